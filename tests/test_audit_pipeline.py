"""Audit of the data-pipeline caches and of large-image crops: staleness and exactness."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import torch
from PIL import Image

from automask.data import SampleCache, SegmentationDataset, validate_frame
from automask.data.cache import file_stamp
from automask.data.crops import random_crop
from automask.models import build_segmenter
from automask.peft import apply_peft
from automask.training.embeddings import EmbeddingCache, input_key

S = 32


def _bmp_pair(folder, name, red):
    """An uncompressed image (its size does not depend on its content) and a mask."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.zeros((24, 40, 3), np.uint8)
    image[..., 0] = red
    mask = np.zeros((24, 40), np.uint8)
    mask[:12] = 1
    Image.fromarray(image).save(folder / f"{name}.bmp")
    Image.fromarray(mask).save(folder / f"{name}_mask.png")
    return folder / f"{name}.bmp", folder / f"{name}_mask.png"


def _replace_keeping_size_and_mtime(target, replacement):
    old = os.stat(target)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(replacement, tmp)
    os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns))  # as cp -p / rsync -t / tar do
    os.replace(tmp, target)
    new = os.stat(target)
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)


def test_file_stamp_tells_apart_replaced_edited_and_same_named_files(tmp_path, monkeypatch):
    """A file replaced or edited with its old size and mtime, or another folder's file of the
    same relative name, gets another stamp."""
    image, _ = _bmp_pair(tmp_path / "a", "img", 10)
    other, _ = _bmp_pair(tmp_path / "b", "img", 200)
    first = file_stamp(image)
    assert file_stamp(image) == first  # stable while nothing changes
    _replace_keeping_size_and_mtime(image, other)
    replaced = file_stamp(image)
    assert replaced != first
    old = os.stat(image)
    with open(image, "r+b") as fh:  # in-place edit, then the old mtime set back
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x01\x02\x03\x04")
    os.utime(image, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert file_stamp(image) != replaced
    shutil.copy2(tmp_path / "b" / "img.bmp", tmp_path / "a" / "img.bmp")
    monkeypatch.chdir(tmp_path / "a")
    in_a = file_stamp("img.bmp")
    monkeypatch.chdir(tmp_path / "b")
    assert file_stamp("img.bmp") != in_a


def test_a_shared_disk_cache_rereads_a_file_replaced_with_its_old_size_and_mtime(
        tmp_path, monkeypatch):
    """Two fits sharing the on-disk sample cache: the second sees the replaced image."""
    image, mask = _bmp_pair(tmp_path / "data", "img", 10)
    other, _ = _bmp_pair(tmp_path / "other", "img", 200)
    frame = pd.DataFrame({"image": [str(image)], "label": [str(mask)]})
    cache_dir = tmp_path / "cache"
    before = SegmentationDataset(validate_frame(frame), S,
                                 cache=SampleCache(0, cache_dir))[0]["image"]
    _replace_keeping_size_and_mtime(image, other)
    cache = SampleCache(0, cache_dir)
    after = SegmentationDataset(validate_frame(frame), S, cache=cache)[0]["image"]
    assert cache.hits_disk == 0 and not torch.equal(after, before)
    fresh = SegmentationDataset(validate_frame(frame), S)[0]["image"]  # no cache at all
    assert torch.equal(after, fresh)


def _decoder_only_model():
    torch.manual_seed(0)
    model = build_segmenter("tiny", input_size=64, checkpoint="random", progress=False)
    apply_peft(model, "decoder_only")
    return model.train()


def test_embedding_cache_is_bypassed_once_the_encoder_trains():
    """An encoder that starts training mid-fit gets its own output, never a kept embedding."""
    model = _decoder_only_model()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    keys = [input_key(x) for x in images]
    cache = EmbeddingCache(64)
    with torch.no_grad():
        cache.features(model, images, keys)
        assert len(cache) == 2
        model.image_encoder.requires_grad_(True)
        for param in model.image_encoder.parameters():
            param.add_(0.05)
        assert torch.equal(cache.features(model, images, keys), model.encode(images))
    assert len(cache) == 0 and cache.used_bytes == 0


def test_embedding_cache_drops_entries_when_frozen_encoder_weights_change():
    """New weights loaded into a still-frozen encoder invalidate the kept embeddings."""
    model = _decoder_only_model()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    keys = [input_key(x) for x in images]
    cache = EmbeddingCache(64)
    with torch.no_grad():
        first = cache.features(model, images, keys)
        state = {k: v + 0.05 for k, v in model.image_encoder.state_dict().items()}
        model.image_encoder.load_state_dict(state)
        assert model.encoder_is_frozen()
        again = cache.features(model, images, keys)
        assert torch.equal(again, model.encode(images)) and not torch.equal(again, first)
        assert cache.hits == 0
        cache.features(model, images, keys)  # unchanged weights: kept entries are used
    assert cache.hits == 2


def test_random_crop_returns_copies_not_views_of_the_cached_image():
    """A crop spanning whole rows of a (cached) native image is a copy, not a view of it."""
    image = np.zeros((40 * S, S - 7, 3), np.uint8)  # very elongated: crops span full rows
    mask = np.zeros(image.shape[:2], np.uint8)
    out_image, out_mask = random_crop(image, mask, S, 1.0, np.random.default_rng(0))
    assert out_image.shape == (S, S - 7, 3)
    assert not np.shares_memory(out_image, image) and not np.shares_memory(out_mask, mask)
    assert out_image.flags.c_contiguous and out_mask.flags.c_contiguous
