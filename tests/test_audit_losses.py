"""Audit of the losses and the leaderboard: focal gradients, target dtypes, ranking, rendering."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from automask.errors import DataValidationError
from automask.leaderboard import (
    aggregate_runs,
    build_leaderboard,
    format_cell,
    format_params,
    paper_table,
    to_markdown,
)
from automask.losses import LOSSES, focal_loss

BINARY = ["structure", "bce", "dice", "balanced_bce", "focal"]
MULTICLASS = ["ce", "ce_dice"]


# ------------------------------------------------------------------------------- losses
def _focal_reference(x: np.ndarray, t: np.ndarray, v: np.ndarray, alpha: float,
                     gamma: float) -> float:
    """Lin et al. 2017: ``-alpha_t (1 - p_t)**gamma log(p_t)``, mean over valid pixels,
    in float64; ``log(p_t)`` and ``1 - p_t`` from log-sum-exp so that large logits stay exact."""
    x_t = np.where(t == 1, x, -x)  # p_t = sigmoid(x_t)
    log_p_t = -np.logaddexp(0.0, -x_t)
    one_minus_p_t = np.exp(-np.logaddexp(0.0, x_t))  # sigmoid(-x_t)
    a_t = np.where(t == 1, alpha, 1 - alpha)
    return float((-a_t * one_minus_p_t**gamma * log_p_t)[v].mean())


@pytest.mark.parametrize("gamma", [0.0, 0.2, 0.5, 1.0, 2.0, 5.0])
def test_focal_loss_matches_the_paper_and_has_finite_gradients_for_any_gamma(gamma):
    """With ``0 < gamma < 1`` the power's derivative is infinite where ``1 - p_t`` rounds to
    0 (a confidently right pixel): the gradient was NaN, which stops the training run."""
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(2, 12, 10, dtype=torch.long)
    target[:, 3:9, 2:7] = 1
    target[1, :, 8:] = 255
    logits = torch.randn(2, 1, 12, 10, generator=g) * 3
    logits[0, 0, 4, 3] = 40.0  # a confident, right positive: 1 - sigmoid(40) == 0 in float32
    logits[0, 0, 0, 0] = -40.0  # a confident, right negative
    logits[1, 0, 0, 9] = 60.0  # an ignored pixel, confident
    logits.requires_grad_()
    loss = focal_loss(logits, target, alpha=0.25, gamma=gamma)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all(), gamma
    assert not grad[1, 0, :, 8:].any()  # ignored pixels get no gradient
    x = logits.detach()[:, 0].double().numpy()
    t = target.numpy()
    expected = _focal_reference(x, t, t != 255, 0.25, gamma)
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # the gradient of the plain formula (float64, where it has no overflow) on moderate pixels
    moderate = logits.detach().clamp(-6, 6).requires_grad_()
    (ours,) = torch.autograd.grad(focal_loss(moderate, target, gamma=gamma), moderate)
    x64 = moderate.detach()[:, 0].double().requires_grad_()
    tt, vv = (target == 1).double(), (target != 255).double()
    p = torch.sigmoid(x64)
    p_t = p * tt + (1 - p) * (1 - tt)
    a_t = 0.25 * tt + 0.75 * (1 - tt)
    plain = ((-a_t * (1 - p_t) ** gamma * torch.log(p_t)) * vv).sum() / vv.sum()
    (reference,) = torch.autograd.grad(plain, x64)
    torch.testing.assert_close(ours[:, 0].double(), reference, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    ({"gamma": -1.0}, "gamma must be a finite number >= 0, got -1.0"),
    ({"gamma": float("nan")}, "gamma"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
    ({"alpha": -0.25}, "alpha"),
])
def test_focal_loss_refuses_alpha_or_gamma_out_of_range(kwargs, match):
    """A negative gamma makes easy pixels' loss blow up; alpha > 1 makes negatives' loss
    negative: both silently gave a loss, now a ValueError naming the argument."""
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        focal_loss(torch.zeros(1, 1, 4, 4), target, **kwargs)


def test_floating_point_targets_are_refused_not_silently_rounded():
    """A float target (e.g. a mask resized bilinearly: 0.6 on the edge) was read as
    background where it is not exactly 1 (binary) or truncated to a lower id (multi-class)."""
    target = torch.zeros(1, 8, 8)
    target[0, 2:6, 2:6] = 1.0
    target[0, 2, 2:6] = 0.6  # an edge pixel of a bilinearly resized mask
    for name in BINARY:
        with pytest.raises(TypeError, match=r"target must hold integer class ids.*float32"):
            LOSSES[name](torch.zeros(1, 1, 8, 8), target)
    for name in MULTICLASS:
        with pytest.raises(TypeError, match=r"target must hold integer class ids.*float64"):
            LOSSES[name](torch.zeros(1, 3, 8, 8), torch.full((1, 8, 8), 1.7, dtype=torch.float64))
    with pytest.raises(TypeError, match="logits must be a floating-point tensor.*int64"):
        LOSSES["bce"](torch.zeros(1, 1, 8, 8, dtype=torch.long), target.long())
    # integer and bool targets of any width still work, with the int64 result
    logits = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = (target == 1).long()
    for name in BINARY:
        expected = LOSSES[name](logits, ids)
        for dtype in (torch.uint8, torch.int32, torch.bool):
            assert LOSSES[name](logits, ids.to(dtype)).item() == pytest.approx(
                expected.item(), rel=1e-6), (name, dtype)


# -------------------------------------------------------------------------- leaderboard
def _fake_predictor(metric: str, scores: list, best: int):
    """A fitted predictor's leaderboard inputs without training: 3 methods x 2 seeds."""
    from automask.config import resolve

    cands = resolve("tiny", {"peft.method": ["lora", "full", "bitfit"], "env.seed": [0, 1]})
    models = {name: {"config": cfg, "val_score": score, "trainable_params": 10,
                     "total_params": 100, "fit_time": 1.0, "predict_images_per_s": None}
              for (name, cfg), score in zip(cands, scores)}
    return SimpleNamespace(models_=models, eval_metric_=metric, best_model_=cands[best][0],
                           seed=0, task_="binary", classes_=["background", "object"])


def test_leaderboards_rank_lower_is_better_metrics_ascending_and_nan_last():
    """BER: the lowest first, in the models and the methods views; a model without a
    validation score last; ties keep the candidates' order; IoU the other way round."""
    names = ["method=lora,seed=0", "method=lora,seed=1", "method=full,seed=0",
             "method=full,seed=1", "method=bitfit,seed=0", "method=bitfit,seed=1"]
    seg = _fake_predictor("ber", [0.30, 0.10, 0.05, 0.07, None, 0.10], best=2)
    models = build_leaderboard(seg, style="models")
    assert list(models["model"]) == [names[i] for i in (2, 3, 1, 5, 0, 4)]
    assert list(models["best"]) == [True, False, False, False, False, False]
    methods = build_leaderboard(seg, style="methods")
    assert list(methods["model"]) == ["full", "bitfit", "lora"]  # means .06, .10, .20
    assert methods["val_ber"].tolist() == pytest.approx([0.06, 0.10, 0.20])
    assert methods.set_index("model").loc["full", "best"]
    paper = build_leaderboard(seg, style="paper")  # registry order, BER with its arrow
    assert list(paper.columns) == ["Method", "#Params (M) / Ratio (%)", "val BER ↓"]

    seg = _fake_predictor("iou", [0.30, 0.10, 0.05, 0.07, None, 0.10], best=0)
    models = build_leaderboard(seg, style="models")
    assert list(models["model"]) == [names[i] for i in (0, 1, 5, 3, 2, 4)]
    assert list(build_leaderboard(seg, style="methods")["model"]) == ["lora", "bitfit", "full"]


def test_pandas_missing_markers_render_as_missing():
    """pd.NA and pd.NaT (nullable columns, e.g. a board after convert_dtypes) were written
    as '<NA>' and 'NaT' in Markdown, and format_cell raised on pd.NA."""
    board = pd.DataFrame({"model": ["a", "b", "c"], "test_iou": [0.5, np.nan, 0.25],
                          "when": [pd.NaT, pd.Timestamp("2024-01-02"), pd.NaT]})
    lines = to_markdown(board.convert_dtypes()).splitlines()
    assert lines[2:] == ["| a | 0.5 |  |", "| b |  | 2024-01-02 00:00:00 |",
                         "| c | 0.25 |  |"]
    assert format_cell(pd.NA, None, 1) == "-"
    assert format_cell(0.5, pd.NA, 1) == "50.0"
    assert format_params(pd.NA, 0.5) == "-"
    methods = pd.DataFrame({"model": ["GT"], "source": ["external"], "test_iou": [pd.NA],
                            "trainable_params_m": [pd.NA], "ratio_pct": [pd.NA]})
    assert paper_table(methods).iloc[0].tolist() == ["GT", "-", "-"]


def test_aggregate_runs_names_rows_without_a_group():
    """A row without a group (a hand-made external row concatenated to a board) vanished
    from the methods view and the paper table without a word."""
    board = pd.DataFrame([
        {"model": "lora,seed=0", "group": "lora", "seed": 0, "val_iou": 0.5, "best": True},
        {"model": "lora,seed=1", "group": "lora", "seed": 1, "val_iou": 0.7, "best": False},
        {"model": "PraNet", "group": np.nan, "test_iou": 0.8, "best": False},
    ])
    with pytest.raises(DataValidationError, match=r"1 row\(s\).*no 'group'.*PraNet"):
        aggregate_runs(board)
    board.loc[2, "group"] = "PraNet"
    assert list(aggregate_runs(board)["model"]) == ["lora", "PraNet"]


def test_paper_table_of_a_methods_board_read_back_from_csv(tmp_path):
    """save_table writes a run's empty variant as an empty CSV cell, which read_csv gives
    back as NaN: the paper table then labelled every row 'LoRA (nan)'."""
    from automask.leaderboard import save_table

    def run(method, seed, iou, variant=""):
        return {"model": f"{method},seed={seed}", "source": "fit", "group": method,
                "variant": variant, "method": method, "pretrained": True, "seed": seed,
                "trainable_params_m": 4.0, "ratio_pct": 0.62, "test_iou": iou, "best": False}

    methods = aggregate_runs(pd.DataFrame([run("lora", 0, 0.5), run("lora", 1, 0.6),
                                           run("conv_lora", 0, 0.7)]))
    save_table(methods, tmp_path / "methods.csv")
    back = pd.read_csv(tmp_path / "methods.csv")
    assert back["variant"].isna().all()  # what read_csv makes of the empty cells
    expected = paper_table(methods)
    assert list(expected["Method"]) == ["LoRA", "Conv-LoRA"]
    pd.testing.assert_frame_equal(paper_table(back), expected)
    assert paper_table(methods.assign(variant=["rank=2", ""]))["Method"].tolist() == [
        "LoRA (rank=2)", "Conv-LoRA"]


@pytest.mark.parametrize("name", BINARY + MULTICLASS)
def test_an_empty_batch_gives_zero_not_nan(name):
    """B = 0 has no labelled pixel, like an all-void batch: the per-image losses (structure,
    dice) gave NaN (the mean of nothing) where the others give 0."""
    k = 1 if name in BINARY else 3
    logits = torch.zeros(0, k, 8, 8, requires_grad=True)
    loss = LOSSES[name](logits, torch.zeros(0, 8, 8, dtype=torch.long))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.shape == logits.shape


@pytest.mark.parametrize("name", MULTICLASS)
@pytest.mark.parametrize("bad", [3, 7, -1])
def test_multiclass_target_out_of_range_names_the_values(name, bad):
    """A class id >= K (or negative) that is not the ignore index was torch's IndexError
    ('Target 3 is out of bounds') on a CPU and a device-side assert on a GPU."""
    target = torch.randint(0, 3, (2, 6, 6), generator=torch.Generator().manual_seed(0))
    target[0, 0, 0] = bad
    target[1, 0, 0] = 255  # the ignore index is fine
    with pytest.raises(ValueError, match=rf"outside \[0, 3\).*\[{bad}\].*K = 3"):
        LOSSES[name](torch.zeros(2, 3, 6, 6), target)
    target[0, 0, 0] = 2
    assert torch.isfinite(LOSSES[name](torch.zeros(2, 3, 6, 6), target))
