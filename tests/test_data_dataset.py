"""SegmentationDataset, the sample cache and the DataModule."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import automask.data.dataset as dataset_mod
from automask.data import (
    IGNORE_INDEX,
    PIXEL_MEAN,
    PIXEL_STD,
    AugmentConfig,
    SampleCache,
    SegmentationDataModule,
    SegmentationDataset,
    make_predict_loader,
    geometry_for,
    restore,
    validate_frame,
)
from automask.data.datamodule import EpochSampler, default_num_workers
from automask.datasets import make_synthetic
from automask.errors import DataValidationError


@pytest.fixture
def binary_spec(tmp_path):
    df = make_synthetic(12, size=(40, 56), num_classes=2, seed=3, root=tmp_path / "syn")
    return validate_frame(df)


def _count_decodes(monkeypatch):
    calls = []
    real = dataset_mod.read_image
    monkeypatch.setattr(dataset_mod, "read_image", lambda p, **kw: calls.append(p) or real(p, **kw))
    return calls


def test_item_layout_and_values(binary_spec):
    ds = SegmentationDataset(binary_spec, input_size=64)
    item = ds[5]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["target"].shape == (64, 64) and item["target"].dtype == torch.int64
    assert item["original_size"].tolist() == [40, 56] and item["resized_size"].tolist() == [46, 64]
    assert item["index"].dtype == torch.int64 and int(item["index"]) == 5
    # padding: zero image, ignore target
    assert (item["image"][:, 46:] == 0).all() and (item["target"][46:] == IGNORE_INDEX).all()
    assert set(item["target"][:46].unique().tolist()) <= {0, 1}
    # un-normalising gives back uint8 pixel values of the resized image
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    pixels = item["image"][:, :46] * std + mean
    assert torch.allclose(pixels, pixels.round(), atol=1e-3) and pixels.min() >= -1e-3
    # the target maps back to the original mask exactly
    with Image.open(binary_spec.frame["label"].iloc[5]) as pil:
        raw = np.asarray(pil) // 255
    geo = geometry_for((40, 56), 64)
    np.testing.assert_array_equal(restore(item["target"], geo, mode="nearest").numpy(), raw)


def test_cache_avoids_second_decode(binary_spec, monkeypatch):
    calls = _count_decodes(monkeypatch)
    cache = SampleCache(memory_mb=64)
    ds = SegmentationDataset(binary_spec, 64, augment=AugmentConfig(), cache=cache)
    first = [ds[(i, 0)] for i in range(len(ds))]
    assert len(calls) == len(ds)
    second = [ds[(i, 1)] for i in range(len(ds))]
    assert len(calls) == len(ds), "epoch 2 decoded again"
    assert cache.hits_memory == len(ds)
    third = [ds[(i, 0)] for i in range(len(ds))]
    for a, b in zip(first, third):  # same (position, epoch): same augmented sample
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["target"], b["target"])
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, second))


def test_disk_cache_when_memory_budget_is_spent(binary_spec, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    cache_dir = tmp_path / "cache"
    ds = SegmentationDataset(binary_spec, 64, cache=SampleCache(memory_mb=0, directory=cache_dir))
    cold = [ds[i] for i in range(len(ds))]
    assert len(calls) == len(ds)
    assert len(list(cache_dir.glob("*.image.npy"))) == len(ds)
    # a fresh dataset and cache object (e.g. another process) reads the files
    cache = SampleCache(memory_mb=0, directory=cache_dir)
    ds2 = SegmentationDataset(binary_spec, 64, cache=cache)
    warm = [ds2[i] for i in range(len(ds2))]
    assert len(calls) == len(ds) and cache.hits_disk == len(ds)
    for a, b in zip(cold, warm):
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["target"], b["target"])


def test_cache_memory_budget_respected():
    cache = SampleCache(memory_mb=1 / 1024)  # 1 KiB
    small = np.zeros((10, 10, 3), np.uint8)
    cache.put("a", small, None)
    cache.put("b", np.zeros((30, 30, 3), np.uint8), None)  # does not fit, no directory
    assert cache.get("a") is not None and cache.get("b") is None
    assert cache.used_bytes == small.nbytes


def test_cache_key_depends_on_input_size(binary_spec, monkeypatch):
    calls = _count_decodes(monkeypatch)
    cache = SampleCache(64)
    SegmentationDataset(binary_spec, 64, cache=cache)[0]
    item = SegmentationDataset(binary_spec, 32, cache=cache)[0]
    assert len(calls) == 2 and item["image"].shape == (3, 32, 32)


def test_epoch_sampler_deterministic_and_reshuffles():
    a, b = EpochSampler(10, seed=1), EpochSampler(10, seed=1)
    first = list(a)
    assert first == list(b) and sorted(p for p, _ in first) == list(range(10))
    assert {e for _, e in first} == {0}
    second = list(a)
    assert {e for _, e in second} == {1} and [p for p, _ in second] != [p for p, _ in first]
    a.set_epoch(0)
    assert list(a) == first


def test_datamodule_split_and_loaders(binary_spec):
    dm = SegmentationDataModule(binary_spec, input_size=32, batch_size=4, holdout_frac=0.25,
                                seed=0, augment=AugmentConfig(), num_workers=0)
    dm.setup("fit")
    train_idx, val_idx = set(dm.train_spec.frame.index), set(dm.val_spec.frame.index)
    assert len(val_idx) == 3 and len(train_idx) == 9 and not train_idx & val_idx
    loader = dm.train_dataloader()
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [4, 4, 1] and not loader.drop_last
    seen = sorted(i for b in batches for i in b["index"].tolist())
    assert seen == list(range(9))  # 9 rows, batch 4: every sample once, the last batch smaller
    assert batches[0]["image"].shape == (4, 3, 32, 32) and batches[0]["target"].shape == (4, 32, 32)
    val = list(dm.val_dataloader())
    # 40 x 56 images at input 32 (56 > 1.25 x 32) are validated on their 2 x 2 window grid
    indices = [i for b in val for i in b["index"].tolist()]
    assert len(set(indices)) == 3 and len(indices) == 3 * 4
    # the same seed gives the same split and the same first batch
    dm2 = SegmentationDataModule(binary_spec, input_size=32, batch_size=4, holdout_frac=0.25,
                                 seed=0, augment=AugmentConfig(), num_workers=0)
    dm2.setup("fit")
    assert set(dm2.val_spec.frame.index) == val_idx
    torch.testing.assert_close(next(iter(dm2.train_dataloader()))["image"], batches[0]["image"])


def test_small_training_set_keeps_partial_batch(binary_spec):
    dm = SegmentationDataModule(binary_spec.subset([0, 1, 2]), input_size=16, batch_size=8,
                                tuning_spec=binary_spec.subset([3]), num_workers=0)
    loader = dm.train_dataloader()
    assert not loader.drop_last and len(list(loader)) == 1
    assert dm.val_spec.frame.index.tolist() == [3]


def test_holdout_stratified_on_foreground(tmp_path):
    # 10 near-empty masks and 10 mostly-foreground masks: each split gets both kinds.
    pairs = []
    for i in range(20):
        m = np.zeros((8, 8), np.uint8)
        if i % 2:
            m[:7] = 255
        else:
            m[0, 0] = 255
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
        Image.fromarray(m).save(tmp_path / f"{i}_m.png")
        pairs.append((str(tmp_path / f"{i}.png"), str(tmp_path / f"{i}_m.png")))
    spec = validate_frame(pd.DataFrame(pairs, columns=["image", "label"]))
    for seed in range(5):
        dm = SegmentationDataModule(spec, input_size=8, batch_size=2, holdout_frac=0.2, seed=seed,
                                    num_workers=0)
        dm.setup("fit")
        fg = dm.val_spec.stats["foreground"]
        assert (fg > 0.5).sum() == 2 and (fg < 0.5).sum() == 2


def test_predict_loader_streams_in_order(binary_spec):
    spec = validate_frame(binary_spec.frame, require_labels=False)
    loader = make_predict_loader(spec, input_size=32, batch_size=5, num_workers=0)
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [5, 5, 2]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(12))
    assert "target" not in batches[0]
    dm = SegmentationDataModule(binary_spec, input_size=32, batch_size=4, num_workers=0)
    b = next(iter(dm.predict_dataloader_for(binary_spec, batch_size=3)))
    assert b["target"].shape == (3, 32, 32)


def test_workers_give_same_batches_as_in_process(binary_spec):
    kwargs = dict(input_size=32, batch_size=4, seed=1, augment=AugmentConfig(rotate_degrees=10))
    a = SegmentationDataModule(binary_spec, num_workers=0, **kwargs)
    b = SegmentationDataModule(binary_spec, num_workers=2, **kwargs)
    for batch_a, batch_b in zip(a.train_dataloader(), b.train_dataloader()):
        torch.testing.assert_close(batch_a["image"], batch_b["image"])
        torch.testing.assert_close(batch_a["target"], batch_b["target"])


def test_default_num_workers_is_sane():
    n = default_num_workers()
    assert 0 <= n <= 4


def test_lightning_trainer_drives_epochs(binary_spec, tmp_path):
    """Trainer.fit uses the loaders and advances the sampler epoch (new augmentation)."""
    import lightning as L

    seen: dict[int, list] = {}

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 1)

        def training_step(self, batch, _):
            seen.setdefault(self.current_epoch, []).append(
                (batch["index"].tolist(), float(batch["image"].sum()))
            )
            logits = self.conv(batch["image"])[:, 0]
            valid = batch["target"] != IGNORE_INDEX
            return torch.nn.functional.binary_cross_entropy_with_logits(
                logits[valid], batch["target"][valid].float()
            )

        def validation_step(self, batch, _):
            assert "target" in batch

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = SegmentationDataModule(binary_spec, input_size=32, batch_size=4, seed=0,
                                augment=AugmentConfig(scale_range=(0.8, 1.2)), num_workers=0,
                                cache_dir=tmp_path / "cache")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(Tiny(), datamodule=dm)
    assert set(seen) == {0, 1}
    order0 = [i for idx, _ in seen[0] for i in idx]
    order1 = [i for idx, _ in seen[1] for i in idx]
    assert order0 != order1  # reshuffled per epoch
    assert dm.cache.hits_memory > 0  # epoch 2 served from the cache


def test_an_image_replaced_after_the_checks_is_named_with_what_changed(tmp_path):
    """A file replaced by one of another size after validation: the message named the
    index as ``np.int64(1)`` and a "DataSpec", a word a user never meets."""
    frame = make_synthetic(2, size=48, num_classes=2, seed=0, root=tmp_path / "data")
    spec = validate_frame(frame)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(frame["image"][1])
    ds = SegmentationDataset(spec, 32)
    with pytest.raises(DataValidationError, match=r"^row 1 .*00001\.png: the image is 30x40 "
                       r"\(H x W\) now but was 48x48 when the data was checked"):
        ds[1]


@pytest.mark.parametrize("column", ["image", "label"])
def test_a_file_deleted_after_the_checks_is_named_with_its_row(tmp_path, column):
    """A bare FileNotFoundError (in a worker: torch's "Caught FileNotFoundError in
    DataLoader worker process 0") gave no row and no reason."""
    frame = make_synthetic(3, size=48, num_classes=2, seed=0, root=tmp_path / "data")
    spec = validate_frame(frame)
    Path(frame[column][2]).unlink()
    ds = SegmentationDataset(spec, 32)
    with pytest.raises(DataValidationError, match=r"^row 2 .*00002\.png: the file is gone "
                                                  r"since the data was checked"):
        ds[2]
