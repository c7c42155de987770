"""Loading models and weights under bad input and faults: checkpoints by path, from the
cache and by download; files of the wrong model or no model at all; safe, device-free
reading; SAM 2.1 configurations and input sizes.

Pretrained weights cannot be downloaded here: every checkpoint is a state dict in the
official segment-anything / SAM 2.1 layout with random values, served from 127.0.0.1.
Each test names the promise it guards; the SAM 2.1 tests skip without the ``sam2`` extra
(and fail without it under ``AUTOMASK_REQUIRE_SAM2=1``, as in CI).
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import importlib
import inspect
import os
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

from automask.errors import CheckpointError, ConfigError
from automask.models import build_segmenter
from automask.models.checkpoint import checkpoint_cache_dir, locate_checkpoint

SIZE = 64
NAME = "sam_audit.pth"
CACHED = f"tiny--{NAME}"  # a mirror's file of the tiny backbone, as the cache names it
_RAN = []


def _need_sam2():
    if os.environ.get("AUTOMASK_REQUIRE_SAM2") == "1":
        return importlib.import_module("sam2")
    return pytest.importorskip("sam2", reason="needs the sam2 extra")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _random_state(backbone: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """``backbone``'s state dict with non-trivial random values (automask's key names)."""
    torch.manual_seed(seed)
    state = build_segmenter(backbone, input_size=SIZE, checkpoint="random").state_dict()
    gen = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=gen).to(v.dtype) * 0.02
            if v.is_floating_point() else v for k, v in state.items()}


def _sam2_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` in SAM2Base's key names, video-only tensors included, as SAM 2.1 ships."""
    out = {}
    for key, value in state.items():
        for ours, theirs in (("prompt_encoder.", "sam_prompt_encoder."),
                             ("mask_decoder.", "sam_mask_decoder.")):
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        out[key] = value
    out["maskmem_tpos_enc"] = torch.randn(7, 1, 1, 64)
    out["memory_attention.layers.0.linear1.weight"] = torch.randn(8, 32)
    out["no_obj_embed_spatial"] = torch.randn(1, 64)
    return out


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("served") / NAME
    torch.save(_random_state("tiny"), path)
    return path


def _cached() -> list[str]:
    folder = checkpoint_cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _same_weights(model, state) -> None:
    ours = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(ours[key], value.to(ours[key].dtype), atol=0, rtol=0,
                                   msg=key)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers by path: /ok/<name> the file, /status/<code>, /redirect/<name> (302 to
    /ok/<name>), /short/<name> (half the bytes, then the connection closes), /html."""

    body = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        kind = self.path.split("/")[1]
        if kind == "status":
            self.send_error(int(self.path.split("/")[2]))
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", "/ok/" + self.path.split("/")[2])
            self.end_headers()
        elif kind == "html":
            page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            if kind == "short":
                self.wfile.write(self.body[: len(self.body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            else:
                self.wfile.write(self.body)


@pytest.fixture
def server(tiny_file):
    handler = type("H", (_Handler,), {"body": tiny_file.read_bytes()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------ cache and download
def test_a_corrupt_cached_checkpoint_is_downloaded_again(tiny_file, server):
    """A truncated file in the cache whose URL and SHA-256 are known is replaced by a
    fresh, verified download (with a warning), not refused."""
    cached = checkpoint_cache_dir() / CACHED
    cached.parent.mkdir(parents=True)
    cached.write_bytes(tiny_file.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="downloading .* again"):
        found = locate_checkpoint("tiny", url=f"{server}/ok/{NAME}", sha256=_sha(tiny_file),
                                  progress=False)
    assert found.source == "download" and found.path == cached
    assert cached.read_bytes() == tiny_file.read_bytes() and _cached() == [CACHED]


def test_a_corrupt_cached_checkpoint_offline_is_named_and_kept(tiny_file):
    """Offline, the error names the cached file, its SHA-256, the expected one and the way
    out; the file is left as it was."""
    cached = checkpoint_cache_dir() / CACHED
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the weights")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as info:
        locate_checkpoint("tiny", url=f"http://127.0.0.1:9/{NAME}", sha256=_sha(tiny_file),
                          progress=False)
    message = str(info.value)
    assert str(cached) in message and _sha(tiny_file) in message and _sha(cached) in message
    assert "delete it" in message and "(1) pass" in message and "Connection refused" in message
    assert cached.read_bytes() == b"not the weights" and _cached() == [CACHED]


@pytest.mark.parametrize("code", [404, 500])
def test_http_errors_are_named_and_leave_nothing(server, code):
    url = f"{server}/status/{code}"
    with pytest.raises(CheckpointError, match=f"HTTP Error {code}.*three ways") as info:
        locate_checkpoint("tiny", url=url, sha256="0" * 64, progress=False)
    assert url in str(info.value)
    assert _cached() == []


def test_a_redirect_is_followed_and_cached_under_the_requested_name(tiny_file, server):
    found = locate_checkpoint("tiny", url=f"{server}/redirect/{NAME}",
                              sha256=_sha(tiny_file), progress=False)
    assert found.path == checkpoint_cache_dir() / CACHED and found.source == "download"
    assert found.path.read_bytes() == tiny_file.read_bytes()


def test_a_body_shorter_than_its_content_length_leaves_nothing(tiny_file, server):
    with pytest.raises(CheckpointError, match="(ended after|broke off after)") as info:
        locate_checkpoint("tiny", url=f"{server}/short/{NAME}", sha256=_sha(tiny_file),
                          progress=False)
    assert "not kept" in str(info.value)
    assert _cached() == []  # no final file, no .part file


def test_an_interrupted_download_leaves_nothing_under_the_final_name(tiny_file, server,
                                                                     monkeypatch):
    """Ctrl-C in the middle of a download: neither the file nor a temporary is left, and
    the next run downloads it whole."""
    real = urllib.request.urlopen

    def interrupted(*args, **kwargs):
        response = real(*args, **kwargs)
        reads = []

        def read(amount=-1):
            reads.append(amount)
            if len(reads) > 1:
                raise KeyboardInterrupt
            return response.fp.read(1000)

        response.read = read
        return response

    monkeypatch.setattr(urllib.request, "urlopen", interrupted)
    with pytest.raises(KeyboardInterrupt):
        locate_checkpoint("tiny", url=f"{server}/ok/{NAME}", sha256=_sha(tiny_file),
                          progress=False)
    assert _cached() == []
    monkeypatch.setattr(urllib.request, "urlopen", real)
    found = locate_checkpoint("tiny", url=f"{server}/ok/{NAME}", sha256=_sha(tiny_file),
                              progress=False)
    assert found.path.read_bytes() == tiny_file.read_bytes()


def test_a_web_page_instead_of_the_file_is_named(server):
    """A login or error page answered with status 200: with a pinned SHA-256 the mismatch
    says a web page came; without one the page is not kept as a checkpoint."""
    with pytest.raises(CheckpointError, match="SHA-256 mismatch.*text/html.*web page"):
        locate_checkpoint("tiny", url=f"{server}/html", sha256="0" * 64, progress=False)
    assert _cached() == []
    with pytest.raises(CheckpointError, match="HTML.*not kept"):
        locate_checkpoint("tiny", url=f"{server}/html", progress=False)
    assert _cached() == []


# ------------------------------------------------------------ what is passed as checkpoint
@pytest.mark.parametrize("value, words", [
    ("", "empty string"),
    ("https://example.com/sam_vit_b_01ec64.pth", "is a URL.*AUTOMASK_SAM_URL_TINY"),
    (3, "must be a file path"),
])
def test_a_checkpoint_argument_that_is_no_path_is_refused(value, words):
    with pytest.raises(CheckpointError, match=words):
        build_segmenter("tiny", input_size=SIZE, checkpoint=value)


def test_a_folder_given_as_checkpoint_lists_the_files_in_it(tiny_file, tmp_path):
    with pytest.raises(CheckpointError, match=f"is a folder.*{NAME}"):
        build_segmenter("tiny", input_size=SIZE, checkpoint=tiny_file.parent)
    # a transformers folder of another model, or without its weights, is a folder too
    (tmp_path / "config.json").write_text('{"model_type": "sam2"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a folder.*model.safetensors"):
        build_segmenter("tiny", input_size=SIZE, checkpoint=tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "sam"}')
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="is a folder"):
        build_segmenter("tiny", input_size=SIZE, checkpoint=tmp_path)


# ------------------------------------------------------------ files that are no checkpoint
@pytest.mark.parametrize("backbone", ["tiny", "sam2_tiny"])
@pytest.mark.parametrize("content, words", [
    (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>",
     "HTML.*404 Not Found.*in place of the weights"),
    (b"", "empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 375042383\n",
     "Git LFS pointer"),
])
def test_a_file_that_is_no_checkpoint_is_named_with_what_it_is(tmp_path, backbone, content,
                                                                words):
    if backbone == "sam2_tiny":
        _need_sam2()
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=words) as info:
        build_segmenter(backbone, input_size=SIZE, checkpoint=path)
    assert str(path) in str(info.value) and "weights_only` set to `False" not in str(info.value)


def test_a_truncated_file_is_named_truncated(tiny_file, tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated or damaged"):
        build_segmenter("tiny", input_size=SIZE, checkpoint=path)


def test_a_training_checkpoint_with_python_objects_is_refused_safely(tiny_file, tmp_path):
    """weights_only refuses argparse.Namespace: the error names it and how to extract the
    weights, instead of advising weights_only=False."""
    path = tmp_path / "trained.pth"
    torch.save({"model": torch.load(tiny_file, weights_only=True),
                "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError, match=r"trained.pth.*argparse\.Namespace") as info:
        build_segmenter("tiny", input_size=SIZE, checkpoint=path)
    assert "weights_only=True" in str(info.value) and "set to `False`" not in str(info.value)


class _Payload:
    def __reduce__(self):
        return (_RAN.append, ("code from the file ran",))


def test_a_sam2_file_is_read_without_running_its_code(tmp_path):
    _need_sam2()
    path = tmp_path / "evil.pt"
    torch.save({"model": {"no_mem_embed": _Payload()}}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        build_segmenter("sam2_tiny", input_size=SIZE, checkpoint=path)
    assert _RAN == []


# ------------------------------------------------------------ checkpoints of another model
@pytest.mark.parametrize("part, words", [
    ("mask_decoder", "no image encoder.*all 65 of image_encoder.*all 17 of prompt_encoder"),
    ("image_encoder", "all 17 of prompt_encoder.*all 120 of mask_decoder"),
    # the encoder's blocks without its patch embedding: incomplete, not absent
    ("image_encoder.blocks", "image encoder is incomplete: it has no patch embedding"),
])
def test_a_partial_state_dict_is_summarised_not_loaded(tmp_path, part, words):
    state = _random_state("tiny")
    path = tmp_path / f"{part}.pth"
    torch.save({k: v for k, v in state.items() if k.startswith(part)}, path)
    with pytest.raises(CheckpointError, match=words) as info:
        build_segmenter("tiny", input_size=SIZE, checkpoint=path)
    message = str(info.value)
    assert str(path) in message and "nothing was loaded" in message and len(message) < 800


def test_another_vit_s_checkpoint_names_it_and_the_mismatched_shapes(tmp_path):
    """vit_b weights for the tiny ViT: the size, the extra blocks and shapes are named."""
    path = tmp_path / "sam_vit_b.pth"
    torch.save(build_segmenter("vit_b", input_size=SIZE, checkpoint="random").state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        build_segmenter("tiny", input_size=SIZE, checkpoint=path)
    message = str(info.value)
    assert "looks like a 'vit_b' checkpoint: width 768, 12 blocks" in message
    assert "image_encoder.blocks.4-11.*" in message  # the blocks tiny lacks
    assert "image_encoder.patch_embed.proj.weight: file (768, 3, 16, 16), backbone (96, 3, 16, " \
           "16)" in message
    assert "Missing key" not in message and len(message) < 1500


def test_a_sam2_checkpoint_for_a_sam1_backbone_is_named(tmp_path):
    _need_sam2()
    path = tmp_path / "sam2_tiny.pt"
    torch.save({"model": _sam2_official(_random_state("sam2_tiny"))}, path)
    with pytest.raises(CheckpointError) as info:
        build_segmenter("tiny", input_size=SIZE, checkpoint=path)
    message = str(info.value)
    assert "SAM 2.1 (Hiera) checkpoint of 'sam2_tiny'" in message
    assert "model.backbone='sam2_tiny'" in message and len(message) < 600


def test_a_sam1_checkpoint_for_a_sam2_backbone_names_which(tiny_file):
    _need_sam2()
    with pytest.raises(CheckpointError, match="SAM 1 .*checkpoint of 'tiny'"):
        build_segmenter("sam2_tiny", input_size=SIZE, checkpoint=tiny_file)


def test_another_sam2_size_is_named(tmp_path):
    _need_sam2()
    path = tmp_path / "sam2.1_hiera_small.pt"
    torch.save({"model": _sam2_official(
        build_segmenter("sam2.1_hiera_s", input_size=SIZE, checkpoint="random").state_dict())},
        path)
    with pytest.raises(CheckpointError) as info:
        build_segmenter("sam2.1_hiera_t", input_size=SIZE, checkpoint=path)
    message = str(info.value)
    assert "looks like a 'sam2.1_hiera_s' checkpoint: Hiera width 96, 16 blocks" in message
    assert "image_encoder.trunk.blocks.12-15.*" in message and len(message) < 1500


def test_a_sam2_key_the_image_model_lacks_is_an_error_not_dropped(tmp_path):
    """Only SAM 2's video-only tensors are dropped; another unknown tensor is reported (a
    file of some other model must not half-load)."""
    _need_sam2()
    state = _sam2_official(_random_state("sam2_tiny"))
    state["segmentation_head.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="not in the backbone.*segmentation_head"):
        build_segmenter("sam2_tiny", input_size=SIZE, checkpoint=path)


def test_a_sam2_decoder_only_file_is_summarised(tmp_path):
    _need_sam2()
    state = _sam2_official(_random_state("sam2_tiny"))
    path = tmp_path / "decoder.pt"
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("sam_mask_decoder")}},
               path)
    with pytest.raises(CheckpointError, match="no image encoder.*missing.*no_mem_embed; all 78 "
                                              "of image_encoder") as info:
        build_segmenter("sam2_tiny", input_size=SIZE, checkpoint=path)
    assert "Missing key" not in str(info.value)


# ------------------------------------------------------------ wrapped checkpoints
_WRAPS = {
    "lightning": lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()},
                             "epoch": 3},
    "compiled": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    "ddp+compiled": lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
    "deepspeed": lambda sd: {"module": sd, "global_steps": 10},
    "model_state_dict": lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}},
}


@pytest.mark.parametrize("wrap", sorted(_WRAPS))
@pytest.mark.parametrize("backbone", ["tiny", "sam2_tiny"])
def test_training_checkpoints_of_other_tools_are_unwrapped(tmp_path, backbone, wrap):
    if backbone == "sam2_tiny":
        _need_sam2()
    state = _random_state(backbone)
    saved = _sam2_official(state) if backbone == "sam2_tiny" else state
    path = tmp_path / "trained.pth"
    torch.save(_WRAPS[wrap](saved), path)
    _same_weights(build_segmenter(backbone, input_size=SIZE, checkpoint=path), state)


# ------------------------------------------------------------ devices and dtypes
def _save_as_if_from_cuda(state, path: Path) -> None:
    """torch.save with every storage tagged "cuda:0", as a GPU training run writes it."""
    import torch.serialization as serialization

    real = serialization.location_tag
    serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(state, path)
    finally:
        serialization.location_tag = real


@pytest.mark.parametrize("backbone", ["tiny", "sam2_tiny"])
def test_a_checkpoint_saved_from_cuda_loads_on_the_cpu(tmp_path, backbone):
    if backbone == "sam2_tiny":
        _need_sam2()
    state = _random_state(backbone)
    path = tmp_path / "gpu.pth"
    _save_as_if_from_cuda({"model": _sam2_official(state)} if backbone == "sam2_tiny"
                          else state, path)
    if not torch.cuda.is_available():  # the file really asks for a GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    model = build_segmenter(backbone, input_size=SIZE, checkpoint=path)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    _same_weights(model, state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backbone", ["tiny", "sam2_tiny"])
def test_a_half_precision_checkpoint_loads_into_a_float32_model(tmp_path, backbone, dtype):
    if backbone == "sam2_tiny":
        _need_sam2()
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in _random_state(backbone).items()}
    path = tmp_path / "half.pth"
    torch.save({"model": _sam2_official(state)} if backbone == "sam2_tiny" else state, path)
    model = build_segmenter(backbone, input_size=128, checkpoint=path)  # tables resized too
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ours = model.state_dict()
    for key, value in state.items():
        if ours[key].shape == value.shape:
            torch.testing.assert_close(ours[key], value.float(), atol=0, rtol=0, msg=key)


# ------------------------------------------------------------ SAM 2.1 specifics
@pytest.mark.parametrize("backbone", ["sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+",
                                      "sam2.1_hiera_l"])
def test_sam2_specs_match_the_packages_configs(backbone):
    """Each spec has the numbers of sam2's configs/sam2.1/<name>.yaml (Hiera's defaults
    where the config sets none), and its official file name and URL."""
    sam2 = _need_sam2()
    import yaml
    from sam2.modeling.backbones.hieradet import Hiera

    from automask.models.sam2 import SAM2_BACKBONES

    spec = SAM2_BACKBONES[backbone]
    config = Path(sam2.__file__).parent / "configs" / "sam2.1" / f"{backbone}.yaml"
    model = yaml.safe_load(config.read_text())["model"]
    trunk, neck = model["image_encoder"]["trunk"], model["image_encoder"]["neck"]
    defaults = {k: p.default for k, p in inspect.signature(Hiera).parameters.items()}

    def value(key):
        return tuple(trunk[key]) if isinstance(trunk.get(key), list) else trunk.get(
            key, defaults[key])

    assert spec.embed_dim == value("embed_dim") and spec.num_heads == value("num_heads")
    assert tuple(spec.stages) == tuple(value("stages"))
    assert tuple(spec.global_att_blocks) == tuple(value("global_att_blocks"))
    assert tuple(spec.window_spec) == tuple(value("window_spec"))
    assert tuple(spec.window_pos_embed_bkg_spatial_size) == tuple(
        value("window_pos_embed_bkg_spatial_size"))
    assert spec.channel_list == neck["backbone_channel_list"] and spec.d_model == neck["d_model"]
    assert model["image_size"] == spec.pretrain_size == 1024
    size = backbone.split("_")[-1]
    official = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}[size]
    assert spec.filename == f"sam2.1_hiera_{official}.pt" and spec.url.endswith(spec.filename)


@pytest.mark.parametrize("size", [32, 96, 160])
def test_sam2_every_multiple_of_32_runs(size):
    """The docstring's promise: any multiple of Hiera's stride 32, not only 1024."""
    _need_sam2()
    model = build_segmenter("sam2.1_hiera_t", input_size=size, checkpoint="random").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 1, size, size)


@pytest.mark.parametrize("size, near", [(48, "32 or 64"), (100, "96 or 128"), (16, "32")])
def test_sam2_other_sizes_name_the_nearest_valid_ones(size, near):
    _need_sam2()
    with pytest.raises(ConfigError, match=f"multiple of 32.*got {size} \\(nearest: {near}\\)"):
        build_segmenter("sam2_tiny", input_size=size, checkpoint="random")


def test_sam2_safetensors_and_sha256_by_path(tmp_path):
    """A .safetensors file in the official key names loads; a sha256 given with the path
    is checked before anything is read."""
    _need_sam2()
    from safetensors.torch import save_file

    state = _random_state("sam2_tiny")
    path = tmp_path / "sam2_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in _sam2_official(state).items()}, str(path))
    _same_weights(build_segmenter("sam2_tiny", input_size=SIZE, checkpoint=path), state)
    with pytest.raises(CheckpointError, match="expected 0{64}"):
        build_segmenter("sam2_tiny", input_size=SIZE, checkpoint=path, sha256="0" * 64)


def test_a_failed_load_never_leaves_random_weights_behind(tmp_path, tiny_file):
    """Asking for pretrained weights that do not fit never yields a model: the builder and
    the predictor both raise (no partially loaded model, no random fallback)."""
    from automask.models.checkpoint import load_sam_weights

    model = build_segmenter("tiny", input_size=SIZE, checkpoint="random")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.load(tiny_file, weights_only=True)
    state.pop("mask_decoder.iou_token.weight")
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="iou_token"):
        load_sam_weights(model, path)
    for key, value in model.state_dict().items():  # nothing was copied in
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


# ------------------------------------------------------------ Hugging Face transformers' files
# Names in transformers' SamModel (5.25: SamModel(SamConfig()).state_dict(), SAM vit_b) and
# the official segment-anything names of the same tensors.
_HF_NAMES = {
    "vision_encoder.pos_embed": "image_encoder.pos_embed",
    "vision_encoder.patch_embed.projection.weight": "image_encoder.patch_embed.proj.weight",
    "vision_encoder.layers.0.layer_norm1.weight": "image_encoder.blocks.0.norm1.weight",
    "vision_encoder.layers.1.attn.qkv.weight": "image_encoder.blocks.1.attn.qkv.weight",
    "vision_encoder.layers.1.attn.rel_pos_w": "image_encoder.blocks.1.attn.rel_pos_w",
    "vision_encoder.layers.0.layer_norm2.bias": "image_encoder.blocks.0.norm2.bias",
    "vision_encoder.layers.1.mlp.lin2.bias": "image_encoder.blocks.1.mlp.lin2.bias",
    "vision_encoder.neck.conv1.weight": "image_encoder.neck.0.weight",
    "vision_encoder.neck.layer_norm1.bias": "image_encoder.neck.1.bias",
    "vision_encoder.neck.conv2.weight": "image_encoder.neck.2.weight",
    "vision_encoder.neck.layer_norm2.weight": "image_encoder.neck.3.weight",
    "prompt_encoder.shared_embedding.positional_embedding":
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "prompt_encoder.mask_embed.conv1.bias": "prompt_encoder.mask_downscaling.0.bias",
    "prompt_encoder.mask_embed.layer_norm1.weight": "prompt_encoder.mask_downscaling.1.weight",
    "prompt_encoder.mask_embed.conv2.weight": "prompt_encoder.mask_downscaling.3.weight",
    "prompt_encoder.mask_embed.layer_norm2.bias": "prompt_encoder.mask_downscaling.4.bias",
    "prompt_encoder.mask_embed.conv3.weight": "prompt_encoder.mask_downscaling.6.weight",
    "prompt_encoder.point_embed.3.weight": "prompt_encoder.point_embeddings.3.weight",
    "prompt_encoder.not_a_point_embed.weight": "prompt_encoder.not_a_point_embed.weight",
    "mask_decoder.mask_tokens.weight": "mask_decoder.mask_tokens.weight",
    "mask_decoder.transformer.layers.1.self_attn.q_proj.weight":
        "mask_decoder.transformer.layers.1.self_attn.q_proj.weight",
    "mask_decoder.transformer.layers.0.layer_norm4.bias":
        "mask_decoder.transformer.layers.0.norm4.bias",
    "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.bias":
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.bias",
    "mask_decoder.transformer.layer_norm_final_attn.weight":
        "mask_decoder.transformer.norm_final_attn.weight",
    "mask_decoder.upscale_conv1.weight": "mask_decoder.output_upscaling.0.weight",
    "mask_decoder.upscale_layer_norm.bias": "mask_decoder.output_upscaling.1.bias",
    "mask_decoder.upscale_conv2.bias": "mask_decoder.output_upscaling.3.bias",
    "mask_decoder.output_hypernetworks_mlps.2.proj_in.weight":
        "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight",
    "mask_decoder.output_hypernetworks_mlps.2.layers.0.bias":
        "mask_decoder.output_hypernetworks_mlps.2.layers.1.bias",
    "mask_decoder.output_hypernetworks_mlps.0.proj_out.weight":
        "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight",
    "mask_decoder.iou_prediction_head.proj_in.bias":
        "mask_decoder.iou_prediction_head.layers.0.bias",
    "mask_decoder.iou_prediction_head.layers.0.weight":
        "mask_decoder.iou_prediction_head.layers.1.weight",
    "mask_decoder.iou_prediction_head.proj_out.bias":
        "mask_decoder.iou_prediction_head.layers.2.bias",
}


def _as_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (official names) under transformers' SamModel names, as its conversion
    script renames them; the positional matrix under its tied name only, as
    ``save_pretrained`` writes it."""
    import re

    renames = [  # official -> transformers, each applied where it matches
        (r"^image_encoder\.", "vision_encoder."),
        (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
        (r"\.blocks\.", ".layers."), (r"\.norm(\d)\.", r".layer_norm\1."),
        (r"\.norm_final_attn\.", ".layer_norm_final_attn."),
        (r"neck\.0\.", "neck.conv1."), (r"neck\.1\.", "neck.layer_norm1."),
        (r"neck\.2\.", "neck.conv2."), (r"neck\.3\.", "neck.layer_norm2."),
        (r"mask_downscaling\.0\.", "mask_embed.conv1."),
        (r"mask_downscaling\.1\.", "mask_embed.layer_norm1."),
        (r"mask_downscaling\.3\.", "mask_embed.conv2."),
        (r"mask_downscaling\.4\.", "mask_embed.layer_norm2."),
        (r"mask_downscaling\.6\.", "mask_embed.conv3."),
        (r"point_embeddings\.", "point_embed."),
        (r"output_upscaling\.0\.", "upscale_conv1."),
        (r"output_upscaling\.1\.", "upscale_layer_norm."),
        (r"output_upscaling\.3\.", "upscale_conv2."),
        (r"(mlps\.\d+|iou_prediction_head)\.layers\.0\.", r"\1.proj_in."),
        (r"(mlps\.\d+|iou_prediction_head)\.layers\.1\.", r"\1.layers.0."),
        (r"(mlps\.\d+|iou_prediction_head)\.layers\.2\.", r"\1.proj_out."),
        (r"pe_layer\.positional_encoding_gaussian_matrix$",
         "shared_embedding.positional_embedding"),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    out["shared_image_embedding.positional_embedding"] = out.pop(
        "prompt_encoder.shared_embedding.positional_embedding")
    return out


def test_transformers_names_are_those_of_sam_model():
    """The test's renaming gives transformers' own names, and automask's gives them back."""
    from automask.models.hf_layout import from_hf_sam

    theirs = _as_hf({ours: torch.zeros(1) for ours in _HF_NAMES.values()})
    tied = {"prompt_encoder.shared_embedding.positional_embedding"}
    assert set(theirs) == set(_HF_NAMES) - tied | {"shared_image_embedding.positional_embedding"}
    assert sorted(from_hf_sam({key: torch.zeros(1) for key in _HF_NAMES})) == sorted(
        _HF_NAMES.values())


@pytest.mark.parametrize("layout", ["model.safetensors", "pytorch_model.bin"])
def test_a_transformers_sam_file_loads_as_the_official_one(tmp_path, layout):
    """facebook/sam-vit-base's model.safetensors (and MedSAM's, fine-tuned from it) hold
    the official tensors under transformers' names: they load exactly, and a prediction
    is the official file's. It was refused as "a Hugging Face transformers checkpoint"."""
    state = _random_state("tiny")
    hf = _as_hf(state)
    path = tmp_path / layout
    if layout.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(hf, str(path))
    else:  # the older format keeps both tied copies
        hf["prompt_encoder.shared_embedding.positional_embedding"] = hf[
            "shared_image_embedding.positional_embedding"]
        torch.save(hf, path)
    model = build_segmenter("tiny", input_size=SIZE, checkpoint=path)
    _same_weights(model, state)
    # the model's folder (save_pretrained's, a snapshot in the Hugging Face cache) names it
    (tmp_path / "config.json").write_text('{"model_type": "sam", "vision_config": {}}')
    _same_weights(build_segmenter("tiny", input_size=SIZE, checkpoint=tmp_path), state)
    official = tmp_path / "official.pth"
    torch.save(state, official)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), build_segmenter("tiny", input_size=SIZE, checkpoint=official)(x),
            atol=0, rtol=0)


def test_a_transformers_file_of_another_model_is_named(tmp_path):
    """Sam2Model's names (``vision_encoder.backbone.*``) are not SamModel's: refused whole,
    named as a transformers file of another model; a SamModel file of another size is
    named as that backbone's."""
    path = tmp_path / "sam2_hf.pth"
    torch.save({"vision_encoder.backbone.patch_embed.projection.weight": torch.zeros(1),
                "no_memory_embedding": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="transformers checkpoint.*but not of SamModel"):
        build_segmenter("tiny", input_size=SIZE, checkpoint=path)
    state = _as_hf(_random_state("tiny"))
    state["vision_encoder.patch_embed.projection.weight"] = torch.zeros(768, 3, 16, 16)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"image_encoder.patch_embed.proj.weight: file "
                                              r"\(768, 3, 16, 16\)"):
        build_segmenter("tiny", input_size=SIZE, checkpoint=path)
