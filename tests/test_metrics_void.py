"""Void (unlabelled) pixels in binary metrics: never counted as correct.

Pixel-wise metrics (mae, iou, dice, ber) must equal the metric of the valid pixels alone;
structural ones (sm, em, wfm) give every void pixel the label opposite to the prediction, so
marking pixels void must not raise them.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from automask import SemanticSegmentor
from automask.datasets import make_synthetic, train_test_split
from automask.metrics import HIGHER_IS_BETTER, build_metrics, score

from cli_process import run_automask

PIXEL_WISE = ["mae", "iou", "dice", "iou_pooled", "dice_pooled", "ber", "ber_per_image", "fm",
              "fm_adp", "fm_max"]
STRUCTURAL = ["sm", "em", "em_adp", "em_max", "wfm"]


def _frame(seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A soft prediction of a disc, a little off and blurred, and the disc's {0, 1} mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.15, 0.3) * size
    gt = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.int64)
    dy, dx = rng.normal(0, 3, 2)
    dist = np.sqrt((yy - cy - dy) ** 2 + (xx - cx - dx) ** 2) - r
    pred = 1 / (1 + np.exp(dist / 3)) + rng.normal(0, 0.05, gt.shape)
    return np.clip(pred, 0, 1), gt


def _not_better(name: str, with_void: float, without: float) -> bool:
    if HIGHER_IS_BETTER[name]:
        return with_void <= without + 1e-12
    return with_void >= without - 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_pixel_wise_metrics_equal_the_valid_pixels_alone(seed):
    pred, gt = _frame(seed)
    rng = np.random.default_rng(100 + seed)
    void = rng.random(gt.shape) < 0.2
    void[30:50] = True  # a band of rows, as a labelling tool marks them
    target = np.where(void, 255, gt)
    valid = ~void
    with_void = score([pred], [target], metrics=PIXEL_WISE, ignore_index=255)
    # the same metrics on the valid pixels only, laid out as a 1-row image
    alone = score([pred[valid][None]], [gt[valid][None]], metrics=PIXEL_WISE)
    for name in PIXEL_WISE:
        assert with_void[name] == pytest.approx(alone[name], abs=1e-12), name
    # and they differ from what the frame scores with the void pixels labelled
    full = score([pred], [gt], metrics=PIXEL_WISE)
    assert any(abs(full[n] - with_void[n]) > 1e-6 for n in PIXEL_WISE)


@pytest.mark.parametrize("seed", range(6))
def test_marking_pixels_void_raises_no_metric(seed):
    pred, gt = _frame(seed)
    names = PIXEL_WISE + STRUCTURAL
    without = score([pred], [gt], metrics=names)
    # 20 rows through the object, void where the prediction is right (error below the mean):
    # cutting out wrong pixels improves pixel-wise scores by definition, so they are spared here
    err = np.abs(pred - gt)
    rows = np.zeros_like(gt, dtype=bool)
    centre = int(np.argwhere(gt).mean(0)[0])
    rows[centre - 10:centre + 10] = True
    void = rows & (err < err.mean()) & ((pred > 0.5) == (gt == 1))
    with_void = score([pred], [np.where(void, 255, gt)], metrics=names, ignore_index=255)
    for name in names:
        assert _not_better(name, with_void[name], without[name]), (name, with_void, without)
    # structural metrics also for void on every pixel of the rows, right or wrong
    with_rows = score([pred], [np.where(rows, 255, gt)], metrics=STRUCTURAL, ignore_index=255)
    for name in STRUCTURAL:
        assert _not_better(name, with_rows[name], without[name]), (name, with_rows, without)
    assert with_rows["sm"] < without["sm"] - 0.01


def test_void_is_no_longer_scored_as_a_true_negative():
    """The former rule (prediction and target 0 on void) raised S-alpha; this one lowers it."""
    pred, gt = _frame(7)
    rows = np.zeros_like(gt, dtype=bool)
    rows[76:96] = True  # an unlabelled band below the object, where the model sees a blob
    pred[80:90, 10:30] = 0.9
    without = score([pred], [gt], metrics=["sm"])["sm"]
    old_rule = score([np.where(rows, 0.0, pred)], [np.where(rows, 0, gt)], metrics=["sm"])["sm"]
    new_rule = score([pred], [np.where(rows, 255, gt)], metrics=["sm"], ignore_index=255)["sm"]
    assert old_rule > without  # the bug this guards against
    assert new_rule < without


def _e_measure_plain(hard: np.ndarray, gt: np.ndarray) -> float:
    """Fan et al.'s enhanced alignment, pixel by pixel (the reference's eps and N - 1)."""
    eps = np.spacing(1)
    hard, gt = hard.astype(np.float64), gt.astype(np.float64)
    n = gt.size
    if gt.sum() == 0:
        enhanced = 1 - hard
    elif gt.sum() == n:
        enhanced = hard
    else:
        dp, dg = hard - hard.mean(), gt - gt.mean()
        enhanced = ((2 * dp * dg / (dp * dp + dg * dg + eps)) + 1) ** 2 / 4
    return enhanced.sum() / (n - 1 + eps)


def test_structural_rule_gives_void_the_label_opposite_to_the_prediction():
    pred, gt = _frame(3)
    rows = np.zeros_like(gt, dtype=bool)
    rows[20:40] = True
    pred[0, 0], pred[0, 1] = 0.0, 1.0  # valid pixels span [0, 1]: min-max leaves the map as is
    target = np.where(rows, 255, gt)
    with_void = score([pred], [target], metrics=STRUCTURAL, ignore_index=255)
    # sm and wfm read the continuous map: void takes the label opposite to p > 0.5
    opposite = np.where(rows, (pred <= 0.5).astype(np.int64), gt)
    reference = score([pred], [opposite], metrics=["sm", "wfm"])
    for name in ("sm", "wfm"):
        assert with_void[name] == pytest.approx(reference[name], abs=1e-12), name
    # the E-measure binarises: void is opposite at each threshold, an error at every one
    q = (pred * 255).astype(np.uint8)
    curve = []
    for t in range(256):
        hard = q >= t
        curve.append(_e_measure_plain(hard, np.where(rows, ~hard, gt == 1)))
    assert with_void["em"] == pytest.approx(np.mean(curve), abs=1e-9)
    assert with_void["em_max"] == pytest.approx(np.max(curve), abs=1e-9)
    hard = pred >= min(2 * pred.mean(), 1)
    adaptive = _e_measure_plain(hard, np.where(rows, ~hard, gt == 1))
    assert with_void["em_adp"] == pytest.approx(adaptive, abs=1e-9)


def test_all_void_image_is_left_out_and_metric_objects_take_ignore_index():
    pred, gt = _frame(1)
    other_pred, other_gt = _frame(2)
    names = PIXEL_WISE + STRUCTURAL
    both = score([pred, other_pred], [gt, np.full_like(other_gt, 255)], metrics=names,
                 ignore_index=255)
    alone = score([pred], [gt], metrics=names)
    assert both == pytest.approx(alone, abs=1e-12)
    # metric objects: ignore_index reaches every binary metric through build_metrics
    built = build_metrics("binary", names, ignore_index=255)
    target = torch.from_numpy(np.where(np.arange(96)[:, None] < 10, 255, gt))
    for metric in built.values():
        assert metric.ignore_index == 255
        metric.update(torch.from_numpy(pred)[None], target[None])
    expected = score([pred], [target.numpy()], metrics=names, ignore_index=255)
    for name, metric in built.items():
        assert float(metric.compute()) == pytest.approx(expected[name], abs=1e-12), name


def test_data_without_any_valid_pixel_scores_nan_in_every_metric():
    """Pooled BER read the empty pool's 0/0 rates as 0 and gave 1.0 beside the others' NaN."""
    pred, gt = _frame(1)
    names = PIXEL_WISE + STRUCTURAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: compute without an update
        scores = score([pred, pred], [np.full_like(gt, 255)] * 2, metrics=names,
                       ignore_index=255)
    assert set(scores) == set(names) and all(np.isnan(v) for v in scores.values()), scores


def test_infer_task_leaves_the_ignore_index_out():
    gt = np.zeros((8, 8), np.int64)
    gt[2:5, 2:5] = 1
    gt[0] = 255
    pred = gt.clip(0, 1).astype(np.uint8)
    assert set(score([pred], [gt], ignore_index=255)) == {"sm", "em", "wfm", "mae", "iou",
                                                         "dice", "ber"}


def test_class_index_targets_with_255_but_no_ignore_index_raise():
    """{0, 1, 255} read as an 8-bit mask would make 1 background and void the object."""
    pred, gt = _frame(0)
    target = np.where(np.arange(96)[:, None] < 10, 255, gt)
    with pytest.raises(ValueError, match="ignore_index=255"):
        score([pred], [target], metrics=["iou"])


@pytest.fixture(scope="module")
def fitted_with_void_test(tmp_path_factory):
    root = tmp_path_factory.mktemp("void")
    frame = make_synthetic(16, size=(64, 80), num_classes=2, seed=3, root=root / "data")
    train, test = train_test_split(frame, test_size=0.25, seed=0)
    seg = SemanticSegmentor(label="label", path=root / "run", verbosity=0)
    seg.fit(train, presets="tiny", hyperparameters={"optim.max_epochs": 1,
                                                    "model.input_size": 64})
    # the same test masks as {0, 1} class indices, with a band of 16 rows marked void (255)
    labelled, void = test.copy(), test.copy()
    for frame_, suffix, band in ((labelled, "lab", False), (void, "void", True)):
        paths = []
        for i, path in enumerate(test["label"]):
            mask = (np.asarray(Image.open(path)) > 128).astype(np.uint8)
            if band:
                mask[20:36] = 255
            out = root / f"{suffix}_{i}.png"
            Image.fromarray(mask).save(out)
            paths.append(str(out))
        frame_["label"] = paths
    return seg, labelled, void


def test_evaluate_excludes_void_pixels(fitted_with_void_test):
    seg, labelled, void = fitted_with_void_test
    names = PIXEL_WISE + STRUCTURAL
    full = seg.evaluate(labelled, metrics=names)
    with_void = seg.evaluate(void, metrics=names)
    probs = seg.predict_proba(labelled)
    gts = [np.asarray(Image.open(p)).astype(np.int64) for p in labelled["label"]]
    keep = np.ones_like(gts[0], dtype=bool)
    keep[20:36] = False
    alone = score([p[keep][None] for p in probs], [g[keep][None] for g in gts],
                  metrics=PIXEL_WISE)
    for name in PIXEL_WISE:
        assert with_void[name] == pytest.approx(alone[name], abs=1e-9), name
    # evaluate applies the same rule as score(..., ignore_index=255) on the probability maps
    voids = [np.asarray(Image.open(p)).astype(np.int64) for p in void["label"]]
    same = score(probs, voids, metrics=names, ignore_index=255)
    assert with_void == pytest.approx(same, abs=1e-9)
    # the band no longer counts as correct: S-alpha and mean E-phi drop (this 1-epoch model's
    # map is nearly useless, and on it wfm, which is not monotone in general, rose by 0.002)
    for name in ("sm", "em"):
        assert with_void[name] < full[name], (name, with_void, full)


def test_an_ignore_index_no_ground_truth_can_hold_is_refused(tmp_path):
    """VOC-style 8-bit masks with a 255 border: ignore_index=999 (a typo) or -1 would leave
    the border scored as class 255; it is refused, naming the value and the masks' range.
    An integer map that can hold -1 takes it as void."""

    truth = np.zeros((20, 20), np.uint8)
    truth[5:15, 5:15] = 1
    truth[:2] = 255  # the void border
    pred = np.where(truth == 255, 0, truth).astype(np.uint8)
    right = score([pred], [truth], task="multiclass", ignore_index=255)
    assert right["miou"] == 1.0 and len(right["iou_per_class"]) == 2
    for bad in (999, -1, 256):
        with pytest.raises(ValueError, match=rf"ignore_index={bad} cannot occur.*uint8 "
                                             r"\(0\.\.255\)"):
            score([pred], [truth], task="multiclass", ignore_index=bad)
    signed = np.where(truth == 255, -1, truth.astype(np.int64))
    assert score([pred], [signed], task="multiclass", ignore_index=-1)["miou"] == 1.0
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(pred).save(tmp_path / "pred" / "a.png")
    Image.fromarray(truth).save(tmp_path / "gt" / "a.png")
    proc = run_automask("score", "--pred", str(tmp_path / "pred"), "--gt",
                        str(tmp_path / "gt"), "--task", "multiclass", "--ignore-index", "999",
                        timeout=300)
    assert proc.returncode == 2 and "--ignore-index 999 cannot occur" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_255_stays_unlabelled_beside_another_void_value():
    """score(ignore_index=11) on CamVid-like masks with a 255 border scored 255 as a class
    of its own (K inferred as 256); evaluate leaves both out."""
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (16, 16)).astype(np.uint8)
    gt[:2] = 255  # a border
    gt[5, 5] = 11  # the data set's void
    pred = gt.copy()
    pred[:2] = rng.integers(0, 4, (2, 16))  # whatever the model says on the border
    pred[5, 5] = 0
    found = score([pred], [gt], task="multiclass", ignore_index=11)
    assert found["miou"] == 1.0 and len(found["iou_per_class"]) == 4
    # the same masks with the border as 11: the same scores
    assert score([pred], [np.where(gt == 255, 11, gt)], task="multiclass",
                 ignore_index=11) == found


def test_multiclass_scores_of_0_255_masks_say_what_they_leave_out():
    """task='multiclass' on 0/255 masks read every object pixel as void: predicting nothing
    scored acc 1.0 and mIoU 1.0 without a word (background-only images with a void border
    are multi-class data too, so it is said, not refused)."""
    gt = np.zeros((16, 16), np.uint8)
    gt[4:12, 4:12] = 255
    with pytest.warns(UserWarning, match="every target holds only 0 and 255.*task='binary'"):
        assert score([np.zeros_like(gt)], [gt], task="multiclass")["miou"] == 1.0
    assert score([np.zeros_like(gt)], [gt], task="binary", metrics=["iou"])["iou"] == 0.0
