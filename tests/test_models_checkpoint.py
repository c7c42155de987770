"""Checkpoint resolution (path, cache, download), verification, safe loading and resizing."""
from __future__ import annotations

import hashlib
import os
import time
from functools import partial

import pytest
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, Sam

from automask.errors import CheckpointError
from automask.models import BACKBONES, build_segmenter, resolve_checkpoint
from automask.models.backbones import build_sam_parts
from automask.models.checkpoint import locate_checkpoint
from automask.peft import apply_peft
from automask.utils import cache_dir

TINY_NAME = "sam_tiny_test.pth"
TINY_CACHED = f"tiny--{TINY_NAME}"  # as the cache names a mirror's file of tiny
_UNSAFE_RAN = []


def _official_state_dict(backbone: str, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict laid out by segment-anything's own ``Sam`` class."""
    torch.manual_seed(seed)
    if backbone == "vit_b":
        sam = sam_model_registry["vit_b"]()
    else:
        sam = Sam(*build_sam_parts(BACKBONES[backbone], size))
    state = sam.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for key, value in state.items():  # position tables start at zero: make them non-trivial
        if "pos" in key and value.is_floating_point():
            value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
    return state


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    path = folder / TINY_NAME
    torch.save(_official_state_dict("tiny", 256), path)
    return path


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached_files():
    folder = cache_dir() / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _assert_weights_equal(model, state):
    ours = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(ours[key], value, atol=0, rtol=0, msg=key)


def test_load_by_path(tiny_file):
    seg = build_segmenter("tiny", input_size=256, checkpoint=tiny_file)
    _assert_weights_equal(seg, torch.load(tiny_file, weights_only=True))
    info = seg.checkpoint_info
    assert info["source"] == "file" and info["path"] == str(tiny_file)
    assert info["sha256"] == _sha(tiny_file)
    assert resolve_checkpoint("tiny", tiny_file) == tiny_file


def test_missing_path():
    with pytest.raises(CheckpointError, match="nope.pth"):
        resolve_checkpoint("vit_b", "nope.pth")


def test_download_then_cache(tiny_file, http_server, monkeypatch):
    base = http_server(tiny_file.parent)
    url = f"{base}/{TINY_NAME}"
    path = resolve_checkpoint("tiny", url=url, sha256=_sha(tiny_file), progress=False)
    assert path == cache_dir() / "checkpoints" / TINY_CACHED
    assert path.read_bytes() == tiny_file.read_bytes()
    # through the builder: the environment names the URL; now the cache answers
    monkeypatch.setenv("AUTOMASK_SAM_URL_TINY", url)
    monkeypatch.setenv("AUTOMASK_SAM_SHA256_TINY", _sha(tiny_file))
    seg = build_segmenter("tiny", input_size=256, progress=False)
    assert seg.checkpoint_info["source"] == "cache"
    assert seg.checkpoint_info["sha256"] == _sha(tiny_file)
    _assert_weights_equal(seg, torch.load(tiny_file, weights_only=True))
    # a killed download's part, hours old: swept on a cache hit too, not only by a download
    from automask.utils.download import STALE_PART_SECONDS, temp_name

    part = temp_name(path)
    part.write_bytes(b"half a checkpoint")
    fresh = temp_name(path)  # another process's download under way: kept
    fresh.write_bytes(b"")
    old = time.time() - STALE_PART_SECONDS - 60
    os.utime(part, (old, old))
    assert build_segmenter("tiny", input_size=256, progress=False).checkpoint_info[
        "source"] == "cache"
    assert not part.exists() and fresh.exists()


def test_download_via_builder(tiny_file, http_server, monkeypatch):
    monkeypatch.setenv("AUTOMASK_SAM_URL_TINY", f"{http_server(tiny_file.parent)}/{TINY_NAME}")
    monkeypatch.setenv("AUTOMASK_SAM_SHA256_TINY", _sha(tiny_file))
    seg = build_segmenter("tiny", input_size=256, progress=False)
    assert seg.checkpoint_info["source"] == "download"
    assert _cached_files() == [TINY_CACHED]


def test_two_backbones_mirrors_with_one_file_name_keep_two_cached_files(tiny_file, tmp_path,
                                                                       http_server):
    """Mirrors often end in the same name (``.../sam-vit-base/.../model.safetensors``,
    ``.../sam-vit-large/.../model.safetensors``): each backbone keeps a cached file of its
    own, so neither download replaces the other's weights."""
    files = {}
    for backbone, body in (("tiny", tiny_file.read_bytes()), ("vit_b", b"other weights")):
        (tmp_path / backbone).mkdir()
        files[backbone] = tmp_path / backbone / "model.safetensors"
        files[backbone].write_bytes(body)
    base = http_server(tmp_path)

    def locate(backbone):
        return locate_checkpoint(backbone, url=f"{base}/{backbone}/model.safetensors",
                                 sha256=_sha(files[backbone]), progress=False)

    first = [locate("tiny"), locate("vit_b")]
    assert [r.source for r in first] == ["download", "download"]
    again = [locate("tiny"), locate("vit_b")]
    assert [r.source for r in again] == ["cache", "cache"]  # nothing downloaded twice
    assert [r.path.read_bytes() for r in again] == [f.read_bytes() for f in files.values()]
    assert _cached_files() == ["tiny--model.safetensors", "vit_b--model.safetensors"]


def test_download_with_wrong_sha_keeps_nothing(tiny_file, http_server):
    url = f"{http_server(tiny_file.parent)}/{TINY_NAME}"
    with pytest.raises(CheckpointError, match="SHA-256"):
        resolve_checkpoint("tiny", url=url, sha256="0" * 64, progress=False)
    assert _cached_files() == []


def test_corrupted_cache_is_refused(tiny_file, monkeypatch):
    target = cache_dir() / "checkpoints" / TINY_CACHED
    target.parent.mkdir(parents=True)
    target.write_bytes(tiny_file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="delete it"):
        resolve_checkpoint("tiny", url=f"http://127.0.0.1:9/{TINY_NAME}", sha256=_sha(tiny_file))


def test_unverified_download_warns(tiny_file, http_server):
    url = f"{http_server(tiny_file.parent)}/{TINY_NAME}"
    with pytest.warns(UserWarning, match="WITHOUT verifying"):
        path = resolve_checkpoint("tiny", url=url, progress=False)
    assert path.is_file()


def test_an_unverified_download_cut_short_is_not_kept(tiny_file, tmp_path, http_server):
    """Without a SHA-256, a download that stopped early (no Content-Length) was kept, and
    every later run failed on the cached file."""
    from safetensors.torch import save_file

    served = tmp_path / "served"
    served.mkdir()
    (served / "cut.pth").write_bytes(tiny_file.read_bytes()[:-2000])
    whole = tmp_path / "whole.safetensors"
    save_file({"image_encoder.x": torch.ones(1000)}, whole)
    (served / "cut.safetensors").write_bytes(whole.read_bytes()[:-100])
    base = http_server(served)
    for name, says in (("cut.pth", "a zip archive cut short"),
                       ("cut.safetensors", "a safetensors file cut short")):
        with pytest.raises(CheckpointError, match=f"{says}.*it was not kept"):
            resolve_checkpoint("tiny", url=f"{base}/{name}", progress=False)
        assert _cached_files() == []


def test_no_weights_names_the_three_ways(monkeypatch):
    # a closed local port stands for "offline"; nothing leaves the machine
    monkeypatch.setenv("AUTOMASK_SAM_URL_VIT_B", "http://127.0.0.1:9/sam_vit_b_01ec64.pth")
    with pytest.raises(CheckpointError) as info:
        build_segmenter("vit_b", input_size=256, progress=False)
    message = str(info.value)
    assert "checkpoint=" in message and "cache" in message and "download" in message
    assert "sam_vit_b_01ec64.pth" in message and "random" in message
    assert _cached_files() == []


def test_tiny_has_no_published_weights():
    with pytest.raises(CheckpointError, match="checkpoint='random'"):
        build_segmenter("tiny")


def test_official_urls_and_pins():
    for name in ("vit_b", "vit_l", "vit_h"):
        spec = BACKBONES[name]
        assert spec.url.startswith("https://dl.fbaipublicfiles.com/segment_anything/sam_")
        assert spec.url.endswith(spec.filename)
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0


def test_truncated_file(tiny_file, tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(tiny_file.read_bytes()[: 5000])
    with pytest.raises(CheckpointError, match="broken.pth"):
        build_segmenter("tiny", input_size=256, checkpoint=broken)


def test_the_format_is_read_from_the_bytes_not_the_name(tiny_file, tmp_path):
    """A safetensors file without its suffix (a hub blob, a renamed download) was read by
    torch.load and refused; a .npy array got torch's advice to load with weights_only=False."""
    from safetensors.torch import save_file

    state = torch.load(tiny_file, weights_only=True)
    blob = tmp_path / "blob"
    save_file({k: v.contiguous() for k, v in state.items()}, blob)
    _assert_weights_equal(build_segmenter("tiny", input_size=256, checkpoint=blob), state)
    renamed = tmp_path / "sam.safetensors"  # a torch file under a safetensors name
    renamed.write_bytes(tiny_file.read_bytes())
    _assert_weights_equal(build_segmenter("tiny", input_size=256, checkpoint=renamed), state)
    array = tmp_path / "weights.npy"
    import numpy as np

    np.save(array, np.ones(3))
    with pytest.raises(CheckpointError, match="it is a numpy .npy array, not a checkpoint") as e:
        build_segmenter("tiny", input_size=256, checkpoint=array)
    assert "weights_only` set to `False`" not in str(e.value)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        build_segmenter("tiny", input_size=256, checkpoint=path)


@pytest.mark.parametrize("wrap", ["model", "state_dict", "ddp", "model._orig_mod.",
                                  "model.module.", "model.module._orig_mod."])
def test_a_training_checkpoint_of_sam_weights_is_unwrapped(tiny_file, tmp_path, wrap):
    """{"model": sd, "epoch": ...} as training scripts save it, DDP's "module." keys, or a
    Lightning module's "model." around DDP or torch.compile's prefixes."""
    state = torch.load(tiny_file, weights_only=True)
    if wrap == "ddp":
        saved = {f"module.{k}": v for k, v in state.items()}
    elif wrap.endswith("."):
        saved = {f"{wrap}{k}": v for k, v in state.items()}
    else:
        saved = {wrap: state, "epoch": 3, "optimizer": {"lr": 1e-4}}
    path = tmp_path / "trained.pth"
    torch.save(saved, path)
    _assert_weights_equal(build_segmenter("tiny", input_size=256, checkpoint=path), state)


def test_a_checkpoint_with_loose_tensors_beside_the_weights_is_not_guessed(tiny_file,
                                                                           tmp_path):
    state = torch.load(tiny_file, weights_only=True)
    path = tmp_path / "mixed.pth"
    torch.save({"model": state, "scale": torch.ones(1)}, path)  # which are the weights?
    with pytest.raises(CheckpointError, match="not a plain state dict.*'model'"):
        build_segmenter("tiny", input_size=256, checkpoint=path)


class _Payload:
    def __reduce__(self):
        return (_UNSAFE_RAN.append, ("pickle code ran",))


def test_pickled_code_is_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": _Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        build_segmenter("tiny", input_size=256, checkpoint=path)
    assert _UNSAFE_RAN == []


def test_key_mismatch_is_an_error(tmp_path):
    state = _official_state_dict("tiny", 256)
    del state["mask_decoder.iou_token.weight"]
    state["image_encoder.extra"] = torch.zeros(1)
    path = tmp_path / "mismatch.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="iou_token"):
        build_segmenter("tiny", input_size=256, checkpoint=path)


def _reference_encoder(spec, size, state):
    """segment-anything's encoder at ``size``; pos_embed resized here, rel-pos tables left
    at their trained length so that segment-anything interpolates them itself."""
    encoder = ImageEncoderViT(
        img_size=size, patch_size=16, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=4, out_chans=spec.prompt_embed_dim,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
        window_size=spec.window_size, global_attn_indexes=spec.global_attn_indexes,
    )
    sub = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    grid = size // 16
    pos = sub.pop("pos_embed").permute(0, 3, 1, 2)
    pos = torch.nn.functional.interpolate(pos, size=(grid, grid), mode="bicubic",
                                          align_corners=False)
    encoder.pos_embed = torch.nn.Parameter(pos.permute(0, 2, 3, 1))
    for i in spec.global_attn_indexes:
        attn = encoder.blocks[i].attn
        attn.rel_pos_h = torch.nn.Parameter(sub.pop(f"blocks.{i}.attn.rel_pos_h"))
        attn.rel_pos_w = torch.nn.Parameter(sub.pop(f"blocks.{i}.attn.rel_pos_w"))
    missing, unexpected = encoder.load_state_dict(sub, strict=False)
    assert not unexpected
    assert set(missing) == {"pos_embed"} | {
        f"blocks.{i}.attn.rel_pos_{a}" for i in spec.global_attn_indexes for a in "hw"}
    return encoder.eval()


def test_other_input_size_resizes_position_tables(tiny_file):
    state = torch.load(tiny_file, weights_only=True)  # made for 256 px
    spec = BACKBONES["tiny"]
    seg = build_segmenter("tiny", input_size=128, checkpoint=tiny_file).eval()
    assert seg.image_encoder.pos_embed.shape == (1, 8, 8, spec.embed_dim)
    glob, win = spec.global_attn_indexes[0], 0
    assert seg.image_encoder.blocks[glob].attn.rel_pos_h.shape[0] == 2 * 8 - 1
    # windowed blocks keep their tables
    torch.testing.assert_close(seg.image_encoder.blocks[win].attn.rel_pos_h,
                               state[f"image_encoder.blocks.{win}.attn.rel_pos_h"])
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(seg.image_encoder(x),
                                   _reference_encoder(spec, 128, state)(x), atol=1e-5, rtol=1e-5)


def test_vit_b_checkpoint_at_256_px(tmp_path):
    """Once with the real vit_b layout: load, resize, then one forward against segment-anything."""
    state = _official_state_dict("vit_b", 1024)
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(state, path)
    seg = build_segmenter("vit_b", input_size=256, checkpoint=path)
    apply_peft(seg, "lora")  # adapters at init must not change the encoder
    seg.eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ours = seg.image_encoder(x)
        reference = _reference_encoder(BACKBONES["vit_b"], 256, state)(x)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_concurrent_resolvers_download_once(tiny_file):
    """Two resolvers missing an empty cache at once (the processes of a distributed fit):
    one downloads, the other waits on the lock and finds the file in the cache."""
    import functools
    import http.server
    import threading

    from automask.models.checkpoint import locate_checkpoint

    gets = []

    class Slow(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            gets.append(self.path)
            threading.Event().wait(0.5)  # a long download: the second resolver arrives now
            super().do_GET()

        def log_message(self, *args):
            pass

    handler = functools.partial(Slow, directory=str(tiny_file.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{TINY_NAME}"
    results = []

    def resolve():
        results.append(locate_checkpoint("tiny", url=url, sha256=_sha(tiny_file),
                                         progress=False))

    try:
        threads = [threading.Thread(target=resolve) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.shutdown()
        server.server_close()
    assert gets == [f"/{TINY_NAME}"]  # one download
    assert sorted(r.source for r in results) == ["cache", "download"]
    assert {r.path for r in results} == {cache_dir() / "checkpoints" / TINY_CACHED}
    assert _cached_files() == [TINY_CACHED]  # the lock file lives elsewhere


@pytest.mark.parametrize("num_classes", [1, 3])
def test_a_model_from_a_file_takes_its_tensors_without_a_random_initialisation(
        tiny_file, num_classes):
    """Built on the meta device and given the file's tensors: torch's global generator is
    not drawn from (a random initialisation would draw from it, and so did the K mask
    tokens before they were copied from token 0), every parameter is a trainable float32
    tensor on the CPU with memory of its own, and the model computes what one initialised
    at random and then loaded computes, binary or with K classes."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = build_segmenter("tiny", num_classes=num_classes, input_size=256,
                            checkpoint=str(tiny_file))
    assert torch.equal(torch.get_rng_state(), before)
    params = list(model.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu"
               for p in params)
    storages = [t.untyped_storage().data_ptr() for t in model.state_dict().values()]
    assert len(set(storages)) == len(storages)
    # the same model the way it was built before: initialised at random, then copied into
    from automask.models.checkpoint import load_sam_weights
    from automask.models.segmenter import SamSegmenter

    reference = SamSegmenter(*build_sam_parts(BACKBONES["tiny"], 256), backbone="tiny",
                             input_size=256)
    load_sam_weights(reference, tiny_file)
    if num_classes == 1:
        _assert_weights_equal(model, torch.load(tiny_file, weights_only=True))
    reference.set_num_classes(num_classes)
    assert list(model.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    model.eval(), reference.eval()
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_file_with_shared_tensors_gives_float32_weights_of_their_own(tmp_path, dtype):
    """A file (float16 or float32) holding one tensor under two keys (tied weights) and
    two views of another: the model's weights are float32 and separate, and training one
    leaves the other as it was."""
    state = {k: v.to(dtype) for k, v in _official_state_dict("tiny", 256).items()}
    tied = ("mask_decoder.transformer.layers.0.norm1.weight",
            "mask_decoder.transformer.layers.0.norm2.weight")
    state[tied[1]] = state[tied[0]]  # one tensor, saved once, read back as one
    a, b = "mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"
    shared = torch.randn(state[a].numel() + state[b].numel()).to(dtype)
    state[a] = shared[:state[a].numel()].view(state[a].shape)
    state[b] = shared[state[a].numel():].view(state[b].shape)
    path = tmp_path / "sam_shared.pth"
    torch.save(state, path)
    expected = {k: v.float().clone() for k, v in state.items()}
    model = build_segmenter("tiny", input_size=256, checkpoint=str(path))
    ours = model.state_dict()
    assert {v.dtype for k, v in ours.items() if v.is_floating_point()} == {torch.float32}
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
    with torch.no_grad():
        model.mask_decoder.transformer.layers[0].norm1.weight.add_(1.0)
        model.mask_decoder.iou_token.weight.add_(1.0)
    assert torch.equal(ours[tied[1]], expected[tied[1]])
    assert torch.equal(ours[b], expected[b])
    storages = [t.untyped_storage().data_ptr() for t in ours.values()]
    assert len(set(storages)) == len(storages)


def test_a_mirror_of_another_name_takes_the_verified_official_copy_in_the_cache(monkeypatch):
    """With a site-wide mirror whose URL names the file otherwise, the official file the
    README says to copy into the cache was ignored: downloaded again, or offline refused."""
    folder = cache_dir() / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    official = folder / "sam_vit_b_01ec64.pth"
    official.write_bytes(b"the official weights, as copied by hand")
    monkeypatch.setenv("AUTOMASK_SAM_URL_VIT_B", "http://127.0.0.1:9/mirror/vit_b.pth")
    monkeypatch.setenv("AUTOMASK_SAM_SHA256_VIT_B", _sha(official))  # no server: offline
    found = locate_checkpoint("vit_b", progress=False)
    assert (found.source, found.path) == ("cache", official)
    official.write_bytes(b"another file under that name")  # not the one expected: not taken
    with pytest.raises(CheckpointError):
        locate_checkpoint("vit_b", progress=False)
