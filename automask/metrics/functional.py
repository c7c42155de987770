"""Per-image binary measures of the salient/camouflaged object and polyp literature.

Pure functions on one image: ``pred`` is a float64 ``(H, W)`` map in [0, 1] (already min-max
normalised where the protocol does so) and ``gt`` a bool ``(H, W)`` mask. Each follows
PySODMetrics 1.6.2, the Python port of the MATLAB code behind the published numbers, formula
for formula (including its ``eps`` terms), but computes with closed-form sums and histograms
instead of repeated passes, on whatever device the tensors are on. Results are float64 0-dim
tensors (or a 256-vector for the E-measure curve).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from torch import Tensor

from automask.metrics.inputs import EPS


def mae(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean absolute error ``mean(|pred - gt|)`` (Perazzi et al., CVPR 2012).

    ``valid`` (bool ``(H, W)``), when given, restricts the mean to its True pixels.
    """
    err = (pred - gt.to(pred.dtype)).abs()
    return err.mean() if valid is None else err[valid].mean()


# --------------------------------------------------------------------------------------------
# S-measure (Fan et al., ICCV 2017)
# --------------------------------------------------------------------------------------------
def s_measure(pred: Tensor, gt: Tensor, alpha: float = 0.5) -> Tensor:
    """Structure measure ``alpha * S_object + (1 - alpha) * S_region``, clipped at 0.

    Special cases as in the reference: an all-background ground truth gives ``1 - mean(pred)``,
    an all-foreground one ``mean(pred)``. The region term splits the image at the foreground
    centroid rounded half-to-even (numpy's ``round``, as PySODMetrics; the MATLAB code rounds
    half away from zero, which differs when the 0-based centroid is ``k + 0.5`` with k even),
    plus one. All statistics come from one set of per-quadrant sums of
    ``p, p^2, g, p g, p^2 g``, except the standard deviation of a nearly constant region,
    which takes a second pass (see :func:`_object_score`).

    Where PySODMetrics would return NaN (the centroid on the last row/column leaves an empty
    quadrant, whose weight is 0), the empty quadrant contributes 0 here.
    """
    h, w = gt.shape
    n = h * w
    row_fg = gt.sum(1)  # (H,) int64
    col_fg = gt.sum(0)  # (W,)
    n_fg = int(row_fg.sum().item())
    if n_fg == 0:
        return 1 - pred.mean()
    if n_fg == n:
        return pred.mean()

    # Centroid: mean row / column index of the foreground pixels, exactly as argwhere().mean().
    ar_h = torch.arange(h, device=gt.device)
    ar_w = torch.arange(w, device=gt.device)
    # Exact integer sums, divided and rounded half-to-even on the host (CUDA would divide by a
    # Python number through its reciprocal and could move a k + 0.5 centroid).
    sums = torch.stack([(ar_h * row_fg).sum(), (ar_w * col_fg).sum()]).tolist()
    cy, cx = (int(round(v / n_fg)) + 1 for v in sums)

    pp = pred * pred
    pg = torch.where(gt, pred, 0.0)
    ppg = torch.where(gt, pp, 0.0)
    top, bottom, left, right = slice(0, cy), slice(cy, h), slice(0, cx), slice(cx, w)
    blocks = [(top, left), (top, right), (bottom, left), (bottom, right)]
    # (4 quadrants lt, rt, lb, rb; 5 sums p, p^2, g, p g, p^2 g)
    maps = (pred, pp, gt, pg, ppg)
    quad = torch.stack(
        [torch.stack([x[r, c].sum().to(pred.dtype) for x in maps]) for r, c in blocks]
    )

    object_score = _object_score(pred, gt, n_fg, n, quad.sum(0))
    region_score = _region_score(pred, quad, cy, cx, h, w)
    return torch.clamp(alpha * object_score + (1 - alpha) * region_score, min=0)


def _object_score(pred: Tensor, gt: Tensor, n_fg: int, n: int, total: Tensor) -> Tensor:
    """The object term over the foreground (values ``p``) and background (``1 - p``).

    ``total`` holds the image's sums of ``p, p^2, g, p g, p^2 g``. A region's sum of squared
    deviations comes from them (one pass), except where the region is nearly constant: there
    ``sum(x^2) - sum(x) m`` cancels catastrophically, and the square root would turn a 1e-17
    rounding residue into an error of about 1e-9 in the score (e.g. any constant 8-bit map,
    which min-max leaves as is), so that region takes a second pass over its deviations from
    the mean, as the reference computes them.
    """
    s_p, s_pp, _, s_pg, s_ppg = total.unbind()
    n_bg = n - n_fg
    mean_fg = s_pg / n_fg
    # background on 1 - p: sum(1 - p) = n_bg - S, sum((1 - p)^2) = n_bg - 2 S + S2
    s_bg, s2_bg = s_p - s_pg, s_pp - s_ppg
    mean_bg = (n_bg - s_bg) / n_bg
    scores = []
    for count, mean, sq_sum, region in (
        (n_fg, mean_fg, s_ppg, lambda: pred[gt]),
        (n_bg, mean_bg, n_bg - 2 * s_bg + s2_bg, lambda: 1 - pred[~gt]),
    ):
        sq_dev = torch.clamp(sq_sum - count * mean * mean, min=0)
        if count > 1 and float(sq_dev) <= 1e-4 * float(sq_sum):  # nearly constant: exact
            sq_dev = ((region() - mean) ** 2).sum()
        std = torch.sqrt(sq_dev / (count - 1)) if count > 1 else torch.zeros_like(mean)
        scores.append(2 * mean / (mean * mean + 1 + std + EPS))
    gt_mean = n_fg / n
    return scores[0] * gt_mean + scores[1] * (1 - gt_mean)


def _region_score(pred: Tensor, quad: Tensor, cy: int, cx: int, h: int, w: int) -> Tensor:
    area = h * w
    w_lt = cx * cy / area
    w_rt = cy * (w - cx) / area
    w_lb = (h - cy) * cx / area
    weights = [w_lt, w_rt, w_lb, 1 - w_lt - w_rt - w_lb]
    bounds = [(0, cy, 0, cx), (0, cy, cx, w), (cy, h, 0, cx), (cy, h, cx, w)]
    score = torch.zeros((), dtype=pred.dtype, device=pred.device)
    for (r0, r1, c0, c1), weight, sums in zip(bounds, weights, quad):
        count = (r1 - r0) * (c1 - c0)
        if count == 0:
            continue  # weight 0; PySODMetrics would produce NaN here
        score = score + weight * _ssim(pred, (r0, r1, c0, c1), count, sums)
    return score


def _ssim(pred: Tensor, box: tuple[int, int, int, int], count: int, sums: Tensor) -> Tensor:
    """The S-measure's SSIM of the quadrant ``box = (r0, r1, c0, c1)`` from its sums."""
    s_p, s_pp, s_g, s_pg, _ = sums.unbind()
    denom = count - 1 + EPS
    x = s_p / count
    y = s_g / count
    n_g = int(s_g.item())
    if 0 < n_g < count:
        sigma_x = torch.clamp(s_pp - s_p * x, min=0) / denom
        sigma_y = (s_g - s_g * y) / denom  # g^2 = g
        sigma_xy = (s_pg - s_p * y) / denom
        a = 4 * x * y * sigma_xy
        b = (x * x + y * y) * (sigma_x + sigma_y)
        if bool(a != 0):
            return a / (b + EPS)
        return (b == 0).to(pred.dtype)
    # The ground truth is constant on the quadrant: sigma_y = sigma_xy = 0, so alpha = 0 and the
    # score is 1 iff beta = (x^2 + y^2) * sigma_x is 0. That needs a constant prediction c, and
    # then the reference's two-pass variance sum((c - mean)^2) is 0 only if numpy's float mean of
    # the block is exactly c (true for 0 and 1, often false for other values: a rounding artefact
    # of the reference, mirrored here so that constant maps score as in PySODMetrics).
    r0, r1, c0, c1 = box
    lo, hi = torch.aminmax(pred[r0:r1, c0:c1])
    if bool(lo != hi):
        return torch.zeros((), dtype=pred.dtype, device=pred.device)
    c = lo.item()
    exact = np.full(pred.shape, c)[r0:r1, c0:c1].mean() == c  # same layout as the reference's slice
    return torch.full((), float(exact), dtype=pred.dtype, device=pred.device)


# --------------------------------------------------------------------------------------------
# E-measure (Fan et al., IJCAI 2018)
# --------------------------------------------------------------------------------------------
def enhanced_alignment(tp: Tensor, pred_fg: Tensor, n_fg: int | Tensor, n: int) -> Tensor:
    """E-measure for binary maps given (vectors of) true-positive and predicted-foreground counts.

    The enhanced alignment matrix takes only four values (one per TP/FP/FN/TN region), so the
    sum over pixels is a count-weighted sum of four terms. Denominator ``N - 1 + eps`` as in
    the reference, hence values slightly above 1 for a perfect map. ``n_fg`` (object pixels of
    the mask) may be a vector matching ``tp``.

    A one-pixel image (``N = 1``) divides by 1 instead, giving the paper's mean of the alignment
    over its pixels (0 or 1): the reference divides by ``eps`` there and returns about 4.5e15.
    """
    tp = tp.to(torch.float64)
    pred_fg = pred_fg.to(torch.float64)
    pred_bg = n - pred_fg
    denom = n - 1 + EPS if n > 1 else 1.0
    if isinstance(n_fg, Tensor):
        n_fg = n_fg.to(torch.float64)
    else:
        if n_fg == 0:
            return pred_bg / denom
        if n_fg == n:
            return pred_fg / denom
    fp = pred_fg - tp
    fn = n_fg - tp
    tn = pred_bg - fn
    mean_pred = pred_fg / n
    mean_gt = n_fg / n
    d_pred_fg, d_pred_bg = 1 - mean_pred, -mean_pred
    d_gt_fg, d_gt_bg = 1 - mean_gt, -mean_gt
    total = torch.zeros_like(tp)
    for part, a, b in (
        (tp, d_pred_fg, d_gt_fg),
        (fp, d_pred_fg, d_gt_bg),
        (fn, d_pred_bg, d_gt_fg),
        (tn, d_pred_bg, d_gt_bg),
    ):
        align = 2 * (a * b) / (a * a + b * b + EPS)
        total = total + (align + 1) ** 2 / 4 * part
    if isinstance(n_fg, Tensor):  # the special cases, elementwise
        total = torch.where(n_fg == 0, pred_bg, torch.where(n_fg == n, pred_fg, total))
    return total / denom


def e_measure_curve(histogram: Tensor, n: int) -> Tensor:
    """E-measure of ``q >= t`` for the 256 thresholds ``t = 0..255`` (index = threshold).

    ``histogram`` is the ``(2, 256)`` count of ``q = floor(255 * pred)`` over ground-truth
    background (row 0) and foreground (row 1). PySODMetrics orders the same curve from t = 255
    down to 0; mean and max do not depend on the order.

    A third row counts void pixels. At each threshold they take the label opposite to the
    binarised map, so they are all errors: false positives where ``q >= t``, false negatives
    (object pixels predicted as background) where ``q < t``.
    """
    above = histogram.flip(-1).cumsum(-1).flip(-1)  # (R, 256): count of q >= t
    n_fg = int(histogram[1].sum().item())
    pred_fg = above[0] + above[1]
    if histogram.shape[0] == 2:
        return enhanced_alignment(above[1], pred_fg, n_fg, n)
    void_above = above[2]  # predicted object, labelled background
    void_below = histogram[2].sum() - void_above  # predicted background, labelled object
    return enhanced_alignment(above[1], pred_fg + void_above, n_fg + void_below, n)


def e_measure_adaptive(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> Tensor:
    """E-measure of ``pred >= min(2 * mean(pred), 1)`` (the adaptive threshold).

    Where ``valid`` is False (void pixels) the mask takes the label opposite to the binarised
    map, so those pixels are errors.

    torch sums in another order than numpy (pairwise, over the C-ordered map), so its mean can
    differ from the reference's in the last bit, which moves a pixel lying exactly on
    ``2 * mean`` (e.g. 1/3 on a map of mean 1/6) across the threshold. When a pixel lies within
    ``1e-6`` of the torch threshold, the threshold is therefore taken from numpy's mean of the
    map, computed on the host.
    """
    hard = pred >= adaptive_threshold(pred)
    if valid is not None:
        gt = torch.where(valid, gt, ~hard)
    tp = (hard & gt).sum()
    return enhanced_alignment(tp, hard.sum(), int(gt.sum().item()), gt.numel())


def adaptive_threshold(pred: Tensor) -> Tensor:
    """``min(2 * mean(pred), 1)``, PySODMetrics' adaptive threshold, with numpy's mean where
    a pixel lies within ``1e-6`` of it (see :func:`e_measure_adaptive`)."""
    threshold = torch.clamp(2 * pred.mean(), max=1)
    if bool(((pred - threshold).abs() <= 1e-6).any()):  # a near tie: use the reference's mean
        host = np.ascontiguousarray(pred.detach().cpu().numpy())  # float64
        threshold = torch.tensor(min(2 * host.mean(), 1.0), dtype=pred.dtype, device=pred.device)
    return threshold


# --------------------------------------------------------------------------------------------
# F-measure over thresholds (Achanta et al., CVPR 2009; PySODMetrics ``Fmeasure``)
# --------------------------------------------------------------------------------------------
def _f_beta(tp: Tensor, predicted: Tensor, n_fg: Tensor, beta2: float) -> Tensor:
    """``(1 + beta2) P R / (beta2 P + R)`` with P = tp / predicted (1 where nothing is
    predicted) and R = tp / n_fg (n_fg at least 1); 0 where P R is 0."""
    precision = tp / predicted.clamp(min=1)
    recall = tp / n_fg.clamp(min=1)
    num = (1 + beta2) * precision * recall
    den = torch.where(num == 0, torch.ones_like(num), beta2 * precision + recall)
    return num / den


def f_measure_curve(histogram: Tensor, beta2: float = 0.3) -> Tensor:
    """F-measure of ``q >= t`` for the 256 thresholds ``t = 0..255`` (index = threshold).

    ``histogram`` is the count of ``q = floor(255 * pred)`` over ground-truth background
    (row 0) and object (row 1); a third row (void pixels) is left out: the F-measure counts
    labelled pixels only. PySODMetrics orders the curve from t = 255 down to 0.
    """
    above = histogram[:2].flip(-1).cumsum(-1).flip(-1).to(torch.float64)  # (2, 256): q >= t
    n_fg = histogram[1].sum().to(torch.float64)
    return _f_beta(above[1], above[0] + above[1], n_fg, beta2)


def f_measure_adaptive(
    pred: Tensor, gt: Tensor, beta2: float = 0.3, valid: Tensor | None = None
) -> Tensor:
    """F-measure of ``pred >= min(2 * mean(pred), 1)``, over the labelled pixels (the mean
    too); 0 when no object pixel is found (PySODMetrics' ``cal_adaptive_fm``)."""
    hard = pred >= adaptive_threshold(pred if valid is None else pred[valid])
    if valid is not None:
        hard = hard & valid
    tp = (hard & gt).sum().to(torch.float64)
    return _f_beta(tp, hard.sum().to(torch.float64), gt.sum().to(torch.float64), beta2)


# --------------------------------------------------------------------------------------------
# Weighted F-measure (Margolin et al., CVPR 2014)
# --------------------------------------------------------------------------------------------
def _gaussian_1d(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """1-D factor of MATLAB's ``fspecial('gaussian', [size size], sigma)`` (which is separable)."""
    r = (size - 1) / 2
    x = np.arange(-r, r + 1)
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


_GAUSS_7_5 = _gaussian_1d()


def _nearest_foreground(gt: Tensor) -> tuple[Tensor, Tensor]:
    """Distance ``(H, W)`` to, and row/col ``(2, H, W)`` of, the nearest object pixel.

    MATLAB's ``[D, IDX] = bwdist(GT)``.

    Runs on the CPU with scipy's exact Euclidean distance transform, the one PySODMetrics uses:
    which of several equidistant foreground pixels is picked changes the weighted F-measure, so
    the same algorithm (and tie-breaking) is needed to reproduce the reference numbers. Only
    this step leaves the tensors' device; the results are moved back.
    """
    background = (~gt).cpu().numpy()
    dist, idx = distance_transform_edt(background, return_indices=True)  # float64, int32
    return torch.from_numpy(dist).to(gt.device), torch.from_numpy(idx).to(gt.device)


def _blur_7x7(x: Tensor) -> Tensor:
    """``imfilter(x, fspecial('gaussian', 7, 5))``, zero padding, as two 1-D passes of 7 taps."""
    h, w = x.shape
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))  # (H + 6, W + 6)
    rows = padded[0:h] * _GAUSS_7_5[0]
    for i in range(1, 7):
        rows.add_(padded[i : i + h], alpha=float(_GAUSS_7_5[i]))  # (H, W + 6)
    out = rows[:, 0:w] * _GAUSS_7_5[0]
    for j in range(1, 7):
        out.add_(rows[:, j : j + w], alpha=float(_GAUSS_7_5[j]))
    return out


def _bounding_box(gt: Tensor, margin: int) -> tuple[int, int, int, int]:
    h, w = gt.shape
    rows = torch.nonzero(gt.any(1)).flatten()
    cols = torch.nonzero(gt.any(0)).flatten()
    y0, y1, x0, x1 = (int(v) for v in torch.stack([rows[0], rows[-1], cols[0], cols[-1]]).tolist())
    y0, x0 = max(y0 - margin, 0), max(x0 - margin, 0)
    return y0, min(y1 + 1 + margin, h), x0, min(x1 + 1 + margin, w)


def weighted_f_measure(pred: Tensor, gt: Tensor, beta2: float = 0.3) -> Tensor:
    """Weighted F-measure ``(1 + beta2) P_w R_w / (beta2 P_w + R_w)``; 0 for an empty ground truth.

    ``beta2`` is beta squared (PySODMetrics names it ``beta``; its default 1 is Margolin's MATLAB
    default, while the SOD/COD tables and Conv-LoRA/SAM-Adapter use 0.3). Steps as in the
    reference: the error ``E = |pred - gt|`` is propagated from the nearest foreground pixel to
    each background pixel (``Et``), blurred with a 7x7 sigma-5 Gaussian (``EA``), replaced by
    ``min(E, EA)`` inside the object, and weighted by ``B = 2 - exp(log(0.5) / 5 * distance)``
    outside it (``B = 1`` inside, where the distance is 0).

    Computed with two shortcuts that give the same sums: outside the object ``Ew = pred * B``,
    so its total is ``sum(pred * B) - sum(pred over the object)``; and ``EA`` is needed only on
    the object, so ``Et`` and the blur are evaluated on the object's bounding box plus the
    kernel radius (3 pixels), with zero padding only at the image border.
    """
    n_fg = int(gt.sum().item())
    if n_fg == 0:
        return torch.zeros((), dtype=pred.dtype, device=pred.device)
    dist, nearest = _nearest_foreground(gt)  # (H, W), (2, H, W)
    decay = torch.exp(dist.to(pred.dtype).mul_(math.log(0.5) / 5))  # B = 2 - decay
    s_p = pred.sum()
    s_pg = torch.where(gt, pred, 0.0).sum()
    fp_w = 2 * s_p - (pred * decay).sum() - s_pg  # sum over the background of pred * B

    y0, y1, x0, x1 = _bounding_box(gt, margin=3)
    gt_c = gt[y0:y1, x0:x1]
    err_c = (pred[y0:y1, x0:x1] - gt_c.to(pred.dtype)).abs()  # (h, w) crop of E
    near_r, near_c = nearest[0, y0:y1, x0:x1] - y0, nearest[1, y0:y1, x0:x1] - x0
    flat = near_r.to(torch.int64) * (x1 - x0) + near_c
    err_t = err_c.flatten()[flat]  # nearest foreground pixels lie in the box
    blurred = _blur_7x7(err_t)
    ew_fg = torch.where(gt_c, torch.minimum(err_c, blurred), 0.0).sum()

    tp_w = n_fg - ew_fg
    recall = 1 - ew_fg / n_fg
    precision = tp_w / (tp_w + fp_w + EPS)
    return (1 + beta2) * recall * precision / (recall + beta2 * precision + EPS)
