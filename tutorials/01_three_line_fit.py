"""Three-line fit / predict / evaluate.

Usage::

    python tutorials/01_three_line_fit.py                       # synthetic data, `tiny` preset
    python tutorials/01_three_line_fit.py IMAGES_DIR MASKS_DIR  # your data, `medium_quality`

Images and masks are paired by file stem (``images/case1.jpg`` with ``masks/case1.png``).
Masks are single-channel PNGs: {0, 255} or {0, 1} for binary tasks, class indices for
multi-class tasks (255 = ignore).
"""
import sys
import tempfile

from automask import SemanticSegmentor
from automask.datasets import from_folders, make_synthetic, train_test_split

if len(sys.argv) not in (1, 3):  # your data, or none: never one in place of the other
    sys.exit(f"usage: python {sys.argv[0]} [IMAGES_DIR MASKS_DIR]")
if len(sys.argv) == 3:
    frame = from_folders(sys.argv[1], sys.argv[2])  # DataFrame with `image` and `label` columns
    presets = "medium_quality"  # pretrained SAM vit_b + Conv-LoRA
else:
    frame = make_synthetic(60, size=128, num_classes=2, seed=0, root=tempfile.mkdtemp())
    presets = "tiny"  # random-init tiny SAM trained from scratch: runs offline in a minute
train_df, test_df = train_test_split(frame, test_size=0.2, seed=0)

# The three lines.
seg = SemanticSegmentor(label="label", path=tempfile.mkdtemp()).fit(train_df, presets=presets)
masks = seg.predict(test_df)    # list of HxW uint8 arrays at each image's original size
scores = seg.evaluate(test_df)  # dict of metric -> value

print(f"{len(masks)} masks; first one {masks[0].shape}")
for name, value in scores.items():
    print(f"{name:>5}: {value:.4f}")
