"""Losses: independent numpy references, the structure loss's boundary weights, ignore, autocast."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter

from automask.losses import LOSSES, build_loss, structure_loss

BINARY = ["structure", "bce", "dice", "balanced_bce", "focal"]
MULTICLASS = ["ce", "ce_dice"]


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _bce(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def _structure_reference(logits: np.ndarray, target: np.ndarray) -> float:
    """PraNet's structure loss written from the paper's formula with numpy/scipy, per image."""
    losses = []
    for x, t in zip(logits[:, 0].astype(np.float64), target):
        valid = (t != 255).astype(np.float64)
        m = (t == 1).astype(np.float64)
        # 31x31 box mean with zero padding counted (avg_pool2d's count_include_pad=True)
        pooled = uniform_filter(m, size=31, mode="constant", cval=0.0)
        w = (1 + 5 * np.abs(pooled - m)) * valid
        wbce = (w * _bce(x, m)).sum() / w.sum()
        p = _sigmoid(x)
        inter = (p * m * w).sum()
        union = ((p + m) * w).sum()
        losses.append(wbce + 1 - (inter + 1) / (union - inter + 1))
    return float(np.mean(losses))


def _batch(seed=0, b=2, h=40, w=48):
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(b, h, w, dtype=torch.long)
    target[:, 10:30, 12:36] = 1
    logits = torch.randn(b, 1, h, w, generator=g) * 2 + (target[:, None] * 2 - 1) * 1.5
    return logits, target


def test_structure_loss_matches_reference():
    logits, target = _batch()
    target[1, :, 40:] = 255  # right band ignored (padding)
    ours = structure_loss(logits, target).item()
    assert ours == pytest.approx(_structure_reference(logits.numpy(), target.numpy()), rel=1e-5)


def test_structure_loss_boundary_weights_matter():
    """Fails if the BCE term is a plain mean (the ``reduce='none'`` bug of the PraNet copies)."""
    big = torch.zeros(1, 120, 120, dtype=torch.long)
    big[:, 20:100, 20:100] = 1
    base = (big.float() * 2 - 1) * 4.0  # confident and right everywhere
    edge = base.clone()
    edge[0, 20:22, 30:90] = -4.0  # wrong on the object's top rows (boundary, weight ~3.5)
    inner = base.clone()
    inner[0, 59:61, 30:90] = -4.0  # as many wrong pixels deep inside (weight ~1)
    l_edge = structure_loss(edge[:, None], big).item()
    l_inner = structure_loss(inner[:, None], big).item()
    assert l_edge > l_inner * 1.5

    logits, target = _batch(seed=1, b=1)
    t = target.float()

    # the buggy variant (plain-mean BCE) differs from ours and from the reference
    x = logits[:, 0]
    pooled = F.avg_pool2d(t[:, None], 31, stride=1, padding=15)[:, 0]
    w = 1 + 5 * (pooled - t).abs()
    plain_bce = F.binary_cross_entropy_with_logits(x, t)  # weights cancel
    p = torch.sigmoid(x)
    inter = (p * t * w).sum((1, 2))
    union = ((p + t) * w).sum((1, 2))
    buggy = (plain_bce + 1 - (inter + 1) / (union - inter + 1)).mean().item()
    ours = structure_loss(logits, target).item()
    assert abs(ours - buggy) > 1e-3
    assert ours == pytest.approx(_structure_reference(logits.numpy(), target.numpy()), rel=1e-5)


def test_ignored_pixels_do_not_matter():
    logits, target = _batch(seed=2)
    target[:, :, 40:] = 255
    changed = logits.clone()
    changed[:, :, :, 40:] = torch.randn_like(changed[:, :, :, 40:]) * 10
    for name in BINARY:
        loss = LOSSES[name]
        expected = loss(logits, target).item()
        assert loss(changed, target).item() == pytest.approx(expected, rel=1e-6), name
    k = 3
    mc_logits = torch.randn(2, k, 16, 16)
    mc_target = torch.randint(0, k, (2, 16, 16))
    mc_target[:, :4] = 255
    mc_changed = mc_logits.clone()
    mc_changed[:, :, :4] = torch.randn(2, k, 4, 16) * 10
    for name in MULTICLASS:
        loss = LOSSES[name]
        expected = loss(mc_logits, mc_target).item()
        assert loss(mc_changed, mc_target).item() == pytest.approx(expected, rel=1e-6), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", BINARY + MULTICLASS)
def test_non_finite_logits_at_ignored_pixels_change_nothing(name, bad):
    """A NaN or an infinity in the logits of ignored pixels (an overflow in the padding)
    leaves the loss and the gradients of the other pixels exactly as with finite values
    there, and gives those pixels a zero gradient (it made 0 * inf = NaN terms)."""
    if name in BINARY:
        logits, target = _batch(seed=6)
        target[:, :, 40:] = 255
        ignored = (target == 255)[:, None]  # (B, 1, H, W)
    else:
        g = torch.Generator().manual_seed(6)
        logits = torch.randn(2, 3, 16, 16, generator=g)
        target = torch.randint(0, 3, (2, 16, 16), generator=g)
        target[:, :4] = 255
        ignored = (target == 255)[:, None].expand_as(logits)
    finite = logits.clone().requires_grad_(True)
    broken = logits.masked_fill(ignored, bad).requires_grad_(True)
    loss = LOSSES[name]
    expected, got = loss(finite, target), loss(broken, target)
    assert torch.isfinite(got) and got.item() == expected.item()
    expected.backward()
    got.backward()
    assert torch.equal(broken.grad[~ignored], finite.grad[~ignored])
    assert torch.count_nonzero(broken.grad[ignored]) == 0


def test_binary_losses_match_numpy_references():
    logits, target = _batch(seed=3)
    target[0, :5] = 255
    x = logits[:, 0].numpy().astype(np.float64)
    t = (target.numpy() == 1).astype(np.float64)
    v = target.numpy() != 255
    bce = _bce(x, t)
    assert LOSSES["bce"](logits, target).item() == pytest.approx(bce[v].mean(), rel=1e-5)
    n_pos, n_neg = (v & (t == 1)).sum(), (v & (t == 0)).sum()
    w_pos, w_neg = n_neg / (n_pos + n_neg), n_pos / (n_pos + n_neg)  # HED's class balance
    bal = (w_pos * t * bce + w_neg * (1 - t) * bce)[v].mean()
    assert LOSSES["balanced_bce"](logits, target).item() == pytest.approx(bal, rel=1e-5)
    p = _sigmoid(x)
    p_t = np.where(t == 1, p, 1 - p)
    a_t = np.where(t == 1, 0.25, 0.75)
    focal = (a_t * (1 - p_t) ** 2 * bce)[v].mean()
    assert LOSSES["focal"](logits, target).item() == pytest.approx(focal, rel=1e-5)
    dice = []
    for i in range(2):
        pi, ti = p[i][v[i]], t[i][v[i]]
        dice.append(1 - (2 * (pi * ti).sum() + 1) / (pi.sum() + ti.sum() + 1))
    assert LOSSES["dice"](logits, target).item() == pytest.approx(np.mean(dice), rel=1e-5)


def test_multiclass_losses_match_numpy_references():
    g = torch.Generator().manual_seed(0)
    k = 4
    logits = torch.randn(2, k, 12, 10, generator=g)
    target = torch.randint(0, k, (2, 12, 10), generator=g)
    target[0, 0] = 255
    x = logits.numpy().astype(np.float64)
    t = target.numpy()
    v = t != 255
    prob = np.exp(x) / np.exp(x).sum(1, keepdims=True)  # (B, K, H, W)
    t0 = np.where(v, t, 0)
    nll = -np.log(np.take_along_axis(prob, t0[:, None], 1)[:, 0])
    ce = nll[v].mean()
    assert LOSSES["ce"](logits, target).item() == pytest.approx(ce, rel=1e-5)
    onehot = (t0[:, None] == np.arange(k)[None, :, None, None]) & v[:, None]
    pv = prob * v[:, None]
    dice = [
        (2 * (pv[:, c] * onehot[:, c]).sum() + 1) / (pv[:, c].sum() + onehot[:, c].sum() + 1)
        for c in range(k)
    ]
    expected = ce + 1 - np.mean(dice)
    assert LOSSES["ce_dice"](logits, target).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", BINARY + MULTICLASS)
def test_losses_backprop_and_bf16_autocast(name):
    if name in BINARY:
        logits, target = _batch(seed=4)
    else:
        logits, target = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    loss = LOSSES[name]
    ref = loss(logits, target)
    weights = torch.ones(1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(logits.to(torch.bfloat16) * weights, target)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert out.item() == pytest.approx(ref.item(), rel=0.05, abs=1e-3)
    out.backward()
    assert weights.grad is not None and torch.isfinite(weights.grad).all()


def test_fully_ignored_batch_is_finite():
    logits, target = _batch(seed=5)
    target[:] = 255
    for name in BINARY:
        assert torch.isfinite(LOSSES[name](logits, target)), name
    mc_target = torch.full((2, 8, 8), 255)
    for name in MULTICLASS:
        assert torch.isfinite(LOSSES[name](torch.randn(2, 3, 8, 8), mc_target)), name


def test_build_loss_and_shape_errors():
    assert build_loss("structure", "binary") is structure_loss
    assert set(LOSSES) == set(BINARY + MULTICLASS)
    with pytest.raises(ValueError, match="unknown loss 'iou'.*structure"):
        build_loss("iou", "binary")
    with pytest.raises(ValueError, match="'ce' is for multiclass"):
        build_loss("ce", "binary")
    with pytest.raises(ValueError, match="'structure' is for binary"):
        build_loss("structure", "multiclass")
    with pytest.raises(ValueError, match="unknown task"):
        build_loss("bce", "regression")
    with pytest.raises(ValueError, match="logits"):
        structure_loss(torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        LOSSES["ce"](torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 9, dtype=torch.long))


def test_balanced_bce_equals_the_sbu_reference_form():
    """SAM-Adapter / Conv-LoRA's balanced BCE: (n_pos / n) * BCE(pos_weight = n_neg / n_pos)."""
    logits, target = _batch(seed=4)
    t = target.float()
    n_pos, n = t.sum(), t.numel()
    reference = n_pos / n * F.binary_cross_entropy_with_logits(
        logits[:, 0], t, pos_weight=(n - n_pos) / n_pos)
    ours = LOSSES["balanced_bce"](logits, target)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    # positives and negatives carry the same total weight: a constant loss per class shows it
    x = torch.where(target[:, None] == 1, torch.tensor(0.3), torch.tensor(-0.3))  # same bce
    bce = F.binary_cross_entropy_with_logits(torch.tensor(0.3), torch.tensor(1.0)).item()
    expected = 2 * (n_pos / n) * ((n - n_pos) / n) * bce
    assert LOSSES["balanced_bce"](x, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # no positive pixel: nothing to balance against, the loss is 0 (reference: ~1e-10 x BCE)
    empty = torch.zeros_like(target)
    assert LOSSES["balanced_bce"](logits, empty).item() == 0.0


@pytest.mark.parametrize("shape", [(2, 40, 48), (1, 31, 31), (3, 7, 90), (2, 512, 512)])
def test_box_mean_is_avg_pool2d_exactly(shape):
    """The integral-image 31x31 mean equals the correctly rounded count / 961, bit for bit,
    and avg_pool2d within 1e-7 (observed: equal)."""
    from automask.losses import box_mean

    g = torch.Generator().manual_seed(sum(shape))
    t = (torch.rand(shape, generator=g) > 0.7).float()
    t[0, : shape[1] // 2, : shape[2] // 3] = 1.0  # a solid block: large counts
    ours = box_mean(t)
    counts = F.avg_pool2d(t[:, None].double(), 31, stride=1, padding=15, divisor_override=1)
    assert torch.equal(ours, (counts[:, 0] / 961).float())
    plain = F.avg_pool2d(t[:, None], 31, stride=1, padding=15)[:, 0]
    assert torch.allclose(ours, plain, rtol=0, atol=1e-7)
    assert ours.dtype == torch.float32 and ours.shape == t.shape


def test_box_mean_float64_path_for_large_images(monkeypatch):
    """Beyond 2**24 padded pixels float32 counts could round; the float64 path is taken."""
    import automask.losses as losses

    t = (torch.rand(1, 60, 70, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    monkeypatch.setattr(losses, "_FLOAT32_EXACT", 100)  # force the float64 path
    counts = F.avg_pool2d(t[:, None].double(), 31, stride=1, padding=15, divisor_override=1)
    out = losses.box_mean(t)
    assert out.dtype == torch.float32
    assert torch.equal(out, (counts[:, 0] / 961).float())
