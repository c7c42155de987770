"""Regression tests from a differential audit of the metrics against PySODMetrics 1.6.2.

No PySODMetrics needed: reference values are either computed here by a readable formula or
written as literals, with a comment saying that they are PySODMetrics 1.6.2's values.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from automask.metrics import build_metrics, infer_task, score, score_folders


def _rect_mask(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    g = np.zeros((h, w), np.uint8)
    g[rows, cols] = 255
    return g


# --------------------------------------------------------------------------------------------
# S-measure of constant maps (the object term's standard deviation)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        # PySODMetrics 1.6.2: Smeasure().step(pred_uint8, gt_uint8) (normalize=True)
        (np.full((40, 40), 120, np.uint8), _rect_mask(40, 40, slice(10, 30), slice(5, 25)),
         0.4064524155883928),
        (np.full((23, 31), 200, np.uint8), _rect_mask(23, 31, slice(3, 17), slice(9, 30)),
         0.321348192964084),
        # PySODMetrics 1.6.2: Smeasure().step(pred_float, gt_bool, normalize=False); a constant
        # map is left as is by min-max, so both conventions agree
        (np.full((40, 40), 0.3), _rect_mask(40, 40, slice(10, 30), slice(5, 25)) > 0,
         0.42115633273813174),
        (np.full((40, 40), 0.7), _rect_mask(40, 40, slice(10, 30), slice(5, 25)) > 0,
         0.3238716827781539),
    ],
)
def test_s_measure_of_a_constant_map_matches_pysodmetrics(pred, gt, expected):
    """A one-pass variance cancelled to ~1e-17 instead of 0, whose square root moved the
    S-measure of any constant non-0/1 map by up to 1e-8 (0.40745415870 vs 0.40745416006)."""
    assert score([pred], [gt], metrics=["sm"])["sm"] == pytest.approx(expected, abs=1e-13)


# --------------------------------------------------------------------------------------------
# Integer wrap-around of thresholds and ignore indices
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gt_threshold", [300, 256, -1, float("nan"), "128", True])
def test_gt_threshold_outside_the_8_bit_range_is_an_error(gt_threshold):
    """``uint8_mask > 300`` is ``uint8_mask > 44`` in torch: it gave a silent wrong mask."""
    g = _rect_mask(8, 8, slice(2, 5), slice(2, 5))
    p = g / 255 * 0.8 + 0.1
    with pytest.raises(ValueError, match="gt_threshold"):
        score([p], [g], metrics=["iou"], gt_threshold=gt_threshold)
    with pytest.raises(ValueError, match="gt_threshold"):
        build_metrics("binary", ["sm"], gt_threshold=gt_threshold)


def test_int8_target_is_binarised_like_uint8():
    """An int8 mask holding 0/100 was compared with 128 wrapped to -128: all object."""
    g8 = (_rect_mask(8, 8, slice(2, 5), slice(2, 5)) > 0).astype(np.uint8) * 100
    p = np.linspace(0, 1, 64).reshape(8, 8)
    names = ["sm", "mae", "iou", "ber"]
    with pytest.warns(UserWarning, match="largest value 100 is not above gt_threshold=128"):
        # 100 <= 128: every pixel is background
        expected = score([p], [g8], task="binary", metrics=names)
        assert score([p], [g8.astype(np.int8)], task="binary", metrics=names) == expected
        assert score([p], [g8.astype(np.int16)], task="binary", metrics=names) == expected
    assert expected["iou"] == 0.0  # the warned-of reading: no object in the target
    for target in (g8, g8.astype(np.int8)):  # the task left to binary metrics: refused
        with pytest.raises(ValueError, match=r"the targets hold only the values 0, 100, none "
                                             r"above gt_threshold=128.*task='binary'"):
            score([p], [target], metrics=names)


def test_a_target_whose_object_lies_below_the_threshold_is_warned_about_not_an_empty_one():
    g = _rect_mask(8, 8, slice(2, 5), slice(2, 5))  # 0/255
    p = (g > 0).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0/255, 0/1 and empty targets warn of nothing
        assert score([p, p, p], [g, (g > 0).astype(np.uint8), np.zeros_like(g)],
                     metrics=["iou"])["iou"] == pytest.approx(2 / 3)
    for small in (2, 128):
        with pytest.warns(UserWarning, match=rf"image 1: .*largest value {small} "):
            score([p, p], [g, (g > 0).astype(np.uint8) * small], metrics=["iou"])
    assert score([p], [(g > 0) * 128], metrics=["iou"], gt_threshold=100)["iou"] == 1.0


def test_ignore_index_outside_the_target_dtype_marks_nothing_void():
    """``uint8_mask == -1`` is ``uint8_mask == 255``: every object pixel became void."""
    g = _rect_mask(8, 8, slice(2, 5), slice(2, 5))
    p = g / 255 * 0.8 + 0.1
    names = ["sm", "em", "wfm", "mae", "iou", "ber"]
    plain = score([p], [g], metrics=names)
    assert plain["mae"] == pytest.approx(0.0, abs=1e-15)  # min-max makes p equal to g / 255
    for ignore_index in (-1, 511, 70000):  # score() refuses what no target can hold
        with pytest.raises(ValueError, match=f"ignore_index={ignore_index} cannot occur"):
            score([p], [g], metrics=names, ignore_index=ignore_index)
    for ignore_index in (-1, 511, 70000):  # int64 targets can hold it: none holds it here
        assert score([p], [g.astype(np.int64)], metrics=names,
                     ignore_index=ignore_index) == plain
    m = build_metrics("binary", ["mae"], ignore_index=-1)["mae"]
    m.update(torch.from_numpy(p), torch.from_numpy(g))
    assert float(m.compute()) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("ignore_index", ["255", 255.0, 1.5, True])
def test_ignore_index_must_be_an_int(ignore_index):
    g = _rect_mask(8, 8, slice(2, 5), slice(2, 5))
    with pytest.raises(ValueError, match="ignore_index"):
        score([g / 255], [g], metrics=["iou"], ignore_index=ignore_index)
    with pytest.raises(ValueError, match="ignore_index"):
        build_metrics("multiclass", num_classes=3, ignore_index=ignore_index)


def test_multiclass_num_classes_inference_does_not_wrap_ignore_index():
    """With ignore_index=-1 a uint8 target's 255 is a class, not void (``uint8 != -1`` is
    ``uint8 != 255``: num_classes was inferred as 4, then the 255 label was rejected)."""
    t = np.array([[0, 1], [2, 255]], np.uint8)
    p = np.array([[0, 1], [2, 3]], np.int64)
    with pytest.raises(ValueError, match=r"ignore_index=-1 cannot occur.*uint8"):
        score([p], [t], task="multiclass", ignore_index=-1)  # no uint8 target holds -1
    acc = build_metrics("multiclass", ["acc"], num_classes=256, ignore_index=-1)["acc"]
    acc.update(torch.from_numpy(p), torch.from_numpy(t))
    assert float(acc.compute()) == 0.75


def test_a_batch_inside_a_list_is_named_as_such():
    """[stack], [stack] said 'shape (2, 10, 10) does not match target shape (2, 10, 10)'."""
    rng = np.random.default_rng(0)
    p, t = rng.random((2, 10, 10)), (rng.random((2, 10, 10)) > 0.5).astype(np.uint8)
    with pytest.raises(ValueError, match=r"image 0: prediction and target are 3-D, "
                                         r"\(2, 10, 10\).*not inside a list"):
        score([p], [t])
    assert score(p, t)["iou"] == pytest.approx(score(list(p), list(t))["iou"], abs=1e-12)


def test_a_predicted_ignore_index_is_no_class_of_its_own(tmp_path):
    """Another tool's prediction marking unsure pixels 255: num_classes was inferred as 256
    and mIoU fell from 0.889 to 0.667 (a class 255 of IoU 0); now refused, naming the image,
    as with num_classes given."""
    gt = np.array([[0, 1, 2, 2], [0, 1, 2, 255]], np.uint8)
    pred = np.array([[0, 1, 2, 255], [0, 1, 2, 2]], np.uint8)
    ok = np.where(pred == 255, 2, pred).astype(np.uint8)
    with pytest.raises(ValueError, match="image 1: the prediction holds 255, the ground "
                                         "truths' ignore_index"):
        score([ok, pred], [gt, gt], task="multiclass")
    with pytest.raises(ValueError, match=r"predicted class index 255 is outside \[0, 3\)"):
        score([pred], [gt], task="multiclass", num_classes=3)
    for folder, masks in (("pred", [pred]), ("gt", [gt])):
        (tmp_path / folder).mkdir()
        Image.fromarray(masks[0]).save(tmp_path / folder / "a.png")
    with pytest.raises(ValueError, match="the prediction holds 255"):
        score_folders(tmp_path / "pred", tmp_path / "gt", task="multiclass")
    assert score([ok], [gt], task="multiclass")["iou_per_class"] == [1.0, 1.0, 1.0]
    # another ignore_index: the 255 of a prediction is then an ordinary (wrong) class id
    assert len(score([pred], [gt], task="multiclass", ignore_index=7)["iou_per_class"]) == 256


def test_a_binary_prediction_with_the_void_copied_in_is_refused():
    """A perfect {0, 1} prediction holding 255 where the ground truth is void scored IoU 0,
    silently: read as an 8-bit map its 1s were 1/255. The target side refused this already."""
    gt = np.array([[0, 1, 1, 255], [0, 1, 1, 255]], np.uint8)
    with pytest.raises(ValueError, match="image 0: the prediction holds only 0, 1 and 255, "
                                         "the ignore_index"):
        score([gt], [gt], task="binary", ignore_index=255)
    fixed = np.where(gt == 255, 0, gt).astype(np.uint8)  # the advice
    assert score([fixed], [gt], task="binary", ignore_index=255)["iou"] == 1.0
    # a 0/255 map and a bool one are read as before
    for pred in ((255 * (gt == 1)).astype(np.uint8), gt == 1):
        assert score([pred], [gt], task="binary", ignore_index=255)["iou"] == 1.0


def test_a_float_target_below_gt_threshold_is_warned_about_as_an_8_bit_one():
    """{0, 128} uint8 masks warned that they read as all background; {0, 0.5} floats, the
    same masks on the 0..1 scale, gave the same scores silently."""
    gt = np.zeros((8, 8))
    gt[2:6, 2:6] = 0.5
    with pytest.warns(UserWarning, match=r"largest value 0.5 is not above gt_threshold/255 = "
                                         r"0.502.*all background"):
        assert score([gt * 2], [gt], metrics=["iou"])["iou"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert score([gt * 2], [gt * 2], metrics=["iou"])["iou"] == 1.0  # 0/1 floats


def test_what_a_prediction_holds_at_void_pixels_is_scored_nowhere():
    """A prediction that copies the ground truth's void (255) onto its void pixels: inferred,
    num_classes was 256 (253 NaN classes in iou_per_class); given num_classes=3, the same
    input was refused. Both now leave those pixels out, whatever value they hold."""
    gt = np.array([[0, 1, 2, 2], [0, 1, 2, 255]], np.uint8)
    copied = gt.copy()  # 255 exactly where the ground truth is void
    other = np.where(gt == 255, 9, gt).astype(np.uint8)  # any value there
    filled = np.where(gt == 255, 0, gt).astype(np.uint8)
    expected = score([filled], [gt], task="multiclass")
    assert expected["iou_per_class"] == [1.0, 1.0, 1.0]
    for pred in (copied, other):
        assert score([pred], [gt], task="multiclass") == expected
        assert score([pred], [gt], task="multiclass", num_classes=3) == expected
    with pytest.raises(ValueError, match=r"predicted class index 9 is outside \[0, 3\)"):
        score([np.where(gt == 1, 9, gt).astype(np.uint8)], [gt], task="multiclass",
              num_classes=3)  # at a labelled pixel it is still checked


# --------------------------------------------------------------------------------------------
# Task inference and shapes
# --------------------------------------------------------------------------------------------
def test_single_channel_probability_map_is_scored_as_binary():
    """A (1, H, W) / (B, 1, H, W) sigmoid output was inferred multi-class with K = 1, which
    scores every image perfect (acc = miou = 1.0)."""
    rng = np.random.default_rng(0)
    g = _rect_mask(12, 10, slice(2, 7), slice(3, 9))
    p = rng.random((12, 10))
    expected = score([p], [g])
    assert score([p[None]], [g]) == expected
    assert score(np.stack([p, p])[:, None], np.stack([g, g])) == expected
    t = torch.from_numpy(g)
    assert infer_task([torch.from_numpy(p)[None]], [t]) == "binary"
    assert infer_task([torch.zeros(3, 12, 10)], [(t > 0).to(torch.uint8)]) == "multiclass"


def test_8bit_grey_maps_against_anti_aliased_masks_are_scored_as_binary():
    """8-bit saliency maps against anti-aliased 8-bit masks (grey object edges, as in several
    saliency datasets) were inferred multi-class: 255 was void and the grey levels classes."""
    rng = np.random.default_rng(1)
    g = _rect_mask(30, 40, slice(5, 20), slice(8, 30))
    g[5, 8:30] = 210  # anti-aliased edge rows
    g[19, 8:30] = 60
    p = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    hard = np.where(g > 128, 255, 0).astype(np.uint8)  # a 0/255 prediction
    mae = lambda pred: float(np.abs(pred / 255.0 - (g > 128)).mean())  # noqa: E731
    for pred in (p, hard):
        assert infer_task([torch.from_numpy(pred)], [torch.from_numpy(g)]) == "binary"
        assert infer_task([pred], [g]) == "binary"  # numpy arrays as well
        got = score([pred], [g])
        assert got == score([pred], [g], task="binary")
        assert got["mae"] == pytest.approx(mae(pred), abs=1e-12)
    # class labels stay multi-class: VOC-style indices with 255 as void, also in uint8
    labels = np.zeros((30, 40), np.uint8)
    labels[5:20, 8:30], labels[5, 8:30] = 15, 255
    pred = np.where(labels == 255, 0, labels).astype(np.uint8)
    assert infer_task([torch.from_numpy(pred)], [torch.from_numpy(labels)]) == "multiclass"
    assert score([pred], [labels])["miou"] == pytest.approx(1.0)


def test_ignore_index_that_voids_every_object_pixel_warns():
    """``ignore_index=255`` on 0/255 masks turns every object pixel void: the scores then
    describe the background alone, which deserves a warning; {0, 1, 255} masks do not warn."""
    g = _rect_mask(20, 20, slice(4, 12), slice(4, 12))
    p = np.zeros((20, 20))
    with pytest.warns(UserWarning, match="64 pixels equal ignore_index=255"):
        got = score([p], [g], ignore_index=255)
    assert got["mae"] == 0.0  # only the background is left, and it is predicted right
    masks_01 = (g > 0).astype(np.uint8)
    masks_01[0, 0] = 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert score([p], [masks_01], ignore_index=255)["mae"] == pytest.approx(64 / 399)


def test_score_reads_files_as_score_folders_does(tmp_path):
    """score() took no paths (numpy's 'can't convert np.str_' TypeError): a path is now read
    as score_folders reads it, a colour ground truth refused by name, a folder pointed to
    score_folders and a missing file named."""
    from automask.metrics import score_folders

    rng = np.random.default_rng(2)
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    for i in range(2):
        g = _rect_mask(24, 18, slice(3 + i, 15), slice(2, 12 + i))
        Image.fromarray(rng.integers(0, 256, g.shape, dtype=np.uint8)).save(tmp_path / f"p/{i}.png")
        Image.fromarray(g).save(tmp_path / f"g/{i}.png")
    preds = [tmp_path / f"p/{i}.png" for i in range(2)]
    gts = [str(tmp_path / f"g/{i}.png") for i in range(2)]
    arrays = [np.array(Image.open(p)) for p in preds], [np.array(Image.open(g)) for g in gts]
    assert score(preds, gts) == score(*arrays)
    assert {**score(preds, gts), "n_images": 2} == score_folders(tmp_path / "p", tmp_path / "g")
    assert score(preds[0], gts[0]) == score(arrays[0][:1], arrays[1][:1])
    red = np.zeros((24, 18, 3), np.uint8)
    red[3:15, 2:12, 0] = 255
    Image.fromarray(red).save(tmp_path / "red.png")
    with pytest.raises(ValueError, match="red.png is a RGB colour image"):
        score(preds[:1], [tmp_path / "red.png"])
    with pytest.raises(ValueError, match="is a folder; score_folders"):
        score([tmp_path / "p"], gts[:1])
    with pytest.raises(FileNotFoundError, match="no file .*missing.png"):
        score(preds[:1], [tmp_path / "missing.png"])
    (tmp_path / "text.png").write_text("not an image")
    for pair in ((["text.png"], gts[:1]), (preds[:1], ["text.png"])):
        pair = [[tmp_path / p if p == "text.png" else p for p in side] for side in pair]
        with pytest.raises(ValueError, match=r"text.png is not an image Pillow can read"):
            score(*pair)
    (tmp_path / "empty.png").write_bytes(b"")  # an interrupted copy: named as empty
    for pair in ((["empty.png"], gts[:1]), (preds[:1], ["empty.png"])):
        pair = [[tmp_path / p if p == "empty.png" else p for p in side] for side in pair]
        with pytest.raises(ValueError, match=r"empty.png is an empty file \(0 bytes\)"):
            score(*pair)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"0.png vs small.png: image 0: prediction shape"):
        score(preds[:1], [tmp_path / "small.png"])


def test_channels_last_colour_prediction_names_its_shape():
    """An (H, W, 3) map was arg-maxed over H and reported as a (W, 3) prediction."""
    g = np.zeros((8, 6), np.int64)
    g[2:5] = 1
    colour = np.zeros((8, 6, 3), np.float32)
    for kwargs in ({}, {"task": "multiclass"}, {"task": "multiclass", "num_classes": 8}):
        with pytest.raises(ValueError, match=r"\(8, 6, 3\)"):
            score([colour], [g], **kwargs)


# --------------------------------------------------------------------------------------------
# Conventions and metric names
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("convention", "value"),
    [
        ("alpha", 2.0),
        ("alpha", -0.1),
        ("alpha", float("nan")),
        ("beta2", -1.0),
        ("beta2", float("nan")),
        ("beta2", float("inf")),
        ("empty_score", 5.0),
        ("empty_score", float("nan")),
        ("normalize", "no"),
        # raw TypeErrors ('<=' not supported, unhashable type) or, for False, a threshold of 0
        ("threshold", "0.5"),
        ("threshold", None),
        ("threshold", [0.5]),
        ("threshold", np.array(0.5)),
        ("threshold", False),
        ("threshold", float("nan")),
    ],
)
def test_invalid_binary_convention_is_an_error(convention, value):
    """These gave silent numbers: sm 1.29 with alpha 2, wfm 0 with beta2 -1, NaN with NaN."""
    g = _rect_mask(8, 8, slice(2, 5), slice(2, 5))
    p = np.linspace(0, 1, 64).reshape(8, 8)
    with pytest.raises(ValueError, match=convention):
        score([p], [g], **{convention: value})
    with pytest.raises(ValueError, match=convention):
        build_metrics("binary", ["sm", "em", "wfm", "mae", "iou"], **{convention: value})


def test_valid_binary_conventions_still_work():
    g = _rect_mask(8, 8, slice(2, 5), slice(2, 5))
    p = np.linspace(0, 1, 64).reshape(8, 8)
    out = score([p], [g], alpha=1.0, beta2=0.0, empty_score=0.0, normalize=np.bool_(False),
                gt_threshold=0, ignore_index=np.int64(7))
    assert set(out) == {"sm", "em", "wfm", "mae", "iou", "dice", "ber"}
    for threshold in (0, np.float32(0.25), np.int64(0)):
        assert score([p], [g], metrics=["iou"], threshold=threshold)["iou"] == \
            score([p], [g], metrics=["iou"], threshold=float(threshold))["iou"]


def test_score_with_an_empty_metric_list_is_an_error():
    g = _rect_mask(8, 8, slice(2, 5), slice(2, 5))
    with pytest.raises(ValueError, match="metrics is empty"):
        score([g / 255], [g], metrics=[])


# --------------------------------------------------------------------------------------------
# Input dtypes
# --------------------------------------------------------------------------------------------
def test_big_endian_arrays_are_read():
    """A big-endian ``.npy`` (``>f8``) raised torch's byte-order error without an image index."""
    p = np.linspace(0, 1, 6).reshape(2, 3)
    g = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)
    expected = score([p], [g])
    assert score([p.astype(">f8")], [g.astype(">i4")]) == expected


def test_boolean_score_maps_are_a_value_error_naming_the_image():
    g = np.array([[0, 1, 2], [2, 1, 1]], np.int64)
    with pytest.raises(ValueError, match=r"image 0: score maps must be numbers.*bool"):
        score([np.ones((3, 2, 3), bool)], [g], task="multiclass")


def test_numpy_integer_num_classes_is_accepted():
    g = np.array([[0, 1, 2], [2, 1, 1]], np.int64)
    out = score([g], [g], task="multiclass", num_classes=np.int64(3))
    assert out == {"acc": 1.0, "miou": 1.0, "iou_per_class": [1.0, 1.0, 1.0]}
    for bad in (3.0, True, 0):
        with pytest.raises(ValueError, match="num_classes"):
            build_metrics("multiclass", num_classes=bad)


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------
def test_colour_ground_truth_with_non_grey_pixels_is_an_error(tmp_path):
    """A red-on-black RGB mask read as luma (76) was scored as a 256-class problem
    (acc 0.86, miou 0.33) instead of failing."""
    from PIL import Image

    from automask.metrics import score_folders

    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    p = _rect_mask(8, 8, slice(2, 5), slice(2, 5))
    Image.fromarray(p).save(tmp_path / "p" / "a.png")
    red = np.zeros((8, 8, 3), np.uint8)
    red[2:5, 2:5, 0] = 255
    Image.fromarray(red).save(tmp_path / "g" / "a.png")
    with pytest.raises(ValueError, match=r"a\.png is a RGB colour image.*row 2, column 2"):
        score_folders(tmp_path / "p", tmp_path / "g")
    # a colour file holding grey pixels only is read as grey
    Image.fromarray(np.repeat(p[..., None], 3, -1)).save(tmp_path / "g" / "a.png")
    assert score_folders(tmp_path / "p", tmp_path / "g", metrics=["iou"])["iou"] == 1.0


def test_score_maps_against_0_255_masks_are_refused_not_scored_on_background():
    """(K, H, W) scores with binary 0/255 masks were scored as K classes with 255 as void:
    every object pixel was left out and the scores looked good."""
    from automask.metrics import score

    target = np.zeros((8, 8), np.uint8)
    target[2:5, 2:5] = 255
    scores = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="only 0 and 255"):
        score([scores], [target])
    explicit = score([scores], [target], task="multiclass", metrics=["acc"])  # the user's call
    assert 0.0 <= explicit["acc"] <= 1.0
    ids = (target > 0).astype(np.uint8)  # class ids: scored as K classes, as before
    assert set(score([scores[:2]], [ids])) == {"acc", "miou", "iou_per_class"}


# --------------------------------------------------------------------------------------------
# E-measure of a one-pixel image (the reference's N - 1 denominator is 0)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        # one object pixel predicted 255: every threshold q >= t is right, phi = 1 throughout
        (255, 255, {"em": 1.0, "em_max": 1.0, "em_adp": 1.0}),
        # one background pixel predicted 0: q = 0 >= t only at t = 0 (a false positive); the
        # adaptive threshold min(2 * 0, 1) = 0 also makes it object: phi = 0 there
        (0, 0, {"em": 255 / 256, "em_max": 1.0, "em_adp": 0.0}),
        # one object pixel predicted 0: right at t = 0 only; the adaptive threshold 0 keeps it
        (0, 255, {"em": 1 / 256, "em_max": 1.0, "em_adp": 1.0}),
    ],
)
def test_e_measure_of_a_one_pixel_image_is_the_mean_alignment(pred, gt, expected):
    """Q = sum(phi) / (N - 1 + eps) gave sum(phi) / eps, about 4.5e15, for N = 1 (PySODMetrics
    1.6.2 and the MATLAB code too), and one such image dominated a dataset's mean. With one
    pixel the score is phi of that pixel (the paper's mean over the N = 1 pixels)."""
    p, g = np.full((1, 1), pred, np.uint8), np.full((1, 1), gt, np.uint8)
    assert score([p], [g], metrics=list(expected)) == pytest.approx(expected, abs=1e-12)


def test_a_one_pixel_image_does_not_dominate_the_dataset_e_measure():
    # A 4 x 4 0/255 mask scored against itself: at thresholds t >= 1 (and at the adaptive
    # threshold 2 * 4/16) the map is perfect, phi = 1 at each of the N = 16 pixels: 16 / 15.
    # At t = 0 every pixel is object: the demeaned map is 0, phi = (0 + 1)^2 / 4 = 1/4: 4 / 15.
    # The 1 x 1 perfect image scores 1; dataset values average the two images' curves.
    g = _rect_mask(4, 4, slice(1, 3), slice(0, 2))
    one = np.full((1, 1), 255, np.uint8)
    out = score([g, one], [g, one], metrics=["em", "em_max", "em_adp"])
    curve_mean = (255 * 16 / 15 + 4 / 15) / 256
    perfect = (16 / 15 + 1) / 2
    expected = {"em": (curve_mean + 1) / 2, "em_max": perfect, "em_adp": perfect}
    assert out == pytest.approx(expected, abs=1e-12)


def test_iou_per_class_is_a_list_with_one_class():
    """torchmetrics squeezes a one-element result to a scalar: with num_classes = 1 (given, or
    inferred from maps holding class 0 only) ``iou_per_class`` came back as a float."""
    t = np.zeros((3, 4), np.int64)
    t[0, 0] = 255  # void
    p = np.zeros((3, 4), np.int64)
    # class 0: 11 labelled pixels, all predicted 0: IoU = 11 / 11
    assert score([p], [t], task="multiclass", num_classes=1)["iou_per_class"] == [1.0]
    out = score([p], [t], task="multiclass")  # num_classes inferred: 1
    assert out["iou_per_class"] == [1.0] and out["miou"] == 1.0


def test_score_folders_reads_ground_truths_as_evaluate_does(tmp_path):
    """``automask score`` read ground truths with Pillow's view: a WhiteIsZero TIFF mask (an
    ImageJ mask with an inverting LUT) came out inverted and a grey 16-bit colour mask as
    its top 8 bits (class 1 -> 0), where ``evaluate`` (``read_mask``) reads stored values."""
    import tifffile

    from automask.metrics import score_folders

    obj = np.zeros((12, 16), bool)
    obj[3:9, 4:12] = True
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    Image.fromarray(obj.astype(np.uint8) * 255).save(tmp_path / "p/a.png")
    tifffile.imwrite(tmp_path / "g/a.tif", obj.astype(np.uint8) * 255, photometric="miniswhite")
    got = score_folders(tmp_path / "p", tmp_path / "g")
    assert got["iou"] == 1.0 and got["mae"] == 0.0
    ids = obj.astype(np.uint16)  # class ids 0/1 as 16-bit grey in three equal channels
    (tmp_path / "g/a.tif").unlink()
    tifffile.imwrite(tmp_path / "g/a.tif", np.repeat(ids[..., None], 3, axis=2),
                     photometric="rgb")
    Image.fromarray(obj.astype(np.uint8)).save(tmp_path / "p/a.png")
    got = score_folders(tmp_path / "p", tmp_path / "g", task="multiclass", num_classes=2)
    assert got["miou"] == 1.0


# --------------------------------------------------------------------------------------------
# Inputs a fuzzing audit found read wrongly or explained badly (2026-12-07)
# --------------------------------------------------------------------------------------------
def test_a_grey_map_below_200_against_masks_with_grey_edges_is_not_guessed_multiclass():
    """An 8-bit saliency map whose values stay below GREY_FROM, against 0/255 masks with an
    anti-aliased row of 128: guessed multi-class it scored 129 classes with the object void.
    Now the task is asked for; task='binary' scores it."""
    rng = np.random.default_rng(0)
    gt = _rect_mask(24, 32, slice(6, 18), slice(8, 24))
    gt[5, 8:24] = 128  # a grey edge
    pred = (rng.random((24, 32)) * 180).astype(np.uint8)  # grey levels 0..179
    with pytest.raises(ValueError, match=r"image 0: the integer prediction holds \d+ different "
                                         r"values.*Pass task='binary'"):
        score([pred], [gt])
    binary = score([pred], [gt], task="binary", metrics=["sm", "mae"])
    assert binary == score([pred.astype(np.float64) / 255], [gt], metrics=["sm", "mae"])
    labels = rng.integers(0, 5, (24, 32))  # a few class indices are still guessed
    assert infer_task([labels], [labels]) == "multiclass"
    # a thresholded 0/255 map: a model never predicts void (255), so binary
    thresholded = (gt >= 128).astype(np.uint8) * 255
    assert score([thresholded], [gt]) == score([thresholded], [gt], task="binary")


def test_binary_metrics_named_for_class_index_targets_are_refused():
    gt = np.array([[0, 1, 1], [2, 2, 0]], np.uint8)
    pred = np.zeros_like(gt)
    with pytest.raises(ValueError, match=r"metrics \['iou'\] are binary metrics.*0, 1, 2.*"
                                         r"task='multiclass'"):
        score([pred], [gt], metrics=["iou"])
    assert score([pred], [gt], metrics=["miou"])["miou"] == pytest.approx(1 / 9)
    # {0, 1} masks and a set holding one 0/255 mask are binary as before
    assert score([gt == 1], [(gt == 1).astype(np.uint8)], metrics=["iou"])["iou"] == 1.0


def test_every_pixel_void_in_multiclass_data_scores_nan_without_num_classes():
    pred, target = np.array([[0, 1], [1, 0]]), np.full((2, 2), 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics' compute-before-update warning neither
        got = score([pred], [target], task="multiclass")
    assert np.isnan(got["acc"]) and np.isnan(got["miou"])
    assert len(got["iou_per_class"]) == 2 and all(np.isnan(got["iou_per_class"]))
    with pytest.warns(UserWarning, match="no target has a labelled object pixel") as caught:
        got = score([pred.astype(np.float32)], [target], ignore_index=255)
    assert len(caught) == 1 and all(np.isnan(v) for v in got.values())


def test_one_metric_name_as_a_string_and_one_dimensional_maps():
    gt = np.zeros((16, 16), np.uint8)
    gt[4:12, 4:12] = 1
    assert score([gt.astype(np.float32)], [gt], metrics="iou") == {"iou": 1.0}
    assert list(build_metrics("binary", "iou")) == ["iou"]
    with pytest.raises(ValueError, match=r"image 0: prediction and target have shape \(5,\): "
                                         r"binary maps must be 2-D"):
        score([np.zeros(5, np.float32)], [np.zeros(5, np.uint8)])


def test_class_ids_against_a_set_of_0_1_masks_are_not_read_as_a_grey_map():
    """A multi-class prediction {0, 1, 2} scored against ground truths that happen to hold
    only 0 and 1: read as an 8-bit grey map, class 1 was 1/255 and the perfect object
    scored IoU 0 without a word. The task is asked for now."""
    gt = np.zeros((40, 40), np.uint8)
    gt[5:20, 5:20] = 1
    pred = gt.copy()
    pred[25:35, 25:35] = 2
    for targets in ([gt], [np.where(gt == 1, 255, 0).astype(np.uint8)]):
        with pytest.raises(ValueError, match=r"image 0: the prediction holds the values "
                                             r"\{0, 1, 2\}.*task='multiclass'"):
            score([pred], targets)
    multi = score([pred], [gt], task="multiclass", num_classes=3)
    assert multi["miou"] == pytest.approx((1275 / 1375 + 1.0 + 0.0) / 3)  # a confusion matrix
    # masks as predictions, 0/1 or 0/255 or bool, are binary as before
    for mask in (gt, gt * 255, gt.astype(bool)):
        assert score([mask], [gt], metrics=["iou"])["iou"] == 1.0
    # a grey map reaching 200 is a grey map, whatever small values it holds too
    grey = (gt * 230).astype(np.uint8)
    grey[0, 0] = 2
    assert score([grey], [gt], metrics=["iou"])["iou"] == 1.0


def test_class_scores_of_an_image_one_pixel_wide_keep_their_width():
    """(K, H, 1) scores of an H x 1 image were read as one (K, H) map, like an (H, W, 1)
    one, and refused as float class ids."""
    gt = np.array([[0], [1], [2], [1]], np.uint8)  # 4 x 1
    scores = np.eye(3, dtype=np.float32)[gt[:, 0]].T[:, :, None]  # (3, 4, 1)
    for task in (None, "multiclass"):
        got = score([scores], [gt], task=task, num_classes=3)
        assert got["miou"] == 1.0 and got["acc"] == 1.0
    # a one-channel map of that image is still read as (H, W)
    prob = (gt == 1).astype(np.float32)[None]  # (1, 4, 1)
    assert score([prob], [(gt == 1).astype(np.uint8)], metrics=["iou"])["iou"] == 1.0


def test_integer_maps_of_one_call_share_one_scale(tmp_path):
    """Each map was read on its own scale: a faint 16-bit PNG (values below 256) as 8-bit,
    a faint 8-bit map holding only 0 and 1 as a 0/1 mask; both turned near-zero
    probabilities into confident foreground."""
    from automask.metrics import score_folders

    truth = np.zeros((20, 20), np.uint8)
    truth[5:15, 5:15] = 255
    empty = np.zeros((20, 20), np.uint8)
    (tmp_path / "pred16").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(truth).save(tmp_path / "gt" / "a.png")
    Image.fromarray(empty).save(tmp_path / "gt" / "b.png")
    sure = ((truth > 0) * 60000).astype(np.uint16)
    faint = np.full((20, 20), 197, np.uint16)  # 0.3 %: background
    for name, array in (("a", sure), ("b", faint)):
        Image.fromarray(array).save(tmp_path / "pred16" / f"{name}.png")  # mode I;16
    as_16bit = score_folders(tmp_path / "pred16", tmp_path / "gt", metrics=["iou", "ber"])
    as_float = score([sure / 65535, faint / 65535], [truth, empty], metrics=["iou", "ber"])
    assert as_16bit["iou"] == as_float["iou"] == 1.0 and as_16bit["ber"] == 0.0
    # in memory, a uint16 array is a 16-bit map whatever its values
    assert score([sure, faint], [truth, empty], metrics=["iou"])["iou"] == 1.0
    # an 8-bit map holding only 0 and 1 beside other 8-bit maps: 1/255, not the object
    weak = np.zeros((20, 20), np.uint8)
    weak[0, :5] = 1
    with pytest.warns(UserWarning, match="hold only 0 and 1 .*prediction 1.* read on the "
                                         "8-bit scale"):
        found = score([truth, weak], [truth, empty], metrics=["iou"])
    assert found["iou"] == 1.0
    # every map 0/1: masks, as before
    assert score([(truth > 0).astype(np.uint8), weak], [truth, empty],
                 metrics=["iou"])["iou"] == 0.5


def test_each_integer_map_keeps_its_own_storage_scale(tmp_path):
    """A 0/1 mask saved as a 16-bit PNG (an ITK label map) scored as empty (IoU 0), and one
    16-bit map in a folder of 8-bit PNGs divided the 8-bit ones by 65535 (IoU 0.333);
    neither said a word."""
    from automask.metrics import score_folders

    truth = np.zeros((20, 30), np.uint8)
    truth[5:15, 5:20] = 255
    for sub in ("gt", "itk", "mixed"):
        (tmp_path / sub).mkdir()
    for name in ("0", "1", "2"):
        Image.fromarray(truth).save(tmp_path / "gt" / f"{name}.png")
        Image.fromarray((truth > 0).astype(np.uint16)).save(tmp_path / "itk" / f"{name}.png")
        sure = np.where(truth > 0, 240, 10).astype(np.uint8)
        picture = Image.fromarray(sure.astype(np.uint16) * 257) if name == "0" \
            else Image.fromarray(sure)
        picture.save(tmp_path / "mixed" / f"{name}.png")
    assert Image.open(tmp_path / "itk" / "0.png").mode.startswith("I;16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn of
        for sub in ("itk", "mixed"):
            found = score_folders(tmp_path / sub, tmp_path / "gt", metrics=["iou", "ber"])
            assert found["iou"] == 1.0 and found["ber"] == 0.0, (sub, found)
        # in memory: a uint16 0/1 array, as the metric objects read it
        assert score([(truth > 0).astype(np.uint16)], [truth], metrics=["iou"])["iou"] == 1.0
    # a 16-bit map whose values stay below 256 stays faint, and is named
    Image.fromarray(np.where(truth > 0, 200, 0).astype(np.uint16)).save(
        tmp_path / "mixed" / "1.png")
    with pytest.warns(UserWarning, match=r"1 16-bit prediction\(s\) hold no value above 255 "
                                         r"\(e.g. '1.png'\)"):
        found = score_folders(tmp_path / "mixed", tmp_path / "gt", metrics=["iou"])
    assert found["iou"] == pytest.approx(2 / 3)  # 200/65535: background


def test_masks_against_ground_truths_with_few_grey_edge_levels_are_not_classes():
    """0/255 masks averaged down (grey edges of only 64 and 128, none from 200) were read as
    129 classes with the object void; a 0/255 prediction is a mask (a model never predicts
    void), and a 0/1 one against such ground truths asks for the task."""
    big = np.zeros((40, 40), np.uint8)
    big[10:30, 10:31] = 255
    gt = big.reshape(20, 2, 20, 2).mean((1, 3)).round().astype(np.uint8)
    assert set(np.unique(gt)) == {0, 128, 255}
    pred = (gt > 128).astype(np.uint8) * 255
    found = score([pred], [gt])
    assert "iou" in found and found["iou"] == 1.0
    with pytest.raises(ValueError, match="every prediction is a 0/1 mask but the targets hold "
                                         "255 and the values 128.*Pass task='binary'"):
        score([pred // 255], [gt])
    assert score([pred // 255], [gt], task="binary")["iou"] == 1.0


def test_a_grey_map_saved_with_a_palette_is_scored_by_its_greys(tmp_path):
    """A saliency map quantized to a palette (as PNG optimisers write it) was scored by its
    palette indices: S-alpha 0 where the grey PNG scored 0.93."""
    rng = np.random.default_rng(0)
    truth = np.zeros((40, 40), np.uint8)
    truth[10:30, 10:30] = 255
    soft = np.clip(truth * 0.8 + rng.normal(0, 30, truth.shape), 0, 255).astype(np.uint8)
    (tmp_path / "grey").mkdir()
    (tmp_path / "palette").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(truth).save(tmp_path / "gt" / "a.png")
    quantized = Image.fromarray(soft).quantize(64)
    quantized.save(tmp_path / "palette" / "a.png")
    Image.fromarray(np.array(quantized.convert("L"))).save(tmp_path / "grey" / "a.png")
    grey = score_folders(tmp_path / "grey", tmp_path / "gt", metrics=["sm", "iou"])
    assert score_folders(tmp_path / "palette", tmp_path / "gt", metrics=["sm", "iou"]) == grey
    assert grey["sm"] > 0.8


def test_probabilities_a_rounding_past_the_interval_are_clipped_and_logits_refused():
    """A map 1 ulp above 1 (a bicubic resize, a float32 mean) was refused with "got min 0
    and max 1", bounds that read as valid."""
    truth = np.zeros((8, 8), np.uint8)
    truth[2:6, 2:6] = 255
    over = np.where(truth > 0, 1.0, 0.0)
    over[3, 3] = np.nextafter(1.0, 2.0)
    under = np.where(truth > 0, 1.0, 0.0).astype(np.float32)
    under[0, 0] = -1e-9
    for prob in (over, under, over.astype(np.float32) * np.float32(1.0000001)):
        found = score([prob], [truth], metrics=["iou", "mae"])
        assert found["iou"] == 1.0 and found["mae"] == 0.0
    logits = np.where(truth > 0, 1.001, 0.0)
    with pytest.raises(ValueError, match=r"got min 0\.0 and max 1\.001 \(apply a sigmoid"):
        score([logits], [truth])


def test_columns_generators_and_dict_values_are_one_map_per_item(tmp_path):
    """A DataFrame's column of arrays or paths (the README's example without .tolist()) was
    refused as "an array of Python objects"."""
    import pandas as pd

    truth = np.zeros((10, 12), np.uint8)
    truth[2:8, 3:9] = 255
    paths = []
    for name in ("a", "b"):
        Image.fromarray(truth).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    frame = pd.DataFrame({"pred": [truth, truth // 2], "mask": paths})
    expected = score([truth, truth // 2], paths, metrics=["iou", "mae"])
    assert expected["iou"] == 0.5  # the second map is 127/255: below the 0.5 threshold
    assert score(frame["pred"], frame["mask"], metrics=["iou", "mae"]) == expected
    assert score((p for p in frame["pred"]), {"a": paths[0], "b": paths[1]}.values(),
                 metrics=["iou", "mae"]) == expected


def test_a_void_inside_the_given_classes_predicted_at_labelled_pixels_is_warned_of():
    """With num_classes inferred this is refused; with num_classes given it scored class 0
    (never labelled) with IoU 0 in the mean, silently."""
    truth = np.array([[0, 1, 1], [2, 2, 3], [3, 3, 0]], np.uint8)  # 0: void
    pred = np.array([[0, 1, 1], [2, 0, 3], [3, 3, 1]], np.uint8)
    with pytest.raises(ValueError, match="the prediction holds 0, the ground truths' ignore"):
        score([pred], [truth], task="multiclass", ignore_index=0)
    with pytest.warns(UserWarning, match=r"ignore_index=0 is one of the num_classes=4 "
                                         r"classes: .*IoU 0 in the mean"):
        found = score([pred], [truth], task="multiclass", ignore_index=0, num_classes=4)
    assert found["iou_per_class"] == [0.0, 1.0, 0.5, 1.0]  # as torchmetrics counts it
    pred[1, 1] = 2  # the void predicted only where the truth is void: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = score([pred], [truth], task="multiclass", ignore_index=0, num_classes=4)
    assert found["miou"] == 1.0 and np.isnan(found["iou_per_class"][0])  # class 0 absent


def test_class_id_ground_truths_saved_as_jpeg_are_refused_by_score_folders(tmp_path):
    """evaluate refuses them; score_folders scored them silently (ids blurred into classes
    that do not exist: 15 classes, mIoU 0.23 for a perfect prediction)."""
    from automask.metrics import score_folders

    ids = np.zeros((48, 64), np.uint8)
    ids[:, 16:32], ids[:, 32:48], ids[:, 48:] = 3, 6, 9
    ids[10:30, 5:60] = 7
    for sub in ("gt", "pred", "binary_gt", "binary_pred"):
        (tmp_path / sub).mkdir()
    Image.fromarray(ids).save(tmp_path / "gt" / "a.jpg", quality=90)
    Image.fromarray(ids).save(tmp_path / "pred" / "a.png")
    assert set(np.unique(np.asarray(Image.open(tmp_path / "gt" / "a.jpg")))) - {0, 3, 6, 7, 9}
    for task in (None, "multiclass"):
        with pytest.raises(ValueError, match=r"a\.jpg: ground truth values .* come from a JPEG "
                                             r"file: .*save class-id masks losslessly"):
            score_folders(tmp_path / "pred", tmp_path / "gt", task=task)
    # a binary mask saved as JPEG is still read as PySODMetrics reads it: > 128
    mask = np.where(ids == 7, 255, 0).astype(np.uint8)
    Image.fromarray(mask).save(tmp_path / "binary_gt" / "a.jpg", quality=90)
    Image.fromarray(mask).save(tmp_path / "binary_pred" / "a.png")
    assert score_folders(tmp_path / "binary_pred", tmp_path / "binary_gt",
                         metrics=["iou"])["iou"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("pred_last, target_last", [(True, False), (False, True), (True, True)])
def test_a_one_row_map_with_its_channel_last_pairs_with_its_target(pred_last, target_last):
    """A (1, W, 1) map reads as (1, W) where the other side is (1, W), not as (W, 1)."""
    pred = np.array([[0.9, 0.1, 0.8, 0.2, 0.7]], np.float32)
    target = np.array([[1, 0, 1, 0, 0]], np.uint8)
    got = score([pred[..., None] if pred_last else pred],
                [target[..., None] if target_last else target], metrics=["iou", "ber"])
    expected = score([pred], [target], metrics=["iou", "ber"])
    assert got == pytest.approx(expected)
    assert got["iou"] == pytest.approx(2 / 3)


def test_a_float_target_whose_ones_are_a_rounding_above_one_reads_on_the_0_1_scale():
    """A float mask whose ones came out as 1.0000001 (a resize) is a 0..1 mask, not an
    8-bit one read as all background."""
    rng = np.random.default_rng(11)
    mask = (rng.random((8, 9)) > 0.5).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = score([mask.copy()], [mask * np.float32(1.0000001)], metrics=["iou", "ber"])
    assert got["iou"] == pytest.approx(1.0) and got["ber"] == pytest.approx(0.0)
