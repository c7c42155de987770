"""Audit of export and tiled prediction: odd arguments, odd paths, odd forwards and images."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import automask.export as export_module
from automask import SemanticSegmentor
from automask.config import image_value_range
from automask.data import read_image
from automask.datasets import make_synthetic
from automask.errors import ConfigError
from automask.export import export_model
from automask.models import build_segmenter
from automask.peft import apply_peft
from automask.tiling import AUTO_RATIO, tiled_proba, window_starts

S = 64
CPU = torch.device("cpu")


def _model(method: str = "lora"):
    """A tiny segmenter with every weight perturbed (no adapter is the identity)."""
    torch.manual_seed(0)
    seg = build_segmenter("tiny", num_classes=1, input_size=S, checkpoint="random")
    apply_peft(seg, method)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in seg.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return seg.eval()


@pytest.fixture
def copies(monkeypatch):
    """Records every inference copy export_model makes: empty means no work was done."""
    calls = []
    real = export_module.inference_copy

    def recording(model):
        calls.append(model)
        return real(model)

    monkeypatch.setattr(export_module, "inference_copy", recording)
    return calls


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("tolerance", [float("nan"), -1.0, float("inf"), "1e-3", True])
def test_bad_tolerance_is_refused_before_any_work(tolerance, tmp_path, copies):
    with pytest.raises(ConfigError, match=rf"tolerance .*{tolerance!r}"):
        export_model(_model(), tmp_path / "out" / "m.onnx", tolerance=tolerance)
    assert copies == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("metadata, named", [
    ({"classes": ["road", "car"]}, "'classes'"),  # a list: ONNX stores strings only
    ({"version": 2}, "'version'"),
    ({1: "one"}, "1"),
    ([("a", "b")], "list"),
])
def test_bad_metadata_is_refused_before_any_work(metadata, named, tmp_path, copies):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ConfigError, match=f"metadata.*{named}"):
        export_model(_model(), path, metadata=metadata)
    assert copies == [] and path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits)."""
    if os.name == "posix" and os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    folder = Path("/proc")  # root: a kernel file system that takes no new files
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return folder
    pytest.skip("no folder here refuses new files")


def test_unwritable_folder_is_refused_before_any_work(tmp_path, copies):
    folder = _unwritable_folder(tmp_path)
    try:
        for path in (folder / "m.onnx", folder / "new" / "deeper" / "m.onnx"):
            with pytest.raises(ConfigError, match=rf"cannot export to '{path}'.*'{folder}'"):
                export_model(_model(), path)
            assert not (folder / "new").exists()
        assert copies == []
    finally:
        if folder.is_relative_to(tmp_path):
            folder.chmod(0o700)


def test_file_name_as_long_as_the_system_allows_exports_with_dynamic_batch(tmp_path):
    longest = min(255, os.pathconf(tmp_path, "PC_NAME_MAX"))
    path = tmp_path / ("m" * (longest - len(".onnx")) + ".onnx")
    model = _model()
    assert export_model(model, path) == path
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary folder or raw file left
    images = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.numpy()})[0]  # batch 1: traced with 2
    with torch.no_grad():
        expected = model(images).numpy()
    assert got.shape == (1, 1, S, S) and np.abs(got - expected).max() < 1e-3
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["image_range"] == "per_image" and "own rule" in meta["deep_images"]


@pytest.mark.parametrize("missing", ["sys.stdout is None", "descriptor 1 closed"])
def test_export_works_without_a_stdout(missing, tmp_path, monkeypatch):
    """pythonw and some services have no sys.stdout, or no descriptor 1 at all."""
    saved = os.dup(1)
    try:
        if missing == "sys.stdout is None":
            monkeypatch.setattr("sys.stdout", None)
        else:
            os.close(1)
        path = export_model(_model(), tmp_path / "m.onnx")
        if missing == "descriptor 1 closed":
            with pytest.raises(OSError):  # closed again, as it was
                os.fstat(1)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert sorted(tmp_path.iterdir()) == [path]
    assert onnx.load(str(path)).graph.output[0].name == "logits"


def test_predictor_export_documents_how_predict_reads_deep_images_and_tiles(tmp_path,
                                                                           monkeypatch):
    frame = make_synthetic(6, size=(48, 64), num_classes=2, seed=1, root=tmp_path / "data")
    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters={
            "optim.max_epochs": 1, "model.input_size": S, "data.image_range": "100,4095"})
    captured = {}

    def capture(net, path, *, format, metadata):
        captured.update(metadata)
        return Path(path)

    monkeypatch.setattr(export_module, "export_model", capture)
    seg.export(tmp_path / "m.onnx")
    # a 16-bit image, read as predict reads it and as the metadata says a runtime should
    deep = np.random.default_rng(0).integers(0, 5000, (20, 30), dtype=np.uint16)
    deep[0, :3] = (0, 100, 4095)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    predicted = read_image(tmp_path / "deep.png", value_range=image_value_range(seg._config(None)))
    low, high = (float(v) for v in captured["image_range"].split(","))
    by_meta = np.floor(np.clip((deep - low) * 255.0 / (high - low) + 0.5, 0, 255))
    np.testing.assert_array_equal(predicted[..., 0], by_meta.astype(np.uint8))
    assert "NaN read as 100" in captured["deep_images"]
    # predict tiles large images by default: the metadata says when and with which windows
    stride = window_starts(10 * S, S)[1]
    assert f"exceeds {AUTO_RATIO:g} x {S}" in captured["large_images"]
    assert f"stride {stride}" in captured["large_images"]


# --------------------------------------------------------------------------- tiling
def test_tiled_proba_refuses_a_forward_that_loses_windows_or_the_class_axis():
    image = np.random.default_rng(0).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    # (B, S, S) from a binary model's squeezed output: the rows would be taken for classes
    with pytest.raises(ValueError, match=r"\(B, C, R, R\).*\(3, 64, 64\) for 3 windows"):
        tiled_proba(lambda x: torch.sigmoid(x[:, 0]), image, S, 3, CPU)
    # one map fewer than windows: zip would drop a window
    with pytest.raises(ValueError, match=r"\(2, 1, 64, 64\) for 3 windows"):
        tiled_proba(lambda x: torch.sigmoid(x[:-1, :1]), image, S, 3, CPU)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_tiled_proba_refuses_images_that_are_not_uint8_before_any_forward(dtype):
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        return torch.sigmoid(x[:, :1])

    image = np.full((100, 90, 3), 1000, dtype=dtype)  # 16-bit: 1000 is dark, not white
    with pytest.raises(ValueError, match=f"uint8.*{np.dtype(dtype).name}"):
        tiled_proba(forward, image, S, 2, CPU)
    assert calls == []


@pytest.mark.parametrize("size", [(1, 1), (1, 100), (100, 1), (17, 16), (3, 500), (97, 61)])
def test_blend_of_constant_low_res_bf16_maps_is_exact_and_sums_to_one(size):
    """Odd sizes, bf16 windows at a quarter of the input: no seams, float32, sums of 1."""
    side = 16
    probs = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1)

    def forward(x):  # (B, 3, S, S) -> (B, 2, S/4, S/4) in bf16
        return probs.expand(x.shape[0], 2, side // 4, side // 4).to(torch.bfloat16)

    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tiled_proba(forward, image, side, 4, CPU)
    assert got.dtype == torch.float32 and got.shape == (2, *size)
    torch.testing.assert_close(got, probs[0].expand(2, *size), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(0), torch.ones(size), atol=1e-6, rtol=0)



def test_metadata_of_ones_own_is_added_to_the_preprocessing_not_instead(tmp_path):
    path = export_model(_model(), tmp_path / "m.onnx",
                        metadata={"licence": "CC-BY-4.0", "task": "binary (polyps)"})
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["licence"] == "CC-BY-4.0" and meta["task"] == "binary (polyps)"
    for key in ("input_size", "pixel_mean", "pixel_std", "padding", "normalisation"):
        assert meta[key], key  # what a runtime needs is still there
