"""ONNX / torch.export export, Conv-LoRA's static routing and merged inference."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from automask import SemanticSegmentor
from automask.datasets import make_synthetic, train_test_split
from automask.errors import ConfigError
from automask.export import ExportError, _export_onnx, export_model, inference_copy
from automask.models import build_segmenter
from automask.peft import (PEFT_METHODS, ConvLoRALinear, LoRALinear, adapters, apply_peft,
                           merge_adapters)
from automask.peft.sam_adapter import high_pass, high_pass_matmul

from cli_process import run_automask

METHODS = list(PEFT_METHODS)
SIZE = 64
ONNX_TOLERANCE = 1e-3  # max |ONNX Runtime - PyTorch| over fp32 logits


def _model(method: str, num_classes: int = 1, seed: int = 0):
    """A tiny segmenter with ``method`` applied and every weight perturbed, so that no
    adapter is the identity (zero-initialised LoRA B, gates, up-projections included)."""
    torch.manual_seed(seed)
    seg = build_segmenter("tiny", num_classes=num_classes, input_size=SIZE, checkpoint="random")
    apply_peft(seg, method)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in seg.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return seg.eval()


def _images(batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _onnx_logits(path: Path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.numpy()})[0]


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _declared_shapes(path: Path) -> dict[str, list]:
    """The graph's input and output shapes as declared: a name or a number per dimension."""
    graph = onnx.load(str(path)).graph
    return {io.name: [d.dim_param or d.dim_value for d in io.type.tensor_type.shape.dim]
            for io in [*graph.input, *graph.output]}


# --------------------------------------------------------------------------- Conv-LoRA
@pytest.mark.parametrize("top_k", [1, 2])
def test_conv_lora_static_routing_equals_dispatch_in_eval(top_k):
    torch.manual_seed(0)
    layer = ConvLoRALinear(torch.nn.Linear(12, 36), rank=3, num_experts=4, top_k=top_k).eval()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.w_gate.normal_()
    grid = torch.randn(16, 7, 7, 12)  # 16 windows of 7x7 tokens
    with torch.no_grad():
        dispatch = layer(grid)
        counts = list(layer.expert_counts)
        layer.dense_routing = True
        dense = layer(grid)
        layer.dense_routing = False
        # tracing picks the static path itself; a first trace builds (and caches) the resize
        # matrices it needs that the dispatch's composed experts did not, so that the second
        # trace's sanity check compares two graphs that use them as constants
        torch.jit.trace(layer, grid, check_trace=False)
        traced = torch.jit.trace(layer, grid)(grid)
    assert sum(c > 0 for c in counts) >= 2, counts  # the samples really go different ways
    assert sum(counts) == 16 * top_k
    # the same operations and order of sums; only the resizes' matrix products see other
    # numbers of rows, which may round differently
    torch.testing.assert_close(dense, dispatch, rtol=1e-6, atol=1e-6)
    # a traced graph convolves with F.conv2d, the dispatch on a CPU with ATen's im2col
    # kernel (conv_lora.expert_conv) or composed with the resize (conv_lora.resized_conv):
    # the same sums in another order
    torch.testing.assert_close(traced, dispatch, rtol=1e-5, atol=1e-5)
    assert not torch.equal(dispatch, layer.base_layer(grid))  # the mixture does something


# --------------------------------------------------------------------------- merging
@pytest.mark.parametrize("method", METHODS)
def test_merging_never_changes_predictions(method):
    model = _model(method, num_classes=3)
    images = _images(2)
    with torch.no_grad():
        expected = model(images)
        merged = inference_copy(model)
        got = merged(images)
    mergeable = [a for a in adapters(model) if a.mergeable]
    assert merged.merged_adapters == len(mergeable)
    if method in ("lora", "ssf"):
        assert len(mergeable) > 0
        assert all(a.merged for a in adapters(merged) if a.mergeable)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not any(a.merged for a in adapters(model))  # the original is left unmerged


def test_merged_lora_forward_skips_the_low_rank_path():
    model = _model("lora")
    merged = inference_copy(model)
    lora = [m for m in merged.modules() if isinstance(m, LoRALinear)]
    assert lora and all(m.merged for m in lora)
    x = torch.randn(1, 2, 2, lora[0].base_layer.in_features)
    with torch.no_grad():  # the merged layer is the base layer alone
        torch.testing.assert_close(lora[0](x), lora[0].base_layer(x), rtol=0, atol=0)
    assert merge_adapters(merged) == len(lora)  # merging again is a no-op
    with torch.no_grad():
        torch.testing.assert_close(merged(_images(1)), model(_images(1)), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- ONNX parity
@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [1, 3], ids=["binary", "multiclass"])
@pytest.mark.parametrize("method", METHODS)
def test_onnx_matches_pytorch_for_every_method(method, num_classes, tmp_path):
    model = _model(method, num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_model(model, tmp_path / "model.onnx")
    images = _images(3)  # another batch size than the export traced (2)
    with torch.no_grad():
        expected = model(images).numpy()
    got = _onnx_logits(path, images)
    assert got.shape == (3, num_classes, SIZE, SIZE)
    assert np.abs(got - expected).max() < ONNX_TOLERANCE
    # every dimension but the batch declared as the number it is
    assert _declared_shapes(path) == {"images": ["batch", 3, SIZE, SIZE],
                                      "logits": ["batch", num_classes, SIZE, SIZE]}
    meta = _metadata(path)
    assert meta["peft_method"] == method and meta["input_size"] == str(SIZE)
    assert meta["exporter"] == "torchscript"  # seconds; SAM-Adapter's FFT as matrix products
    assert meta["task"] == ("binary" if num_classes == 1 else "multiclass")
    assert int(meta["merged_adapters"]) == sum(a.mergeable for a in adapters(model))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is not touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no leftovers


def test_high_pass_as_matrix_products_equals_the_fft():
    """SAM-Adapter's filter as traced for ONNX equals the FFT one: even and odd sides, a
    wide image whose removed band is longer than its short side (Python's slice rules)."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 64, 64), (1, 3, 33, 31), (1, 2, 8, 100)]:
        for ratio in (0.0, 0.25, 0.9):
            images = torch.randn(*shape, generator=gen) * 2
            torch.testing.assert_close(high_pass_matmul(images, ratio),
                                       high_pass(images, ratio), rtol=0, atol=1e-5)
    images = torch.randn(1, 3, 32, 32, generator=gen)
    assert (high_pass(images, 0.25) - images.abs()).abs().max() > 0.1  # not the identity


def test_a_graph_the_torchscript_exporter_cannot_translate_goes_to_the_dynamo_one(tmp_path):
    class Spectrum(nn.Module):  # an FFT: the TorchScript-based exporter has none
        def forward(self, images):
            return torch.fft.fft2(images, norm="forward").real

    dest = tmp_path / "spectrum.onnx"
    assert _export_onnx(Spectrum(), _images(2)[:, :, :8, :8], dest, {"task": "test"},
                        (3, 8, 8)) == "dynamo"
    assert _metadata(dest) == {"task": "test", "exporter": "dynamo"}
    images = _images(3, seed=6)[:, :, :8, :8]
    np.testing.assert_allclose(_onnx_logits(dest, images), Spectrum()(images).numpy(),
                               rtol=0, atol=1e-5)


def test_pt2_export_matches_pytorch(tmp_path, recwarn):
    model = _model("conv_lora", num_classes=3)
    path = export_model(model, tmp_path / "model.pt2")  # the format from the suffix
    # Conv-LoRA's load-balancing loss is not stored on the module while exporting
    assert not [w for w in recwarn if "assigned during export" in str(w.message)]
    extra = {"automask.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    images = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), model(images), rtol=1e-4, atol=1e-4)
    assert json.loads(extra["automask.json"])["peft_method"] == "conv_lora"


def test_a_pt2_export_leaves_no_traced_matrices_for_later_forwards(tmp_path):
    """torch.export traced Conv-LoRA's cached resize matrices as fake tensors and the cache
    kept them: a later ONNX export in the process failed, and eager forwards read them."""
    script = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from test_export import _images, _model\n"
        "from automask.export import export_model\n"
        "from automask.peft import conv_lora\n"
        "model = _model('conv_lora')\n"
        "images = _images(2)\n"
        "with torch.no_grad():\n"
        "    before = model(images)\n"
        "export_model(model, sys.argv[1] + '/m.pt2')\n"
        "fake = torch._subclasses.fake_tensor.FakeTensor\n"
        "export_model(model, sys.argv[1] + '/m.onnx')\n"
        "for size_in in range(1, 40):\n"
        "    for size_out in range(1, 80):\n"
        "        m = conv_lora.resize_matrix(size_in, size_out, torch.float32)\n"
        "        assert not isinstance(m, fake), (size_in, size_out)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(model(images), before, rtol=0, atol=0)\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path),
                           str(Path(__file__).parent)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_bad_format_or_suffix_fails_before_writing(tmp_path):
    model = _model("lora")
    with pytest.raises(ConfigError, match="'tflite'.*onnx"):
        export_model(model, tmp_path / "m.tflite", format="tflite")
    with pytest.raises(ConfigError, match=r"m\.pt2.*'\.onnx'"):
        export_model(model, tmp_path / "m.pt2", format="onnx")
    with pytest.raises(ConfigError, match=r"m\.bin.*must end with \.onnx or \.pt2"):
        export_model(model, tmp_path / "m.bin")
    for name in (".onnx", ".PT2"):  # a hidden file of no suffix, not a missing suffix
        with pytest.raises(ConfigError, match=rf"'{re.escape(name)}' without a name before"):
            export_model(model, tmp_path / name)
    for path in (5, None, b"m.onnx", "", " "):  # not a file's name
        with pytest.raises(ConfigError, match="the export path must name a file"):
            export_model(model, path)
    assert list(tmp_path.iterdir()) == []


def test_failed_check_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError, match="does not reproduce"):
        export_model(_model("lora"), path, tolerance=0.0)  # merged float error is > 0
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_onnx_runs_without_torch_or_automask(tmp_path):
    """Another process, isolated (-I), with torch and automask made unimportable, reads
    the preprocessing from the metadata, prepares a PNG with numpy and Pillow only, and
    gets the logits PyTorch computes."""
    from PIL import Image

    from automask.data.transforms import geometry_for, normalize_pad, resize_image

    model = _model("conv_lora")
    path = export_model(model, tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # standard operators only
    rgb = np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "image.png")
    geometry = geometry_for(rgb.shape[:2], SIZE)
    x = normalize_pad(resize_image(rgb, geometry.resized_size), SIZE)[None]
    with torch.no_grad():
        np.save(tmp_path / "expected.npy", model(x).numpy())
    script = r"""
import sys
sys.modules["torch"] = None
sys.modules["automask"] = None
import numpy as np, onnxruntime as ort
from PIL import Image
model, image, expected = sys.argv[1:4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
size = int(meta["input_size"])
mean = np.array([float(v) for v in meta["pixel_mean"].split(",")], dtype=np.float32)
std = np.array([float(v) for v in meta["pixel_std"].split(",")], dtype=np.float32)
img = Image.open(image).convert("RGB")
scale = size / max(img.size)
w, h = (int(side * scale + 0.5) for side in img.size)
rgb = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
x = np.zeros((1, 3, size, size), dtype=np.float32)
x[0, :, :h, :w] = ((rgb - mean) / std).transpose(2, 0, 1)
logits = session.run([meta["output_name"]], {meta["input_name"]: x})[0]
diff = float(np.abs(logits - np.load(expected)).max())
print(meta["output_activation"].split(";")[0], logits.shape, diff)
assert diff < 1e-3, diff
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", script, str(path),
                           str(tmp_path / "image.png"), str(tmp_path / "expected.npy")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("sigmoid (1, 1, 64, 64)"), proc.stdout


# --------------------------------------------------------------------------- predictor
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    frame = make_synthetic(16, size=(48, 64), num_classes=2, seed=1,
                           root=tmp_path_factory.mktemp("synthetic"))
    train, _ = train_test_split(frame, test_size=0.25, seed=0)
    seg = SemanticSegmentor(label="label", path=tmp_path_factory.mktemp("run"), verbosity=0)
    return seg.fit(train, presets="tiny", hyperparameters={
        "optim.max_epochs": 1, "model.input_size": SIZE, "peft.method": "lora"})


def test_segmentor_export_keeps_the_predictor_unchanged(fitted, tmp_path):
    net = fitted._model(None)  # the predictor's inference model (LoRA merged for speed)
    images = _images(2)
    merged = [a.merged for a in adapters(net)]
    with torch.no_grad():
        before = net(images)
    path = fitted.export(tmp_path / "best.onnx")
    with torch.no_grad():
        after = net(images)
    assert torch.equal(before, after)
    assert [a.merged for a in adapters(net)] == merged
    np.testing.assert_allclose(_onnx_logits(path, images), before.numpy(), atol=ONNX_TOLERANCE)
    meta = _metadata(path)
    assert meta["model"] == fitted.best_model_ and meta["task"] == "binary"
    assert json.loads(meta["classes"]) == [str(c) for c in fitted.classes_]
    assert meta["peft_method"] == "lora" and int(meta["merged_adapters"]) > 0
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        fitted.export(tmp_path / "x.onnx", model="nope")


def test_cli_export(fitted, tmp_path):
    out = tmp_path / "cli.onnx"
    proc = run_automask("export", str(fitted.path_), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exported to {out}" in proc.stdout
    assert _metadata(out)["model"] == fitted.best_model_
    proc = run_automask("export", str(fitted.path_), "--out", str(tmp_path / "m.pt2"),
                        "--format", "onnx")
    assert proc.returncode == 2 and "must end with '.onnx'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("resize_mode, interpolation",
                         [("longest_side", "bilinear"), ("square", "bicubic")])
def test_the_documented_postprocessing_reproduces_predict_proba(resize_mode, interpolation,
                                                                tmp_path_factory, tmp_path):
    """The ONNX recipe of README and tutorials/05_export.py (its ``resize_bilinear``, run
    without torch) gives predict_proba's probabilities for images smaller and larger than
    the input size, where Pillow's antialiased BILINEAR would not, for a model that keeps
    the aspect ratio and one that stretches (metadata ``resize_mode``), resizing images by
    the filter the metadata names (``interpolation``); the metadata names the precision
    predict runs in."""
    import ast

    from PIL import Image

    tutorial = Path(__file__).resolve().parents[1] / "tutorials" / "05_export.py"
    source = tutorial.read_text()
    [resize] = [ast.get_source_segment(source, node) for node in ast.parse(source).body
                if isinstance(node, ast.FunctionDef) and node.name == "resize_bilinear"]
    frame = make_synthetic(8, size=(48, 64), num_classes=2, seed=2,
                           root=tmp_path_factory.mktemp("pp"))
    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters={
            "optim.max_epochs": 1, "model.input_size": SIZE, "env.precision": "32",
            "data.resize": resize_mode, "data.interpolation": interpolation})
    rng = np.random.default_rng(0)
    images = []
    for height, width in [(12, 16), (30, 40), (54, 72)]:  # below and above SIZE, untiled
        images.append(tmp_path / f"{height}x{width}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images[-1])
    # a photo stored sideways: EXIF orientation 6 (shown rotated 90 degrees, 40 x 30 upright)
    images.append(tmp_path / "sideways.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
        images[-1], exif=exif.tobytes())
    # JPEGs of more than twice the resized size, upright and sideways: predict decodes them
    # at a reduced scale (libjpeg's DCT scaling), as the metadata's jpeg_draft says
    for name, orientation in (("large.jpg", 1), ("large_sideways.jpg", 6)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        images.append(tmp_path / name)
        Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(
            images[-1], exif=exif.tobytes(), quality=90)
    expected = seg.predict_proba([str(p) for p in images], tiling="off")
    assert [p.shape for p in expected[-3:]] == [(40, 30), (150, 200), (200, 150)]
    np.save(tmp_path / "expected.npy", np.concatenate([p.ravel() for p in expected]))
    np.save(tmp_path / "shapes.npy", np.array([p.shape for p in expected]))
    path = seg.export(tmp_path / "model.onnx", format="ONNX")  # the format in any case
    # a float32 predictor (env.precision "32" is recorded as "32-true"): no difference
    assert _metadata(path)["predict_precision"] == "32-true: the same arithmetic as predict"
    assert _metadata(path)["interpolation"] == interpolation
    assert f"{interpolation} (Pillow's" in _metadata(path)["resize"]
    script = "\n".join([r"""
import sys
sys.modules["torch"] = None
sys.modules["automask"] = None
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps
""", resize, r"""
model, expected, shapes, *images = sys.argv[1:]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
size = int(meta["input_size"])
mean = np.array([float(v) for v in meta["pixel_mean"].split(",")], dtype=np.float32)
std = np.array([float(v) for v in meta["pixel_std"].split(",")], dtype=np.float32)
probs = []
for image in images:
    file = Image.open(image)
    width, height = file.size
    turned = file.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    if turned:
        width, height = height, width
    assert meta["orientation"].startswith("apply the file's EXIF orientation")
    if meta["resize_mode"] == "square":
        w = h = size
    else:
        scale = size / max(width, height)
        w, h = (max(1, int(side * scale + 0.5)) for side in (width, height))
    assert meta["jpeg_draft"].startswith("JPEG files: Image.draft")
    if file.format == "JPEG":
        file.draft("RGB", (h, w) if turned else (w, h))
    img = ImageOps.exif_transpose(file).convert("RGB")
    resample = Image.Resampling[meta["interpolation"].upper()]
    rgb = np.asarray(img.resize((w, h), resample), dtype=np.float32)
    x = np.zeros((1, 3, size, size), dtype=np.float32)
    x[0, :, :h, :w] = ((rgb - mean) / std).transpose(2, 0, 1)
    logits = session.run([meta["output_name"]], {meta["input_name"]: x})[0][0]
    prob = 1 / (1 + np.exp(-logits[:, :h, :w]))
    probs.append(resize_bilinear(prob.astype(np.float32), height, width)[0])
assert [p.shape for p in probs] == [tuple(s) for s in np.load(shapes)]
probs = [p.ravel() for p in probs]
diff = float(np.abs(np.concatenate(probs) - np.load(expected)).max())
print(diff)
assert diff < 1e-4, diff
"""])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", script, str(path),
                           str(tmp_path / "expected.npy"), str(tmp_path / "shapes.npy"),
                           *map(str, images)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_a_full_disk_is_an_export_error_naming_the_file(fitted, tmp_path, suffix):
    """A write the disk refuses (here a file size limit, as a full disk refuses one): an
    ExportError naming the export, the process alive, the previous file kept and no
    temporary folder left. A .pt2 written by torch's own file writer aborted the whole
    process (a C++ exception past its destructor), which no except clause could catch."""
    script = r"""
import resource, signal, sys
from pathlib import Path
from automask import SemanticSegmentor
from automask.export import ExportError
run, dest = sys.argv[1:3]
seg = SemanticSegmentor.load(run)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    seg.export(dest)
except ExportError as exc:
    print("ExportError:", exc)
print("alive")
"""
    dest = tmp_path / f"model{suffix}"
    dest.write_bytes(b"previous")
    proc = subprocess.run([sys.executable, "-c", script, str(fitted.path_), str(dest)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"ExportError: cannot write the {suffix[1:]} export {str(dest)!r}: File too large" \
        in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("alive")
    assert dest.read_bytes() == b"previous" and sorted(tmp_path.iterdir()) == [dest]
