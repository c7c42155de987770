"""The paper's mask-classification head: matching, matched loss, inference, parity, a fit."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from automask import SemanticSegmentor
from automask.config import ModelConfig, OptimConfig
from automask.datasets import make_synthetic, train_test_split
from automask.errors import ConfigError
from automask.models import build_segmenter, parameter_summary
from automask.models.mask_classification import (
    COST_CLASS,
    COST_DICE,
    COST_MASK,
    LOSS_CLASS,
    LOSS_DICE,
    LOSS_MASK,
    NO_OBJECT_WEIGHT,
    NUM_QUERIES,
    MaskClassificationLoss,
    _pairwise_bce,
    _pairwise_dice,
    hungarian_match,
    image_targets,
    semantic_log_probs,
)
from automask.peft import apply_peft
from automask.training import SegmentationModule

from cli_process import run_automask

K = 3  # classes in the constructed cases


def _two_region_target() -> torch.Tensor:
    """(8, 8): class 0 on the left half, class 2 on the right half (class 1 absent)."""
    target = torch.zeros(8, 8, dtype=torch.int64)
    target[:, 4:] = 2
    return target


def _right_prediction(target: torch.Tensor, queries: int = 4):
    """Query 3 predicts class 0 with the left mask, query 1 class 2 with the right mask;
    queries 0 and 2 predict no-object with empty masks."""
    class_logits = torch.full((queries, K + 1), -4.0)
    class_logits[:, K] = 4.0  # no object
    class_logits[3] = torch.tensor([4.0, -4.0, -4.0, -4.0])
    class_logits[1] = torch.tensor([-4.0, -4.0, 4.0, -4.0])
    mask_logits = torch.full((queries, *target.shape), -6.0)
    mask_logits[3] = torch.where(target == 0, 6.0, -6.0)
    mask_logits[1] = torch.where(target == 2, 6.0, -6.0)
    return class_logits, mask_logits


def test_image_targets_leave_ignore_pixels_out():
    target = _two_region_target()
    target[0, :] = 255
    classes, masks, valid = image_targets(target, 255)
    assert classes.tolist() == [0, 2]  # 255 is not a class
    assert valid.sum() == 56 and masks.shape == (2, 56)
    assert masks.sum(0).eq(1).all()  # every labelled pixel in exactly one mask
    assert masks[0].sum() == 28 and masks[1].sum() == 28


def test_matching_finds_the_obvious_and_the_cheapest_assignment():
    target = _two_region_target()
    class_logits, mask_logits = _right_prediction(target)
    classes, masks, valid = image_targets(target, 255)
    flat = mask_logits.reshape(4, -1)[:, valid]
    queries, targets = hungarian_match(class_logits, flat, classes, masks)
    assert dict(zip(targets.tolist(), queries.tolist())) == {0: 3, 1: 1}

    # On random outputs the assignment is the cheapest injective one (brute force).
    gen = torch.Generator().manual_seed(0)
    class_logits = torch.randn(5, K + 1, generator=gen)
    flat = torch.randn(5, masks.shape[1], generator=gen) * 3
    cost = (COST_CLASS * -class_logits.softmax(-1)[:, classes]
            + COST_MASK * _pairwise_bce(flat, masks) + COST_DICE * _pairwise_dice(flat, masks))
    queries, targets = hungarian_match(class_logits, flat, classes, masks)
    found = cost[queries, targets].sum().item()
    best = min(cost[list(p), [0, 1]].sum().item() for p in itertools.permutations(range(5), 2))
    assert found == pytest.approx(best, abs=1e-6)
    assert sorted(targets.tolist()) == [0, 1] and len(set(queries.tolist())) == 2


def test_pairwise_costs_agree_with_torch_losses():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 20, generator=gen)
    masks = (torch.rand(2, 20, generator=gen) > 0.5).float()
    bce = _pairwise_bce(logits, masks)
    for q in range(3):
        for m in range(2):
            ref = F.binary_cross_entropy_with_logits(logits[q], masks[m])
            assert bce[q, m].item() == pytest.approx(ref.item(), rel=1e-5)


def test_loss_prefers_the_right_prediction_and_ignores_query_order():
    target = _two_region_target().unsqueeze(0)  # (1, 8, 8)
    loss_fn = MaskClassificationLoss(K)
    class_logits, mask_logits = _right_prediction(target[0])
    right = loss_fn(class_logits[None], mask_logits[None], target)
    # Wrong: the two object queries swap their class predictions (masks stay).
    wrong_cls = class_logits.clone()
    wrong_cls[[1, 3]] = class_logits[[3, 1]]
    wrong = loss_fn(wrong_cls[None], mask_logits[None], target)
    assert right.item() < 0.2 < wrong.item()
    # Wrong masks: the object queries swap masks (classes stay).
    wrong_masks = mask_logits.clone()
    wrong_masks[[1, 3]] = mask_logits[[3, 1]]
    assert loss_fn(class_logits[None], wrong_masks[None], target).item() > right.item() + 0.5
    # Matching makes the loss independent of which query says what.
    order = torch.tensor([2, 0, 3, 1])
    shuffled = loss_fn(class_logits[order][None], mask_logits[order][None], target)
    assert shuffled.item() == pytest.approx(right.item(), rel=1e-6)


def test_no_object_weight_and_unmatched_queries():
    """Unmatched queries are pushed to no-object with the class weight 0.1."""
    target = _two_region_target().unsqueeze(0)
    class_logits, mask_logits = _right_prediction(target[0])
    # A third query that wrongly claims class 1 raises the loss only through the CE.
    bad = class_logits.clone()
    bad[0] = torch.tensor([-4.0, 4.0, -4.0, -4.0])
    heavy = MaskClassificationLoss(K, no_object_weight=1.0)
    light = MaskClassificationLoss(K)
    gain_light = (light(bad[None], mask_logits[None], target)
                  - light(class_logits[None], mask_logits[None], target)).item()
    gain_heavy = (heavy(bad[None], mask_logits[None], target)
                  - heavy(class_logits[None], mask_logits[None], target)).item()
    assert gain_light > 0 and gain_heavy > gain_light


def test_class_weights_count_each_mask_w_times_in_every_term():
    """The weighted matched loss against a readable reference on the same matching: CE as
    F.cross_entropy(weight=[w, no-object]) weighs it, each mask term sum(w_c x term) /
    sum(w_c); weights of 1 give the unweighted loss; a class of weight 0 alone gives no
    mask loss and no NaN."""
    gen = torch.Generator().manual_seed(5)
    target = torch.stack([_two_region_target(), torch.randint(0, K, (8, 8), generator=gen)])
    target[1, :2] = 255
    class_logits = torch.randn(2, 5, K + 1, generator=gen, requires_grad=True)
    mask_logits = torch.randn(2, 5, 8, 8, generator=gen, requires_grad=True)
    w = torch.tensor([0.5, 3.0, 1.5])
    got = MaskClassificationLoss(K, class_weight=w)(class_logits, mask_logits, target)
    ce_num = ce_den = bce = dice = mass = 0.0
    for i in range(2):
        classes, masks, valid = image_targets(target[i], 255)
        logits = mask_logits[i].reshape(5, -1)[:, valid]
        rows, cols = hungarian_match(class_logits[i], logits, classes, masks)
        wanted = torch.full((5,), K)
        wanted[rows] = classes[cols]
        weight = torch.cat([w, torch.tensor([NO_OBJECT_WEIGHT])])[wanted]
        ce_num = ce_num + (weight * F.cross_entropy(class_logits[i], wanted,
                                                    reduction="none")).sum()
        ce_den = ce_den + weight.sum()
        for r, c in zip(rows.tolist(), cols.tolist()):
            wc = w[classes[c]]
            p, g = logits[r], masks[c]
            bce = bce + wc * F.binary_cross_entropy_with_logits(p, g)
            dice = dice + wc * (1 - (2 * (p.sigmoid() * g).sum() + 1)
                                / (p.sigmoid().sum() + g.sum() + 1))
            mass = mass + wc
    expected = LOSS_CLASS * ce_num / ce_den + (LOSS_MASK * bce + LOSS_DICE * dice) / mass
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    grads = torch.autograd.grad(got, [class_logits, mask_logits])
    refs = torch.autograd.grad(expected, [class_logits, mask_logits])
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    plain = MaskClassificationLoss(K)(class_logits, mask_logits, target)
    ones = MaskClassificationLoss(K, class_weight=torch.ones(K))(class_logits, mask_logits,
                                                                 target)
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)
    assert got.item() != pytest.approx(plain.item(), rel=1e-3)
    only = torch.zeros(1, 8, 8, dtype=torch.int64)  # class 0 alone, weighing 0
    zero = MaskClassificationLoss(K, class_weight=torch.tensor([0.0, 1.0, 1.0]))
    loss = zero(class_logits[:1], mask_logits[:1], only)
    classes, masks, _ = image_targets(only[0], 255)
    rows, _ = hungarian_match(class_logits[0], mask_logits[0].reshape(5, -1), classes, masks)
    unmatched = [q for q in range(5) if q not in rows.tolist()]
    no_object = F.cross_entropy(class_logits[0, unmatched].detach(), torch.full((4,), K))
    assert torch.isfinite(loss)  # the matched query weighs 0: the others' no-object CE
    assert loss.item() == pytest.approx(LOSS_CLASS * no_object.item(), rel=1e-5)


def test_ignore_pixels_do_not_change_the_loss():
    target = _two_region_target()
    target[:3, :] = 255  # void rows
    target[:, 7] = 255  # and a void column (e.g. padding)
    target = target.unsqueeze(0)
    gen = torch.Generator().manual_seed(2)
    class_logits = torch.randn(1, 4, K + 1, generator=gen)
    mask_logits = torch.randn(1, 4, 8, 8, generator=gen)
    loss_fn = MaskClassificationLoss(K)
    base = loss_fn(class_logits, mask_logits, target)
    void = (target == 255).unsqueeze(1).expand_as(mask_logits)
    changed = mask_logits.clone()
    changed[void] = torch.randn(int(void.sum()), generator=gen) * 10
    assert loss_fn(class_logits, changed, target).item() == pytest.approx(base.item(), rel=1e-6)
    # ... while a labelled pixel does change it.
    changed[0, :, 5, 2] += 5.0
    assert loss_fn(class_logits, changed, target).item() != pytest.approx(base.item(), rel=1e-4)
    # An all-void image is unknown, not empty (background is a class): it asks nothing of
    # the queries, not even no-object.
    empty = torch.full_like(target, 255)
    assert loss_fn(class_logits, mask_logits, empty).item() == 0.0


def test_semantic_log_probs_is_maskformer_inference():
    gen = torch.Generator().manual_seed(3)
    class_logits = torch.randn(2, 5, K + 1, generator=gen)
    mask_logits = torch.randn(2, 5, 6, 7, generator=gen)
    out = semantic_log_probs(class_logits, mask_logits)
    assert out.shape == (2, K, 6, 7)
    expected = torch.zeros(2, K, 6, 7)
    for b in range(2):
        for q in range(5):
            p = class_logits[b, q].softmax(0)[:K]
            expected[b] += p[:, None, None] * mask_logits[b, q].sigmoid()
    torch.testing.assert_close(out.exp(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.softmax(1), expected / expected.sum(1, keepdim=True))


def test_segmenter_head_structure_forward_and_gradients():
    model = build_segmenter("tiny", num_classes=K, input_size=64, checkpoint="random",
                            multiclass_head="mask_classification")
    decoder = model.mask_decoder
    assert model.multiclass_head == "mask_classification" and model.num_classes == K
    assert decoder.mask_tokens.weight.shape[0] == NUM_QUERIES == decoder.num_mask_tokens
    assert len(decoder.output_hypernetworks_mlps) == 1
    assert decoder.class_head.out_features == K + 1
    apply_peft(model, "decoder_only")
    assert decoder.class_head.weight.requires_grad and decoder.mask_tokens.weight.requires_grad
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    class_logits, mask_logits = model.forward_queries(images)
    assert class_logits.shape == (2, NUM_QUERIES, K + 1)
    assert mask_logits.shape == (2, NUM_QUERIES, 64, 64)
    model.eval()
    with torch.no_grad():
        scores = model(images)
    assert scores.shape == (2, K, 64, 64)
    torch.testing.assert_close(scores, semantic_log_probs(class_logits, mask_logits).detach())
    model.train()
    target = torch.randint(0, K, (2, 64, 64), generator=torch.Generator().manual_seed(5))
    target[:, 48:] = 255
    loss = MaskClassificationLoss(K)(class_logits, mask_logits, target)
    loss.backward()
    for param in (decoder.class_head.weight, decoder.mask_tokens.weight,
                  decoder.output_hypernetworks_mlps[0].layers[0].weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_bad_head_names_are_config_errors():
    with pytest.raises(ConfigError,
                       match="model.multiclass_head.*did you mean 'mask_classification'"):
        ModelConfig(multiclass_head="mask_classifcation")
    with pytest.raises(ConfigError, match="'mask'"):
        build_segmenter("tiny", num_classes=K, input_size=64, checkpoint="random",
                        multiclass_head="mask")
    model = build_segmenter("tiny", num_classes=K, input_size=64, checkpoint="random",
                            multiclass_head="mask_classification")
    with pytest.raises(ConfigError, match="'optim.loss'.*matched loss"):
        SegmentationModule(model, task="multiclass", num_classes=K,
                           optim=OptimConfig(loss="ce"), val_metric="miou")


def test_binary_tasks_keep_sams_single_mask():
    model = build_segmenter("tiny", num_classes=1, input_size=64, checkpoint="random",
                            multiclass_head="mask_classification")
    assert model.multiclass_head == "tokens" and not hasattr(model.mask_decoder, "class_head")


def test_parameter_parity_with_the_papers_trans10k_table():
    """vit_h, 12 classes, counted on the meta device."""
    head = parameter_summary("vit_h", num_classes=12, multiclass_head="mask_classification")
    head = head.set_index("method")
    binary = parameter_summary("vit_h").set_index("method")
    tokens = parameter_summary("vit_h", num_classes=12).set_index("method")
    # Paper (results_trans10k.csv): #Params (M) and Ratio (%) of its four SAM rows.
    paper = {"decoder_only": (3.51, 0.55), "vpt": (4.00, 0.62), "lora": (4.00, 0.62),
             "conv_lora": (4.02, 0.63)}
    got = {m: (head.loc[m, "trainable_m"], head.loc[m, "ratio_pct"]) for m in paper}
    assert got == paper
    # The head adds (Q - 4) mask tokens and Linear(256, 13) to SAM's single-mask decoder.
    added = (NUM_QUERIES - 4) * 256 + 256 * 13 + 13
    for method in paper:
        assert head.loc[method, "trainable"] - binary.loc[method, "trainable"] == added
        assert tokens.loc[method, "trainable_m"] - head.loc[method, "trainable_m"] > 1.5


def test_params_cli_takes_the_head():
    proc = run_automask("params", "--backbone", "vit_h", "--num-classes", "12",
                        "--multiclass-head", "mask_classification", "--methods",
                        "decoder_only,lora", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r["trainable_m"] for r in json.loads(proc.stdout)}
    assert rows == {"decoder_only": 3.51, "lora": 4.00}


def test_tiny_fit_predict_evaluate_save_load(tmp_path):
    frame = make_synthetic(16, size=(72, 90), num_classes=3, seed=3, root=tmp_path / "data")
    train, test = train_test_split(frame, test_size=0.25, seed=0)
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        train, presets="tiny",
        hyperparameters={"model.multiclass_head": "mask_classification",
                         "model.input_size": 96, "optim.max_epochs": 2},
    )
    assert seg.task_ == "multiclass" and seg.num_classes_ == 3
    masks = seg.predict(test)
    assert len(masks) == len(test)
    for mask in masks:
        assert mask.shape == (72, 90) and mask.dtype == np.uint8 and mask.max() < 3
    probs = seg.predict_proba(test.iloc[:1])[0]
    assert probs.shape == (3, 72, 90)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
    np.testing.assert_array_equal(probs.argmax(0), masks[0])
    scores = seg.evaluate(test)
    assert 0.0 <= scores["miou"] <= 1.0 and 0.0 <= scores["acc"] <= 1.0
    loaded = SemanticSegmentor.load(seg.save(tmp_path / "saved"))
    assert loaded._model(None).multiclass_head == "mask_classification"  # rebuilt as trained
    for a, b in zip(masks, loaded.predict(test)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict_proba(test.iloc[:1])[0], probs)


def _stripes(root, n: int, classes: int, size: int = 64) -> pd.DataFrame:
    """``n`` images whose masks label every one of ``classes`` classes (horizontal stripes)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        mask = (np.arange(size)[:, None] * classes // size).repeat(size, 1).astype(np.uint8)
        mask = np.roll(mask, i * 3, axis=0)
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        image[..., 0] = mask * (255 // classes)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
        rows.append({"image": str(root / "images" / f"{i}.png"),
                     "label": str(root / "masks" / f"{i}.png")})
    return pd.DataFrame(rows)


def test_queries_cover_the_most_classes_one_mask_labels(tmp_path):
    """Street-scene masks label more classes than the paper's 7 queries: each class present
    gets a query, recorded in the saved predictor and rebuilt on load; a count set below
    that is kept with a warning."""
    classes = NUM_QUERIES + 2
    frame = _stripes(tmp_path / "data", 4, classes)
    hp = {"model.multiclass_head": "mask_classification", "model.input_size": 64,
          "optim.max_epochs": 1}
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters=hp, num_classes=classes)
    assert seg.models_["default"].config.model.num_queries == classes
    loaded = SemanticSegmentor.load(tmp_path / "run")
    decoder = loaded._model(None).mask_decoder
    assert decoder.num_mask_tokens == decoder.mask_tokens.weight.shape[0] == classes
    np.testing.assert_array_equal(loaded.predict_proba(frame.iloc[:1])[0],
                                  seg.predict_proba(frame.iloc[:1])[0])
    with pytest.warns(UserWarning, match=rf"'model.num_queries'=7 is less than the {classes} "):
        fixed = SemanticSegmentor(path=tmp_path / "run7", verbosity=0).fit(
            frame, presets="tiny", hyperparameters={**hp, "model.num_queries": 7},
            num_classes=classes)
    assert fixed._model(None).mask_decoder.num_mask_tokens == 7
    few = _stripes(tmp_path / "few", 4, 3)  # fewer classes than queries: the paper's 7
    small = SemanticSegmentor(path=tmp_path / "run3", verbosity=0).fit(
        few, presets="tiny", hyperparameters=hp, num_classes=3)
    assert small._model(None).mask_decoder.num_mask_tokens == NUM_QUERIES


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "7"])
def test_num_queries_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="model.num_queries"):
        ModelConfig(num_queries=bad)
