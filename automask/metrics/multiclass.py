"""torchmetrics ``Metric`` classes for multi-class semantic segmentation.

Inputs per ``update(preds, target)``: class-index maps ``(H, W)`` / ``(B, H, W)`` (integer
dtype) or class scores ``(K, H, W)`` / ``(B, K, H, W)`` (arg-maxed over K; a NaN score is an
error), or lists of either per image (sizes may differ); targets are class-index maps where
``ignore_index`` (default 255) marks unlabelled pixels. Ignored pixels are removed from every
count, predictions included (as Trans2Seg's ``batch_intersection_union``; AutoGluon's
``Multiclass_IoU`` still counts the prediction on them in the union, which we consider a bug).

All states are per-class sums (``dist_reduce_fx="sum"``): intersections and unions are pooled
over the dataset before dividing, the protocol of the Trans10K/ADE20K/Cityscapes tables.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from automask.metrics.inputs import check_ignore_index, multiclass_pairs


class _ConfusionCounts(Metric):
    """Accumulates per-class intersection, prediction area and target area over labelled pixels."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if (
            isinstance(num_classes, (bool, np.bool_))
            or not isinstance(num_classes, (int, np.integer))
            or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        check_ignore_index(ignore_index)
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        for name in ("intersection", "area_pred", "area_target"):
            self.add_state(name, torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Any, target: Any) -> None:
        """Add one image, a batch or lists of images (see the module docstring for shapes).

        Raises
        ------
        ValueError
            An invalid image (the message names its index); nothing is added then.
        """
        k = self.num_classes
        # every image is validated before any is counted: a bad one leaves the state unchanged
        pairs = list(multiclass_pairs(preds, target, k, self.ignore_index))
        for pred, tgt in pairs:
            if self.ignore_index is None:
                labelled = torch.ones_like(tgt, dtype=torch.bool)
            else:
                labelled = tgt != self.ignore_index
            p, t = pred[labelled], tgt[labelled]  # (n_labelled,)
            self.intersection += torch.bincount(t[p == t], minlength=k).to(self.intersection)
            self.area_pred += torch.bincount(p, minlength=k).to(self.area_pred)
            self.area_target += torch.bincount(t, minlength=k).to(self.area_target)

    def _iou(self) -> Tensor:
        """Per-class IoU ``(K,)`` float64, NaN for a class absent from predictions and targets."""
        inter = self.intersection.to(torch.float64)
        union = self.area_pred.to(torch.float64) + self.area_target - inter
        nan = torch.full_like(union, float("nan"))
        return torch.where(union > 0, inter / union.clamp(min=1), nan)


class PixelAccuracy(_ConfusionCounts):
    """Pixel accuracy: correct labelled pixels / labelled pixels, pooled over the dataset.

    Background (class 0) counts like any class; ignored pixels count nowhere (Trans2Seg ``pixAcc``).
    """

    def compute(self) -> Tensor:
        """Pooled accuracy (NaN before any labelled pixel)."""
        return self.intersection.sum().to(torch.float64) / self.area_target.sum()


class MeanIoU(_ConfusionCounts):
    """Mean IoU over the classes present in the ground truth or the prediction of the dataset.

    Intersections and unions are summed over all images, then ``IoU_c = I_c / U_c`` is averaged
    over the classes with ``U_c > 0``. Trans2Seg (the Trans10K code) averages over all K classes
    with ``I / (eps + U)``, so a class never seen counts as 0 and pulls the mean down;
    mmsegmentation's ``nanmean`` over classes with a union, which is ours, does not. With every
    class present, both agree.
    """

    def compute(self) -> Tensor:
        """Mean of the defined per-class IoUs."""
        return torch.nanmean(self._iou())


class IoUPerClass(_ConfusionCounts):
    """Per-class IoU ``(K,)`` pooled over the dataset; NaN for a class absent from both maps.

    With ``num_classes=1`` torchmetrics squeezes the ``(1,)`` result to a 0-dim tensor;
    :func:`automask.metrics.score` still returns a one-element list.
    """

    def compute(self) -> Tensor:
        """The ``(K,)`` vector of IoUs."""
        return self._iou()
