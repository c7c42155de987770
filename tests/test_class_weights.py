"""optim.class_weights: the multi-class cross-entropy weighted by class (balanced,
median frequency, or given), counted on the training masks, checked before a fit."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from automask.config import parse_class_weights, resolve
from automask.data import validate_frame
from automask.data.validation import class_pixels
from automask.errors import ConfigError
from automask.losses import ce_dice_loss, ce_loss, class_weights, multiclass_dice_loss


def test_rules_against_scikit_learn_and_the_median_frequency_definition():
    rng = np.random.default_rng(0)
    masks = [rng.choice(4, size=(6, 7), p=p) for p in
             ([0.7, 0.2, 0.1, 0.0], [0.5, 0.0, 0.3, 0.2], [0.9, 0.1, 0.0, 0.0])]
    labels = np.concatenate([m.ravel() for m in masks])
    pixels = np.bincount(labels, minlength=4)
    holding = np.array([sum(m.size for m in masks if (m == k).any()) for k in range(4)])
    got = class_weights("balanced", pixels, holding)
    expected = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    assert np.allclose(got.numpy(), expected, rtol=1e-6)
    freq = pixels / holding
    assert np.allclose(class_weights("median_frequency", pixels, holding).numpy(),
                       np.median(freq) / freq, rtol=1e-6)
    # a class without pixels weighs 0; given weights pass through
    got = class_weights("median_frequency", [10, 0, 30], [40, 0, 40])
    assert got.tolist() == pytest.approx([2.0, 0.0, 2 / 3])
    assert class_weights([1.0, 0.5], [3, 4], [7, 7]).tolist() == [1.0, 0.5]


def test_weighted_ce_is_torch_weighted_mean_and_zero_weight_batches_give_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 4))
    target[0, :2] = 255
    weight = torch.tensor([0.2, 3.0, 1.0])
    ours = ce_loss(logits, target, weight)
    ref = F.cross_entropy(logits, target, weight=weight, ignore_index=255)
    assert torch.allclose(ours, ref, atol=1e-6)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_ours, g_ref, atol=1e-7)
    assert not torch.allclose(ours, ce_loss(logits, target), atol=1e-3)  # it weighs
    background = torch.zeros_like(target)  # every labelled pixel of weight 0: 0, not NaN
    zero = ce_loss(logits, background, torch.tensor([0.0, 1.0, 1.0]))
    assert zero.item() == 0.0 and zero.requires_grad
    both = ce_dice_loss(logits, target, weight)
    assert torch.allclose(both, ref + multiclass_dice_loss(logits, target), atol=1e-6)


@pytest.mark.parametrize("value, match", [
    ("balancd", "did you mean 'balanced'"),
    ("1", "two or more"),
    ("1,-2", ">= 0"),
    ("0,0", "not all 0"),
    ("1,inf", "finite"),
])
def test_bad_class_weights_are_refused_by_the_config(value, match):
    with pytest.raises(ConfigError, match=match):
        resolve(None, {"optim.class_weights": value})
    assert parse_class_weights("2, 1,0.5") == [2.0, 1.0, 0.5]


def _street(root, n=6):
    """Masks of classes 0, 1, 2 (2 rare) and the void 7; images shaded by class."""
    root.mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(1)
    for i in range(n):
        mask = np.zeros((24, 32), np.uint8)
        mask[:, 16:] = 1
        if i % 2 == 0:
            mask[10:13, 4:8] = 2  # 12 pixels in half the masks
        mask[0, :] = 7
        image = (rng.random((24, 32, 3)) * 30 + mask[..., None] * 60).astype(np.uint8)
        Image.fromarray(image).save(root / f"{i}.png")
        Image.fromarray(mask).save(root / f"{i}_mask.png")
        rows.append({"image": str(root / f"{i}.png"), "label": str(root / f"{i}_mask.png")})
    return pd.DataFrame(rows)


def test_class_pixels_count_the_masks_without_their_void(tmp_path):
    spec = validate_frame(_street(tmp_path / "d"), num_classes=3, void_label=7)
    pixels, holding = class_pixels(spec)
    # the top row is void: in no class's pixels, in the masks' (Eigen and Fergus' rule)
    assert pixels.tolist() == [6 * (23 * 16) - 3 * 12, 6 * 23 * 16, 3 * 12]
    assert holding.tolist() == [6 * 24 * 32, 6 * 24 * 32, 3 * 24 * 32]


def test_fit_weighs_its_loss_and_refuses_weights_it_cannot_use(tmp_path, caplog):
    from automask import SemanticSegmentor

    df = _street(tmp_path / "d")
    hp = {"optim.max_epochs": 1, "model.input_size": 32, "data.void_label": 7}
    with pytest.raises(ConfigError, match=r"gives 2 weights for the data's 3 classes"):
        SemanticSegmentor(path=tmp_path / "bad").fit(
            df, presets="tiny", hyperparameters={**hp, "optim.class_weights": "1,2"})
    binary = df.assign(label=df["label"].str.replace("_mask", "_bin"))
    for path in df["label"]:
        Image.fromarray((np.array(Image.open(path)) == 1).astype(np.uint8)).save(
            path.replace("_mask", "_bin"))
    with pytest.raises(ConfigError, match="binary task; for a rare foreground use"):
        SemanticSegmentor(path=tmp_path / "bad").fit(
            binary, presets="tiny", hyperparameters={"optim.max_epochs": 1,
                                                      "optim.class_weights": "balanced"})
    assert not (tmp_path / "bad").exists()

    caplog.set_level("INFO", logger="automask")
    losses = {}
    for weights in ("median_frequency", "1,0,0", None):
        run = tmp_path / f"run_{weights}"
        SemanticSegmentor(path=run, seed=0).fit(
            df, presets="tiny", hyperparameters={**hp, "optim.max_epochs": 2,
                                                 "optim.class_weights": weights})
        metrics = pd.read_csv(next((run / "logs").rglob("metrics.csv")))
        losses[weights] = metrics["train_loss"].dropna().tolist()
    assert "class weights (median_frequency) class_0 " in caplog.text
    assert "class weights (given) class_0 1, class_1 0, class_2 0" in caplog.text
    # The same seed and data. At the first step every class has the same logit, so every
    # pixel's cross-entropy is log 3 whatever the weights; after it the weights show.
    assert losses["1,0,0"][0] == pytest.approx(losses[None][0], abs=1e-6)
    assert losses["1,0,0"][1] != pytest.approx(losses[None][1], abs=1e-4)
    assert losses["median_frequency"][1] != pytest.approx(losses[None][1], abs=1e-4)
    # the mask_classification head's matched loss takes them too
    head = {"model.multiclass_head": "mask_classification", "optim.max_epochs": 2}
    for weights in ("1,0,0", None):
        run = tmp_path / f"queries_{weights}"
        SemanticSegmentor(path=run, seed=0).fit(
            df, presets="tiny", hyperparameters={**hp, **head, "optim.class_weights": weights})
        metrics = pd.read_csv(next((run / "logs").rglob("metrics.csv")))
        losses[("queries", weights)] = metrics["train_loss"].dropna().tolist()
    assert losses[("queries", "1,0,0")][1] != pytest.approx(losses[("queries", None)][1],
                                                             abs=1e-4)
