"""Audit with users' own files: lossy WebP masks of grey content, float and 32-bit images
beyond the 8/16-bit ranges, read by :mod:`automask.data.io` and taken through a tiny fit."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask.data.io import read_image, read_mask
from automask.errors import DataValidationError



def _tiff(path, array: np.ndarray) -> None:
    """Write a 2-D float32 (mode F) or int32 (mode I) array as a TIFF, with Pillow."""
    Image.fromarray(array).save(path, format="TIFF")


def _square_mask(h: int = 48, w: int = 64) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[10:38, 16:50] = 255
    return mask


def _lossy_webp(path, mask: np.ndarray) -> None:
    """A grey mask saved as lossy WebP, as many tools do: decoded with chroma noise."""
    Image.fromarray(mask).convert("RGB").save(path, "WEBP", quality=50)
    rgb = np.array(Image.open(path)).astype(int)
    assert (rgb.max(axis=2) - rgb.min(axis=2)).max() > 0  # the channels really differ


def test_lossy_webp_grey_mask_is_read_as_grey(tmp_path):
    mask = _square_mask()
    path = tmp_path / "m.webp"
    _lossy_webp(path, mask)
    values = read_mask(path)
    assert values.shape == mask.shape and values.dtype == np.uint8
    assert np.array_equal(values > 128, mask > 128)


def test_lossy_colour_mask_is_still_refused(tmp_path):
    rgb = np.zeros((48, 64, 3), dtype=np.uint8)
    rgb[10:38, 16:50] = (200, 30, 30)
    Image.fromarray(rgb).save(tmp_path / "m.webp", "WEBP", quality=50)
    with pytest.raises(DataValidationError, match="colour"):
        read_mask(tmp_path / "m.webp")


@pytest.mark.parametrize("data", [
    np.linspace(0, 4000, 48 * 64, dtype=np.float32),      # reflectance-like floats
    np.linspace(-1, 1, 48 * 64, dtype=np.float32),        # normalised, signed
    np.linspace(0, 200_000, 48 * 64).astype(np.int32),    # 32-bit counts
    np.linspace(-1500, 1500, 48 * 64).astype(np.int32),   # signed
], ids=["float-4000", "float-signed", "int32-counts", "int32-signed"])
def test_images_beyond_8_16_bit_ranges_are_stretched_not_clipped(tmp_path, data):
    path = tmp_path / "i.tif"
    _tiff(path, data.reshape(48, 64))
    rgb = read_image(path)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and rgb.max() == 255
    # a gradient stays a gradient: no half of the image saturated to one value
    assert len(np.unique(rgb)) > 200
    assert (rgb == 255).mean() < 0.01 and (rgb == 0).mean() < 0.01


def test_in_range_data_keeps_its_scale(tmp_path):
    _tiff(tmp_path / "f.tif", np.full((8, 8), 0.5, dtype=np.float32))
    _tiff(tmp_path / "g.tif", np.full((8, 8), 100.0, dtype=np.float32))
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "u.tif")
    assert (read_image(tmp_path / "f.tif") == 128).all()
    assert (read_image(tmp_path / "g.tif") == 100).all()
    assert (read_image(tmp_path / "u.tif") == 255).all()


def test_fit_predict_evaluate_on_float_tiffs_and_webp_masks(tmp_path):
    from automask import SemanticSegmentor

    rng = np.random.default_rng(0)
    rows = []
    for k in range(4):
        mask = _square_mask(40 + 4 * k, 56)
        image = (rng.normal(1000, 50, mask.shape) + 2000 * (mask > 0)).astype(np.float32)
        image_path, mask_path = tmp_path / f"i{k}.tif", tmp_path / f"m{k}.webp"
        _tiff(image_path, image)
        _lossy_webp(mask_path, mask)
        rows.append((str(image_path), str(mask_path)))
    frame = pd.DataFrame(rows, columns=["image", "label"])
    seg = SemanticSegmentor(label="label", path=str(tmp_path / "run"), verbosity=0)
    with pytest.warns(UserWarning, match="anti-aliased or JPEG"):
        seg.fit(frame, presets="tiny",
                hyperparameters={"model.input_size": 64, "optim.max_epochs": 1})
    predictions = seg.predict(frame)
    assert [p.shape for p in predictions] == [(40 + 4 * k, 56) for k in range(4)]
    with pytest.warns(UserWarning, match="anti-aliased or JPEG"):
        scores = seg.evaluate(frame)
    assert 0.0 <= scores["iou"] <= 1.0


_STORE = {  # orientation tag -> how the stored pixels relate to the upright picture
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("mode,compression", [
    ("L", None), ("L", "tiff_lzw"), ("RGB", None), ("P", None),
])
def test_tiff_orientation_is_applied_once(tmp_path, orientation, mode, compression):
    # Pillow >= 11 turns TIFFs itself (scrambling memory-mapped ones); the image and the
    # mask must come out upright, at the size image_size announces
    upright = np.zeros((30, 40), dtype=np.uint8)
    upright[3:10, 2:20] = 1
    upright[18:27, 25:37] = 2
    stored = Image.fromarray(upright).transpose(_STORE[orientation]).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "x.tif"
    options = {"compression": compression} if compression else {}
    stored.save(path, exif=exif, **options)
    from automask.data.io import image_size

    assert image_size(path) == (30, 40)
    assert np.array_equal(read_mask(path), upright)
    gray = read_image(path)[..., 0]
    expected = np.array(Image.fromarray(upright).convert(mode).convert("RGB"))[..., 0]
    assert np.array_equal(gray, expected)


def _pairs(tmp_path, masks: list[np.ndarray], suffix: str) -> pd.DataFrame:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, mask in enumerate(masks):
        image = tmp_path / f"img{i}.png"
        Image.fromarray(np.full(mask.shape + (3,), 90, np.uint8)).save(image)
        label = tmp_path / f"mask{i}{suffix}"
        Image.fromarray(mask).save(label, quality=90)
        rows.append({"image": str(image), "label": str(label)})
    return pd.DataFrame(rows)


def _class_ids(h: int = 48, w: int = 64) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 3:] = 3
    mask[h // 2:, 2 * w // 3:] = 7
    return mask


def test_class_id_masks_saved_as_jpeg_are_refused_naming_the_rows(tmp_path):
    """JPEG turns class ids 0/3/7 into in-between ids at every edge: fit used to infer a
    larger class count from the ringing and train on classes that do not exist."""
    from automask.data import validate_frame

    frame = _pairs(tmp_path, [_class_ids(), _class_ids()], ".jpg")
    with pytest.raises(DataValidationError, match=r"row 0 \[label\].*JPEG file.*PNG") as info:
        validate_frame(frame)
    assert "row 1 [label]" in str(info.value)
    with pytest.raises(DataValidationError, match="JPEG file"):
        validate_frame(frame, num_classes=8)
    png = _pairs(tmp_path / "png", [_class_ids(), _class_ids()], ".png")
    spec = validate_frame(png)  # lossless: the same ids are read as they are
    assert spec.task == "multiclass" and spec.num_classes == 8


def test_binary_masks_saved_as_jpeg_are_still_read(tmp_path):
    mask = _square_mask()
    frame = _pairs(tmp_path, [mask, mask], ".jpg")
    from automask.data import validate_frame

    with pytest.warns(UserWarning, match="binarised"):
        spec = validate_frame(frame)
    assert spec.task == "binary"


def test_row_labels_and_invisible_white_space_are_named_plainly(tmp_path):
    from automask.data import validate_frame
    from automask.data.validation import warn_training_issues

    frame = _pairs(tmp_path, [_square_mask() * 0, _square_mask()], ".png")
    with pytest.warns(UserWarning, match=r"rows 0\b") as record:
        warn_training_issues(validate_frame(frame))
    assert not any("np.int64" in str(w.message) for w in record)
    frame.loc[1, "image"] = frame.loc[1, "image"] + " "
    with pytest.raises(DataValidationError, match=r"row 1 \[image\].*ends with white space"):
        validate_frame(frame)


def test_score_folders_reads_a_lossy_webp_grey_ground_truth(tmp_path):
    from automask.metrics import score_folders

    mask = _square_mask()
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(mask).save(tmp_path / "pred" / "a.png")
    _lossy_webp(tmp_path / "gt" / "a.webp", mask)
    assert score_folders(tmp_path / "pred", tmp_path / "gt", metrics=["iou"])["iou"] > 0.98


def test_a_void_label_no_training_mask_holds_is_warned_about(tmp_path):
    """void_label=30 on CamVid-like masks (void 11) used to train silently, ignoring
    nothing."""
    from automask.data import validate_frame
    from automask.data.validation import warn_training_issues

    masks = [_class_ids(), _class_ids()]
    masks[1][:4] = 11
    frame = _pairs(tmp_path, masks, ".png")
    spec = validate_frame(frame, void_label=30, num_classes=12)
    with pytest.warns(UserWarning, match="void_label=30 marks no pixel of any training mask"):
        warn_training_issues(spec)
    spec = validate_frame(frame, void_label=11)  # present in row 1: nothing to say
    assert spec.stats["void"].tolist() == [0.0, 4 / 48]
    assert not [m for m in warn_training_issues(spec) if "void_label" in m]


def test_an_image_over_pillows_bomb_limit_is_named_with_the_way_out(tmp_path, monkeypatch):
    from automask.data import validate_frame

    Image.fromarray(np.zeros((60, 80), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(_square_mask(60, 80)).save(tmp_path / "m.png")
    frame = pd.DataFrame({"image": [str(tmp_path / "big.png")],
                          "label": [str(tmp_path / "m.png")]})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 4800 pixels: over twice the limit
    with pytest.raises(DataValidationError,
                       match=r"row 0 \[image\] .*big\.png: larger than Pillow allows.*"
                             r"before reading it \(fit, predict or evaluate\).*"
                             r"MAX_IMAGE_PIXELS = None"):
        validate_frame(frame, image_col="image", label_col="label")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the way out works
    assert len(validate_frame(frame, image_col="image", label_col="label")) == 1


def test_a_csv_with_a_header_and_no_rows_is_named(tmp_path):
    from automask.data import validate_frame

    (tmp_path / "train.csv").write_text("image,label\n")
    with pytest.raises(DataValidationError, match=r"train\.csv has no rows.*'image', 'label'"):
        validate_frame(tmp_path / "train.csv", image_col="image", label_col="label")


@pytest.mark.parametrize("name", ["Unlabelled", "unlabeled", "VOID", "don't care", "Ignore"])
def test_a_class_named_as_unlabelled_pixels_without_void_label_is_warned_about(
        tmp_path, name):
    """CamVid's classes.txt names id 11 "Unlabelled": fitted without data.void_label, those
    pixels were learnt and scored as a class, silently."""
    from automask.data import validate_frame
    from automask.data.validation import warn_training_issues

    masks = [_class_ids(), _class_ids()]
    masks[1][:4] = 11
    frame = _pairs(tmp_path, masks, ".png")
    names = [f"c{i}" for i in range(11)]
    spec = validate_frame(frame, class_names=names + [name])
    with pytest.warns(UserWarning, match=rf"class 11 is named {re.escape(repr(name))}, as "
                                         r"datasets name the pixels they leave unlabelled.*"
                                         r"hyperparameters=\{'data.void_label': 11\}"):
        warn_training_issues(spec)
    spec = validate_frame(frame, class_names=names, void_label=11)
    assert not [m for m in warn_training_issues(spec) if "unlabelled" in m]
    spec = validate_frame(frame, class_names=names + ["Other"])  # a class in many datasets
    assert not [m for m in warn_training_issues(spec) if "unlabelled" in m]
