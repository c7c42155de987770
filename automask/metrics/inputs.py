"""Input conventions of the metrics: conversion, validation and per-image splitting.

Every metric receives images one at a time, as tensors on the caller's device:

* binary: a :class:`BinarySample` holding the prediction as a float64 probability map in
  [0, 1] and the ground truth as a bool mask, both ``(H, W)``;
* multi-class: a pair of int64 class-index maps ``(H, W)``.

The scale rules follow PySODMetrics (``prepare_data``: ``pred / 255``, ``gt > 128``), extended to
the float and 0/1 inputs a training loop produces:

========================  =============================================================
input                      interpretation
========================  =============================================================
float prediction           a probability in [0, 1] (within 1e-6 past it, as a resize's
                           rounding leaves it: clipped); anything else (logits, NaN) is an error
integer prediction         0/1 when its values lie in {0, 1}, else an 8-bit map in 0..255
                           divided by 255 (as ``im2double``), or, when a value exceeds 255, a
                           16-bit map divided by 65535; :func:`automask.metrics.score`
                           reads every map of a call as 0/1 when all hold only 0 and 1,
                           else each by its storage (``uint8``: 8-bit, ``uint16`` or a
                           16-bit file: 16-bit whatever its values)
bool prediction            0.0 / 1.0
integer/float target       max <= 1: a [0, 1] map, foreground where ``t > gt_threshold / 255``;
                           else an 8-bit mask in 0..255, foreground where ``t > gt_threshold``
bool target                used as is
========================  =============================================================

With the default ``gt_threshold=128`` an 8-bit mask is binarised exactly as PySODMetrics does
(the value 128 is background). One deliberate difference: an 8-bit map whose values are all 0
or 1 is read as a 0/1 mask (PySODMetrics would read it as 0 and 1/255); this makes 0/1 label
PNGs work. :func:`automask.metrics.score` reads it so only when every integer map of the call
holds only 0 and 1: beside 8-bit maps it is a faint 8-bit map, as PySODMetrics reads it.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

# np.spacing(1): the epsilon PySODMetrics (and MATLAB's ``eps``) adds to denominators.
EPS = float(np.spacing(1))

# numpy dtypes torch cannot hold or index with; widened before conversion.
_WIDEN = {np.dtype("uint16"): np.int64, np.dtype("uint32"): np.int64, np.dtype("uint64"): np.int64}


def as_tensor(x: Any, device: torch.device | None = None) -> Tensor:
    """Convert a numpy array, tensor or nested list to a tensor without copying when possible."""
    if isinstance(x, Tensor):
        t = x.detach()
        if t.dtype in (torch.uint16, torch.uint32, torch.uint64):  # few kernels take them
            t = t.long()
    else:
        arr = np.asarray(x)
        if arr.dtype == object:
            raise ValueError(f"cannot read an array of Python objects (shape {arr.shape})")
        if not arr.dtype.isnative:  # e.g. a big-endian '>f8' .npy: torch reads native only
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.dtype in _WIDEN:  # after the byte order: '>u2' is not uint16 until then
            arr = arr.astype(_WIDEN[arr.dtype])
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # e.g. np.asarray(PIL image): torch wants writable memory
            arr = arr.copy()
        t = torch.from_numpy(arr)
    return t if device is None else t.to(device)


def _where(index: int | None) -> str:
    return "" if index is None else f"image {index}: "


def _minmax(t: Tensor) -> tuple[float, float]:
    lo, hi = torch.aminmax(t)
    return lo.item(), hi.item()


def _check_real(t: Tensor, name: str, index: int | None) -> None:
    """Raise TypeError for a complex map (comparisons and ``aminmax`` have no meaning there)."""
    if t.is_complex():
        raise TypeError(
            f"{_where(index)}the {name} has the complex dtype {t.dtype}; pass real values"
        )


def check_gt_threshold(gt_threshold: Any) -> None:
    """Raise ValueError unless ``gt_threshold`` is a real number in [0, 255).

    Out of that range the threshold cannot split an 8-bit mask; worse, torch compares an
    integer tensor with a Python int of another range after wrapping it to the tensor's dtype
    (``uint8_mask > 300`` is ``uint8_mask > 44``), which would give a silent wrong mask.
    """
    if isinstance(gt_threshold, bool) or not isinstance(gt_threshold, (int, float, np.number)):
        raise ValueError(
            f"gt_threshold must be a number in [0, 255), got {gt_threshold!r} "
            f"({type(gt_threshold).__name__})"
        )
    if not 0 <= gt_threshold < 255:  # also false for NaN
        raise ValueError(
            f"gt_threshold must lie in [0, 255) (foreground where target > gt_threshold on the "
            f"0..255 scale; PySODMetrics: 128), got {gt_threshold!r}"
        )


def check_ignore_index(ignore_index: Any) -> None:
    """Raise ValueError unless ``ignore_index`` is None or an integer (not a bool)."""
    if ignore_index is None:
        return
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(
        ignore_index, (int, np.integer)
    ):
        raise ValueError(
            f"ignore_index must be an int (the target value of void pixels) or None, "
            f"got {ignore_index!r} ({type(ignore_index).__name__})"
        )


# How far past [0, 1] a probability map may stray by rounding (a bicubic resize, a mean of
# maps in float32) and be clipped back rather than refused as logits.
_ROUNDING = 1e-6


def binary_prediction(pred: Tensor, index: int | None = None,
                      integer_scale: float | None = None) -> Tensor:
    """Read a binary prediction as a float64 probability map in [0, 1] (see the module table);
    ``integer_scale`` (1, 255 or 65535), when given, is the scale of an integer map, decided
    for all the maps of a call (:func:`automask.metrics.score`) rather than from this one."""
    if pred.numel() == 0:
        raise ValueError(f"{_where(index)}the prediction is empty (shape {tuple(pred.shape)})")
    _check_real(pred, "prediction", index)
    if pred.dtype == torch.bool:
        return pred.to(torch.float64)
    if pred.is_floating_point():
        p = pred.to(torch.float64)
        bad = int((~torch.isfinite(p)).sum())
        if bad:
            raise ValueError(f"{_where(index)}the prediction holds {bad} NaN or infinite "
                             f"value(s) of its {p.numel()} pixels")
        lo, hi = _minmax(p)
        if not (-_ROUNDING <= lo and hi <= 1.0 + _ROUNDING):  # also false for NaN
            raise ValueError(
                f"{_where(index)}prediction values must be probabilities in [0, 1], "
                f"got min {float(lo)!r} and max {float(hi)!r} (apply a sigmoid to logits; "
                "pass 8-bit maps as an integer dtype)"
            )
        if lo < 0.0 or hi > 1.0:  # a resize's or an average's rounding past the interval
            p = p.clamp(0.0, 1.0)
        return p
    lo, hi = _minmax(pred)
    if lo < 0 or hi > 65535:
        raise ValueError(
            f"{_where(index)}integer prediction values must lie in 0..255 (8-bit map), "
            f"0..65535 (16-bit map) or {{0, 1}}, got min {lo} and max {hi}"
        )
    p = pred.to(torch.float64)
    if integer_scale is not None:
        assert integer_scale >= hi, (integer_scale, hi)  # the call's scale covers each map
    if integer_scale == 1.0 or (integer_scale is None and hi <= 1):
        return p
    # Divide by a tensor on p's device: CUDA divides by a Python scalar through its reciprocal,
    # whose rounding moves some pixels across the 1/255 bins of the E-measure curve.
    full = integer_scale or (255.0 if hi <= 255 else 65535.0)  # 16-bit: as im2double reads it
    return p / torch.tensor(full, dtype=torch.float64, device=p.device)


def binary_target(target: Tensor, gt_threshold: float = 128, index: int | None = None) -> Tensor:
    """Binarise a ground-truth mask to bool (see the module table for the scale rule)."""
    if target.numel() == 0:
        raise ValueError(f"{_where(index)}the target is empty (shape {tuple(target.shape)})")
    _check_real(target, "target", index)
    if target.dtype == torch.bool:
        return target
    lo, hi = _minmax(target)
    if not (0 <= lo and hi <= 255):  # also false for NaN
        raise ValueError(
            f"{_where(index)}binary target values must lie in {{0, 1}} or 0..255 (8-bit mask), "
            f"got min {lo:g} and max {hi:g}"
        )
    if hi <= 1 or (target.is_floating_point() and hi <= 1.0 + _ROUNDING):
        # a float mask on the 0..1 scale, its ones perhaps a rounding above 1 (a resize)
        if not target.is_floating_point():
            return target == 1
        binary = target.to(torch.float64) > gt_threshold / 255
        if hi > 0 and not bool(binary.any()):  # a {0, 0.5} mask: as for {0, 128} below
            warnings.warn(
                f"{_where(index)}the target's largest value {hi:g} is not above gt_threshold/"
                f"255 = {gt_threshold / 255:.4g} (float masks are on the 0..1 scale), so it "
                "reads as all background (PySODMetrics' rule); if its nonzero pixels are "
                "the object, pass a bool mask (target > 0) or a lower gt_threshold",
                stacklevel=2)
        return binary
    if hi == 255 and not target.is_floating_point() and _void_marked(target):
        raise ValueError(
            f"{_where(index)}the target holds only 0, 1 and 255: a {{0, 1}} mask with 255 "
            "marking void pixels? Pass ignore_index=255 (read as an 8-bit mask it would make 1 "
            "background and 255 the object)"
        )
    if target.dtype == torch.int8:  # 128..254 would wrap to negative int8 values
        target = target.to(torch.int16)
    binary = target > gt_threshold
    if hi <= gt_threshold and not bool(binary.any()):
        # nonzero pixels, none above the threshold: a {0, 2} label or {0, 128} mask
        warnings.warn(
            f"{_where(index)}the target's largest value {hi:g} is not above gt_threshold="
            f"{gt_threshold:g}, so it reads as all background (PySODMetrics' rule, gt > "
            f"{gt_threshold:g}); if its nonzero pixels are the object, pass a bool mask "
            "(target > 0) or a lower gt_threshold", stacklevel=2)
    return binary


def _void_marked(target: Tensor) -> bool:
    """True when an integer target's values are 0, 1 and 255 and nothing else."""
    return bool((target == 1).any()) and not bool(((target > 1) & (target < 255)).any())


def quantized_histogram(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> Tensor:
    """``(2, 256)`` int64 counts of ``q = floor(255 * pred)`` over ``~gt`` (row 0) and ``gt``
    (row 1); with ``valid``, ``(3, 256)`` where row 2 counts the void (not valid) pixels.

    ``floor`` by truncation, as PySODMetrics' ``(pred * 255).astype(np.uint8)``; int32 keeps the
    float-to-integer conversion fast.
    """
    q = (pred * 255).to(torch.int32)  # (H, W) in 0..255
    q = torch.where(gt, q + 256, q)
    if valid is None:
        return torch.bincount(q.flatten(), minlength=512).view(2, 256)
    q = torch.where(valid, q, q + 512)  # gt is False on void pixels
    return torch.bincount(q.flatten(), minlength=768).view(3, 256)


@dataclass(eq=False)
class BinarySample:
    """One image of a binary task, with the derived maps that several metrics share (cached).

    Void (unlabelled) pixels, marked by ``valid``, follow two rules:

    * pixel-wise measures (MAE, IoU, Dice, BER) use the valid pixels only (:meth:`confusion`,
      and ``valid`` itself for MAE);
    * structural measures (S-alpha, E-phi, weighted F), which need the whole 2-D frame, give
      each void pixel the label opposite to the prediction there, so that it is always an
      error: S-alpha and weighted F score :meth:`structural_gt` (``p > 0.5`` -> background,
      else object: an error of size ``max(p, 1 - p) >= 0.5``, the largest any label could
      give); the E-measure does so at each threshold it binarises at (the curve's 256, the
      adaptive one), from :attr:`histogram`'s void row and ``valid``.

    The min-max normalisation (:attr:`minmax`) takes its range from the valid pixels.

    Attributes
    ----------
    pred : Tensor
        ``(H, W)`` float64 probability map in [0, 1], as given (no normalisation).
    gt : Tensor
        ``(H, W)`` bool ground-truth mask (False on void pixels).
    valid : Tensor or None
        ``(H, W)`` bool, True where the pixel is labelled; None when every pixel is.
    """

    pred: Tensor
    gt: Tensor
    valid: Tensor | None = None
    _confusion: dict[float, Tensor] = field(default_factory=dict, repr=False)
    _structural: dict[bool, Tensor] = field(default_factory=dict, repr=False)

    @cached_property
    def n_fg(self) -> int:
        """Number of (valid) foreground pixels of the ground truth."""
        return int(self.gt.sum().item())

    @cached_property
    def n_valid(self) -> int:
        """Number of labelled pixels."""
        return self.gt.numel() if self.valid is None else int(self.valid.sum().item())

    @cached_property
    def minmax(self) -> Tensor:
        """PySODMetrics' ``mapminmax``: ``(p - min) / (max - min)`` unless the map is constant.

        With void pixels, min and max are those of the valid pixels and the result is clipped
        to [0, 1] (void pixels may lie outside that range).
        """
        if self.valid is None:
            lo, hi = torch.aminmax(self.pred)
        elif self.n_valid == 0:
            return self.pred
        else:
            lo, hi = torch.aminmax(self.pred[self.valid])
        if bool(hi == lo):
            return self.pred
        out = (self.pred - lo) / (hi - lo)
        return out if self.valid is None else out.clamp_(0.0, 1.0)

    def structural_gt(self, normalized: bool = True) -> Tensor:
        """The mask the structural measures score: ``gt``, void pixels set opposite to the map.

        ``normalized`` selects the map the measure reads (:attr:`minmax` or ``pred``).
        """
        if self.valid is None:
            return self.gt
        if normalized not in self._structural:
            pred = self.minmax if normalized else self.pred
            self._structural[normalized] = torch.where(self.valid, self.gt, pred <= 0.5)
        return self._structural[normalized]

    @cached_property
    def histogram(self) -> Tensor:
        """``(2, 256)`` counts of ``floor(255 * minmax)`` over the mask's background / object,
        plus a row for the void pixels when there are some (see :func:`quantized_histogram`)."""
        return quantized_histogram(self.minmax, self.gt, self.valid)

    def confusion(self, threshold: float) -> Tensor:
        """``[tp, fp, fn, tn]`` of ``pred > threshold`` (raw probabilities, not normalised),
        counted over the valid pixels."""
        if threshold not in self._confusion:
            hard = self.pred > threshold
            if self.valid is not None:
                hard &= self.valid
            tp = (hard & self.gt).sum()
            n_pred = hard.sum()
            n_fg = self.gt.sum()
            n = self.n_valid
            fp = n_pred - tp
            fn = n_fg - tp
            self._confusion[threshold] = torch.stack([tp, fp, fn, n - tp - fp - fn])
        return self._confusion[threshold]


def _split(x: Any, name: str) -> list:
    """Split a batch into per-image items: a list/tuple as is, a tensor/array along dim 0."""
    if isinstance(x, (list, tuple)):
        return list(x)
    t = as_tensor(x)
    if t.ndim == 2:
        return [t]
    if t.ndim == 3:
        return list(t.unbind(0))
    raise ValueError(
        f"{name} must be (H, W), (B, H, W) or a list of (H, W) maps, got shape {tuple(t.shape)}"
    )


def _channels_last_one(t: Tensor) -> Tensor:
    """A Keras / OpenCV map of one channel without its channel axis: ``(H, W, 1)`` ->
    ``(H, W)``, ``(B, H, W, 1)`` -> ``(B, H, W)``, as :func:`automask.metrics.score` reads
    them (so a ``(B, H, 1)`` stack of maps one pixel wide reads as one map there too)."""
    if t.ndim == 4 and t.shape[-1] == 1 and t.shape[1] != 1:
        return t[..., 0]
    if t.ndim == 3 and t.shape[-1] == 1 < t.shape[0]:
        return t[..., 0]
    return t


def _batch_of_one_channel(target: Tensor) -> Tensor:
    """``(B, 1, H, W)`` targets (a PyTorch loader's masks) as ``(B, H, W)``."""
    return target[:, 0] if target.ndim == 4 and target.shape[1] == 1 else target


def split_void(target: Tensor, ignore_index: int | None) -> tuple[Tensor, Tensor | None]:
    """Return ``target`` with its ``ignore_index`` pixels set to 0, and the validity mask.

    The mask is None when no pixel is void (or ``ignore_index`` is None, or the target is bool).
    """
    if ignore_index is None or target.dtype == torch.bool:
        return target, None
    if not target.is_floating_point():
        info = torch.iinfo(target.dtype)
        if not info.min <= ignore_index <= info.max:
            # no pixel can hold it; comparing would wrap it into the dtype's range
            # (uint8 == -1 is uint8 == 255) and make every object pixel void
            return target, None
    void = target == ignore_index
    if not bool(void.any()):
        return target, None
    return target.masked_fill(void, 0), ~void


def binary_samples(
    preds: Any,
    target: Any,
    gt_threshold: float = 128,
    offset: int = 0,
    ignore_index: int | None = None,
    integer_scale: float | None = None,
) -> list[BinarySample]:
    """Validate and convert binary predictions/targets into :class:`BinarySample` objects.

    Parameters
    ----------
    preds, target
        ``(H, W)``, ``(B, H, W)`` (a ``(B, 1, H, W)`` prediction or target is squeezed, and so
        is an ``(H, W, 1)`` or ``(B, H, W, 1)`` one, as :func:`automask.metrics.score` reads
        them), or lists of ``(H, W)`` maps of possibly different sizes; numpy arrays or
        tensors.
    gt_threshold
        Foreground where ``target > gt_threshold`` on the 0..255 scale (PySODMetrics: 128).
    offset
        Index of the first image, used in error messages.
    ignore_index
        Target value of void (unlabelled) pixels, e.g. 255 with {0, 1} class-index targets;
        None: every pixel is labelled (needed for 8-bit 0/255 masks, where 255 is the object).
    integer_scale
        The scale of integer predictions (1, 255 or 65535) when the caller decided it for a
        whole set (:func:`automask.metrics.score`); None: each map by its own values.
    """
    check_gt_threshold(gt_threshold)
    check_ignore_index(ignore_index)
    if isinstance(preds, BinarySample):
        return [preds]
    if isinstance(preds, (list, tuple)) and preds and isinstance(preds[0], BinarySample):
        return list(preds)
    if not isinstance(target, (list, tuple)):
        # (B, 1, H, W) -> (B, H, W); (H, W, 1) -> (H, W), (B, H, W, 1) -> (B, H, W)
        target = _batch_of_one_channel(_channels_last_one(as_tensor(target)))
    if not isinstance(preds, (list, tuple)):
        p = preds = _channels_last_one(as_tensor(preds))
        # a list of targets stands for a (B, H, W) batch; its maps may differ in size, so it is
        # not stacked here (the per-image check below names a bad one)
        t_ndim = 3 if isinstance(target, (list, tuple)) else target.ndim
        if p.ndim == t_ndim + 1 and p.ndim >= 3 and p.shape[-3] == 1:
            preds = p.squeeze(-3)  # (B, 1, H, W) -> (B, H, W)
    pred_list, target_list = _split(preds, "predictions"), _split(target, "targets")
    if len(pred_list) != len(target_list):
        raise ValueError(f"got {len(pred_list)} predictions but {len(target_list)} targets")
    samples = []
    for i, (p, t) in enumerate(zip(pred_list, target_list), start=offset):
        p = as_tensor(p)
        t = as_tensor(t, device=p.device)
        if p.ndim == 3 and p.shape[0] == 1 and t.ndim == 2:
            p = p[0]  # (1, H, W) single-channel map
        if p.shape == t.shape and p.ndim == 3:  # a (B, H, W) batch given as one list item
            raise ValueError(
                f"image {i}: prediction and target are 3-D, {tuple(p.shape)}: a binary "
                "map is 2-D (H, W); pass a batch of maps as one (B, H, W) array, or as a "
                "list of 2-D maps, not inside a list")
        if p.shape == t.shape and p.ndim != 2:
            raise ValueError(
                f"image {i}: prediction and target have shape {tuple(p.shape)}: binary maps "
                "must be 2-D (H, W)")
        if p.shape != t.shape or p.ndim != 2:
            raise ValueError(
                f"image {i}: prediction shape {tuple(p.shape)} does not match target shape "
                f"{tuple(t.shape)} (binary maps must be 2-D and of the same size; compute metrics "
                "at the ground truth's resolution)"
            )
        if ignore_index is not None and 1 < ignore_index <= 255 and _copied_void(p, ignore_index):
            raise ValueError(
                f"image {i}: the prediction holds only 0, 1 and {ignore_index}, the "
                f"ignore_index: a {{0, 1}} mask with the void pixels copied in? Read as an "
                f"8-bit map (0..255) its 1s would be 1/255, background; give those pixels 0 "
                "or 1 (void pixels are scored nowhere pixel-wise)")
        t, valid = split_void(t, ignore_index)
        gt = binary_target(t, gt_threshold, i)
        if valid is not None:
            gt = gt & valid
        samples.append(BinarySample(binary_prediction(p, i, integer_scale), gt, valid))
    return samples


def _copied_void(pred: Tensor, ignore_index: int) -> bool:
    """Whether an integer prediction holds 0, 1 and ``ignore_index`` and nothing else."""
    if pred.is_floating_point() or pred.dtype == torch.bool or pred.is_complex():
        return False
    p = pred.to(torch.int64)
    return (bool((p == 1).any()) and bool((p == ignore_index).any())
            and bool(((p == 0) | (p == 1) | (p == ignore_index)).all()))


def multiclass_pairs(
    preds: Any,
    target: Any,
    num_classes: int,
    ignore_index: int | None = 255,
    offset: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield validated ``(pred, target)`` int64 class-index maps of one image or one batch.

    ``preds`` may be class indices ``(H, W)``/``(B, H, W)`` (integer dtype) or scores
    ``(K, H, W)``/``(B, K, H, W)`` (arg-maxed over K; NaN is an error), or a list of either per
    image. Target values must lie in ``[0, num_classes)`` or equal ``ignore_index``; predicted
    indices must lie in ``[0, num_classes)``. Same-size batches are yielded whole (flattened
    counting is per pixel).
    """
    if isinstance(preds, (list, tuple)) or isinstance(target, (list, tuple)):
        pred_list, target_list = list(preds), list(target)
        if len(pred_list) != len(target_list):
            raise ValueError(f"got {len(pred_list)} predictions but {len(target_list)} targets")
        for i, (p, t) in enumerate(zip(pred_list, target_list), start=offset):
            yield _multiclass_pair(as_tensor(p), as_tensor(t), num_classes, ignore_index, i)
    else:
        p = as_tensor(preds)
        t = _batch_of_one_channel(as_tensor(target, device=p.device))  # (B, 1, H, W) masks
        yield _multiclass_pair(p, t, num_classes, ignore_index, None)


def _multiclass_pair(
    p: Tensor, t: Tensor, num_classes: int, ignore_index: int | None, index: int | None
) -> tuple[Tensor, Tensor]:
    t = t.to(p.device)
    _check_real(p, "prediction", index)
    _check_real(t, "target", index)
    if t.ndim not in (2, 3):
        raise ValueError(
            f"{_where(index)}targets must be (H, W) or (B, H, W) class maps, "
            f"got shape {tuple(t.shape)}"
        )
    if p.ndim == t.ndim + 1:  # scores (K, H, W) / (B, K, H, W)
        if p.shape[:-3] + p.shape[-2:] != t.shape:
            raise ValueError(
                f"{_where(index)}prediction shape {tuple(p.shape)} does not fit target shape "
                f"{tuple(t.shape)}: score maps must be channels first, (K, H, W) or "
                "(B, K, H, W), with the target's height and width (a colour (H, W, 3) map? "
                "convert it to one channel)"
            )
        if p.shape[-3] != num_classes:
            raise ValueError(
                f"{_where(index)}score maps have {p.shape[-3]} classes along dim {p.ndim - 3}, "
                f"expected num_classes={num_classes}"
            )
        if p.dtype == torch.bool:
            raise ValueError(
                f"{_where(index)}score maps must be numbers, got the dtype torch.bool "
                "(pass class indices (H, W) with an integer dtype instead)"
            )
        if p.is_floating_point():
            nan = torch.isnan(p)
            if bool(nan.any()):  # argmax would silently pick the NaN class
                where = tuple(torch.nonzero(nan)[0].tolist())
                raise ValueError(
                    f"{_where(index)}score maps hold {int(nan.sum().item())} NaN value(s), "
                    f"the first at index {where} of shape {tuple(p.shape)}"
                )
        p = p.argmax(dim=-3)
    elif p.ndim == t.ndim:
        if p.is_floating_point() or p.dtype == torch.bool:
            raise ValueError(
                f"{_where(index)}class-index predictions must have an integer dtype, got {p.dtype} "
                "(pass (K, H, W) scores to have them arg-maxed)"
            )
    else:
        raise ValueError(
            f"{_where(index)}prediction shape {tuple(p.shape)} does not fit "
            f"target shape {tuple(t.shape)}"
        )
    if p.shape != t.shape:
        raise ValueError(
            f"{_where(index)}prediction shape {tuple(p.shape)} does not match "
            f"target shape {tuple(t.shape)}"
        )
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(
            f"{_where(index)}class-index targets must have an integer dtype, got {t.dtype}"
        )
    p, t = p.to(torch.int64), t.to(torch.int64)
    labelled = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    bad_t = labelled & ((t < 0) | (t >= num_classes))
    if bool(bad_t.any()):
        value = t[bad_t][0].item()
        raise ValueError(
            f"{_where(index)}target class index {value} is outside [0, {num_classes}) "
            f"and is not the ignore index {ignore_index}"
        )
    bad_p = labelled & ((p < 0) | (p >= num_classes))  # at a void pixel: scored nowhere
    if bool(bad_p.any()):
        value = p[bad_p][0].item()
        raise ValueError(
            f"{_where(index)}predicted class index {value} is outside [0, {num_classes})"
        )
    return p, t
