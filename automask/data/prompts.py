"""Point and box prompts: checking the user's, mapping them to model space, sampling them.

Prompts are given per image in original pixels: points ``(x, y)`` with a label (1 =
foreground, 0 = background) and boxes ``(x0, y0, x1, y1)`` whose edges enclose the object
(``x1 > x0``). The image is resized so that its longer side is ``S`` and padded at the
bottom and right (:mod:`automask.data.transforms`); a coordinate goes through the same
resize, ``x * w / W`` and ``y * h / H`` with ``(h, w)`` the resized and ``(H, W)`` the
original size of :class:`~automask.data.transforms.Geometry`, and the padding moves nothing.
That is the frame SAM's prompt encoder takes (as ``ResizeLongestSide.apply_coords``).

Training with prompts (``data.prompts``, see :data:`PROMPT_MODES`) draws one prompt per
sample from its augmented mask, in the same model frame, with the sample's generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import DataValidationError
from .transforms import Geometry

PROMPT_MODES = ("box", "points", "box_or_points")
"""``data.prompts`` values besides None (no prompts, the default): a jittered box around the
mask; 1 to :data:`MAX_POINTS` points; a box or points, each with probability 1/2."""
BOX_JITTER = 0.1  # each box edge moves by up to this fraction of the box's width / height
MAX_POINTS = 3  # points per training sample, at most (the first is always foreground)

KIND_NONE, KIND_BOX, KIND_POINTS = 0, 1, 2


@dataclass(frozen=True)
class ImagePrompt:
    """Checked prompts of one image, in its original pixels.

    Attributes
    ----------
    points : ndarray or None
        (N, 2) float64 x, y.
    labels : ndarray or None
        (N,) int64, 1 foreground / 0 background.
    box : ndarray or None
        (4,) float64 x0, y0, x1, y1.
    """

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None


# --------------------------------------------------------------------------- geometry
def map_points(coords: Any, geometry: Geometry) -> np.ndarray:
    """(N, 2) original-pixel ``x, y`` -> (N, 2) float64 in the padded model-input frame.

    The scale is the image's own resize: ``geometry.resized_size / geometry.original_size``
    per axis (the padding is at the bottom and right, so there is no offset).
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    (height, width), (new_h, new_w) = geometry.original_size, geometry.resized_size
    return coords * np.array([new_w / width, new_h / height])


def map_box(box: Any, geometry: Geometry) -> np.ndarray:
    """(4,) original-pixel ``x0, y0, x1, y1`` -> (4,) float64 in the model-input frame."""
    return map_points(np.asarray(box, dtype=np.float64).reshape(2, 2), geometry).reshape(4)


def to_model_prompt(prompt: ImagePrompt | None, geometry: Geometry):
    """The :class:`~automask.models.segmenter.Prompt` of ``prompt`` for an image of
    ``geometry`` (None stays None)."""
    from ..models.segmenter import Prompt

    if prompt is None:
        return None
    points = labels = box = None
    if prompt.points is not None:
        points = torch.from_numpy(map_points(prompt.points, geometry)).float()  # (N, 2)
        labels = torch.from_numpy(np.asarray(prompt.labels, dtype=np.int64))  # (N,)
    if prompt.box is not None:
        box = torch.from_numpy(map_box(prompt.box, geometry)).float()  # (4,)
    return Prompt(points, labels, box)


# --------------------------------------------------------------------------- checking
def check_prompts(points: Any, boxes: Any, index: Sequence[Any],
                  sizes: Sequence[tuple[int, int]], *,
                  positional: bool = False) -> list[ImagePrompt | None]:
    """Check ``predict(points=..., boxes=...)`` against the images; nothing is run.

    Parameters
    ----------
    points : list, dict or None
        One entry per image (a list as long as the data, or a dict keyed by the data's
        index; None or a missing key: no points), each ``(coords, labels)``: coords (N, 2)
        ``x, y`` with ``0 <= x < W`` and ``0 <= y < H``, labels (N,) of 1 / 0.
    boxes : list, dict or None
        Likewise, each a (4,) ``x0, y0, x1, y1`` with ``0 <= x0 < x1 <= W`` and
        ``0 <= y0 < y1 <= H``.
    index : sequence
        The data's index (row names in messages, keys of the dicts).
    sizes : sequence of (H, W)
        Original size of each image.

    Returns
    -------
    list of ImagePrompt or None
        One per image; None where the image has no prompt.

    Raises
    ------
    DataValidationError
        The first problem found, naming the row and the value at fault.
    """
    index = list(index)
    per_points = _per_row("points", points, index, positional)
    per_boxes = _per_row("boxes", boxes, index, positional)
    out: list[ImagePrompt | None] = []
    for pos, (row, (height, width)) in enumerate(zip(index, sizes)):
        pts, labels, box = None, None, None
        if not _absent(per_points[pos]):
            pts, labels = _check_points(row, per_points[pos], height, width)
        if not _absent(per_boxes[pos]):
            box = _check_box(row, per_boxes[pos], height, width)
        out.append(None if pts is None and box is None else ImagePrompt(pts, labels, box))
    return out


def _per_row(name: str, value: Any, index: list, positional: bool = False) -> list:
    """One entry (or None) per row from a list or a dict keyed by the index.
    ``positional``: the data has no index of its own (a list of paths, a folder), its rows
    are numbered 0..n-1 by position."""
    n = len(index)
    if value is None:
        return [None] * n
    if isinstance(value, pd.Series) and positional \
            and not value.index.equals(pd.RangeIndex(len(value))):
        raise DataValidationError(
            f"{name} is a Series with an index of its own (labels "
            f"{list(value.index[:3])}...), but the data (a list or folder of images) has "
            "none: its rows are numbered by position, and matching the Series' labels to "
            f"them would pair prompts with other images; pass the DataFrame (or its image "
            f"column) the Series belongs to, or {name}.tolist() in the data's order")
    if isinstance(value, pd.Series):  # a DataFrame's column: by its index, as a dict
        if not value.index.is_unique:
            raise DataValidationError(f"{name} is a Series whose index repeats labels; pass "
                                      "a list with one entry per row instead")
        value = value.to_dict()
    if isinstance(value, Mapping):
        if len(set(index)) != n:
            raise DataValidationError(
                f"{name} is a dict but the data's index has repeated labels; pass a list "
                "with one entry per row instead"
            )
        known = set(index)  # once: a set per key made this quadratic in the data's size
        unknown = [k for k in value if k not in known]
        if unknown:
            raise DataValidationError(
                f"{name} has keys that are not in the data's index: {unknown[:5]!r}"
            )
        return [value.get(row) for row in index]
    if isinstance(value, np.ndarray) and value.ndim >= 2:  # e.g. (N, 4) boxes: a row each
        value = list(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise DataValidationError(
            f"{name} must be a list with one entry per image, or a dict keyed by the data's "
            f"index, got a {type(value).__name__}"
        )
    if len(value) != n:
        raise DataValidationError(
            f"{name} has {len(value)} entries but the data has {n} image(s); give one entry "
            "per image (None for none)"
        )
    return list(value)


def _absent(entry: Any) -> bool:
    """No prompt for the row: None, a missing value as pandas stores one in a column of
    boxes (NaN, ``pd.NA``), or a row of NaNs of an array of boxes."""
    if isinstance(entry, np.ndarray) and entry.dtype.kind == "f" and entry.size \
            and bool(np.isnan(entry).all()):
        return True  # an all-NaN row of an (N, 4) array taken from x0..y1 columns
    if isinstance(entry, (list, tuple)) and entry and all(
            isinstance(v, (float, np.floating)) and bool(np.isnan(v)) for v in entry):
        return True  # the same row as a list (the array's .tolist())
    return (entry is None or type(entry).__name__ == "NAType"
            or (isinstance(entry, (float, np.floating)) and bool(np.isnan(entry))))


def _as_array(row: Any, what: str, value: Any, *, flags: bool = False) -> np.ndarray:
    """``value`` as float64 numbers; strings, and bools unless ``flags`` (point labels), are
    refused: ``("10", "20", ...)`` is text from a file that was not parsed."""
    def words(v: Any) -> bool:  # text, or a flag where a number is wanted, at any depth
        if isinstance(v, (list, tuple)):
            return any(words(x) for x in v)
        if isinstance(v, (str, bytes)):
            return True
        return (isinstance(v, (bool, np.bool_)) and not flags) or (
            isinstance(v, np.ndarray) and (v.dtype.kind in "USVO" and words(v.tolist())
                                           or v.dtype.kind == "b" and not flags))

    try:
        if words(value) or words(np.asarray(value)):
            raise TypeError
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataValidationError(f"row {row!r}: {what} {value!r} is not numeric") from None
    if not np.isfinite(array).all():
        raise DataValidationError(f"row {row!r}: {what} {value!r} is not finite")
    return array


def _check_points(row: Any, entry: Any, height: int, width: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
        raise DataValidationError(
            f"row {row!r}: points must be a (coords, labels) pair, got {entry!r}")
    coords = _as_array(row, "point coordinates", entry[0])
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] < 1:
        raise DataValidationError(
            f"row {row!r}: point coordinates must have shape (N, 2) with N >= 1, got shape "
            f"{coords.shape}")
    labels = _as_array(row, "point labels", entry[1], flags=True)
    if labels.shape != (coords.shape[0],):
        raise DataValidationError(
            f"row {row!r}: point labels must have shape ({coords.shape[0]},), one per point, "
            f"got shape {labels.shape}")
    bad = [v for v in labels.tolist() if v not in (0.0, 1.0)]
    if bad:
        raise DataValidationError(
            f"row {row!r}: point labels must be 1 (foreground) or 0 (background), got "
            f"{bad[0]!r}")
    for x, y in coords.tolist():
        if not (0 <= x < width and 0 <= y < height):
            raise DataValidationError(
                f"row {row!r}: point ({x:g}, {y:g}) is outside the {width}x{height} (W x H) "
                f"image; x must be in [0, {width}) and y in [0, {height})")
    return coords, labels.astype(np.int64)


def _check_box(row: Any, entry: Any, height: int, width: int) -> np.ndarray:
    box = _as_array(row, "box", entry)
    if box.shape != (4,):
        raise DataValidationError(
            f"row {row!r}: a box must be (x0, y0, x1, y1), shape (4,), got shape {box.shape}")
    x0, y0, x1, y1 = box.tolist()
    if x1 <= x0 or y1 <= y0:
        raise DataValidationError(
            f"row {row!r}: box {box.tolist()} must have x1 > x0 and y1 > y0")
    if x0 < 0 or y0 < 0:  # whatever the image's size
        raise DataValidationError(
            f"row {row!r}: box {box.tolist()} has a negative coordinate; x0 and y0 must be "
            ">= 0 (pixels from the image's left and top edges)")
    if x1 > width or y1 > height:
        raise DataValidationError(
            f"row {row!r}: box {box.tolist()} is outside the {width}x{height} (W x H) image; "
            f"it must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
    return box


# --------------------------------------------------------------------------- training
def sample_prompt(target: np.ndarray, mode: str, rate: float,
                  rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One training prompt drawn from an augmented mask, as fixed-size batch entries.

    Parameters
    ----------
    target : ndarray
        (h, w) uint8 of 0 / 1 (255: void, never sampled), in the model frame (resized and
        augmented, before padding).
    mode : {"box", "points", "box_or_points"}
        See :data:`PROMPT_MODES`.
    rate : float
        Probability that the sample gets a prompt at all.
    rng : numpy.random.Generator
        The sample's generator; every number is drawn up front, whatever the mask.

    Returns
    -------
    dict
        ``prompt_kind`` int64 () (0 none, 1 box, 2 points); ``prompt_box`` float32 (4,)
        ``x0, y0, x1, y1``; ``prompt_points`` float32 (MAX_POINTS, 2) ``x, y``;
        ``prompt_labels`` int64 (MAX_POINTS,), -1 for unused slots. An empty mask gets no
        prompt. A box encloses the mask's pixels, each edge moved by up to
        :data:`BOX_JITTER` of the box's width (x) or height (y), clipped to the sample.
        Points: 1 to MAX_POINTS, the first on the mask, each further one on the mask or
        on the background with probability 1/2.
    """
    assert mode in PROMPT_MODES, mode
    use, pick_box, count = rng.random(), rng.random(), int(rng.integers(1, MAX_POINTS + 1))
    jitter = rng.uniform(-1.0, 1.0, size=4)
    where = rng.random((MAX_POINTS, 2))  # per point: which pixel, foreground or not
    height, width = target.shape
    box = np.zeros(4, dtype=np.float32)
    points = np.zeros((MAX_POINTS, 2), dtype=np.float32)
    labels = np.full(MAX_POINTS, -1, dtype=np.int64)
    fg_rows, fg_cols = np.nonzero(target == 1)
    kind = KIND_NONE
    if fg_rows.size and use < rate:
        kind = KIND_BOX if mode == "box" or (mode == "box_or_points" and pick_box < 0.5) \
            else KIND_POINTS
    if kind == KIND_BOX:
        x0, y0 = fg_cols.min(), fg_rows.min()
        x1, y1 = fg_cols.max() + 1, fg_rows.max() + 1  # edges: the box encloses the pixels
        size = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=np.float64)
        moved = np.array([x0, y0, x1, y1], dtype=np.float64) + jitter * BOX_JITTER * size
        moved = np.clip(moved, 0, [width, height, width, height])
        if moved[2] <= moved[0] or moved[3] <= moved[1]:
            moved = np.array([x0, y0, x1, y1], dtype=np.float64)
        box[:] = moved
    elif kind == KIND_POINTS:
        bg_rows, bg_cols = np.nonzero(target == 0)
        for i in range(count):
            foreground = i == 0 or where[i, 1] < 0.5 or not bg_rows.size
            rows, cols = (fg_rows, fg_cols) if foreground else (bg_rows, bg_cols)
            k = min(int(where[i, 0] * rows.size), rows.size - 1)
            points[i] = (cols[k], rows[k])  # x, y: pixel indices, as SAM's points
            labels[i] = int(foreground)
    return {"prompt_kind": torch.tensor(kind, dtype=torch.int64),
            "prompt_box": torch.from_numpy(box), "prompt_points": torch.from_numpy(points),
            "prompt_labels": torch.from_numpy(labels)}


def batch_prompts(batch: Mapping[str, torch.Tensor]) -> list | None:
    """Per-sample :class:`~automask.models.segmenter.Prompt` (or None) of a training batch;
    None when the batch has no prompt entries (prompt-free training)."""
    from ..models.segmenter import Prompt

    if "prompt_kind" not in batch:
        return None
    out: list = []
    for i, kind in enumerate(batch["prompt_kind"].tolist()):
        if kind == KIND_BOX:
            out.append(Prompt(box=batch["prompt_box"][i]))
        elif kind == KIND_POINTS:
            keep = batch["prompt_labels"][i] >= 0
            out.append(Prompt(points=batch["prompt_points"][i][keep],
                              labels=batch["prompt_labels"][i][keep]))
        else:
            out.append(None)
    return out
