"""Multi-class masks: class names, a void value, rare classes, per-class scores.

Usage::

    python tutorials/07_multiclass.py                          # synthetic data, `tiny` preset
    python tutorials/07_multiclass.py IMAGES_DIR MASKS_DIR [VOID]  # your data, `medium_quality`

Masks hold one class id per pixel. Street-scene and land-cover sets mark unlabelled pixels
with a void value, in one of two ways, and both are handled without rewriting a file:

* after the classes (CamVid's 11, or 255): ``data.void_label`` names it;
* before them (ADE20K's and LoveDA's 0, classes 1..K): a value map renumbers the masks as
  they are read, ``color_map={0: 255, 1: 0, 2: 1, ...}`` (255 is always ignored).

The synthetic data here is of the second kind. Rare classes (a pole, a sign) get more
weight in the cross-entropy with ``optim.class_weights="median_frequency"`` (SegNet's rule).
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from automask import SemanticSegmentor
from automask.data import validate_frame
from automask.datasets import from_folders, make_synthetic, train_test_split
from automask.errors import ConfigError

if len(sys.argv) not in (1, 3, 4):  # your data, or none: never one in place of the other
    sys.exit(f"usage: python {sys.argv[0]} [IMAGES_DIR MASKS_DIR [VOID]]")
if len(sys.argv) > 1:
    # a classes.txt beside the masks names the values; fit renumbers its names as the masks
    frame = from_folders(sys.argv[1], sys.argv[2])
    void = int(sys.argv[3]) if len(sys.argv) == 4 else None  # None: no void value
    presets, names = "medium_quality", None
else:
    # Synthetic masks of 3 classes, renumbered as ADE20K's are: 0 void (the top rows), 1..3
    frame = make_synthetic(48, size=96, num_classes=3, seed=0, root=tempfile.mkdtemp())
    for path in frame["label"]:
        mask = np.array(Image.open(path)) + 1
        mask[:8] = 0
        Image.fromarray(mask).save(path)
    void, presets = 0, "tiny"
    names = ["ground", "disc", "square"]  # the classes, without the void
train_df, test_df = train_test_split(frame, test_size=0.25, seed=0)
hyperparameters = {"optim.class_weights": "median_frequency"}
if presets == "tiny":
    hyperparameters["optim.max_epochs"] = 15
color_map = None

try:  # fit's own checks: a void value among the class ids is refused, with the fix
    validate_frame(train_df, void_label=void)
    hyperparameters["data.void_label"] = void  # a void after the classes: nothing to renumber
except ConfigError as err:
    print(f"refused: {str(err)[:150]}...")
    k = int(max(np.array(Image.open(p)).max() for p in train_df["label"])) + 1  # values 0..k-1
    color_map = {**{v: v - (v > void) for v in range(k)}, void: 255}
    print("renumbering the masks as they are read:", color_map)

seg = SemanticSegmentor(path=tempfile.mkdtemp()).fit(
    train_df, presets=presets, hyperparameters=hyperparameters, class_names=names,
    color_map=color_map)
scores = seg.evaluate(test_df)  # void pixels are neither right nor wrong
print(f"pixel accuracy {scores['acc']:.4f}, mIoU {scores['miou']:.4f}")
for name, iou in zip(seg.classes_, scores["iou_per_class"]):
    print(f"  iou {name:>10}: {iou:.4f}")
masks = seg.predict(test_df.head(2))  # class ids 0..K-1 at each image's size
print(f"{len(masks)} masks of ids {sorted(set(np.unique(masks[0]).tolist()))}, "
      f"saved predictor in {Path(seg.path_).name}")
if color_map is not None:  # the masks' own values, for a benchmark's or a tool's format
    own = seg.predict(test_df.head(2), values="dataset")
    print(f"the same in the data set's values: {sorted(set(np.unique(own[0]).tolist()))}")
