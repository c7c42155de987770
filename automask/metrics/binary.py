"""torchmetrics ``Metric`` classes for binary (foreground/background) segmentation.

Each class accumulates over ``update(preds, target)`` calls and returns a float64 scalar
tensor from ``compute()``. Inputs: ``preds`` a probability map ``(H, W)`` / ``(B, H, W)`` (or a
``(B, 1, H, W)`` sigmoid output), or a list of ``(H, W)`` maps of different sizes; ``target`` the
matching ground-truth mask(s) ({0, 1}, bool, or 8-bit 0/255). See :mod:`automask.metrics.inputs`
for the scale rules. Metrics must be fed at the ground truth's original resolution.

States are sums (``dist_reduce_fx="sum"``), so results are exact under DDP.

Void pixels: with ``ignore_index`` set (e.g. 255, with {0, 1} class-index targets, what
``SemanticSegmentor.evaluate`` and validation pass), target pixels equal to it are unlabelled.
They never count as correct:

* pixel-wise metrics (``mae``, ``iou``, ``dice``, ``ber``, ``ber_per_image``, ``fm*``) are
  computed on the valid pixels only, exactly as if the void pixels were cut out (the min-max
  normalisation of ``mae`` and ``fm*`` takes its range from the valid pixels too);
* structural metrics (``sm``, ``em*``, ``wfm``) need the 2-D frame, so each void pixel is given
  the label opposite to the (normalised) prediction there, making it an error: for ``sm`` and
  ``wfm``, which read the continuous map, object where ``p <= 0.5`` and background where
  ``p > 0.5`` (an error of ``max(p, 1 - p)``, the largest any label could give); for the
  E-measure, opposite at each threshold it binarises at (every point of the curve, the
  adaptive threshold), so void pixels are false positives or false negatives there. A
  void pixel is thus never counted as correct; structural scores are not monotone in
  general, but on the frames tested marking pixels void never raised one.

An image without any valid pixel carries no ground truth and is left out of every metric.

Conventions (``em``/``sm``/``wfm``/``mae`` follow PySODMetrics, the code behind the SOD, COD and
polyp tables; thresholded metrics follow the segmentation literature):

* ``normalize`` (``sm``, ``em*``, ``wfm``, ``mae``): per-image min-max normalisation of the
  prediction before measuring, PySODMetrics' ``prepare_data`` (MATLAB ``mapminmax``); a
  constant map is left as is.
* ``threshold`` (``iou``, ``dice``, ``ber``): the raw probability is binarised with
  ``pred > threshold`` (default 0.5), without min-max normalisation. PySODMetrics' "binary"
  mode normalises first; the two agree whenever the map spans [0, 1] (any 8-bit map containing
  0 and 255, any confident network output).
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Any

import math

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from automask.metrics import functional as F
from automask.metrics.inputs import (
    BinarySample,
    binary_samples,
    check_gt_threshold,
    check_ignore_index,
    quantized_histogram,
)


def _check_normalize(normalize: Any) -> None:
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"normalize must be True or False, got {normalize!r}")


def _check_range(name: str, value: Any, lo: float, hi: float) -> None:
    """Raise ValueError unless ``value`` is a finite real number in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and lo <= value <= hi):  # NaN fails both
        bounds = f"[{lo:g}, {hi:g}]" if math.isfinite(hi) else f"a finite number >= {lo:g}"
        raise ValueError(f"{name} must be {'in ' if math.isfinite(hi) else ''}{bounds}, "
                         f"got {value!r}")


class _BinaryMetric(Metric):
    """Shared input handling: converts any accepted input to :class:`BinarySample` objects."""

    is_differentiable = False
    full_state_update = False

    def __init__(
        self, *, gt_threshold: float = 128, ignore_index: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        check_gt_threshold(gt_threshold)
        check_ignore_index(ignore_index)
        self.gt_threshold = gt_threshold
        self.ignore_index = ignore_index

    def _add_sum(self, name: str, shape: tuple[int, ...] = ()) -> None:
        self.add_state(name, default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Any, target: Any = None) -> None:
        """Add one image, a batch or a list of images.

        Parameters
        ----------
        preds
            Probability map(s) ``(H, W)``, ``(B, H, W)``, ``(B, 1, H, W)``, ``(H, W, 1)``,
            ``(B, H, W, 1)`` or a list of ``(H, W)`` maps; alternatively a list of prepared
            :class:`BinarySample` (then ``target`` is None), which lets several metrics share
            the per-image preprocessing.
        target
            Ground-truth mask(s) of the same shape(s); pixels equal to ``ignore_index`` are void.
        """
        samples = binary_samples(preds, target, self.gt_threshold, ignore_index=self.ignore_index)
        for sample in samples:
            if sample.n_valid:  # an image without labelled pixels has no ground truth
                self._update_sample(sample)

    def _update_sample(self, sample: BinarySample) -> None:
        raise NotImplementedError


class _PerImageMean(_BinaryMetric):
    """Mean over images of a per-image score (state: sum of scores, number of images)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_sum("total")
        self._add_sum("count")

    def _add_image(self, value: Tensor) -> None:
        self.total += value.to(self.total)
        self.count += 1

    def compute(self) -> Tensor:
        """Mean of the per-image values (NaN before any update)."""
        return self.total / self.count


class SMeasure(_PerImageMean):
    """S-measure (structure measure, Fan et al. ICCV 2017), mean over images.

    ``alpha = 0.5`` balances the object and region terms, with the all-background (``1 - mean(p)``)
    and all-foreground (``mean(p)``) special cases, as PySODMetrics ``Smeasure`` and the MATLAB
    code. The prediction is min-max normalised per image (``normalize``). The region split uses
    numpy's half-to-even rounding of the centroid (PySODMetrics), not MATLAB's half-away.
    """

    higher_is_better = True

    def __init__(self, alpha: float = 0.5, normalize: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_range("alpha", alpha, 0.0, 1.0)
        _check_normalize(normalize)
        self.alpha = alpha
        self.normalize = normalize

    def _update_sample(self, sample: BinarySample) -> None:
        pred = sample.minmax if self.normalize else sample.pred
        self._add_image(F.s_measure(pred, sample.structural_gt(self.normalize), self.alpha))


class MeanAbsoluteError(_PerImageMean):
    """MAE ``mean(|p - g|)`` per image, averaged (PySODMetrics ``MAE``; min-max normalised).

    With void pixels the mean runs over the valid pixels only."""

    higher_is_better = False

    def __init__(self, normalize: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_normalize(normalize)
        self.normalize = normalize

    def _update_sample(self, sample: BinarySample) -> None:
        pred = sample.minmax if self.normalize else sample.pred
        self._add_image(F.mae(pred, sample.gt, sample.valid))


class WeightedFMeasure(_PerImageMean):
    """Weighted F-measure (Margolin et al. CVPR 2014), mean over images; 0 on an empty mask.

    ``beta2`` is beta squared, default 0.3: the value Conv-LoRA and SAM-Adapter report as
    F_beta^w (CAMO). PySODMetrics' ``WeightedFmeasure(beta=...)`` takes the same beta squared
    but defaults to 1 (Margolin's MATLAB default), so its default numbers differ from the papers'.
    The distance transform runs on the CPU (scipy, exact and with the reference tie-breaking).
    """

    higher_is_better = True

    def __init__(self, beta2: float = 0.3, normalize: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_range("beta2", beta2, 0.0, math.inf)
        _check_normalize(normalize)
        self.beta2 = beta2
        self.normalize = normalize

    def _update_sample(self, sample: BinarySample) -> None:
        pred = sample.minmax if self.normalize else sample.pred
        gt = sample.structural_gt(self.normalize)
        self._add_image(F.weighted_f_measure(pred, gt, self.beta2))


class _CurveMeasure(_BinaryMetric):
    """A measure of ``floor(255 * p) >= t`` at the 256 thresholds t = 0..255 (``variant``
    ``"mean"`` or ``"max"`` of the curve averaged over images) or at the adaptive threshold
    ``min(2 * mean(p), 1)`` (``"adaptive"``, averaged over images), after per-image min-max
    normalisation (``normalize``). Subclasses give the measure of one image."""

    higher_is_better = True
    _kind = ""  # "E-measure", for errors

    def __init__(self, variant: str = "mean", normalize: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if variant not in ("mean", "max", "adaptive"):
            raise ValueError(
                f"{self._kind} variant must be 'mean', 'max' or 'adaptive', got {variant!r}"
            )
        _check_normalize(normalize)
        self.variant = variant
        self.normalize = normalize
        self._add_sum("curve_sum", (256,))
        self._add_sum("adaptive_sum")
        self._add_sum("count")

    @abstractmethod
    def _adaptive(self, pred: Tensor, sample: BinarySample) -> Tensor:
        """The measure of one image at its adaptive threshold."""

    @abstractmethod
    def _curve(self, histogram: Tensor, sample: BinarySample) -> Tensor:
        """The measure of one image at the 256 thresholds, from its histogram."""

    def _update_sample(self, sample: BinarySample) -> None:
        pred = sample.minmax if self.normalize else sample.pred
        if self.variant == "adaptive":
            self.adaptive_sum += self._adaptive(pred, sample).to(self.adaptive_sum)
        else:
            if self.normalize:
                hist = sample.histogram
            else:
                hist = quantized_histogram(pred, sample.gt, sample.valid)
            self.curve_sum += self._curve(hist, sample).to(self.curve_sum)
        self.count += 1

    def curve(self) -> Tensor:
        """The dataset-level curve ``(256,)``, index = threshold."""
        return self.curve_sum / self.count

    def compute(self) -> Tensor:
        """The dataset-level value of the chosen variant."""
        if self.variant == "adaptive":
            return self.adaptive_sum / self.count
        curve = self.curve()
        return curve.mean() if self.variant == "mean" else curve.max()


class EMeasure(_CurveMeasure):
    """E-measure (enhanced-alignment measure, Fan et al. IJCAI 2018).

    ``variant``:

    * ``"mean"`` (registry name ``em``): the mean over the 256-threshold curve, the E_phi that
      Conv-LoRA reports (PySODMetrics ``em["curve"].mean()``);
    * ``"max"`` (``em_max``): the maximum of the curve;
    * ``"adaptive"`` (``em_adp``): per image at the threshold ``min(2 * mean(p), 1)``, averaged.

    The curve binarises ``floor(255 * p) >= t`` for t = 0..255 after per-image min-max
    normalisation. Dataset level, as PySODMetrics: the curves are averaged over images first,
    then reduced, so ``em_max`` is the max of the mean curve, not the mean of per-image maxima.
    Values slightly above 1 occur (the reference divides by ``N - 1``); a one-pixel image,
    where the reference divides by ``eps``, is divided by 1 (see
    :func:`automask.metrics.functional.enhanced_alignment`).
    """

    _kind = "E-measure"

    def _adaptive(self, pred: Tensor, sample: BinarySample) -> Tensor:
        return F.e_measure_adaptive(pred, sample.gt, sample.valid)

    def _curve(self, histogram: Tensor, sample: BinarySample) -> Tensor:
        return F.e_measure_curve(histogram, sample.gt.numel())


class FMeasure(_CurveMeasure):
    """F-measure over thresholds (PySODMetrics ``Fmeasure``, beta^2 = 0.3 by default).

    ``variant``:

    * ``"mean"`` (registry name ``fm``): the mean over the 256-threshold curve (mean F-beta);
    * ``"max"`` (``fm_max``): the maximum of the curve (max F-beta);
    * ``"adaptive"`` (``fm_adp``): per image at the threshold ``min(2 * mean(p), 1)``,
      averaged (adaptive F-beta).

    As the E-measure, the curve binarises ``floor(255 * p) >= t`` after per-image min-max
    normalisation, and is averaged over images before it is reduced. An empty ground truth
    scores 0, as in the reference. A pixel-wise measure: void pixels are left out.
    """

    _kind = "F-measure"

    def __init__(self, variant: str = "mean", beta2: float = 0.3, normalize: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(variant, normalize, **kwargs)
        _check_range("beta2", beta2, 0.0, math.inf)
        self.beta2 = float(beta2)

    def _adaptive(self, pred: Tensor, sample: BinarySample) -> Tensor:
        return F.f_measure_adaptive(pred, sample.gt, self.beta2, sample.valid)

    def _curve(self, histogram: Tensor, sample: BinarySample) -> Tensor:
        return F.f_measure_curve(histogram, self.beta2)


class _ConfusionMetric(_BinaryMetric):
    """Thresholded metric: ``pred > threshold`` against the binarised ground truth."""

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(threshold, (bool, np.bool_)) or not isinstance(
                threshold, (int, float, np.number)):  # as the other settings: no bool, no str
            raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r} "
                             f"({type(threshold).__name__})")
        if not 0.0 <= threshold < 1.0:  # also false for NaN
            raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
        self.threshold = float(threshold)

    def _counts(self, sample: BinarySample) -> Tensor:
        return sample.confusion(self.threshold).to(torch.float64)  # [tp, fp, fn, tn]


def _overlap(counts: Tensor, kind: str, empty_score: float) -> Tensor:
    tp, fp, fn, _ = counts.unbind(-1)
    num, den = (tp, tp + fp + fn) if kind == "iou" else (2 * tp, 2 * tp + fp + fn)
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(den, empty_score))


class _Overlap(_ConfusionMetric):
    kind = "iou"
    higher_is_better = True

    def __init__(self, threshold: float = 0.5, empty_score: float = 1.0, **kwargs: Any) -> None:
        super().__init__(threshold=threshold, **kwargs)
        _check_range("empty_score", empty_score, 0.0, 1.0)
        self.empty_score = empty_score


class BinaryIoU(_Overlap):
    """Jaccard index ``tp / (tp + fp + fn)`` per image at ``pred > threshold``, mean over images.

    An empty prediction on an empty ground truth scores ``empty_score`` (default 1.0: a perfect
    answer). PySODMetrics' ``IOUHandler`` and torchmetrics' ``BinaryJaccardIndex`` give 0 there;
    pass ``empty_score=0.0`` to reproduce them.
    """

    kind = "iou"

    def __init__(self, threshold: float = 0.5, empty_score: float = 1.0, **kwargs: Any) -> None:
        super().__init__(threshold=threshold, empty_score=empty_score, **kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _update_sample(self, sample: BinarySample) -> None:
        self.total += _overlap(self._counts(sample), self.kind, self.empty_score)
        self.count += 1

    def compute(self) -> Tensor:
        """Mean of the per-image scores."""
        return self.total / self.count


class BinaryDice(BinaryIoU):
    """Dice / F1 ``2 tp / (2 tp + fp + fn)`` per image at ``pred > threshold``, mean over images.

    ``empty_score`` (default 1.0) for an empty prediction on an empty ground truth, as for ``iou``.
    """

    kind = "dice"


class PooledIoU(_Overlap):
    """Dataset-level Jaccard: tp, fp, fn summed over all images, then ``tp / (tp + fp + fn)``.

    Equals PySODMetrics' ``IOUHandler(sample_based=False)`` binary result; ``empty_score`` when
    the whole dataset has neither predicted nor true foreground.
    """

    kind = "iou"

    def __init__(self, threshold: float = 0.5, empty_score: float = 1.0, **kwargs: Any) -> None:
        super().__init__(threshold=threshold, empty_score=empty_score, **kwargs)
        self._add_sum("counts", (4,))

    def _update_sample(self, sample: BinarySample) -> None:
        self.counts += self._counts(sample)

    def compute(self) -> Tensor:
        """Score of the summed confusion counts; NaN without any valid pixel."""
        return _nan_without_pixels(_overlap(self.counts, self.kind, self.empty_score),
                                   self.counts)


class PooledDice(PooledIoU):
    """Dataset-level Dice from tp, fp, fn summed over all images (see :class:`PooledIoU`)."""

    kind = "dice"


def _nan_without_pixels(value: Tensor, counts: Tensor) -> Tensor:
    """``value``, or NaN when the pooled ``counts`` hold no pixel at all: every image was
    void, so there is no ground truth to score (as the per-image metrics say by NaN)."""
    return torch.where(counts.sum() > 0, value, torch.full_like(value, float("nan")))


def _ber(counts: Tensor) -> Tensor:
    """PySODMetrics ``BERHandler``: ``1 - (TPR + TNR) / 2`` with 0/0 rates taken as 0."""
    tp, fp, fn, tn = counts.unbind(-1)
    tpr = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    tnr = torch.where(tn + fp > 0, tn / (tn + fp).clamp(min=1), torch.zeros_like(tn))
    return 1 - (tpr + tnr) / 2


class BalancedErrorRate(_ConfusionMetric):
    """Balanced error rate ``1 - (TPR + TNR) / 2`` pooled over the dataset, as a fraction.

    The shadow-detection protocol (SBU, ISTD: Vicente et al.; the MATLAB BER script) sums the
    true positives/negatives and the positive/negative pixel counts over all test images and
    computes BER once; papers print it x100. Equals PySODMetrics ``BERHandler(sample_based=False)``.
    The prediction is binarised with ``pred > threshold`` (0.5); the SAM-Adapter/Conv-LoRA
    evaluation code uses ``> 125`` on 8-bit maps for both prediction and mask: pass
    ``threshold=125/255, gt_threshold=125`` to reproduce it.
    """

    higher_is_better = False

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(threshold=threshold, **kwargs)
        self._add_sum("counts", (4,))

    def _update_sample(self, sample: BinarySample) -> None:
        self.counts += self._counts(sample)

    def compute(self) -> Tensor:
        """BER of the summed counts; NaN without any valid pixel (no ground truth, as the
        other metrics)."""
        return _nan_without_pixels(_ber(self.counts), self.counts)


class BalancedErrorRatePerImage(_ConfusionMetric):
    """Per-image balanced error rate, mean over images: the Conv-LoRA (AutoGluon) variant.

    Conv-LoRA computes ``1 - `` torchmetrics' macro-averaged recall over the classes
    {background, foreground} of each image, where a class with neither true nor predicted pixels
    is left out of the average (so a perfect empty prediction scores 0, where PySODMetrics'
    per-image BER gives 0.5), and a class predicted but absent from the mask has recall 0.
    SAM-Adapter's variant returns NaN when a class is absent and is not provided.
    Use ``threshold=125/255, gt_threshold=125`` for their exact binarisation.
    """

    higher_is_better = False

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(threshold=threshold, **kwargs)
        self._add_sum("total")
        self._add_sum("count")

    def _update_sample(self, sample: BinarySample) -> None:
        tp, fp, fn, tn = self._counts(sample).unbind()
        recalls, present = [], []
        for correct, true_count, pred_count in ((tp, tp + fn, tp + fp), (tn, tn + fp, tn + fn)):
            recall = correct / true_count.clamp(min=1)
            recalls.append(torch.where(true_count > 0, recall, torch.zeros_like(tp)))
            present.append(((true_count + pred_count) > 0).to(tp))
        recall = torch.stack(recalls)
        weight = torch.stack(present)
        self.total += 1 - (recall * weight).sum() / weight.sum()
        self.count += 1

    def compute(self) -> Tensor:
        """Mean of the per-image BERs."""
        return self.total / self.count
