"""Prompted segmentation: train with box prompts, then predict with and without boxes.

Usage::

    python tutorials/06_prompts.py                       # synthetic data, `tiny` preset
    python tutorials/06_prompts.py IMAGES_DIR MASKS_DIR  # your binary data, `medium_quality`

``data.prompts="box"`` draws a jittered box around each training mask (after the
augmentation) for half of the samples (``data.prompt_rate``), so that the fine-tuned
decoder learns to read SAM's prompt tokens while still segmenting without them. At
prediction, ``boxes=`` gives one box per image in original pixels (None: no prompt).
Here the boxes come from the test masks, standing in for a user's clicks or a detector.
"""
import sys
import tempfile

import numpy as np

from automask import SemanticSegmentor
from automask.data import read_mask
from automask.datasets import from_folders, make_synthetic, train_test_split

if len(sys.argv) not in (1, 3):  # your data, or none: never one in place of the other
    sys.exit(f"usage: python {sys.argv[0]} [IMAGES_DIR MASKS_DIR]")
if len(sys.argv) == 3:
    frame = from_folders(sys.argv[1], sys.argv[2])
    presets, hp = "medium_quality", {"data.prompts": "box"}
else:
    frame = make_synthetic(24, size=(96, 128), num_classes=2, seed=0, root=tempfile.mkdtemp())
    # tiny random-init SAM at a 64-pixel input: runs in well under a minute on a CPU but
    # learns little in 8 epochs; the numbers mean something on real data
    presets, hp = "tiny", {"data.prompts": "box", "model.input_size": 64,
                           "optim.max_epochs": 8}
train_df, test_df = train_test_split(frame, test_size=0.25, seed=0)
seg = SemanticSegmentor(label="label", path=tempfile.mkdtemp(), verbosity=0)
seg.fit(train_df, presets=presets, hyperparameters=hp)


def truth(mask_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, labelled) of a binary mask as automask reads it: 0/1 by value, with
    255 beside them void (neither foreground nor scored); others (0/255, anti-aliased or
    JPEG masks) at > 128, every pixel labelled."""
    mask = read_mask(mask_path)
    values = set(np.unique(mask).tolist())
    if values <= {0, 1} or (values <= {0, 1, 255} and 1 in values):
        return mask == 1, mask != 255
    return mask > 128, np.ones(mask.shape, dtype=bool)


def box_of(mask_path: str):
    """(x0, y0, x1, y1) enclosing the mask's foreground, or None for an empty mask."""
    rows, cols = np.nonzero(truth(mask_path)[0])
    if rows.size == 0:
        return None
    return (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)


boxes = [box_of(p) for p in test_df["label"]]
free = seg.predict(test_df)                  # prompt-free, as always
prompted = seg.predict(test_df, boxes=boxes)  # one box (or None) per row
click = [None if b is None else ([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]], [1]) for b in boxes]
clicked = seg.predict(test_df, points=click)  # one foreground point per image

changed = np.mean([np.mean(a != b) for a, b in zip(free, prompted)])
print(f"{len(prompted)} masks; {changed:.2%} of the pixels change when the box is given")
inside = [m[b[1]:b[3], b[0]:b[2]].sum() / max(m.sum(), 1)
          for m, b in zip(prompted, boxes) if b is not None]
print(f"share of the predicted foreground inside the box: {np.mean(inside):.2%}")


def iou(masks):
    truths = [truth(p) for p in test_df["label"]]  # void pixels left out
    return np.mean([(m.astype(bool) & t & valid).sum()
                    / max(((m.astype(bool) | t) & valid).sum(), 1)
                    for m, (t, valid) in zip(masks, truths)])


print(f"iou without prompts: {iou(free):.4f}   with boxes: {iou(prompted):.4f}   "
      f"with one point: {iou(clicked):.4f}")
print(f"evaluate (prompt-free) iou: {seg.evaluate(test_df)['iou']:.4f}")
