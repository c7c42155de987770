"""Export a fine-tuned model to ONNX and run it with ONNX Runtime, without automask.

Usage::

    python tutorials/05_export.py                       # synthetic data, `tiny` preset + Conv-LoRA
    python tutorials/05_export.py IMAGES_DIR MASKS_DIR  # your data, `medium_quality`

Needs the export extra: ``pip install 'automask[export]'`` (onnx, onnxruntime). The second
half uses only numpy, Pillow and onnxruntime, as a deployment would: the preprocessing
(resize, normalise, pad) is read from the ONNX file's metadata.
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

from automask import SemanticSegmentor
from automask.datasets import from_folders, make_synthetic, train_test_split

# ---------------------------------------------------------------- 1. fit and export
if len(sys.argv) not in (1, 3):  # your data, or none: never one in place of the other
    sys.exit(f"usage: python {sys.argv[0]} [IMAGES_DIR MASKS_DIR]")
if len(sys.argv) == 3:
    frame = from_folders(sys.argv[1], sys.argv[2])
    presets, hp = "medium_quality", {}
else:
    frame = make_synthetic(40, size=(96, 128), num_classes=2, seed=0, root=tempfile.mkdtemp())
    # tiny random-init SAM with Conv-LoRA, so that the export has its experts to translate
    presets, hp = "tiny", {"peft.method": "conv_lora", "optim.max_epochs": 10}
train_df, test_df = train_test_split(frame, test_size=0.25, seed=0)
seg = SemanticSegmentor(label="label", path=tempfile.mkdtemp(), verbosity=0)
seg.fit(train_df, presets=presets, hyperparameters=hp)

onnx_path = seg.export(Path(tempfile.mkdtemp()) / "model.onnx")  # LoRA merged, checked
print(f"exported {seg.best_model_} to {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB)")

# ---------------------------------------------------------------- 2. inference without automask
session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
size = int(meta["input_size"])
mean = np.array([float(v) for v in meta["pixel_mean"].split(",")], dtype=np.float32)
std = np.array([float(v) for v in meta["pixel_std"].split(",")], dtype=np.float32)
print(f"input {meta['input_layout']}; output {meta['output']}; {meta['output_activation']}")


def resize_bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) -> (C, height, width): bilinear with half-pixel centres and no
    antialiasing, as predict resizes probabilities (torch's F.interpolate(...,
    mode="bilinear", align_corners=False)); Pillow's BILINEAR antialiases when it shrinks."""
    def taps(n_out: int, n_in: int):
        scale = np.float32(n_in / n_out)  # in float32, as torch computes it
        src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * scale - 0.5, 0)
        low = np.minimum(src.astype(np.int64), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), (src - low).astype(np.float32)

    y0, y1, wy = taps(height, maps.shape[1])
    x0, x1, wx = taps(width, maps.shape[2])
    rows = maps[:, y0] * (1 - wy)[:, None] + maps[:, y1] * wy[:, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def segment(path: str) -> np.ndarray:
    """(H, W) uint8 mask of one image file, as ``seg.predict`` would give it."""
    file = Image.open(path)
    width, height = file.size
    turned = file.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation: sideways
    if turned:
        width, height = height, width  # the upright picture's size
    if meta["resize_mode"] == "square":  # stretched to the square input, no padding
        w = h = size
    else:  # resize the longest side to `size`, keep the aspect ratio, pad the rest
        scale = size / max(width, height)
        w, h = max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))
    if file.format == "JPEG":  # as predict decodes a JPEG: at 1/2, 1/4 or 1/8 scale (in
        file.draft("RGB", (h, w) if turned else (w, h))  # libjpeg) while both sides stay >= w, h
    # as predict reads an image file: upright by its EXIF orientation (a phone's photo)
    image = ImageOps.exif_transpose(file).convert("RGB")
    # BILINEAR or BICUBIC; files exported before this key existed were resized bilinearly
    resample = Image.Resampling[meta.get("interpolation", "bilinear").upper()]
    rgb = np.asarray(image.resize((w, h), resample), dtype=np.float32)
    x = np.zeros((1, 3, size, size), dtype=np.float32)  # zero padding after normalisation
    x[0, :, :h, :w] = ((rgb - mean) / std).transpose(2, 0, 1)
    logits = session.run([meta["output_name"]], {meta["input_name"]: x})[0][0]  # (C, S, S)
    if meta["task"] == "binary":
        prob = 1.0 / (1.0 + np.exp(-logits[:, :h, :w]))  # crop the padding
    else:
        e = np.exp(logits[:, :h, :w] - logits[:, :h, :w].max(0, keepdims=True))
        prob = e / e.sum(0, keepdims=True)
    back = resize_bilinear(prob.astype(np.float32), height, width)  # (C, H, W)
    return (back[0] > 0.5).astype(np.uint8) if meta["task"] == "binary" else back.argmax(0)


onnx_masks = [segment(p) for p in test_df["image"]]
torch_masks = seg.predict(test_df)
agreement = np.mean([np.mean(a == b) for a, b in zip(onnx_masks, torch_masks)])
# Not 100% where predict runs under the training precision's autocast (bf16 on a CPU
# with bf16 instructions or a GPU; metadata "predict_precision"): this file is float32.
print(f"ONNX Runtime and seg.predict agree on {agreement:.2%} of the pixels")

if meta["task"] == "binary":
    truth = [np.asarray(Image.open(p)) for p in test_df["label"]]
    # as automask reads binary masks: {0, 1} by value, others (0/255, anti-aliased) at > 128
    truth = [(t > 128) if t.max() > 1 else (t == 1) for t in truth]
    ious = [np.logical_and(m, t).sum() / max(np.logical_or(m, t).sum(), 1)
            for m, t in zip(onnx_masks, truth)]
    print(f"onnx iou: {np.mean(ious):.4f}   automask iou: {seg.evaluate(test_df)['iou']:.4f}")
