"""automask.metrics against PySODMetrics on random pairs; inputs, errors, registry and files."""
from __future__ import annotations

import math
import re

import numpy as np
import py_sod_metrics as sod
import pytest
import torch
from PIL import Image

from automask.metrics import (
    DEFAULT_METRICS,
    HIGHER_IS_BETTER,
    METRICS,
    build_metrics,
    infer_task,
    score,
    score_folders,
)
from automask.errors import DataValidationError
from automask.metrics.registry import METRIC_TASK

TOL = 1e-6
SOD_NAMES = ["sm", "em", "em_adp", "em_max", "wfm", "fm", "fm_adp", "fm_max", "mae"]
THRESHOLD_NAMES = ["iou", "dice", "iou_pooled", "dice_pooled", "ber"]


def _random_pairs(seed: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """uint8 predictions (noise, shifted shapes, constant, binary); 0/255 masks incl. empty/full."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(8, 90, size=2))
        gt = np.zeros((h, w), np.uint8)
        kind = i % 6
        if kind == 4:
            pass  # empty ground truth
        elif kind == 5:
            gt[:] = 255  # full ground truth
        else:
            for _ in range(int(rng.integers(1, 4))):
                y, x = rng.integers(0, h), rng.integers(0, w)
                gt[y : y + int(rng.integers(1, h)), x : x + int(rng.integers(1, w))] = 255
        style = int(rng.integers(0, 4))
        if style == 0:
            pred = rng.integers(0, 256, (h, w)).astype(np.uint8)
        elif style == 1:
            moved = np.roll(gt, int(rng.integers(-3, 4)), axis=1) * rng.uniform(0.3, 1)
            noise = rng.normal(0, 40, (h, w)) + moved
            pred = np.clip(noise + rng.uniform(0, 60), 0, 255).astype(np.uint8)
        elif style == 2:
            pred = np.full((h, w), rng.integers(0, 256), np.uint8)
        else:
            pred = np.where(rng.random((h, w)) < 0.9, gt, 255 - gt).astype(np.uint8)
        pairs.append((pred, gt))
    return pairs


def _pysod_reference(pairs):
    """PySODMetrics values; thresholded metrics on raw pred / 255 (automask's convention)."""
    sm, em, wfm, mae = sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure(beta=0.3), sod.MAE()
    fmeasure = sod.Fmeasure(beta=0.3)
    fm = sod.FmeasureV2(
        {
            "iou": sod.IOUHandler(with_dynamic=False, with_adaptive=False, with_binary=True),
            "dice": sod.DICEHandler(with_dynamic=False, with_adaptive=False, with_binary=True),
            "iou_pooled": sod.IOUHandler(False, False, with_binary=True, sample_based=False),
            "dice_pooled": sod.DICEHandler(False, False, with_binary=True, sample_based=False),
            "ber": sod.BERHandler(False, False, with_binary=True, sample_based=False),
        }
    )
    for pred, gt in pairs:
        for metric in (sm, em, wfm, mae, fmeasure):
            metric.step(pred, gt)
        fm.step(pred / 255.0, gt > 128, normalize=False)  # no min-max normalisation
    curve = em.get_results()["em"]
    f_curve = fmeasure.get_results()["fm"]
    res = fm.get_results()
    return {
        "sm": sm.get_results()["sm"],
        "em": curve["curve"].mean(),
        "em_adp": curve["adp"],
        "em_max": curve["curve"].max(),
        "wfm": wfm.get_results()["wfm"],
        "fm": f_curve["curve"].mean(),
        "fm_adp": f_curve["adp"],
        "fm_max": f_curve["curve"].max(),
        "mae": mae.get_results()["mae"],
        **{name: res[name]["binary"] for name in THRESHOLD_NAMES},
    }


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # PySODMetrics' NaN S-measure case
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_pairs_match_pysodmetrics(seed):
    pairs = _random_pairs(seed, 24)
    names = SOD_NAMES + THRESHOLD_NAMES
    # per image
    for i, (pred, gt) in enumerate(pairs):
        ref = _pysod_reference([(pred, gt)])
        ours = score([pred], [gt], metrics=names, empty_score=0.0)
        for name in names:
            if math.isnan(ref[name]):  # PySODMetrics' S-measure on an empty quadrant
                assert name == "sm" and math.isfinite(ours[name])
                continue
            assert math.isclose(ours[name], ref[name], abs_tol=TOL), (seed, i, name, ours, ref)
    # dataset level
    ref = _pysod_reference(pairs)
    ours = score([p for p, _ in pairs], [g for _, g in pairs], metrics=names, empty_score=0.0)
    for name in names:
        if not math.isnan(ref[name]):
            assert math.isclose(ours[name], ref[name], abs_tol=TOL), (seed, name, ours, ref)


def test_sm_on_a_centroid_in_the_last_row_is_finite_where_pysod_is_nan():
    gt = np.zeros((10, 12), np.uint8)
    gt[9, 3:7] = 255
    pred = np.random.default_rng(0).integers(0, 256, (10, 12)).astype(np.uint8)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        ref = sod.Smeasure()
        ref.step(pred, gt)
    assert math.isnan(ref.get_results()["sm"])
    assert 0 <= score([pred], [gt], metrics=["sm"])["sm"] <= 1


def test_input_dtypes_and_containers_agree():
    pairs = _random_pairs(7, 12)
    preds_u8 = [p for p, _ in pairs]
    gts_u8 = [g for _, g in pairs]
    names = SOD_NAMES + THRESHOLD_NAMES + ["ber_per_image"]
    base = score(preds_u8, gts_u8, metrics=names)
    # float64 probabilities computed as PySODMetrics does (u8 / 255) and 0/1 int64 masks: identical
    gts_01 = [(g > 128).astype(np.int64) for g in gts_u8]
    f64 = score([p / 255.0 for p in preds_u8], gts_01, metrics=names)
    assert f64 == pytest.approx(base, abs=1e-12)
    # bool masks, torch tensors
    tens = score(
        [torch.from_numpy(p / 255.0) for p in preds_u8],
        [torch.from_numpy(g > 128) for g in gts_u8],
        metrics=names,
    )
    assert tens == pytest.approx(base, abs=1e-12)
    # float32: rounding may move a pixel across a 1/255 bin of the E-measure curve, and the
    # S-measure of a constant map depends on the exact float value (see functional._ssim)
    varied = [i for i, p in enumerate(preds_u8) if p.min() != p.max()]
    gts_v = [gts_u8[i] for i in varied]
    f32 = score([(preds_u8[i] / 255.0).astype(np.float32) for i in varied], gts_v, metrics=names)
    u8 = score([preds_u8[i] for i in varied], gts_v, metrics=names)
    assert f32 == pytest.approx(u8, abs=1e-4)


def test_metric_objects_accept_batches_lists_and_channel_dim():
    rng = np.random.default_rng(3)
    gt = (rng.random((4, 20, 30)) < 0.3).astype(np.int64)
    prob = np.clip(gt * 0.7 + rng.random((4, 20, 30)) * 0.5, 0, 1)
    expected = score(list(prob), list(gt))
    for preds, target in (
        (torch.from_numpy(prob), torch.from_numpy(gt)),  # (B, H, W)
        (torch.from_numpy(prob)[:, None], torch.from_numpy(gt)),  # (B, 1, H, W)
        (torch.from_numpy(prob)[:, None], torch.from_numpy(gt)[:, None]),  # both (B, 1, H, W)
        ([torch.from_numpy(x) for x in prob], [torch.from_numpy(x) for x in gt]),  # lists
        (prob[..., None], gt[..., None]),  # (B, H, W, 1), as Keras / OpenCV stack them
        (torch.from_numpy(prob)[..., None], torch.from_numpy(gt)),
    ):
        metrics = build_metrics("binary")
        for m in metrics.values():
            m.update(preds[:2], target[:2])
            m.update(preds[2:], target[2:])
        got = {name: m.compute().item() for name, m in metrics.items()}
        assert got == pytest.approx(expected, abs=1e-12)
    # one (H, W, 1) map at a time is one image (as score reads it), not H maps 1 pixel wide
    metrics = build_metrics("binary")
    for m in metrics.values():
        for p, g in zip(prob, gt):
            m.update(p[..., None], g[..., None] if m is not metrics["mae"] else g)
    assert {name: m.compute().item() for name, m in metrics.items()} == pytest.approx(
        expected, abs=1e-12)
    assert int(metrics["sm"].count) == 4


def test_multiclass_metric_objects_take_targets_with_a_channel_dim():
    """(B, K, H, W) scores against (B, 1, H, W) masks, as a PyTorch loader gives them."""
    rng = np.random.default_rng(4)
    labels = torch.from_numpy(rng.integers(0, 3, (2, 10, 12)))
    scores = torch.from_numpy(rng.random((2, 3, 10, 12)))
    got = {}
    for target in (labels, labels[:, None]):
        metrics = build_metrics("multiclass", num_classes=3)
        for m in metrics.values():
            m.update(scores, target)
        got[target.ndim] = {name: m.compute().tolist() for name, m in metrics.items()}
    assert got[4] == got[3] == score(list(scores), list(labels))


def test_list_of_different_sizes_in_one_update():
    pairs = _random_pairs(11, 6)
    metrics = build_metrics("binary", ["sm", "em_max", "ber"])
    for m in metrics.values():
        m.update([torch.from_numpy(p) for p, _ in pairs], [torch.from_numpy(g) for _, g in pairs])
    expected = score([p for p, _ in pairs], [g for _, g in pairs], metrics=["sm", "em_max", "ber"])
    assert {n: m.compute().item() for n, m in metrics.items()} == pytest.approx(expected, abs=1e-12)


def test_states_merge_like_ddp():
    """States are sums: two ranks' halves merged equal one pass over everything."""
    pairs = _random_pairs(5, 10)
    preds = [torch.from_numpy(p) for p, _ in pairs]
    gts = [torch.from_numpy(g) for _, g in pairs]
    for name in METRICS:
        task = "multiclass" if name in DEFAULT_METRICS["multiclass"] else "binary"
        conv = {"num_classes": 3} if task == "multiclass" else {}
        data_p = [(p // 100).long() for p in preds] if task == "multiclass" else preds
        data_g = [(g // 100).long() for g in gts] if task == "multiclass" else gts
        whole, a, b = (build_metrics(task, [name], **conv)[name] for _ in range(3))
        whole.update(data_p, data_g)
        a.update(data_p[:4], data_g[:4])
        b.update(data_p[4:], data_g[4:])
        a.merge_state(b)
        torch.testing.assert_close(a.compute(), whole.compute(), equal_nan=True, msg=name)


def test_multiclass_scores_indices_and_ignore():
    rng = np.random.default_rng(0)
    k = 3
    target = rng.integers(0, k, (2, 16, 20))
    target[:, :2] = 255  # ignored rows
    logits = rng.normal(size=(2, k, 16, 20))
    index = logits.argmax(1)
    a = score(list(logits), list(target), task="multiclass", num_classes=k)
    b = score(list(index), list(target), num_classes=k)
    assert a == b
    # independent count: ignored pixels removed from predictions as well
    valid = target != 255
    inter = [np.sum((index == c) & (target == c) & valid) for c in range(k)]
    union = [np.sum(((index == c) | (target == c)) & valid) for c in range(k)]
    assert b["iou_per_class"] == pytest.approx([i / u for i, u in zip(inter, union)])
    assert b["miou"] == pytest.approx(np.mean([i / u for i, u in zip(inter, union)]))
    assert b["acc"] == pytest.approx(np.sum((index == target) & valid) / valid.sum())
    # batched tensors through the metric objects
    metrics = build_metrics("multiclass", num_classes=k)
    for m in metrics.values():
        m.update(torch.from_numpy(logits), torch.from_numpy(target))
    assert metrics["miou"].compute().item() == pytest.approx(b["miou"])


def test_multiclass_absent_class_is_nan_and_left_out_of_miou():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 3]])  # class 3 only on an ignored pixel
    out = score([pred], [target], num_classes=4)
    assert out["iou_per_class"][:2] == pytest.approx([3 / 4, 3 / 4])
    assert math.isnan(out["iou_per_class"][2]) and math.isnan(out["iou_per_class"][3])
    assert out["miou"] == pytest.approx(0.75)
    assert out["acc"] == pytest.approx(6 / 7)


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (np.zeros((4, 5)), np.zeros((4, 6)), "shape"),
        (np.full((4, 5), 1.5), np.zeros((4, 5)), r"\[0, 1\]"),
        (np.full((4, 5), -0.1), np.zeros((4, 5)), r"\[0, 1\]"),
        (np.full((4, 5), np.nan), np.zeros((4, 5)), r"holds 20 NaN or infinite value\(s\) "
                                                     r"of its 20 pixels"),
        (np.where(np.eye(4, 5) > 0, np.nan, 0.2), np.zeros((4, 5)),
         r"the prediction holds 4 NaN or infinite value\(s\) of its 20 pixels$"),
        (np.full((4, 5), np.inf), np.zeros((4, 5)), "holds 20 NaN or infinite"),
        (np.full((4, 5), 70000), np.zeros((4, 5), np.int64), r"0\.\.255 .* 0\.\.65535"),
        (np.full((4, 5), -1), np.zeros((4, 5), np.int64), r"0\.\.255 .* 0\.\.65535"),
        (np.zeros((4, 5)), np.full((4, 5), 256), "target"),
    ],
)
def test_binary_bad_input(pred, target, message):
    with pytest.raises(ValueError, match=message):
        score([pred], [target], task="binary")
    metric = build_metrics("binary", ["mae"])["mae"]
    with pytest.raises(ValueError, match=message):
        metric.update(torch.as_tensor(pred), torch.as_tensor(target))


def test_score_names_the_bad_image():
    good = np.zeros((4, 5))
    with pytest.raises(ValueError, match="image 2: .*shape"):
        score([good, good, np.zeros((4, 4))], [good, good, good], task="binary")
    with pytest.raises(ValueError, match=r"image 1: .*\[0, 1\]"):
        score([good, good + 2.0], [good, good], task="binary")
    with pytest.raises(ValueError, match="image 1: target class index 7 .*outside \\[0, 3\\)"):
        targets = [np.zeros((2, 2), int), np.full((2, 2), 7)]
        score([np.zeros((2, 2), int)] * 2, targets, task="multiclass", num_classes=3)
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        score([good, good], [good])


def test_multiclass_bad_input():
    metric = build_metrics("multiclass", ["miou"], num_classes=3)["miou"]
    with pytest.raises(ValueError, match="target class index 5"):
        metric.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 5], [1, 255]]))
    with pytest.raises(ValueError, match="predicted class index 3"):
        metric.update(torch.tensor([[0, 3], [1, 1]]), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match"):
        metric.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="4 classes"):
        metric.update(torch.zeros(4, 2, 2), torch.zeros(2, 2, dtype=torch.long))
    metric.update(torch.tensor([[0, 1], [2, 0]]), torch.tensor([[0, 1], [255, 255]]))  # ignored
    assert metric.compute().item() == 1.0


def test_registry_and_build_metrics_errors():
    assert DEFAULT_METRICS == {
        "binary": ["sm", "em", "wfm", "mae", "iou", "dice", "ber"],
        "multiclass": ["acc", "miou", "iou_per_class"],
    }
    assert set(HIGHER_IS_BETTER) == set(METRICS)
    assert not HIGHER_IS_BETTER["mae"] and not HIGHER_IS_BETTER["ber"] and HIGHER_IS_BETTER["sm"]
    binary_names = [n for n in METRICS if n not in DEFAULT_METRICS["multiclass"]]
    for name, m in build_metrics("binary", binary_names).items():
        assert m.higher_is_better == HIGHER_IS_BETTER[name]
    with pytest.raises(ValueError, match="'smeasure'.*valid metrics: sm, em"):
        build_metrics("binary", ["smeasure"])
    with pytest.raises(ValueError, match="'miou' is a multiclass metric"):
        build_metrics("binary", ["miou"])
    with pytest.raises(ValueError, match="num_classes is required"):
        build_metrics("multiclass")
    with pytest.raises(ValueError, match="unknown convention.*treshold"):
        build_metrics("binary", treshold=0.3)
    with pytest.raises(ValueError, match="unknown task"):
        build_metrics("regression")


def test_conventions_reach_the_metrics():
    conv = {"threshold": 0.3, "beta2": 1.0, "empty_score": 0.0, "gt_threshold": 100}
    m = build_metrics("binary", ["iou", "wfm", "ber"], **conv)
    assert m["iou"].threshold == 0.3 and m["iou"].empty_score == 0.0
    assert m["iou"].gt_threshold == 100
    assert m["wfm"].beta2 == 1.0 and m["ber"].threshold == 0.3
    mc = build_metrics("multiclass", num_classes=5, ignore_index=0)
    assert mc["miou"].ignore_index == 0 and mc["acc"].num_classes == 5


def test_threshold_and_empty_score():
    pred = np.array([[0.2, 0.4], [0.6, 0.8]])
    gt = np.array([[0, 1], [1, 1]])
    assert score([pred], [gt], metrics=["iou"])["iou"] == pytest.approx(2 / 3)
    assert score([pred], [gt], metrics=["iou"], threshold=0.3)["iou"] == pytest.approx(1.0)
    empty = np.zeros((2, 2))
    assert score([empty], [empty], metrics=["iou", "dice"]) == {"iou": 1.0, "dice": 1.0}
    zero = score([empty], [empty], metrics=["iou", "dice"], empty_score=0.0)
    assert zero == {"iou": 0.0, "dice": 0.0}


def test_infer_task():
    t = torch.from_numpy
    assert infer_task([t(np.zeros((2, 2)))], [t(np.zeros((2, 2), np.int64))]) == "binary"
    mask_0_255 = t(np.array([[0, 255], [0, 0]], np.uint8))
    assert infer_task([t(np.zeros((2, 2), np.uint8))], [mask_0_255]) == "binary"
    labels = t(np.array([[0, 2], [1, 255]]))
    assert infer_task([t(np.zeros((2, 2), np.int64))], [labels]) == "multiclass"
    assert infer_task([t(np.zeros((3, 2, 2)))], [t(np.zeros((2, 2), np.int64))]) == "multiclass"
    out = score([np.zeros((2, 2), int)], [np.array([[0, 2], [1, 255]])])
    assert set(out) == {"acc", "miou", "iou_per_class"}


def test_score_folders(tmp_path):
    pairs = _random_pairs(21, 5)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    for i, (p, g) in enumerate(pairs):
        if i == 0:
            np.save(pred_dir / f"img{i}.npy", p)
        else:
            Image.fromarray(p).save(pred_dir / f"img{i}.png")
        Image.fromarray(g).save(gt_dir / f"img{i}.{'bmp' if i == 1 else 'png'}")
    (gt_dir / "notes.txt").write_text("ignored")
    got = score_folders(pred_dir, gt_dir)
    expected = score([p for p, _ in pairs], [g for _, g in pairs])
    assert got.pop("n_images") == 5
    assert got == pytest.approx(expected, abs=1e-12)
    # unpaired stems are listed from both sides
    Image.fromarray(pairs[0][0]).save(pred_dir / "extra.png")
    (gt_dir / "img3.png").unlink()
    with pytest.raises(ValueError, match=r"without a ground truth: extra, img3"):
        score_folders(pred_dir, gt_dir)


def test_score_folders_merges_further_masks_on_request(tmp_path):
    """BUSI keeps a second lesion's mask as ``x_mask_1.png`` beside ``x_mask.png``: by
    default it is an unpaired ground truth named as a further mask of ``x_mask.png``, with
    the option to give; ``extra_masks="union"`` scores the image against the union of its
    masks, as from_folders(extra_masks="union") labels it."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    first, second = np.zeros((20, 30), np.uint8), np.zeros((20, 30), np.uint8)
    first[2:8, 2:10] = 255
    second[12:18, 15:28] = 255
    union = np.maximum(first, second)
    pred = np.zeros((20, 30), np.uint8)
    pred[2:18, 2:20] = 255  # covers the first lesion and half the second
    Image.fromarray(pred).save(pred_dir / "benign (4).png")
    Image.fromarray(first).save(gt_dir / "benign (4)_mask.png")
    Image.fromarray(second).save(gt_dir / "benign (4)_mask_1.png")
    Image.fromarray(first).save(pred_dir / "benign (5).png")
    Image.fromarray(first).save(gt_dir / "benign (5)_mask.png")
    with pytest.raises(ValueError, match=r"benign \(4\)_mask_1 \(a further mask of ground "
                                         r"truth benign \(4\)_mask.png\).*extra_masks='union'"):
        score_folders(pred_dir, gt_dir)
    got = score_folders(pred_dir, gt_dir, extra_masks="union", metrics=["iou", "sm"])
    want = score([pred, first], [union, first], metrics=["iou", "sm"])
    assert got.pop("n_images") == 2
    assert got == pytest.approx(want, abs=1e-12)
    assert got["iou"] != pytest.approx(score([pred, first], [first, first], metrics=["iou"])
                                       ["iou"])  # the second lesion counts
    with pytest.raises(ValueError, match="extra_masks must be None or 'union'"):
        score_folders(pred_dir, gt_dir, extra_masks="max")


def test_score_folders_pairs_ground_truths_named_with_a_mask_ending(tmp_path):
    """ISIC_1.png predictions against ISIC_1_segmentation.png ground truths (automask's own
    predictions of ISIC data) pair as from_folders pairs them; names that share nothing
    are listed with what to do."""
    pairs = _random_pairs(4, 3)
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    for i, (p, g) in enumerate(pairs):
        Image.fromarray(p).save(tmp_path / "pred" / f"ISIC_{i}.png")
        Image.fromarray(g).save(tmp_path / "gt" / f"ISIC_{i}_segmentation.png")
    got = score_folders(tmp_path / "pred", tmp_path / "gt")
    assert got.pop("n_images") == 3
    assert got == pytest.approx(score([p for p, _ in pairs], [g for _, g in pairs]), abs=1e-12)
    # another model's outputs, named with an ending of their own that all of them share
    for i in range(3):
        (tmp_path / "pred" / f"ISIC_{i}.png").rename(tmp_path / "pred" / f"ISIC_{i}-pranet.png")
    assert score_folders(tmp_path / "pred", tmp_path / "gt") == {**got, "n_images": 3}
    for i in range(3):
        (tmp_path / "gt" / f"ISIC_{i}_segmentation.png").rename(tmp_path / "gt" / f"gt{i}.png")
    with pytest.raises(ValueError, match=r"ground truths without a prediction: gt0, gt1, gt2; "
                                         r"no file pairs.*_segmentation"):
        score_folders(tmp_path / "pred", tmp_path / "gt")


def test_score_folders_names_the_bad_file(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    np.save(tmp_path / "p" / "a.npy", np.zeros((4, 4)))
    np.save(tmp_path / "p" / "b.npy", np.full((4, 4), 2.0))
    for stem in "ab":
        np.save(tmp_path / "g" / f"{stem}.npy", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"b\.npy vs b\.npy: image 1"):
        score_folders(tmp_path / "p", tmp_path / "g", task="binary")
    np.save(tmp_path / "p" / "b.npy", np.zeros((4, 4), np.complex64))
    with pytest.raises(TypeError, match=r"b\.npy vs b\.npy: image 1: .*complex"):
        score_folders(tmp_path / "p", tmp_path / "g", task="binary")
    # strings and records: torch's "can't convert np.ndarray of type numpy.str_" named none
    for bad in (np.full((4, 4), "a"), np.zeros((4, 4), dtype=[("a", "f8")])):
        np.save(tmp_path / "p" / "b.npy", bad)
        with pytest.raises(TypeError, match=rf"{re.escape(str(tmp_path / 'p' / 'b.npy'))} "
                                            r"holds values of dtype .*, not numbers"):
            score_folders(tmp_path / "p", tmp_path / "g", task="binary")
    np.save(tmp_path / "p" / "b.npy", np.zeros((4, 4)))
    mask = Image.fromarray(255 * np.eye(64, dtype=np.uint8))
    for side in "pg":  # an interrupted copy: Pillow's "image file is truncated" named none
        for folder in "pg":
            mask.save(tmp_path / folder / "c.png")
        damaged = tmp_path / side / "c.png"
        damaged.write_bytes(damaged.read_bytes()[:-30])  # the end of its pixels cut off
        with pytest.raises(DataValidationError, match=rf"{re.escape(str(damaged))} cannot be "
                                                      r"decoded \(image file is truncated\)"):
            score_folders(tmp_path / "p", tmp_path / "g", task="binary")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda_match_cpu():
    pairs = _random_pairs(4, 8)
    binary = [name for name in METRICS if METRIC_TASK[name] == "binary"]
    expected = score([p for p, _ in pairs], [g for _, g in pairs], metrics=binary)
    metrics = build_metrics("binary", binary)
    for m in metrics.values():
        m.to("cuda")
        m.update(
            [torch.from_numpy(p).cuda() for p, _ in pairs],
            [torch.from_numpy(g).cuda() for _, g in pairs],
        )
    got = {n: m.compute().item() for n, m in metrics.items()}
    assert got == pytest.approx(expected, abs=1e-9)
    mc = build_metrics("multiclass", num_classes=3)
    for m in mc.values():
        m.to("cuda")
        scores = torch.randn(2, 3, 8, 8, device="cuda")
        m.update(scores, torch.randint(0, 3, (2, 8, 8), device="cuda"))
        assert m.compute().device.type == "cuda"


def test_adaptive_e_measure_binarises_a_pixel_on_the_threshold_as_foreground():
    # 1 x 14 map: eleven 0, one 85 (= 1/3) and two 255 (= 1), already spanning [0, 1]. Its mean
    # is (1/3 + 2) / 14 = 1/6, so the adaptive threshold 2 * mean is 1/3 and the 85 pixel,
    # lying exactly on it, is foreground (p >= threshold). numpy's mean of this map (the one
    # PySODMetrics takes) rounds to the float 1/6; torch's rounds one bit higher, which dropped
    # the pixel. The binarised map then equals the mask (the last three pixels): every pixel
    # has an enhanced alignment of 1 (up to eps), and E = 14 / (14 - 1).
    pred = np.array([[0] * 11 + [85, 255, 255]], np.uint8)
    gt = np.array([[0] * 11 + [255] * 3], np.uint8)
    assert score([pred], [gt], metrics=["em_adp"])["em_adp"] == pytest.approx(14 / 13, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_e_measure_on_threshold_ties_matches_pysodmetrics(seed):
    """Maps of the values 0, k and 255 whose exact adaptive threshold 2 * mean is k / 255."""
    rng = np.random.default_rng(seed)
    for k, n_k in ((85, 1), (51, 15), (153, 3), (102, 10)):
        # n_255 = k / 255 * (N / 2 - n_k) makes 2 * mean = k / 255 exactly
        n = 2 * (n_k + 3 * 255 // np.gcd(k, 255) * int(rng.integers(1, 4)))
        n_255 = k * (n // 2 - n_k) // 255
        values = np.array([0] * (n - n_k - n_255) + [k] * n_k + [255] * n_255, np.uint8)
        for _ in range(5):
            pred = rng.permutation(values).reshape(2, -1)
            gt = ((rng.random(pred.shape) < 0.3) * 255).astype(np.uint8)
            ref = sod.Emeasure()
            ref.step(pred, gt)
            ours = score([pred], [gt], metrics=["em_adp"])["em_adp"]
            assert ours == pytest.approx(ref.get_results()["em"]["adp"], abs=TOL), (k, pred)


def test_multiclass_bad_image_leaves_the_state_unchanged():
    good = torch.tensor([[0, 1], [2, 2]])
    bad = torch.tensor([[0, 3], [2, 2]])  # class 3 with num_classes=3
    metric = build_metrics("multiclass", ["acc"], num_classes=3)["acc"]
    with pytest.raises(ValueError, match="image 1: predicted class index 3"):
        metric.update([good, bad], [good, good])
    assert metric.area_target.sum().item() == 0 and metric.intersection.sum().item() == 0
    metric.update([good], [torch.tensor([[0, 1], [2, 0]])])
    assert metric.compute().item() == 3 / 4  # only the valid update counts


def test_multiclass_nan_scores_raise():
    scores = torch.rand(2, 3, 4, 5)
    scores[1, 2, 0, 3] = float("nan")  # argmax would pick class 2 there
    target = torch.zeros(2, 4, 5, dtype=torch.long)
    metric = build_metrics("multiclass", ["miou"], num_classes=3)["miou"]
    with pytest.raises(ValueError, match=r"1 NaN value.*\(1, 2, 0, 3\)"):
        metric.update(scores, target)
    with pytest.raises(ValueError, match="image 1: score maps hold 1 NaN"):
        score(list(scores), list(target), task="multiclass", num_classes=3)


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.float64])
def test_empty_binary_maps_raise_whatever_the_dtype(dtype):
    empty = np.zeros((0, 3), dtype)
    with pytest.raises(ValueError, match="image 1: the .* is empty"):
        score([np.ones((2, 3), dtype), empty], [np.ones((2, 3), dtype), empty], task="binary")


def test_complex_maps_raise_a_type_error_naming_the_image():
    real = np.zeros((2, 3))
    with pytest.raises(TypeError, match="image 1: the prediction has the complex dtype"):
        score([real, real.astype(np.complex64)], [real, real], task="binary")
    with pytest.raises(TypeError, match="image 0: the target has the complex dtype"):
        score([real], [real.astype(np.complex128)], task="binary")
    index = np.zeros((2, 3), np.int64)
    with pytest.raises(TypeError, match="image 0: the prediction has the complex dtype"):
        score([index.astype(np.complex64)], [index], task="multiclass", num_classes=2)


def test_batch_prediction_with_a_list_of_targets_names_the_bad_image():
    preds = np.random.default_rng(0).random((2, 4, 5))  # (B, H, W)
    metric = build_metrics("binary", ["iou"])["iou"]
    with pytest.raises(ValueError, match=r"image 1: prediction shape \(4, 5\) does not match"):
        metric.update(preds, [np.zeros((4, 5)), np.zeros((3, 5))])
    metric.update(preds[:, None], [np.zeros((4, 5))] * 2)  # (B, 1, H, W) with a list still works
    assert metric.compute().item() == 0.0  # (pred > 0.5 somewhere on an empty mask)


def test_a_16_bit_binary_target_is_not_read_as_65536_classes():
    """Targets of only 0 and 65535 (a 16-bit binary mask as an array) without a task: a
    ValueError naming the image and the conversion, not a silent 65536-class score. Class
    ids past 255 with other values stay multi-class."""
    g = np.zeros((8, 8), np.uint16)
    g[2:6, 2:6] = 65535
    p = (g > 0).astype(np.uint8) * 255
    with pytest.raises(ValueError, match=r"image 1: the target holds only 0 and 65535: a "
                                         r"16-bit binary mask\? .*mask // 257"):
        score([p, p], [g // 257, g])
    assert score([p], [g // 257])["iou"] == 1.0
    ids = np.arange(64, dtype=np.int64).reshape(8, 8) * 5  # ids 0..315, many values
    assert score([ids], [ids])["miou"] == 1.0


def test_a_16_bit_saliency_map_scores_as_its_8_bit_version(tmp_path):
    """A 16-bit PNG prediction (v * 257 for each 8-bit value v) is divided by 65535, so it
    scores exactly as the 8-bit map, from arrays and from files; without a task, values past
    255 against grey 8-bit targets are an error, not one class per value."""
    rng = np.random.default_rng(3)
    grey = (rng.random((40, 60)) * 255).astype(np.uint8)  # an anti-aliased ground truth
    maps = [(rng.random((40, 60)) * 255).astype(np.uint8) for _ in range(3)]
    maps[1] = np.clip(maps[1], 30, 180)  # not spanning 0..255: the scale shows in iou/ber
    gts = [(grey > 128).astype(np.uint8) * 255, grey, grey]
    want = score(maps, gts, task="binary")
    deep = [m.astype(np.uint16) * 257 for m in maps]
    assert score(deep, gts, task="binary") == want
    for i, m in enumerate(deep):
        Image.fromarray(m).save(tmp_path / f"p{i}.png")
        Image.fromarray(gts[i]).save(tmp_path / f"g{i}.png")
    assert Image.open(tmp_path / "p0.png").mode == "I;16"
    files = [str(tmp_path / f"p{i}.png") for i in range(3)]
    truths = [str(tmp_path / f"g{i}.png") for i in range(3)]
    assert score(files, truths, task="binary") == want
    assert score(deep[:1], gts[:1]) == score(maps[:1], gts[:1])  # 0/255 target: binary
    with pytest.raises(ValueError, match=r"image 1: the prediction holds values up to \d+ but "
                                         r"no target holds one above 25\d: a 16-bit grey map\? "
                                         r"Pass task='binary'"):
        score([maps[0], deep[1]], gts[1:])
    with pytest.raises(ValueError, match=r"image 0: .* a 16-bit grey map\?"):
        score(files, truths)
    labels = np.array([[0, 2], [1, 300]])  # ids past 255 in a target: still classes
    assert score([labels], [labels])["miou"] == 1.0


def test_maps_of_one_channel_score_as_their_2d_maps():
    """(1, H, W) and (H, W, 1) maps (a PyTorch batch's items, Keras or OpenCV outputs), in
    lists, as (B, 1, H, W) / (B, H, W, 1) stacks, or alone, score as the (H, W) maps; a
    lone (H, W, 1) map is one image, not H maps one pixel wide."""
    rng = np.random.default_rng(5)
    probs = [rng.random((30, 40)) for _ in range(3)]
    truths = [(rng.random((30, 40)) > 0.5).astype(np.uint8) * 255 for _ in range(3)]
    want = score(probs, truths)
    p, g = np.stack(probs), np.stack(truths)
    assert score([m[None] for m in probs], [m[None] for m in truths]) == want
    assert score([m[..., None] for m in probs], [m[..., None] for m in truths]) == want
    assert score(torch.from_numpy(p)[:, None], torch.from_numpy(g)[:, None]) == want
    assert score(p[..., None], g[..., None]) == want
    assert score(probs[0][..., None], truths[0][..., None]) == score(probs[:1], truths[:1])
    labels = rng.integers(0, 4, (2, 30, 40))
    scores = rng.random((2, 4, 30, 40))
    want = score(list(scores), list(labels))
    assert score(scores, labels[:, None]) == want  # (B, K, H, W) against (B, 1, H, W)
    assert score(list(scores), [m[..., None] for m in labels]) == want
    with pytest.raises(ValueError, match=r"image 0: prediction shape \(30, 40, 2\) does not "
                                         r"match target shape \(30, 40\)"):
        score([np.stack([1 - probs[0], probs[0]], -1)], truths[:1])  # two channels last


@pytest.mark.parametrize("task, given, meant", [
    ("binary", "S-alpha", "sm"), ("binary", "Sα", "sm"), ("binary", "S-measure", "sm"),
    ("binary", "E_phi", "em"), ("binary", "maxE", "em_max"), ("binary", "MAE", "mae"),
    ("binary", "wF", "wfm"), ("binary", "F_beta^w", "wfm"), ("binary", "maxF", "fm_max"),
    ("binary", "IoU", "iou"), ("binary", "mIoU", "iou"), ("binary", "Dice", "dice"),
    ("binary", "BER", "ber"), ("binary", "f1", "dice"), ("binary", "iuo", "iou"),
    ("multiclass", "mIoU", "miou"), ("multiclass", "Accuracy", "acc"),
    ("multiclass", "IoU", "miou"), ("multiclass", "pixel_accuracy", "acc"),
])
def test_unknown_metric_names_suggest_the_registry_name(task, given, meant):
    """The names papers and other libraries use are answered with the registry's."""
    with pytest.raises(ValueError) as info:
        build_metrics(task, [given], **({"num_classes": 3} if task == "multiclass" else {}))
    text = str(info.value)
    assert f"unknown metric {given!r} for task {task!r}; did you mean {meant!r}? (valid " \
           "metrics: " in text, text


@pytest.mark.parametrize("task, given, says", [
    ("multiclass", "mAcc", "a mean class accuracy is not offered ('acc' is the pixel"),
    ("multiclass", "F1", "a multi-class Dice is not offered (the mean IoU is 'miou')"),
    ("multiclass", "dsc", "a multi-class Dice is not offered"),
    ("multiclass", "mDice", "a multi-class Dice is not offered"),
    ("binary", "mDice", "did you mean 'dice'?"),
])
def test_names_of_quantities_not_offered_are_not_answered_with_another(task, given, says):
    """A mean class accuracy is not the pixel accuracy, nor a Dice the mean IoU."""
    with pytest.raises(ValueError) as info:
        build_metrics(task, [given], **({"num_classes": 3} if task == "multiclass" else {}))
    assert f"unknown metric {given!r} for task {task!r}; {says}" in str(info.value)
    assert task == "binary" or "did you mean" not in str(info.value)


def test_names_like_no_metric_get_no_suggestion():
    with pytest.raises(ValueError) as info:
        build_metrics("binary", ["hausdorff"])
    assert "did you mean" not in str(info.value)
    assert "unknown metric 'hausdorff' for task 'binary' (valid metrics: sm, em" in str(info.value)
