"""Segmentation losses on logits, with an ignore index.

Binary losses take ``logits`` of shape ``(B, 1, H, W)`` (or ``(B, H, W)``) and a ``target``
``(B, H, W)`` int64 in {0, 1}, where 255 marks pixels to ignore (e.g. the padding added to
reach SAM's 1024x1024 input): ignored pixels are excluded from every term. Multi-class losses
take ``(B, K, H, W)`` logits and a ``(B, H, W)`` int64 target with the same ignore index.

Every loss returns a float32 scalar and computes in float32 even under bf16/fp16 autocast.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255


def _check_dtypes(logits: Tensor, target: Tensor) -> None:
    """Floating-point ``logits`` and an integer (or bool) ``target``, else a TypeError.

    A floating-point target is refused rather than cast: fractional values (a mask resized
    with bilinear interpolation, soft labels) would otherwise be silently read as
    background (binary losses test ``target == 1``) or truncated to a lower class id.
    """
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating-point tensor of raw scores, got {logits.dtype}")
    if torch.is_floating_point(target) or torch.is_complex(target):
        raise TypeError(
            f"target must hold integer class ids (int64, {IGNORE_INDEX} = ignore), got "
            f"{target.dtype}; convert a mask that holds exact ids with target.long()"
        )


def _binary_inputs(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, H, W)`` float32 logits (0 where ignored), {0, 1} target (0 where ignored) and
    validity mask.

    The logits of ignored pixels are replaced, not only weighted by 0: a NaN or an infinity
    there (an overflow in the padding) would otherwise make ``0 * inf`` and NaN terms.
    """
    _check_dtypes(logits, target)
    if logits.ndim == 4 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.shape != target.shape or logits.ndim != 3:
        raise ValueError(
            f"binary losses need logits (B, 1, H, W) and target (B, H, W); "
            f"got logits {tuple(logits.shape)} and target {tuple(target.shape)}"
        )
    valid = target != IGNORE_INDEX
    return torch.where(valid, logits.float(), 0.0), (target == 1).float(), valid.float()


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    return (values * weights).sum() / weights.sum().clamp(min=1)


def _labelled_image_mean(per_image: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per_image`` (B,) over the images with at least one non-ignored pixel.

    An image that is ignored everywhere (a crop inside a void region) has no term to
    contribute, so it must not dilute the others' mean either: a batch ``[a, void]`` gives
    what ``[a]`` gives. When every image has a labelled pixel this is ``per_image.mean()``
    itself, bit for bit; no host synchronisation either way. 0 when no image has one,
    an empty batch (``B = 0``, where ``mean`` would give NaN) included.
    """
    if per_image.numel() == 0:
        return per_image.sum()  # 0, with a graph
    labelled = valid.flatten(1).amax(1)  # (B,) 1.0 where the image has a labelled pixel
    some = (per_image * labelled).sum() / labelled.sum().clamp(min=1)
    return torch.where(labelled.bool().all(), per_image.mean(), some)


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy on logits, mean over non-ignored pixels.

    Parameters
    ----------
    logits : Tensor
        ``(B, 1, H, W)`` raw scores.
    target : Tensor
        ``(B, H, W)`` int64 in {0, 1}, 255 = ignore.
    """
    x, t, valid = _binary_inputs(logits, target)
    return _masked_mean(F.binary_cross_entropy_with_logits(x, t, reduction="none"), valid)


def balanced_bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Class-balanced BCE (HED, Xie and Tu 2015), as used for shadow detection (SBU).

    ``mean_i [w_pos t_i bce_i + w_neg (1 - t_i) bce_i]`` over the non-ignored pixels, with
    ``w_pos = n_neg / n`` and ``w_neg = n_pos / n`` counted over the batch's non-ignored pixels
    (``n = n_pos + n_neg``) and detached: positives and negatives carry the same total weight.
    This is the balanced BCE of the SAM-Adapter code that Conv-LoRA's (AutoGluon) SBU recipe
    follows, ``(n_pos / n) * BCEWithLogits(pos_weight=n_neg / n_pos)`` with mean reduction,
    written out: it equals that expression (up to its ``1e-10`` on ``n_pos``). A batch
    without any positive pixel gives 0 (the reference gives about 1e-10 times the plain BCE).
    Shapes as :func:`bce_loss`.
    """
    x, t, valid = _binary_inputs(logits, target)
    n = valid.sum()
    n_pos = (t * valid).sum()
    w_pos = ((n - n_pos) / n.clamp(min=1)).detach()
    w_neg = (n_pos / n.clamp(min=1)).detach()
    weight = t * w_pos + (1 - t) * w_neg  # (B, H, W)
    losses = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    return _masked_mean(weight * losses, valid)


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017), mean over non-ignored pixels.

    ``alpha`` weights positives (``1 - alpha`` negatives), ``gamma`` down-weights easy pixels;
    the defaults are RetinaNet's (and ``torchvision.ops.sigmoid_focal_loss``'s). Shapes as
    :func:`bce_loss`.

    The modulating factor ``(1 - p_t) ** gamma`` is computed as
    ``exp(gamma * logsigmoid(-x_t))`` (``x_t = x`` for positives, ``-x`` for negatives):
    ``1 - sigmoid(x)`` rounds to 0 for a confident pixel, where the power's derivative
    ``gamma (1 - p_t) ** (gamma - 1)`` is infinite for ``0 < gamma < 1`` and the
    gradient would be NaN.

    Raises
    ------
    ValueError
        ``alpha`` outside [0, 1] or ``gamma`` negative (or either not finite).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"focal loss alpha must be in [0, 1], got {alpha!r}")
    if not 0.0 <= gamma < float("inf"):
        raise ValueError(f"focal loss gamma must be a finite number >= 0, got {gamma!r}")
    x, t, valid = _binary_inputs(logits, target)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    # 1 - p_t = sigmoid(-x) for positives, sigmoid(x) for negatives: sigmoid((1 - 2t) x)
    modulating = torch.exp(gamma * F.logsigmoid((1 - 2 * t) * x))
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return _masked_mean(alpha_t * modulating * ce, valid)


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per image, batch mean.

    ``p = sigmoid(logits)``; sums over non-ignored pixels; ``smooth`` (s) keeps empty masks finite.
    The batch mean skips images ignored everywhere (they have no term). Shapes as
    :func:`bce_loss`.
    """
    x, t, valid = _binary_inputs(logits, target)
    p = torch.sigmoid(x) * valid
    t = t * valid
    inter = (p * t).sum((-2, -1))  # (B,)
    dice = (2 * inter + smooth) / (p.sum((-2, -1)) + t.sum((-2, -1)) + smooth)
    return _labelled_image_mean(1 - dice, valid)


_BOX = 31  # PraNet's boundary window
_FLOAT32_EXACT = 2**24  # integers up to this are exact in float32


def box_mean(t: Tensor, size: int = _BOX) -> Tensor:
    """``avg_pool2d(t, size, stride=1, padding=size // 2)`` (zero padding counted) of a {0, 1}
    ``(B, H, W)`` map, through an integral image.

    The window sums are integer counts, computed exactly from two cumulative sums (in float32
    while the padded image has fewer than 2**24 pixels, else float64) and divided once by
    ``size**2``: the result is the correctly rounded ``count / size**2``, what ``avg_pool2d``
    gives, at a cost that does not grow with the window (about 20-100x faster than the
    31x31 ``avg_pool2d`` on a CPU, see benchmarks/README.md).
    """
    assert size % 2 == 1, size
    h, w = t.shape[-2:]
    r = size // 2
    dtype = torch.float32 if (h + size) * (w + size) < _FLOAT32_EXACT else torch.float64
    # one extra zero row/column in front, so that window [i, i + size) is c[i + size] - c[i]
    c = F.pad(t.to(dtype), (r + 1, r, r + 1, r)).cumsum(-1).cumsum(-2)  # (B, H + size, W + size)
    counts = (
        c[..., size:, size:] - c[..., :h, size:] - c[..., size:, :w] + c[..., :h, :w]
    )  # (B, H, W)
    return (counts / (size * size)).to(t.dtype)


def structure_loss(logits: Tensor, target: Tensor) -> Tensor:
    """PraNet's structure loss: boundary-weighted BCE + boundary-weighted IoU, mean over the batch.

    ``weight = 1 + 5 |avgpool31(t) - t|`` (31x31 mean filter, stride 1, zero padding counted)
    emphasises pixels near the object boundary. It multiplies BOTH terms:

    * ``wbce = sum(weight * bce) / sum(weight)`` per image, where ``bce`` is computed with
      ``reduction="none"``. The widely copied PraNet code passes the deprecated ``reduce="none"``,
      which torch reads as ``reduction="mean"``: the weights then cancel and the term is a plain
      mean (AutoGluon's Conv-LoRA loss inherits this). Here the weights really apply.
    * ``wiou = 1 - (sum(w p t) + 1) / (sum(w (p + t)) - sum(w p t) + 1)`` with ``p = sigmoid``.

    Ignored pixels (255) get weight 0 in both terms and count as background inside the average
    pool (so padding does not create a fake boundary on the mask's side); the batch mean skips
    images ignored everywhere. The pool depends on
    the target only and is computed once per call, exactly, by :func:`box_mean`.

    Parameters
    ----------
    logits : Tensor
        ``(B, 1, H, W)`` raw scores.
    target : Tensor
        ``(B, H, W)`` int64 in {0, 1}, 255 = ignore.
    """
    x, t, valid = _binary_inputs(logits, target)
    pooled = box_mean(t)  # (B, H, W) = avg_pool2d(t, 31, stride 1, padding 15)
    weight = (1 + 5 * (pooled - t).abs()) * valid
    w_sum = weight.sum((-2, -1)).clamp(min=torch.finfo(torch.float32).tiny)  # (B,)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    wbce = (weight * bce).sum((-2, -1)) / w_sum

    p = torch.sigmoid(x)
    inter = (p * t * weight).sum((-2, -1))
    union = ((p + t) * weight).sum((-2, -1))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return _labelled_image_mean(wbce + wiou, valid)


def _multiclass_inputs(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    _check_dtypes(logits, target)
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"multi-class losses need logits (B, K, H, W) and target (B, H, W); got logits "
            f"{tuple(logits.shape)} and target {tuple(target.shape)}"
        )
    target = target.long()
    # logits of ignored pixels replaced (see _binary_inputs): no NaN from a NaN or inf there
    return torch.where((target != IGNORE_INDEX).unsqueeze(1), logits.float(), 0.0), target


def ce_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy over K classes, mean over non-ignored pixels.

    Parameters
    ----------
    logits : Tensor
        ``(B, K, H, W)`` raw scores.
    target : Tensor
        ``(B, H, W)`` int64 class indices, 255 = ignore.
    weight : Tensor, optional
        ``(K,)`` class weights (see :func:`class_weights`): the mean is weighted, as
        ``F.cross_entropy(weight=...)`` takes it, and a batch whose labelled pixels all
        weigh 0 gives 0, not NaN.

    Raises
    ------
    ValueError
        A target value outside ``[0, K)`` that is not the ignore index (the message names
        the values): torch would raise an IndexError on a CPU and a device-side assert, which
        leaves the CUDA context unusable, on a GPU.
    """
    x, t = _multiclass_inputs(logits, target)
    k = x.shape[1]
    labelled = t != IGNORE_INDEX
    bad = labelled & ((t < 0) | (t >= k))
    any_labelled, any_bad = torch.stack([labelled.any(), bad.any()]).tolist()  # one sync
    if any_bad:
        values = torch.unique(t[bad])[:5].tolist()
        raise ValueError(
            f"target holds class ids outside [0, {k}) that are not the ignore index "
            f"{IGNORE_INDEX}: {values}; the logits have K = {k} classes"
        )
    if not any_labelled:
        return x.sum() * 0.0  # all ignored: 0 with a graph, where F.cross_entropy gives NaN
    if weight is None:
        return F.cross_entropy(x, t, ignore_index=IGNORE_INDEX)
    weight = weight.to(x)
    # sum(w_t * nll) / sum(w_t), F.cross_entropy's weighted mean, without its 0 / 0
    nll = F.cross_entropy(x, t, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")
    total = (weight[torch.where(labelled, t, 0)] * labelled).sum()
    return nll / total.clamp_min(torch.finfo(total.dtype).tiny)


def multiclass_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice over classes: ``1 - mean_k (2 sum(p_k t_k) + s) / (sum(p_k) + sum(t_k) + s)``.

    ``p = softmax(logits)`` over K; sums over the batch's non-ignored pixels. Shapes as
    :func:`ce_loss`.
    """
    x, t = _multiclass_inputs(logits, target)
    k = x.shape[1]
    valid = (t != IGNORE_INDEX).unsqueeze(1).float()  # (B, 1, H, W)
    p = torch.softmax(x, dim=1) * valid
    onehot = F.one_hot(torch.where(t == IGNORE_INDEX, 0, t), k).permute(0, 3, 1, 2).float() * valid
    inter = (p * onehot).sum((0, 2, 3))  # (K,)
    dice = (2 * inter + smooth) / (p.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + smooth)
    return (1 - dice).mean()


def ce_dice_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy + soft Dice over classes (:func:`ce_loss` + :func:`multiclass_dice_loss`);
    ``weight`` weighs the cross-entropy's classes (Dice treats them alike already)."""
    return ce_loss(logits, target, weight) + multiclass_dice_loss(logits, target)


def class_weights(rule: str | list[float], pixels: Any, holding: Any) -> Tensor:
    """``(K,)`` float32 class weights of the multi-class cross-entropy.

    Parameters
    ----------
    rule : {"balanced", "median_frequency"} or list of float
        ``balanced``: ``N / (K n_k)``, N the labelled pixels (scikit-learn's
        ``class_weight="balanced"``); ``median_frequency``: ``median(f) / f_k`` with
        ``f_k = n_k / m_k`` over the classes present (Eigen and Fergus, SegNet); a list:
        the weights themselves.
    pixels : array-like
        ``(K,)`` n_k, the training pixels of each class.
    holding : array-like
        ``(K,)`` m_k, the pixels of the training masks that hold class k.

    Returns
    -------
    Tensor
        ``(K,)``; 0 for a class with no pixel (under a rule).
    """
    n = torch.as_tensor(pixels, dtype=torch.float64)
    if not isinstance(rule, str):
        assert len(rule) == n.numel(), (len(rule), n.numel())  # checked by the fit's plan
        return torch.tensor(rule, dtype=torch.float32)
    present = n > 0
    if not present.any():
        raise ValueError("no training pixel is labelled: class weights are undefined")
    if rule == "balanced":
        w = n.sum() / (n.numel() * n)
    elif rule == "median_frequency":
        f = n / torch.as_tensor(holding, dtype=torch.float64)
        w = f[present].quantile(0.5) / f  # an even count: the mean of the two middle
    else:
        raise ValueError(f"unknown class weight rule {rule!r}")
    return torch.where(present, w, 0.0).float()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "structure": structure_loss,
    "bce": bce_loss,
    "dice": dice_loss,
    "balanced_bce": balanced_bce_loss,
    "focal": focal_loss,
    "ce": ce_loss,
    "ce_dice": ce_dice_loss,
}

LOSS_TASKS: dict[str, str] = {
    "structure": "binary",
    "bce": "binary",
    "dice": "binary",
    "balanced_bce": "binary",
    "focal": "binary",
    "ce": "multiclass",
    "ce_dice": "multiclass",
}


def task_loss_name(loss: str, task: str) -> str:
    """The loss ``optim.loss`` names; ``auto`` is ``structure`` (binary) or ``ce_dice``."""
    if loss == "auto":
        return "structure" if task == "binary" else "ce_dice"
    return loss


def build_loss(name: str, task: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Return the loss function registered as ``name`` after checking it suits ``task``.

    Raises
    ------
    ValueError
        An unknown task or loss name, or a loss of the other task (the message lists the
        valid ones).
    """
    if task not in ("binary", "multiclass"):
        raise ValueError(f"unknown task {task!r}; valid tasks: binary, multiclass")
    valid = [n for n, t in LOSS_TASKS.items() if t == task]
    if name not in LOSSES:
        raise ValueError(
            f"unknown loss {name!r} for task {task!r}; valid losses: {', '.join(valid)}"
        )
    if LOSS_TASKS[name] != task:
        raise ValueError(
            f"loss {name!r} is for {LOSS_TASKS[name]} tasks, not {task}; "
            f"valid losses: {', '.join(valid)}"
        )
    return LOSSES[name]
