"""The reference vectors of ../shared/metric_vectors (PySODMetrics 1.6.2 and protocol variants).

Every value of expected.json that corresponds to an automask metric is reproduced to 1e-6, per
image and aggregated over the 12 binary cases, plus the multi-class case.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from automask.metrics import score

pytestmark = pytest.mark.shared

TOL = 1e-6

# automask name (with conventions) -> key of expected.json's "pysodmetrics" block.
# PySODMetrics gives 0 to an empty prediction on an empty mask, hence empty_score=0.0.
PYSOD_KEYS = {
    "sm": "Sm",
    "em": "Em_mean",
    "em_adp": "Em_adaptive",
    "em_max": "Em_max",
    "wfm": "wFm_beta2_0.3",
    "fm": "Fm_mean",
    "fm_adp": "Fm_adaptive",
    "fm_max": "Fm_max",
    "mae": "MAE",
    "iou": "IoU_binary",
    "dice": "Dice_binary",
    "ber": "BER_binary_overall",
    "iou_pooled": "IoU_binary_overall",
    "dice_pooled": "Dice_binary_overall",
}


@pytest.fixture(scope="module")
def vectors():
    folder = shared_path("metric_vectors")
    expected = json.loads((folder / "expected.json").read_text())
    cases = expected["cases"]
    preds = [np.load(folder / f"{c}_pred.npy") for c in cases]
    gts = [np.load(folder / f"{c}_gt.npy") for c in cases]
    return folder, expected, cases, preds, gts


def _close(ours: float, ref: float, label: str) -> None:
    assert math.isclose(ours, ref, rel_tol=0, abs_tol=TOL), f"{label}: {ours!r} != {ref!r}"


def test_inputs_are_what_the_json_describes(vectors):
    _, expected, cases, preds, gts = vectors
    assert len(cases) == 12
    for case, p, g in zip(cases, preds, gts):
        assert list(p.shape) == expected["per_image"][case]["shape"] == list(g.shape)
        assert p.dtype == np.uint8 and g.dtype == np.uint8


def test_per_image_pysodmetrics_values(vectors):
    _, expected, cases, preds, gts = vectors
    for case, p, g in zip(cases, preds, gts):
        ours = score([p], [g], metrics=list(PYSOD_KEYS), empty_score=0.0, beta2=0.3)
        ref = expected["per_image"][case]["pysodmetrics"]
        for name, key in PYSOD_KEYS.items():
            _close(ours[name], ref[key], f"{case} {name}")
        # On a single image the per-image BER equals the pooled one.
        _close(ours["ber"], ref["BER_binary"], f"{case} ber (per image)")


def test_wfm_beta2_is_a_parameter(vectors):
    _, expected, cases, preds, gts = vectors
    for case, p, g in zip(cases, preds, gts):
        ours = score([p], [g], metrics=["wfm"], beta2=1.0)["wfm"]
        ref = expected["per_image"][case]["pysodmetrics"]["wFm_beta2_1"]
        _close(ours, ref, f"{case} wfm beta2=1")


def test_aggregated_pysodmetrics_values(vectors):
    """Dataset level: per-image means, curves averaged before max/mean, pooled confusion counts."""
    _, expected, _, preds, gts = vectors
    ours = score(preds, gts, metrics=list(PYSOD_KEYS), empty_score=0.0)
    ref = expected["aggregated_pysodmetrics"]
    for name, key in PYSOD_KEYS.items():
        _close(ours[name], ref[key], f"aggregated {name}")
    # em_max is the max of the mean curve, not the mean of per-image maxima
    contrast = expected["mean_of_per_image_max_for_contrast"]["Em_max"]
    assert abs(ours["em_max"] - contrast) > 1e-3


def test_png_files_give_the_same_values(vectors):
    folder, expected, cases, _, _ = vectors
    preds = [np.array(Image.open(folder / f"{c}_pred.png")) for c in cases]
    gts = [np.array(Image.open(folder / f"{c}_gt.png")) for c in cases]
    ours = score(preds, gts, metrics=["sm", "em", "wfm"], empty_score=0.0)
    ref = expected["aggregated_pysodmetrics"]
    for name in ("sm", "em", "wfm"):
        _close(ours[name], ref[PYSOD_KEYS[name]], f"png aggregated {name}")


def test_conv_lora_protocol_variants(vectors):
    """Conv-LoRA/AutoGluon: per-image macro BER and binary IoU; SBU pooled BER at > 125."""
    _, expected, cases, preds, gts = vectors
    sam_style = {"threshold": 125 / 255, "gt_threshold": 125}
    for case, p, g in zip(cases, preds, gts):
        variants = expected["per_image"][case]["protocol_variants"]
        ber = score([p], [g], metrics=["ber_per_image"], **sam_style)["ber_per_image"]
        key = "ConvLoRA_autogluon_BER_fraction(per-image,torchmetrics macro,thr>125)"
        _close(ber, variants[key], f"{case} ber_per_image")
        # pred / 255 > 0.5 on both maps (127 is the largest background value of an 8-bit mask)
        tm = score([p], [g], metrics=["iou"], empty_score=0.0, gt_threshold=127)["iou"]
        key = "torchmetrics_BinaryJaccard(pred/255>0.5; empty/empty->0)"
        _close(tm, variants[key], f"{case} iou empty->0")
        ours = score([p], [g], metrics=["iou", "dice"], gt_threshold=127)  # default empty_score=1.0
        _close(ours["iou"], variants["IoU(pred/255>0.5; empty/empty->1)"], f"{case} iou empty->1")
        key = "Dice(pred/255>0.5; empty/empty->1)"
        _close(ours["dice"], variants[key], f"{case} dice empty->1")

    agg = expected["aggregated_protocol_variants"]
    ours = score(preds, gts, metrics=["ber_per_image", "ber"], **sam_style)
    key = "ConvLoRA_autogluon_BER_mean_over_images_fraction"
    _close(ours["ber_per_image"], agg[key], "aggregated ber_per_image")
    _close(ours["ber"], agg["SBU_dataset_level_BER_percent(thr>125)"] / 100, "SBU pooled ber")
    iou = score(preds, gts, metrics=["iou"], empty_score=0.0, gt_threshold=127)["iou"]
    _close(iou, agg["ConvLoRA_autogluon_binary_IoU_mean_over_images"], "aggregated Conv-LoRA IoU")


def test_edge_cases_described_in_the_json(vectors):
    _, expected, cases, preds, gts = vectors
    by_case = dict(zip(cases, zip(preds, gts)))
    # empty/empty: IoU and Dice take empty_score; the Conv-LoRA BER is 0 where PySODMetrics says 0.5
    p, g = by_case["empty_gt_empty_pred_64"]
    ours = score([p], [g], metrics=["iou", "dice", "ber", "ber_per_image"])
    assert ours == {"iou": 1.0, "dice": 1.0, "ber": 0.5, "ber_per_image": 0.0}
    # gt value 128 is background (gt > 128)
    p, g = by_case["disk_gt_ring128_64"]
    assert score([p], [g], metrics=["iou"])["iou"] < 0.75
    assert score([p], [g], metrics=["iou"], gt_threshold=127)["iou"] == 1.0


def test_multiclass_case(vectors):
    folder, expected, _, _, _ = vectors
    mc = expected["multiclass"]
    assert mc["num_classes"] == 4 and mc["ignore_label"] == 255
    names = sorted(mc["images"])
    preds = [np.load(folder / f"{n}_pred.npy") for n in names]
    gts = [np.load(folder / f"{n}_gt.npy") for n in names]
    for name, p, g in zip(names, preds, gts):
        ref = mc["images"][name]
        ours = score([p], [g], task="multiclass", num_classes=4)
        _close(ours["acc"], ref["pixAcc"], f"{name} acc")
        _close(ours["miou"], ref["mIoU_present_classes"], f"{name} miou")
        for k, union in enumerate(ref["union"]):
            if union > 0:
                _close(ours["iou_per_class"][k], ref["IoU_per_class"][k], f"{name} iou class {k}")
            else:
                assert math.isnan(ours["iou_per_class"][k])
    ref = mc["dataset"]
    ours = score(preds, gts, task="multiclass", num_classes=4)
    _close(ours["acc"], ref["pixAcc_trans2seg"], "dataset acc")
    _close(ours["miou"], ref["mIoU_excluding_never_seen_classes"], "dataset miou")
    for k in range(3):
        _close(ours["iou_per_class"][k], ref["IoU_per_class"][k], f"dataset iou class {k}")
    assert math.isnan(ours["iou_per_class"][3])  # never seen: NaN (Trans2Seg would say 0)
    trans2seg = float(np.nan_to_num(ours["iou_per_class"]).mean())  # never seen -> 0, mean over K
    _close(trans2seg, ref["mIoU_trans2seg_all_K_classes_incl_background"], "trans2seg miou")
