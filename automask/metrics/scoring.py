"""``score()``: the functional entry point, usable on masks from any model."""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Iterator, ValuesView
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from automask.metrics.inputs import (_copied_void, as_tensor, binary_samples, check_gt_threshold,
                                     check_ignore_index, multiclass_pairs)
from automask.metrics.names import DEFAULT_METRICS, METRIC_TASK, TASKS
from automask.metrics.registry import build_metrics


def _as_list(x: Any, name: str) -> list[Tensor]:
    from automask.data.arrays import _is_pil, encoded_image

    if isinstance(x, (str, os.PathLike)) or encoded_image(x) is not None or _is_pil(x) \
            or _colour_array(x):
        x = [x]  # one file, its bytes, or one picture (never a stack of its rows)
    if isinstance(x, (list, tuple)):
        return [_item(item, name, i) for i, item in enumerate(x)]
    t = as_tensor(x)
    if t.ndim < 2:
        raise ValueError(
            f"{name} must be a list of 2-D maps (or of (K, H, W) score maps), "
            f"got shape {tuple(t.shape)}"
        )
    if t.ndim == 3 and t.shape[-1] == 1 < t.shape[0]:
        return [t]  # one (H, W, 1) map, not H maps one pixel wide
    return [t] if t.ndim == 2 else list(t.unbind(0))


def _listed(x: Any) -> Any:
    """A DataFrame's column, a generator or a dict's values as a list of their items (each
    one map, path or picture); anything else as it is."""
    if isinstance(x, (Iterator, ValuesView)) or (
            type(x).__module__.startswith("pandas") and getattr(x, "ndim", 0) == 1):
        return list(x)
    return x


def one_channel(m: Tensor, like: Tensor | None = None) -> Tensor:
    """A map of one channel as ``(H, W)``: ``(1, H, W)``, a PyTorch batch's item, or
    ``(H, W, 1)``, a Keras or OpenCV one. A ``(1, N, 1)`` map reads either way; the one
    of ``like``'s shape (the other side's map) is taken when it is one of them."""
    if (like is not None and m.ndim == 3 and m.shape[0] == m.shape[-1] == 1
            and tuple(like.shape) == (1, m.shape[1])):
        return m[..., 0]  # (1, N, 1) -> (1, N): a one-row map with its channel last
    if m.ndim == 3 and m.shape[0] == 1:
        return m[0]
    if m.ndim == 3 and m.shape[-1] == 1:
        return m[..., 0]
    return m


def _item(item: Any, name: str, index: int) -> Tensor:
    """One map (the ``index``-th): a file's path, a file's bytes (or a Hugging Face image),
    a PIL image, or an array."""
    from automask.data.arrays import _is_pil, encoded_image, write_picture

    if isinstance(item, dict) and set(item) == {"bytes", "path"} and item["bytes"] is None:
        item = item["path"]  # a Hugging Face image by its path
    if isinstance(item, (str, os.PathLike)):
        return _read(item, name)
    if encoded_image(item) is not None:  # read as its file would be
        with tempfile.TemporaryDirectory(prefix="automask-in-memory-") as tmp:
            return _read_in_memory(write_picture(item, Path(tmp), "map"), name, index)
    if _is_pil(item) or _colour_array(item):  # read as its PNG (or TIFF) file would be
        return _read_picture(item, name, index)
    return as_tensor(item)


def _read_in_memory(path: str | os.PathLike, name: str, index: int) -> Tensor:
    """:func:`_read` of a temporary file holding the ``index``-th picture given in memory;
    an error names that picture, not the file."""
    try:
        return _read(path, name)
    except ValueError as exc:
        shown = f"<in-memory {name[:-1]} {index}>"
        text = str(exc).replace(str(path), shown).replace(Path(path).name, shown)
        if shown not in text:  # a message that named no file
            text = f"{shown}: {text}"
        try:
            error = type(exc)(text)
        except TypeError:  # an exception type with other arguments
            raise exc from None
        raise error from None


def _colour_array(item: Any) -> bool:
    """An ``(H, W, 3)`` or ``(H, W, 4)`` uint8 array or tensor: a picture in colour (a mask
    as ``np.asarray`` of an RGB PNG gives it), not ``(K, H, W)`` class scores nor a stack of
    ``H`` maps 3 or 4 pixels wide."""
    shape, dtype = getattr(item, "shape", None), getattr(item, "dtype", None)
    return (shape is not None and len(shape) == 3 and shape[-1] in (3, 4)
            and shape[0] > 4 and shape[1] > 4 and str(dtype) in ("uint8", "torch.uint8"))


def _read_picture(item: Any, name: str, index: int) -> Tensor:
    """A PIL image, or a colour array as a PIL image, read as its file: a prediction in
    colour as its luma, a ground truth in colour as grey when it is grey, else refused
    naming a pixel (see :func:`automask.metrics.folders.read_target`)."""
    from PIL import Image

    from automask.data.arrays import _PNG_MODES, _is_pil

    if not _is_pil(item):
        if hasattr(item, "detach"):
            item = item.detach().cpu().numpy()
        item = Image.fromarray(np.ascontiguousarray(item))
    with tempfile.TemporaryDirectory(prefix="automask-in-memory-") as tmp:
        png = item.mode in _PNG_MODES
        path = Path(tmp) / ("map.png" if png else "map.tiff")
        try:
            item.save(path, **({"compress_level": 0} if png else {}))
        except (OSError, ValueError) as exc:  # a mode no file format here holds (HSV, La)
            raise ValueError(f"<in-memory {name[:-1]} {index}>: a PIL image of mode "
                             f"{item.mode!r} cannot be read as a file ({exc}); convert it to "
                             "'L' (or 'RGB') first") from None
        return _read_in_memory(path, name, index)


def _stack_hint(x: Any, name: str) -> str:
    """Why a lone ``(H, W, 3|4)`` array counts as many maps (for a count mismatch)."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 3 or shape[-1] not in (3, 4):
        return ""
    return (f"; the {name} are one {tuple(shape)} array, read as a stack of {shape[0]} maps "
            f"of {shape[1]}x{shape[2]}: give one picture in colour in a list ([x]) or as a "
            "PIL image")


def _read(path: str | os.PathLike, name: str) -> Tensor:
    """A map read from a file (as :func:`automask.metrics.score_folders` reads one)."""
    from automask.metrics.folders import read_target, read_map  # folders imports score

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {path} is a folder; score_folders(pred_dir, gt_dir) scores "
                         "two folders, score() takes maps or the files of single maps")
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no file {path}")
    return as_tensor(read_target(path) if name == "targets" else read_map(path))


def _binary_like(t: Tensor, ignore_index: int | None = None) -> bool:
    if t.dtype == torch.bool:
        return True
    values = torch.unique(t)
    if ignore_index is not None:
        if not values.is_floating_point():  # int8/uint8 would wrap ignore_index (-1 -> 255)
            values = values.to(torch.int64)
        values = values[values != ignore_index]
    return bool(torch.isin(values, torch.tensor([0, 1], device=t.device)).all()) or bool(
        torch.isin(values, torch.tensor([0, 255], device=t.device)).all()
    )


def _all_0_255(targets: list[Tensor]) -> bool:
    """True when every target holds only 0 and 255, and some hold 255."""
    seen_255 = False
    for t in targets:
        if t.dtype == torch.bool or t.is_floating_point():
            return False
        values = torch.unique(t).to(torch.int64)
        if not bool(torch.isin(values, torch.tensor([0, 255], device=t.device)).all()):
            return False
        seen_255 = seen_255 or bool((values == 255).any())
    return seen_255


# An 8-bit map holding a value from here to 254 is a grey map (a saliency map, an anti-aliased
# mask), not class indices: no common label set reaches it below its void value 255 (COCO-Stuff
# ends at 181, ADE20K at 150).
GREY_FROM = 200
# An integer prediction with more distinct values than this is not guessed to hold class
# indices (one image's map rarely shows more than a few dozen classes, even of ADE20K's 150
# or COCO-Stuff's 171); infer_task then asks for the task instead of guessing.
MAX_GUESSED_CLASSES = 64


def _grey_8bit(predictions: list[Tensor], targets: list[Tensor], ignore_index: int | None) -> bool:
    """True when every map is uint8 and some map holds a value in ``GREY_FROM..254`` (target
    pixels equal to ``ignore_index`` left out)."""
    maps = [*predictions, *targets]
    if not all(m.dtype == torch.uint8 for m in maps):
        return False
    for i, m in enumerate(maps):
        values = _values(m)
        if i >= len(predictions) and ignore_index is not None:
            values = values[values != ignore_index]
        if bool(((values >= GREY_FROM) & (values <= 254)).any()):
            return True
    return False


def _refuse_ids_against_masks(predictions: list[Tensor]) -> None:
    """ValueError for an integer prediction that holds a few small values past 1 (``{0, 1,
    2}``) against 0/1 or 0/255 masks: read as a grey map, 2 is 2/255, background; class ids
    of a multi-class model scored against a set whose masks happen to hold no class past 1
    would be scored as nothing found. Which it is must be said."""
    for i, p in enumerate(predictions):
        if p.dtype == torch.bool or p.is_floating_point() or p.is_complex() or not p.numel():
            continue  # complex maps are refused, naming the image, by the checks after
        values = _values(p)
        hi = int(values.max())
        if 2 <= hi < GREY_FROM and values.numel() <= MAX_GUESSED_CLASSES:
            shown = ", ".join(str(v) for v in values[:8].tolist())
            raise ValueError(
                f"image {i}: the prediction holds the values {{{shown}"
                f"{', ...' if values.numel() > 8 else ''}}} but every target is a 0/1 or "
                "0/255 mask: class ids of a multi-class model (pass task='multiclass') or a "
                "grey map whose values "
                "stay below 200 (pass task='binary'; it is read as value / 255)")


def _values(m: Tensor) -> Tensor:
    """The distinct values of an integer map, sorted, as int64 (of a uint8 map by counting:
    10x faster than sorting a megapixel)."""
    if m.dtype == torch.uint8:
        return torch.bincount(m.flatten(), minlength=256).nonzero().flatten()
    return torch.unique(m).to(torch.int64)


def _mask_values(predictions: list[Tensor]) -> set[int] | None:
    """The values the integer 2-D predictions hold together when they all lie in {0, 1} or
    all in {0, 255}; None otherwise (float or bool maps, more values, mixed kinds)."""
    seen: set[int] = set()
    for p in predictions:
        if p.is_floating_point() or p.dtype == torch.bool or p.is_complex() or p.ndim != 2:
            return None
        values = set(_values(p).tolist()) if p.numel() else set()
        if not (values <= {0, 1} or values <= {0, 255}):
            return None
        seen |= values
    return seen if seen <= {0, 1} or seen <= {0, 255} else None


def _is_scores(p: Tensor, t: Tensor) -> bool:
    """True for ``(K, H, W)`` class scores of an ``(H, W)`` target, with ``K > 1``."""
    return p.ndim == t.ndim + 1 and p.shape[-2:] == t.shape[-2:] and p.shape[-3] > 1


def infer_task(
    predictions: list[Tensor], targets: list[Tensor], ignore_index: int | None = None
) -> str:
    """Guess ``"binary"`` or ``"multiclass"`` from the data.

    Rules, in order: a prediction with one more dimension than its target, of the target's
    height and width, with ``K > 1`` channels (``(K, H, W)`` scores) means multi-class (a
    single-channel ``(1, H, W)`` map is a binary probability map); a floating-point
    prediction (a probability map) means binary; otherwise (integer maps) binary when every
    target holds only {0, 1} or only {0, 255}, or when every map is 8-bit and one of them holds
    a value from ``GREY_FROM`` (200) to 254 (8-bit saliency maps, anti-aliased masks: their
    values are grey levels, and the targets are binarised ``> gt_threshold``), else multi-class.
    A 2-class problem labelled 0/1 is therefore scored as binary; pass ``task`` to override.
    Predictions that are all 0/255 masks (without ``ignore_index``) are binary whatever the
    targets hold, their 255 an object (a model never predicts void); all 0/1 masks against
    targets holding 255 and values from 2 to 254 raise ValueError (grey edges, or class
    ids with void?).
    Against such targets, an integer prediction holding a few values from 2 to 199 (class
    ids ``{0, 1, 2}``, or a dark grey map) raises ValueError instead of being read as grey.
    An integer prediction with more than ``MAX_GUESSED_CLASSES`` (64) distinct values
    against targets that are neither raises ValueError rather than be guessed either way
    (a grey map whose values stay below 200, or a map of very many classes).
    Target pixels equal to ``ignore_index`` (when given) are left out of that check.
    Score maps against targets that all hold only 0 and 255 raise ValueError: multi-class
    metrics would read every object pixel as void (255). So do integer predictions holding a
    value above 255 that no target reaches (16-bit grey maps, read as binary with ``task``).
    """
    predictions = [as_tensor(p) for p in predictions]  # numpy arrays too
    targets = [as_tensor(t) for t in targets]
    if any(_is_scores(p, t) for p, t in zip(predictions, targets)):
        if ignore_index in (None, 255) and _all_0_255(targets):
            # multi-class metrics read 255 as void: every object pixel would be left out
            raise ValueError(
                "the predictions are (K, H, W) class scores but every target holds only 0 "
                "and 255, a binary mask whose 255 multi-class metrics read as void (every "
                "object pixel would be left out); pass one (H, W) probability map per image "
                "for a binary task, or task='multiclass' if 255 really is void"
            )
        return "multiclass"
    if any(p.is_floating_point() for p in predictions):
        return "binary"
    if all(_binary_like(t, ignore_index) for t in targets):
        if not _grey_8bit(predictions, targets, ignore_index):
            _refuse_ids_against_masks(predictions)
        return "binary"
    if _grey_8bit(predictions, targets, ignore_index):
        return "binary"
    for i, t in enumerate(targets):  # 0 and one value past 255: not 65536 classes
        hi = int(t.max())
        if hi > 255 and not bool(((t != 0) & (t != hi)).any()) and bool((t == 0).any()):
            raise ValueError(
                f"image {i}: the target holds only 0 and {hi}: a 16-bit binary "
                "mask? Pass it as 0/255 (for 0/65535: mask // 257) or as a bool mask "
                "(mask > 0); for class ids, pass task='multiclass'")
    masks = _mask_values(predictions)
    if masks == {0, 255} and ignore_index is None:  # a model never predicts void
        return "binary"  # 0/255 masks against grey-edged (anti-aliased) 0/255 ground truths
    if masks == {0, 1} and ignore_index is None:
        grey = sorted({v for t in targets if not t.is_floating_point()
                       for v in _values(t).tolist() if 1 < v < 255})
        if grey and any(bool((t == 255).any()) for t in targets):
            shown = ", ".join(map(str, grey[:6])) + (" ..." if len(grey) > 6 else "")
            raise ValueError(
                f"every prediction is a 0/1 mask but the targets hold 255 and the values "
                f"{shown}: 0/255 masks with grey (anti-aliased) edges, or class ids with 255 "
                "void? Pass task='binary' (targets binarised > gt_threshold) or "
                "task='multiclass' (automask score --task)")
    top = max(int(t.max()) for t in targets if t.numel()) if any(t.numel() for t in targets) else 0
    for i, p in enumerate(predictions):  # ids no target holds: a 16-bit grey map, not classes
        hi = int(p.max()) if p.numel() else 0
        if hi > 255 >= top:
            raise ValueError(
                f"image {i}: the prediction holds values up to {hi} but no target holds one "
                f"above {top}: a 16-bit grey map? Pass task='binary' (it is divided by 65535); "
                "for class ids, pass task='multiclass'")
    for i, p in enumerate(predictions):  # many grey levels, not a few class indices
        levels = _values(p).numel() if p.numel() and p.dtype != torch.bool else 0
        if levels > MAX_GUESSED_CLASSES:
            raise ValueError(
                f"image {i}: the integer prediction holds {levels} different values, more than "
                f"the class indices of one image's map usually do ({MAX_GUESSED_CLASSES}), "
                "and the targets are not 0/1 or 0/255 masks: a grey map (a saliency map, "
                "probabilities x 255)? Pass task='binary' (targets binarised > gt_threshold); "
                "for class indices, pass task='multiclass'")
    return "multiclass"


def _infer_num_classes(
    predictions: list[Tensor], targets: list[Tensor], ignore_index: int | None
) -> int:
    highest = -1
    for i, (p, t) in enumerate(zip(predictions, targets)):
        if p.ndim == t.ndim + 1:
            return int(p.shape[-3])
        if ignore_index is not None and not p.is_floating_point() and p.shape == t.shape \
                and bool(((p.to(torch.int64) == ignore_index)
                          & (t.to(torch.int64) != ignore_index)).any()):
            # at a labelled pixel, counted, it would make a class of its own (class 255 of
            # IoU 0 in the mean); at a void pixel it is scored nowhere
            raise ValueError(
                f"image {i}: the prediction holds {ignore_index}, the ground truths' "
                f"ignore_index, as a class index: a prediction gives every pixel a class, so "
                f"{ignore_index} would be scored as a class of its own (with IoU 0 in the "
                "mean); give those pixels a class (or, if these are binary 0/255 masks, pass "
                "task='binary')")
        if ignore_index is not None:
            if not t.is_floating_point():  # int8/uint8 would wrap ignore_index (-1 -> 255)
                t = t.to(torch.int64)
            keep = t != ignore_index  # what a prediction says at a void pixel is not scored
            labelled = t[keep]
            predicted = p[keep] if p.shape == t.shape else p.flatten()
        else:
            labelled, predicted = t.flatten(), p.flatten()
        for values in (predicted, labelled):
            if values.numel():
                highest = max(highest, int(values.max().item()))
    if highest < 0:  # no labelled pixel anywhere: every score is NaN, for classes 0..top
        highest = max((int(p.max()) for p in predictions
                       if p.numel() and not p.is_floating_point() and p.ndim == 2), default=0)
    return highest + 1


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Run torch CPU ops on one thread, then restore the previous setting.

    Each per-image op is short (about 0.1 ms on a 0.3-Mpixel mask), too short to gain from
    intra-op threads; on a machine whose cores are busy, waiting for them made ``score`` up to
    15 times slower. Images are independent, so parallelise over images instead if needed.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _to_python(value: Tensor, per_class: bool = False) -> float | list[float]:
    """A float, or a list of floats for a vector; ``per_class`` always gives a list (torchmetrics
    squeezes a one-class ``(1,)`` result to a scalar)."""
    value = value.detach().cpu().to(torch.float64)
    return value.item() if value.ndim == 0 and not per_class else value.reshape(-1).tolist()


def score(
    predictions: Any,
    targets: Any,
    task: str | None = None,
    metrics: list[str] | None = None,
    **conventions: Any,
) -> dict[str, float | list[float]]:
    """Score predicted masks against ground truths, without any model.

    Parameters
    ----------
    predictions
        List of per-image maps (numpy arrays, tensors, PIL images, or paths of image or ``.npy``
        files, or such files' bytes or Hugging Face images ``{"bytes": ..., "path": ...}``,
        read as :func:`automask.metrics.score_folders` reads them; sizes may differ).
        PIL images, and ``(H, W, 3)`` or ``(H, W, 4)`` uint8 arrays or tensors (H and W
        above 4), are pictures read as their PNG files (a prediction in colour as its luma).
        Binary: probability maps in [0, 1], or 8-bit maps 0..255, or 0/1 masks. Multi-class:
        class-index maps, or ``(K, H, W)`` scores. A map of one channel, ``(1, H, W)`` or
        ``(H, W, 1)``, is read as ``(H, W)``. Any other array/tensor on its own (not in a
        list) is a stack of maps, split along its first axis: ``(B, H, W)``,
        ``(B, 1, H, W)``, ``(B, H, W, 1)`` or ``(B, K, H, W)``.
    targets
        List (or stack) of ground-truth masks of the same sizes (read as the predictions are; a
        picture in colour must be grey, as :meth:`automask.SemanticSegmentor.evaluate`
        requires). Binary: 0/1, bool or 8-bit 0/255 (binarised
        ``> 128``, as PySODMetrics), or {0, 1} with ``ignore_index`` marking void pixels.
        Multi-class: class indices, ``ignore_index`` (255) unlabelled.
    task
        ``"binary"`` or ``"multiclass"``; when None, the task of the ``metrics`` named, else
        inferred from the data (see :func:`infer_task`).
    metrics
        Registry names; None means the task's default set (``DEFAULT_METRICS``).
    **conventions
        Metric conventions: binary ``threshold`` (0.5), ``beta2`` (0.3), ``empty_score`` (1.0),
        ``gt_threshold`` (128), ``normalize`` (True), ``alpha`` (0.5), ``ignore_index`` (None:
        every pixel labelled, as 8-bit 0/255 masks need; pass 255 for {0, 1, 255} masks, whose
        255 pixels are then void, see :mod:`automask.metrics.binary` for how void is scored);
        multi-class ``num_classes`` (inferred from the data when omitted) and ``ignore_index``
        (255).

    Returns
    -------
    dict
        Metric name -> float (a list of floats for ``iou_per_class``, NaN for absent classes).

    Raises
    ------
    ValueError
        Unknown task/metric/convention, different numbers of predictions and targets, or an
        invalid image (shape mismatch, probability outside [0, 1], class index out of range);
        the message names the image index.
    """
    check_ignore_index(conventions.get("ignore_index"))  # before any file is read
    if isinstance(metrics, str):
        metrics = [metrics]  # one name, as evaluate takes it (not its letters)
    targets, predictions = _listed(targets), _listed(predictions)
    pred_list = _as_list(predictions, "predictions")
    target_list = [one_channel(t, pred_list[i] if i < len(pred_list) else None)
                   for i, t in enumerate(_as_list(targets, "targets"))]
    # (K, H, 1) scores of an H x 1 target keep their width; any other one-channel map
    # becomes (H, W)
    pred_list = [p if i < len(target_list) and _is_scores(as_tensor(p), target_list[i])
                 else one_channel(p, target_list[i] if i < len(target_list)
                                  else None) for i, p in enumerate(pred_list)]
    if len(pred_list) != len(target_list):
        raise ValueError(f"got {len(pred_list)} predictions but {len(target_list)} targets"
                         + _stack_hint(predictions, "predictions")
                         + _stack_hint(targets, "targets"))
    if not pred_list:
        raise ValueError("no images to score")
    if task is None and metrics:
        tasks = {METRIC_TASK.get(name) for name in metrics} - {None}
        task = tasks.pop() if len(tasks) == 1 else None
        if task == "binary":
            _refuse_class_indices(target_list, metrics, conventions)
    if task is None:
        task = infer_task(pred_list, target_list, conventions.get("ignore_index"))
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if task == "multiclass" and conventions.get("ignore_index", 255) == 255 \
            and _all_0_255(target_list) and any(bool((t == 0).any()) for t in target_list):
        # binary masks? their objects (255) are void here: predicting nothing scores 1
        warnings.warn(
            "task 'multiclass' but every target holds only 0 and 255: if these are binary "
            "masks, their objects (255) are read as void and left out of every score; pass "
            "task='binary' (automask score --task binary)", stacklevel=2)
    names = list(DEFAULT_METRICS[task]) if metrics is None else list(metrics)
    if not names:
        raise ValueError("metrics is empty; give metric names, or None for the task's default set")

    _check_ignore_index_fits(target_list, conventions.get("ignore_index"))
    files = _file_names(predictions), _file_names(targets)
    scales = _integer_scale(pred_list, predictions, files[0], conventions.get("ignore_index")) \
        if task == "binary" else None
    try:
        with _one_intra_op_thread():
            return _score(pred_list, target_list, task, names, conventions, scales)
    except (ValueError, TypeError) as err:
        message = str(err)
        found = re.match(r"image (\d+): ", message)
        if found is None or not any(files[0] + files[1]):
            raise
        index = int(found.group(1))
        named = " vs ".join(f[index] for f in files if index < len(f) and f[index])
        raise type(err)(f"{named}: {message}") from err


def _refuse_class_indices(targets: list[Tensor], metrics: list[str],
                          conventions: dict[str, Any]) -> None:
    """ValueError when binary ``metrics`` were named (the task left to them) for targets that
    are all integer maps holding a value from 2 up and none above ``gt_threshold`` (class
    indices, or masks whose object is a low value): binarised as masks (``> gt_threshold``)
    they would all be background, every prediction scored against nothing. ``evaluate``
    refuses class indices for binary metrics too; ``task='binary'`` scores them as they are
    (with a warning per target)."""
    gt_threshold = conventions.get("gt_threshold", 128)
    check_gt_threshold(gt_threshold)
    ignore_index = conventions.get("ignore_index")
    values: set[int] = set()
    for t in targets:
        t = as_tensor(t)
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex() or not t.numel():
            return
        found = _values(t)
        if ignore_index is not None:
            found = found[found != ignore_index]
        if found.numel() and int(found.max()) > gt_threshold:
            return  # an 8-bit mask's object is there
        values.update(found.tolist())
    if not values or max(values) < 2:
        return  # {0, 1} masks are binary
    shown = sorted(values)
    shown_text = ", ".join(map(str, shown[:8])) + (" ..." if len(shown) > 8 else "")
    raise ValueError(
        f"metrics {list(metrics)} are binary metrics, but the targets hold only the values "
        f"{shown_text}, none above gt_threshold={gt_threshold:g}: binarised as masks they "
        "would all be background. For class indices, name multi-class metrics "
        f"({', '.join(DEFAULT_METRICS['multiclass'])}) or pass task='multiclass'; if their "
        "nonzero pixels are the object, pass bool masks (target > 0) or a lower "
        "gt_threshold; task='binary' scores them as they are")


def _check_ignore_index_fits(targets: list[Tensor], ignore_index: Any) -> None:
    """ValueError when no ground truth can hold ``ignore_index`` (999 or -1 for 8-bit masks):
    its void pixels (VOC's 255 border) would silently count as a class of their own.
    ``ignore_index`` is None or an integer (checked by :func:`score` first)."""
    if ignore_index is None:
        return
    dtypes = {t.dtype for t in targets}
    if not dtypes or any(d.is_floating_point or d == torch.bool for d in dtypes):
        return
    ranges = {d: torch.iinfo(d) for d in dtypes}
    if all(not r.min <= ignore_index <= r.max for r in ranges.values()):
        kinds = ", ".join(f"{str(d).removeprefix('torch.')} ({r.min}..{r.max})"
                          for d, r in ranges.items())
        raise ValueError(
            f"ignore_index={ignore_index} cannot occur in the ground truths, whose values are "
            f"{kinds}; void pixels are usually 255 in 8-bit masks (e.g. VOC's border), or "
            "pass ignore_index=None when no pixel is void")


def _file_names(x: Any) -> list[str | None]:
    """The file name of each item given as a path (None for the others), for messages."""
    items = [x] if isinstance(x, (str, os.PathLike)) else x
    if not isinstance(items, (list, tuple)):
        return []
    return [Path(i).name if isinstance(i, (str, os.PathLike)) else None for i in items]


def _integer_scale(preds: list[Tensor], given: Any, names: list[str | None],
                   ignore_index: int | None = None) -> list[float | None] | None:
    """The scale of each integer binary prediction (1, 255 or 65535; None for float and
    bool maps), or None without integer predictions.

    A map's storage decides where it tells: ``uint8`` (an 8-bit array or file) is read on
    the 8-bit scale, a 16-bit one (a ``uint16`` array, a 16-bit PNG or TIFF, a ``uint16``
    ``.npy``) on the 16-bit scale, so that a faint 16-bit map (values below 256) stays
    faint and an 8-bit file beside 16-bit ones stays 8-bit. Other integer maps (``int32``,
    ``int64``) share one scale per call: 16-bit when one of them is (a value above 255),
    else 8-bit. When every integer map of the call holds only 0 and 1, whatever its
    storage, they are 0/1 masks (an ITK label map saved in 16 bits); a 0/1 map beside maps
    of a wider scale is read on that scale (its 1 is background), with a warning naming it.
    """
    ints = [i for i, p in enumerate(preds)
            if not (p.is_floating_point() or p.dtype == torch.bool or p.is_complex())]
    if not ints or (ignore_index is not None and 1 < ignore_index <= 255 and any(
            _copied_void(preds[i], ignore_index) for i in ints)):
        return None  # a 0/1 mask with the void copied in: refused, naming it, when scored
    highs = {i: int(preds[i].max()) if preds[i].numel() else 0 for i in ints}
    scales: list[float | None] = [None] * len(preds)
    if max(highs.values()) <= 1:
        for i in ints:
            scales[i] = 1.0
        return scales
    items = given if isinstance(given, (list, tuple)) else None
    wide = {i for i in ints if (items is None and _sixteen_bit(given))
            or (items is not None and i < len(items) and _sixteen_bit(items[i]))}
    byte = {i for i in ints if preds[i].dtype == torch.uint8 and i not in wide}
    others = [i for i in ints if i not in wide and i not in byte]
    other_scale = 65535.0 if any(highs[i] > 255 for i in others) else 255.0
    for i in ints:
        scales[i] = 65535.0 if i in wide or highs[i] > 255 else 255.0 if i in byte \
            else other_scale
    masks = [i for i in ints if 0 < highs[i] <= 1]
    if masks:
        shown = names[masks[0]] if masks[0] < len(names) and names[masks[0]] \
            else f"prediction {masks[0]}"
        bits = "16" if scales[masks[0]] == 65535.0 else "8"
        warnings.warn(
            f"{len(masks)} integer prediction(s) hold only 0 and 1 (e.g. {shown!r}) while "
            f"others are 8- or 16-bit maps: they are read on the {bits}-bit scale (1 is "
            f"1/{2 ** int(bits) - 1}, background); pass 0/1 masks as bool, or as 0/255, to "
            "score them as masks", stacklevel=3)
    faint = [i for i in wide if 1 < highs[i] <= 255]
    if faint:
        shown = names[faint[0]] if faint[0] < len(names) and names[faint[0]] \
            else f"prediction {faint[0]}"
        warnings.warn(
            f"{len(faint)} 16-bit prediction(s) hold no value above 255 (e.g. {shown!r}): "
            "they are read on the 16-bit scale, as probabilities of at most 255/65535; if "
            "they are 8-bit maps saved in 16 bits, save them as 8-bit", stacklevel=3)
    return scales


def _sixteen_bit(item: Any) -> bool:
    """Whether a prediction as given is a 16-bit map: a ``uint16`` array or tensor, a
    16-bit PNG or TIFF file, or a ``.npy`` file of ``uint16``."""
    if isinstance(item, np.ndarray):
        return item.dtype == np.uint16
    if isinstance(item, Tensor):
        return item.dtype == torch.uint16
    if isinstance(item, (str, os.PathLike)) and Path(item).is_file():
        try:
            if str(item).lower().endswith(".npy"):
                return np.load(item, mmap_mode="r").dtype == np.uint16
            from PIL import Image

            with Image.open(item) as im:
                return im.mode.startswith("I;16")
        except Exception:  # unreadable: the reading proper names it
            return False
    return False


def _score(
    pred_list: list[Tensor],
    target_list: list[Tensor],
    task: str,
    names: list[str],
    conventions: dict[str, Any],
    scales: list[float | None] | None = None,
) -> dict[str, float | list[float]]:
    if task == "binary":
        built = build_metrics(task, names, **conventions)
        gt_threshold = conventions.get("gt_threshold", 128)
        ignore_index = conventions.get("ignore_index")
        objects = voids = 0
        for i, (p, t) in enumerate(zip(pred_list, target_list)):
            # prepared once, shared by every metric
            samples = binary_samples([p], [t], gt_threshold, offset=i, ignore_index=ignore_index,
                                     integer_scale=None if scales is None else scales[i])
            objects += samples[0].n_fg
            voids += samples[0].gt.numel() - samples[0].n_valid
            if not samples[0].n_valid:
                continue  # no labelled pixel: no ground truth
            for metric in built.values():
                metric.update(samples)
        if ignore_index is not None and voids and not objects:
            warnings.warn(
                f"no target has a labelled object pixel and {voids} pixels equal ignore_index="
                f"{ignore_index} (void); if these are 0/{ignore_index} masks, their objects are "
                "what was left out: pass ignore_index=None", stacklevel=3)
    else:
        ignore_index = conventions.get("ignore_index", 255)
        given_k = conventions.get("num_classes")
        if ignore_index is not None and ignore_index != 255 and (given_k is None
                                                                 or given_k <= 255):
            # 255 stays unlabelled beside another void value (CamVid's 11 and a 255
            # border), as evaluate reads such masks: not a class 255 of its own
            target_list = [t.masked_fill(t == 255, ignore_index)
                           if not (t.is_floating_point() or t.dtype == torch.bool)
                           and bool((t == 255).any()) else t for t in target_list]
        if conventions.get("num_classes") is None:
            num_classes = _infer_num_classes(pred_list, target_list, ignore_index)
            conventions = {**conventions, "num_classes": num_classes}
        elif ignore_index is not None and 0 <= ignore_index < given_k and any(
                not p.is_floating_point() and p.shape == t.shape
                and bool(((p == ignore_index) & (t != ignore_index)).any())
                for p, t in zip(pred_list, target_list)):
            warnings.warn(
                f"ignore_index={ignore_index} is one of the num_classes={given_k} classes: "
                f"no pixel is labelled {ignore_index}, so the predictions of it at labelled "
                f"pixels are scored as a class of its own (IoU 0 in the mean, as torchmetrics "
                f"counts it); if {ignore_index} is only the void, a model never "
                f"predicts it: give those pixels one of the other classes",
                stacklevel=3)
        built = build_metrics(task, names, **conventions)
        pairs = multiclass_pairs(pred_list, target_list, conventions["num_classes"], ignore_index)
        for p, t in pairs:  # validated per image, errors name the image
            for metric in built.values():
                metric.update(p, t)
    with warnings.catch_warnings():
        # a metric no image updated (none had a labelled pixel) is NaN, as documented; the
        # warning above (or the NaN) says so, not one from torchmetrics per metric
        warnings.filterwarnings("ignore", message=r".*``compute`` method of metric .* was "
                                r"called before the ``update``")
        return {
            name: _to_python(metric.compute(), per_class=name == "iou_per_class")
            for name, metric in built.items()
        }
