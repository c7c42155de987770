"""validate_frame: every bad input reported at once, task detection, class checks."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFile

import automask.data.validation as validation
from automask.data import IGNORE_INDEX, SegmentationDataset, validate_frame
from automask.errors import ConfigError, DataValidationError


def _pair(folder, name, mask, image_size=None, suffix=".png"):
    """Write image + mask; returns (image_path, mask_path) as strings."""
    folder.mkdir(parents=True, exist_ok=True)
    mask = np.asarray(mask, dtype=np.uint8)
    h, w = image_size or mask.shape
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img_path, mask_path = folder / f"{name}{suffix}", folder / f"{name}_mask.png"
    Image.fromarray(image).save(img_path)
    Image.fromarray(mask).save(mask_path)
    return str(img_path), str(mask_path)


def _binary(h=12, w=16, fg=255):
    m = np.zeros((h, w), np.uint8)
    m[2:6, 3:9] = fg
    return m


def _frame(pairs, index=None):
    return pd.DataFrame(
        {"image": [p[0] for p in pairs], "label": [p[1] for p in pairs]}, index=index
    )


def test_a_repeated_column_is_named_by_fit_predict_and_evaluate(tmp_path):
    """A frame that holds 'label' twice (after a merge or concat) was read past the check,
    into a raw AttributeError; each entry point now names the column before any work."""
    from automask import SemanticSegmentor

    pairs = [_pair(tmp_path / "d", f"s{i}", _binary()) for i in range(3)]
    twice = pd.concat([_frame(pairs), _frame(pairs)[["label"]]], axis=1)
    assert list(twice.columns) == ["image", "label", "label"]
    seg = SemanticSegmentor(path=tmp_path / "run")
    with pytest.raises(DataValidationError, match=r"\['label'\] appear more than once"):
        seg.fit(twice, presets="tiny")
    assert not (tmp_path / "run").exists()
    images = pd.concat([_frame(pairs)[["image"]]] * 2, axis=1)
    with pytest.raises(DataValidationError, match=r"\['image'\] appear more than once"):
        validate_frame(images, require_labels=False)
    from automask.data.arrays import as_files

    with pytest.raises(DataValidationError, match=r"\['image'\] appear more than once"):
        with as_files(images, ["image"]):
            pass


def test_an_image_given_as_the_table_of_paths_is_named_as_not_text(tmp_path):
    """evaluate / fit on one image file instead of a table of paths: the parse error says
    the file is no text and how labelled data is given (it said only 'utf-8 codec can't
    decode byte 0x89'); a table that does not parse as text does keep the parser's words."""
    from automask import SemanticSegmentor

    image, _ = _pair(tmp_path, "a", _binary())
    with pytest.raises(DataValidationError, match=r"could not be parsed: .*it is not text "
                       r"\(an image\?\): a table lists image and mask paths.*from_folders"):
        validate_frame(image)
    with pytest.raises(DataValidationError, match="it is not text"):
        SemanticSegmentor(path=tmp_path / "run").fit(image, presets="tiny")
    assert not (tmp_path / "run").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text('image\n"unterminated\n')
    with pytest.raises(DataValidationError, match="could not be parsed") as info:
        validate_frame(bad)
    assert "not text" not in str(info.value)


def test_missing_columns_are_named(tmp_path):
    df = pd.DataFrame({"img": ["a.png"], "mask": ["b.png"]})
    with pytest.raises(DataValidationError) as info:
        validate_frame(df)
    msg = str(info.value)
    assert "'image'" in msg and "'label'" in msg and "'img'" in msg


def test_empty_frame(tmp_path):
    with pytest.raises(DataValidationError, match="empty"):
        validate_frame(pd.DataFrame({"image": [], "label": []}))


def test_all_bad_rows_reported_at_once(tmp_path):
    good = _pair(tmp_path, "good", _binary())
    missing_img = (str(tmp_path / "nope.png"), good[1])
    nan_row = (float("nan"), good[1])
    empty_label = (good[0], "  ")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    unreadable = (str(garbage), good[1])
    # truncated JPEG image
    big = _pair(tmp_path, "big", _binary(64, 64), suffix=".jpg")
    data = Path(big[0]).read_bytes()
    cut_img = tmp_path / "cut.jpg"
    cut_img.write_bytes(data[: len(data) // 2])
    truncated_img = (str(cut_img), big[1])
    # truncated PNG mask
    mdata = Path(big[1]).read_bytes()
    cut_mask = tmp_path / "cut_mask.png"
    cut_mask.write_bytes(mdata[: len(mdata) // 2])
    truncated_mask = (big[0], str(cut_mask))
    mismatch = _pair(tmp_path, "mismatch", _binary(12, 16), image_size=(13, 16))
    pairs = [good, missing_img, nan_row, empty_label, unreadable, truncated_img,
             truncated_mask, mismatch]
    index = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"]
    with pytest.raises(DataValidationError) as info:
        validate_frame(_frame(pairs, index=index))
    msg = str(info.value)
    lines = msg.splitlines()

    def line_for(idx):
        found = [ln for ln in lines if f"row {idx!r}" in ln]
        assert found, f"row {idx} not reported in:\n{msg}"
        return " ".join(found)

    assert "'r0'" not in msg
    assert str(tmp_path / "nope.png") in line_for("r1") and "not found" in line_for("r1")
    assert "missing image path" in line_for("r2") and "nan" in line_for("r2")
    assert "missing mask path" in line_for("r3")
    assert str(garbage) in line_for("r4") and "not an image" in line_for("r4")
    assert str(cut_img) in line_for("r5") and "truncated" in line_for("r5")
    assert str(cut_mask) in line_for("r6") and "truncated" in line_for("r6")
    assert mismatch[1] in line_for("r7") and "12x16" in line_for("r7") and "13x16" in line_for("r7")


def test_error_cap_counts_everything(tmp_path):
    rows = [(str(tmp_path / f"missing{i}.png"), str(tmp_path / f"m{i}.png")) for i in range(30)]
    with pytest.raises(DataValidationError) as info:
        validate_frame(_frame(rows), max_errors=5)
    msg = str(info.value)
    assert msg.startswith("60 problem(s) in 30 row(s)")
    assert len(re.findall(r"^\s+row ", msg, flags=re.M)) == 5
    assert "55 more" in msg


def test_values_that_fit_neither_task(tmp_path):
    pairs = [_pair(tmp_path, f"b{i}", _binary()) for i in range(3)]
    multi = np.zeros((12, 16), np.uint8)
    multi[:4] = 2
    multi[4:8] = 3
    pairs.append(_pair(tmp_path, "multi", multi))
    soft = _binary()
    soft[5, 5] = 200  # anti-aliased edge value
    pairs.append(_pair(tmp_path, "soft", soft))
    with pytest.raises(DataValidationError) as info:
        validate_frame(_frame(pairs))
    msg = str(info.value)
    assert "row 3" in msg and pairs[3][1] in msg and "fit neither" in msg
    assert "row 4" in msg and pairs[4][1] in msg and "128-254" in msg
    assert "row 0" not in msg


def test_binary_masks_of_0_and_128_get_advice_that_works(tmp_path):
    """Masks of 0 and 128 (an object marked with 128) were told to pass num_classes=2,
    which binarises at > 128 and so refused them again ("class id 128 outside [0, 2)").
    Both errors now give the colour map that reads 128 as the object, and following it
    gives binary targets with the object as foreground; masks of 0 and 200 keep the
    num_classes=2 advice, which works for them."""
    pairs = [_pair(tmp_path, f"h{i}", _binary(fg=128)) for i in range(3)]
    hint = "color_map={0: 0, 128: 1} to read 128 as the object"
    with pytest.raises(DataValidationError) as info:
        validate_frame(_frame(pairs))
    assert hint in str(info.value) and "num_classes=2" not in str(info.value)
    with pytest.raises(DataValidationError) as info:
        validate_frame(_frame(pairs), num_classes=2)
    assert "leaves {128} background" in str(info.value) and hint in str(info.value)
    spec = validate_frame(_frame(pairs), color_map={0: 0, 128: 1})
    plain = validate_frame(_frame([_pair(tmp_path / "w", "h0", _binary())]))  # 0/255
    target = SegmentationDataset(spec, input_size=16)[0]["target"]
    assert spec.task == "binary" and int((target == 1).sum()) > 0
    assert torch.equal(target, SegmentationDataset(plain, input_size=16)[0]["target"])

    pairs = [_pair(tmp_path / "b200", f"h{i}", _binary(fg=200)) for i in range(3)]
    with pytest.raises(DataValidationError, match=r"pass num_classes=2 to binarise"):
        validate_frame(_frame(pairs))
    assert validate_frame(_frame(pairs), num_classes=2).task == "binary"


def test_colour_mask_reported_with_row(tmp_path):
    img, _ = _pair(tmp_path, "c", _binary())
    colour = np.zeros((12, 16, 3), np.uint8)
    colour[..., 0] = 200
    colour[0, 0] = (0, 10, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(DataValidationError) as info:
        validate_frame(_frame([(img, str(tmp_path / "colour.png"))]))
    assert "row 0" in str(info.value) and "colour" in str(info.value)
    assert str(tmp_path / "colour.png") in str(info.value)


@pytest.mark.parametrize("fg", [255, 1])
def test_binary_detection_and_targets(tmp_path, fg):
    pairs = [_pair(tmp_path, f"b{i}", _binary(fg=fg)) for i in range(3)]
    pairs.append(_pair(tmp_path, "empty", np.zeros((12, 16), np.uint8)))
    spec = validate_frame(_frame(pairs))
    assert spec.task == "binary" and spec.num_classes == 2 and spec.num_outputs == 1
    assert spec.class_names == ["background", "foreground"]
    ds = SegmentationDataset(spec, input_size=32)
    target = ds[0]["target"]
    assert set(target.unique().tolist()) == {0, 1, IGNORE_INDEX}
    # 16 wide -> 32: a 4x6 block becomes 8x12 pixels of foreground
    assert int((target == 1).sum()) == 8 * 12
    np.testing.assert_allclose(spec.stats["foreground"].iloc[:3], 24 / 192)
    assert spec.stats["foreground"].iloc[3] == 0


def test_multiclass_detection_num_classes_and_void(tmp_path):
    m = np.zeros((10, 10), np.uint8)
    m[:3] = 1
    m[3:5] = 4
    m[9] = 11  # void
    m[8] = 255  # already ignore
    pairs = [_pair(tmp_path, "m0", m)]
    spec = validate_frame(_frame(pairs))
    assert spec.task == "multiclass" and spec.num_classes == 12
    spec = validate_frame(_frame(pairs), void_label=11)
    assert spec.num_classes == 5 and spec.num_outputs == 5
    target = SegmentationDataset(spec, input_size=10)[0]["target"]
    assert (target[9] == IGNORE_INDEX).all() and (target[8] == IGNORE_INDEX).all()
    assert (target[3:5] == 4).all()
    spec = validate_frame(_frame(pairs), void_label=11, num_classes=8,
                          class_names=[f"c{i}" for i in range(8)])
    assert spec.num_classes == 8 and spec.class_names[7] == "c7"


def test_a_void_label_among_the_class_ids_is_refused_before_any_fit(tmp_path):
    ade = np.ones((10, 10), np.uint8)  # ADE20K-style: 0 = void, classes 1 and 2
    ade[:, 5:] = 2
    ade[:2] = 0
    frame = _frame([_pair(tmp_path, "a", ade)])
    with pytest.raises(ConfigError, match=r"void_label=0 lies among the class ids 0\.\.2") \
            as info:
        validate_frame(frame, void_label=0)
    # the advice is a value map that works: void 0 -> 255 (ignored), classes 1, 2 -> 0, 1
    advice = re.search(r"color_map=(\{.*\}) makes", str(info.value)).group(1)
    assert eval(advice) == {0: 255, 1: 0, 2: 1}
    spec = validate_frame(frame, color_map=eval(advice))
    assert (spec.task, spec.num_classes, spec.void_label) == ("binary", 2, None)
    target = SegmentationDataset(spec, input_size=10)[0]["target"]
    assert (target[:2] == IGNORE_INDEX).all() and (target[2:, :5] == 0).all()
    assert (target[2:, 5:] == 1).all()
    with pytest.raises(ConfigError) as info:  # a void in the middle: the classes after it shift
        validate_frame(frame, void_label=1)
    advice = re.search(r"color_map=(\{.*\}) makes", str(info.value)).group(1)
    assert eval(advice) == {0: 0, 1: 255, 2: 1}
    assert validate_frame(frame, color_map=eval(advice)).num_classes == 2
    with pytest.raises(ConfigError, match="void_label=11 lies among the class ids 0..11"):
        validate_frame(frame, void_label=11, num_classes=12)  # CamVid's void as a 12th class
    binary = _frame([_pair(tmp_path, "b", (ade == 2).astype(np.uint8))])
    for void, side in ((0, "background"), (1, "foreground")):
        with pytest.raises(ConfigError, match=f"void_label={void} is a class of binary masks "
                                              rf"\(0 background, 1 foreground\): every {side}"):
            validate_frame(binary, void_label=void)
    assert validate_frame(frame).num_classes == 3  # unset: 0 is a class
    shifted = np.where(ade == 0, 255, ade - 1).astype(np.uint8)  # the fix the message gives
    spec = validate_frame(_frame([_pair(tmp_path, "c", shifted)]), void_label=255)
    assert spec.task == "binary"


def test_void_label_that_is_the_objects_of_binary_masks_is_refused(tmp_path):
    """void_label=255 on plain 0/255 masks (or 38 on 0/38 ones) ignored every object pixel:
    the fit ran on background alone, warned only that the masks were empty."""
    from automask import SemanticSegmentor

    for fg in (38, 255):
        pairs = [_pair(tmp_path / str(fg), f"m{i}", _binary(fg=fg)) for i in range(3)]
        with pytest.raises(ConfigError, match=f"void_label={fg} leaves no object in any mask: "
                                              f"the masks hold only 0 and {fg}"):
            validate_frame(_frame(pairs), void_label=fg)
    with pytest.raises(ConfigError, match="void_label=255 leaves no object"):
        SemanticSegmentor(path=tmp_path / "run").fit(
            _frame(pairs), presets="tiny", hyperparameters={"data.void_label": "255"})
    assert not (tmp_path / "run").exists()
    # beside the objects' own value a void value is what it says: 0/1 masks with 255 kept
    mixed = _binary(fg=1)
    mixed[-2:] = 255
    spec = validate_frame(_frame([_pair(tmp_path, "v", mixed), pairs[0]]), void_label=255)
    assert spec.task == "binary"


def test_ids_outside_fitted_classes_are_errors(tmp_path):
    m = np.zeros((10, 10), np.uint8)
    m[:2] = 3
    m[5:] = 6
    pairs = [_pair(tmp_path, "ok", np.minimum(m, 2)), _pair(tmp_path, "bad", m)]
    with pytest.raises(DataValidationError) as info:
        validate_frame(_frame(pairs), num_classes=4)
    msg = str(info.value)
    assert "row 1" in msg and pairs[1][1] in msg and "{6}" in msg and "[0, 4)" in msg
    assert "row 0" not in msg


def test_binary_model_rejects_class_ids(tmp_path):
    m = np.zeros((10, 10), np.uint8)
    m[:2] = 2
    pairs = [_pair(tmp_path, "x", m)]
    with pytest.raises(DataValidationError, match=r"outside \[0, 2\)"):
        validate_frame(_frame(pairs), num_classes=2)


def test_inconsistent_options_are_config_errors():
    df = pd.DataFrame({"image": ["a"], "label": ["b"]})
    with pytest.raises(ConfigError, match="class_names"):
        validate_frame(df, num_classes=3, class_names=["a", "b"])
    with pytest.raises(ConfigError, match=r"class 1 of \['road', ' '\] has an empty name"):
        validate_frame(df, class_names=["road", " "])
    with pytest.raises(ConfigError, match="num_classes"):
        validate_frame(df, num_classes=1)
    with pytest.raises(ConfigError, match="void_label"):
        validate_frame(df, void_label=300)


def test_relative_paths_root_and_csv(tmp_path, monkeypatch):
    _pair(tmp_path / "data", "a", _binary())
    df = pd.DataFrame({"image": ["data/a.png"], "label": ["data/a_mask.png"]})
    spec = validate_frame(df, root=tmp_path)
    assert spec.frame["image"].iloc[0] == os.path.abspath(tmp_path / "data" / "a.png")
    csv = tmp_path / "train.csv"
    df.to_csv(csv, index=False)
    monkeypatch.chdir(tmp_path)
    spec = validate_frame(str(csv))  # default root: the working directory
    assert spec.frame["label"].iloc[0] == os.path.abspath(tmp_path / "data" / "a_mask.png")
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(DataValidationError, match="not found"):
        validate_frame(csv)


def test_predict_time_needs_images_only(tmp_path):
    img, _ = _pair(tmp_path, "p", _binary())
    df = pd.DataFrame({"image": [img], "other": [1]}, index=[42])
    spec = validate_frame(df, require_labels=False)
    assert spec.label_col is None and list(spec.frame.index) == [42]
    item = SegmentationDataset(spec, 16, with_labels=False)[0]
    assert "target" not in item
    with pytest.raises(DataValidationError, match="'label'"):
        validate_frame(df)


def test_validation_reads_image_headers_only(tmp_path, monkeypatch):
    pairs = [_pair(tmp_path, f"h{i}", _binary(), suffix=".jpg") for i in range(20)]
    loaded = []
    original = ImageFile.ImageFile.load

    def spy(self):
        loaded.append(getattr(self, "filename", None))
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    validation._memo.clear()
    validate_frame(_frame(pairs))
    assert loaded, "masks must be decoded"
    assert not [f for f in loaded if str(f).endswith(".jpg")], "images were decoded"


def test_masks_decoded_once_across_calls(tmp_path, monkeypatch):
    pairs = [_pair(tmp_path, f"d{i}", _binary()) for i in range(4)]
    calls = []
    real = validation.read_mask
    monkeypatch.setattr(
        validation, "read_mask", lambda p, color_map=None: calls.append(p) or real(p, color_map)
    )
    validation._memo.clear()
    validate_frame(_frame(pairs))
    validate_frame(_frame(pairs))
    assert len(calls) == 4


def test_nothing_written_when_validation_fails(tmp_path, monkeypatch):
    _pair(tmp_path, "w", _binary())
    before = sorted(p for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataValidationError):
        validate_frame(
            pd.DataFrame({"image": ["w.png", "x.png"], "label": ["w_mask.png", "y.png"]})
        )
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_jpeg_with_trailer_after_end_marker_is_not_truncated(tmp_path):
    img, mask = _pair(tmp_path, "t", _binary(), suffix=".jpg")
    with open(img, "ab") as fh:  # e.g. a phone's metadata trailer
        fh.write(b"\x00TRAILER" * 400)
    spec = validate_frame(_frame([(img, mask)]))
    assert len(spec.frame) == 1


def test_jpeg_compressed_binary_masks_are_binarised_at_128(tmp_path):
    """Masks saved as JPEG (ringing values 0-255) are soft binary masks, not 256 classes."""
    pairs = []
    truths = []
    for i in range(3):
        mask = np.zeros((48, 64), np.uint8)
        mask[8 + i:30, 10:40 + i] = 255
        img_path, mask_path = _pair(tmp_path, f"j{i}", mask)
        jpeg = tmp_path / f"j{i}_mask.jpg"
        Image.fromarray(mask).save(jpeg, quality=70)
        pairs.append((img_path, str(jpeg)))
        truths.append(mask > 128)
    raw = [np.array(Image.open(p[1])) for p in pairs]
    assert any(((r > 0) & (r < 255)).any() for r in raw)  # the JPEG really rings
    with pytest.warns(UserWarning, match=r"3 mask\(s\).*binarised at > 128"):
        spec = validate_frame(_frame(pairs))
    assert spec.task == "binary" and spec.num_classes == 2
    for pos, r in enumerate(raw):
        target = spec.target_lut(pos)[r]
        np.testing.assert_array_equal(target, (r > 128).astype(np.uint8))
        assert (target == truths[pos]).mean() > 0.97  # close to the mask before JPEG
    with pytest.warns(UserWarning):  # checked again against a fitted binary model
        again = validate_frame(_frame(pairs), num_classes=2)
    assert again.task == "binary" and list(again.stats["kind"]) == list(spec.stats["kind"])
    # Class ids spread over 0..150 are not mistaken for a soft binary mask.
    ids = np.tile(np.arange(0, 151, dtype=np.uint8), (12, 1))[:, :150]
    with pytest.raises(DataValidationError, match="num_classes"):
        validate_frame(_frame([_pair(tmp_path / "ids", "ade", ids[:, :16])]
                              + [_pair(tmp_path / "ids", "ade2", ids[:, 134:150])]))


def test_repeated_image_or_label_column_is_named(tmp_path):
    frame = _frame([_pair(tmp_path, "a", _binary()), _pair(tmp_path, "b", _binary())])
    twice = pd.concat([frame[["image"]], frame], axis=1)  # two columns called "image"
    with pytest.raises(DataValidationError, match=r"column\(s\) \['image'\] appear more than"):
        validate_frame(twice)
    with pytest.raises(DataValidationError, match=r"\['label'\] appear more than once"):
        validate_frame(pd.concat([frame, frame[["label"]]], axis=1))


def test_a_folder_given_as_the_csv_is_named_as_a_folder(tmp_path):
    _pair(tmp_path / "data", "a", _binary())
    with pytest.raises(DataValidationError, match="is a folder, not a CSV file") as info:
        validate_frame(tmp_path / "data")
    assert str(tmp_path / "data") in str(info.value)


def test_data_whose_every_mask_pixel_is_void_is_refused(tmp_path):
    void = np.full((12, 16), 11, np.uint8)
    pairs = [_pair(tmp_path, f"v{i}", void) for i in range(3)]
    with pytest.raises(DataValidationError, match=r"3 problem\(s\) in 3 row\(s\)") as info:
        validate_frame(_frame(pairs, index=["a", "b", "c"]), void_label=11)
    message = str(info.value)
    assert f"row 'b' [label] {pairs[1][1]}: mask values {{11}} are all void_label=11" in message
    assert "no mask of the data has a labelled pixel" in message
    ignored = [_pair(tmp_path, f"i{i}", np.full((12, 16), 255, np.uint8)) for i in range(2)]
    with pytest.raises(DataValidationError, match=r"values \{255\} are all 255 \(ignore\)"):
        validate_frame(_frame(ignored), void_label=255)
    # one void-only mask beside a labelled one is fine: it is left out of losses and metrics
    labelled = _binary(fg=1)
    labelled[0, :] = 11
    spec = validate_frame(_frame([pairs[0], _pair(tmp_path, "ok", labelled)]), void_label=11)
    assert spec.task == "binary" and list(spec.stats["foreground"] > 0) == [False, True]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_mask_kept_in_the_alpha_channel_is_named_not_read_as_empty(tmp_path, mode):
    mask = _binary()
    img_path, _ = _pair(tmp_path, "a", mask)
    channels = 4 if mode == "RGBA" else 2
    pixels = np.zeros((*mask.shape, channels), np.uint8)  # black everywhere ...
    pixels[..., -1] = mask  # ... and the mask in the alpha channel
    alpha = tmp_path / f"alpha_{mode}.png"
    Image.fromarray(pixels, mode).save(alpha)
    frame = _frame([(img_path, str(alpha)), _pair(tmp_path, "b", mask)])
    with pytest.raises(DataValidationError, match=r"1 problem\(s\) in 1 row\(s\)") as info:
        validate_frame(frame)
    assert f"row 0 [label] {alpha}: mask is a {mode} image of one colour whose alpha" \
        in str(info.value)
    # a mask drawn in colour with a transparent background still reads as before
    pixels[..., 0] = mask
    if mode == "RGBA":
        pixels[..., 1] = pixels[..., 2] = mask
    Image.fromarray(pixels, mode).save(alpha)
    spec = validate_frame(frame)
    assert spec.task == "binary" and spec.stats["foreground"][0] == spec.stats["foreground"][1]


def test_a_mask_not_turned_like_its_exif_rotated_image_gets_a_hint(tmp_path):
    mask = _binary(12, 16)
    img_path, mask_path = _pair(tmp_path, "a", mask, suffix=".jpg")
    image = Image.open(img_path)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    image.save(img_path, exif=exif)
    with pytest.raises(DataValidationError) as info:
        validate_frame(_frame([(img_path, mask_path)]))
    message = str(info.value)
    assert f"row 0 [label] {mask_path}: mask is 12x16 (HxW) but image {img_path} is 16x12" \
        in message
    assert "EXIF orientation tag (6)" in message
    other = _pair(tmp_path, "b", _binary(16, 12), image_size=(12, 16))  # plain swap: no hint
    with pytest.raises(DataValidationError) as info:
        validate_frame(_frame([other]))
    assert "is 12x16" in str(info.value) and "EXIF" not in str(info.value)


def test_class_ids_beyond_the_class_names_name_class_names(tmp_path):
    """K from ``class_names`` alone: a mask with a class id past the names is named with
    the number of names the data needs (the most over every row, in each row's message),
    not with a num_classes the user never passed."""
    mask = np.zeros((8, 8), np.uint8)
    mask[:2], mask[2:4], mask[4:] = 1, 2, 4
    pairs = [_pair(tmp_path, "a", mask), _pair(tmp_path, "b", mask + (mask == 4))]
    with pytest.raises(DataValidationError, match=r"(?s)row 0 .*class id\(s\) \{2, 4\} outside "
                                                  r"\[0, 2\): class_names names 2 classes.*"
                                                  r"at least 6 names for this data\)"
                                                  r".*row 1 .*class id\(s\) \{2, 5\}.*at least "
                                                  r"6 names") as info:
        validate_frame(_frame(pairs), class_names=["road", "car"])
    assert "num_classes" not in str(info.value)
    with pytest.raises(DataValidationError, match=r"(?s)row 0 .*outside \[0, 2\) for "
                                                  r"num_classes=2 .*pass num_classes=6 or more"
                                                  r".*row 1 .*pass num_classes=6 or more"):
        validate_frame(_frame(pairs), num_classes=2, class_names=["road", "car"])
    assert validate_frame(_frame(pairs), class_names=list("abcdef")).num_classes == 6


def test_soft_masks_get_the_class_id_hint_only_when_the_data_set_the_classes(tmp_path):
    """Anti-aliased binary masks are binarised with a warning; the hint to pass num_classes
    is given when the number of classes came from the data, not when it was given (a fitted
    binary model's evaluate passes num_classes=2, which cannot change)."""
    import warnings

    soft = _binary()
    soft[5, 5] = 200  # anti-aliased edge value
    pairs = [_pair(tmp_path, "soft", soft), _pair(tmp_path, "hard", _binary())]
    for num_classes, hint in ((None, True), (2, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert validate_frame(_frame(pairs), num_classes=num_classes).task == "binary"
        [text] = [str(w.message) for w in caught if "anti-aliased" in str(w.message)]
        assert text.startswith("1 mask(s) look like anti-aliased or JPEG-compressed")
        assert ("Pass num_classes > 2" in text) == hint, text


def test_numbers_where_paths_belong_are_named_as_an_image_classification_table(
        tmp_path, monkeypatch):
    """A label column of one class per image (a classification CSV) is refused row by row
    as numbers, not as missing files; a file whose name is a number is still read."""
    pairs = [_pair(tmp_path, f"a{i}", _binary()) for i in range(3)]
    csv = tmp_path / "classes.csv"
    pd.DataFrame({"image": [p[0] for p in pairs], "label": [0, 1, 2.5]}).to_csv(csv, index=False)
    with pytest.raises(DataValidationError) as info:
        validate_frame(csv)
    text = str(info.value)
    for row, value in [(0, "0.0"), (1, "1.0"), (2, "2.5")]:
        assert (f"row {row} [label]: a number ({value}), not a path: the column holds a value "
                "per image, as an image-classification table does; each row needs the path of "
                "a mask file") in text, text
    assert "file not found" not in text
    with pytest.raises(DataValidationError, match=r"row 0 \[image\]: a number \(7\), not a "
                                                  r"path.* path of an image file$"):
        validate_frame(pd.DataFrame({"image": [7]}), require_labels=False)
    Image.open(pairs[0][1]).save(tmp_path / "3", format="PNG")  # a mask file named "3"
    monkeypatch.chdir(tmp_path)
    spec = validate_frame(pd.DataFrame({"image": [pairs[0][0]], "label": [3]}))
    assert spec.frame["label"].tolist() == [str(tmp_path / "3")] and spec.task == "binary"


def test_blurred_binary_masks_are_binarised_once_num_classes_2_says_binary(tmp_path):
    """A mask blurred past the soft rule (a fifth of its pixels between 32 and 223) fits
    neither task by itself, and the message says how to read it; with ``num_classes=2``
    (given, or of a fitted binary model) it is binarised at > 128. A 0/1 JPEG mask with
    ``num_classes=2`` still is no soft mask: nothing in it is above 128."""
    from PIL import ImageFilter

    pairs = []
    for i in range(3):
        mask = np.zeros((24, 24), np.uint8)
        mask[6:18, 5 + i:17 + i] = 255
        blurred = np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(2)))
        middle = ((blurred >= 32) & (blurred < 224)).mean()
        assert middle > 0.1 and len(np.unique(blurred)) > 20, middle
        img, path = _pair(tmp_path, f"blur{i}", blurred)
        pairs.append((img, path, blurred))
    frame = _frame([p[:2] for p in pairs])
    with pytest.raises(DataValidationError, match=r"pass num_classes=2 to binarise them at "
                                                  r"> 128"):
        validate_frame(frame)
    for fitted in (False, True):
        with pytest.warns(UserWarning, match=r"3 mask\(s\) look like anti-aliased"):
            spec = validate_frame(frame, num_classes=2, fitted=fitted)
        assert (spec.task, spec.num_classes) == ("binary", 2)
        for pos, (_, _, blurred) in enumerate(pairs):
            target = SegmentationDataset(spec, input_size=24)[pos]["target"].numpy()
            np.testing.assert_array_equal(target, (blurred > 128).astype(target.dtype))
    ones = np.zeros((40, 48), np.uint8)
    ones[10:30, 5:25] = 1
    img, _ = _pair(tmp_path, "ones", ones)
    Image.fromarray(ones).save(tmp_path / "ones.jpg", quality=90)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "ones.jpg")))) == {0, 1, 2}
    with pytest.raises(DataValidationError, match=r"row 0 \[label\].*ones\.jpg"):
        validate_frame(_frame([(img, str(tmp_path / "ones.jpg"))]), num_classes=2)


def test_a_void_row_among_the_colour_table_gets_advice_that_works(tmp_path):
    """CamVid's Kaggle table lists 'Void' among the classes: the warning advised void_label
    with its name left out, which was refused with advice that failed in turn (a value map
    that colour masks refuse, an id one off). Each advice given is now followed here."""
    from automask.data.validation import warn_training_issues

    table = {(0, 0, 192): 0, (128, 64, 128): 1, (0, 0, 0): 2, (128, 128, 128): 3}
    names = ["Car", "Road", "Void", "Sky"]
    colours = np.array(list(table), np.uint8)
    pairs = []
    for i in range(3):
        ids = np.full((12, 16), 3, np.uint8)
        ids[6:, :] = 1
        ids[8:, 4 + i:9] = 0
        ids[:2, :] = 2
        path = tmp_path / f"m{i}.png"
        Image.fromarray(colours[ids]).save(path)
        image = tmp_path / f"i{i}.png"
        Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(image)
        pairs.append((str(image), str(path)))
    frame = _frame(pairs)
    spec = validate_frame(frame, color_map=table, class_names=names)
    with pytest.warns(UserWarning, match="class 2 is named 'Void'") as record:
        warn_training_issues(spec)
    text = " ".join(str(w.message) for w in record)
    advice = re.search(r"color_map=(\{key: .*?\}) \(color_map", text).group(1)
    fixed = eval(advice, {"color_map": table})
    assert fixed == {(0, 0, 192): 0, (128, 64, 128): 1, (0, 0, 0): 255, (128, 128, 128): 2}
    spec = validate_frame(frame, color_map=fixed, class_names=["Car", "Road", "Sky"])
    assert spec.num_classes == 3 and spec.class_names == ["Car", "Road", "Sky"]
    # the old advice, void_label=2 with 'Void' left out: refused with the same fix
    with pytest.raises(ConfigError, match=r"void_label=2 lies among the class ids 0..3 "
                                          r"that color_map gives.*move the void row "
                                          r"last and pass void_label=3"):
        validate_frame(frame, color_map=table, class_names=["Car", "Road", "Sky"],
                       void_label=2)
    with pytest.raises(ConfigError, match=r"names it as class 2 \('Void'\).*color_map="
                                          r"\{key: 255 if i == 2.*--void-label 3"):
        validate_frame(frame, color_map=table, class_names=names, void_label=2)
    # the command line's way: the void row moved last, its id there
    moved = {(0, 0, 192): 0, (128, 64, 128): 1, (128, 128, 128): 2, (0, 0, 0): 3}
    spec = validate_frame(frame, color_map=moved, class_names=["Car", "Road", "Sky"],
                          void_label=3)
    assert spec.num_classes == 3


def test_a_void_name_among_id_masks_gets_the_value_map_that_renumbers_them(tmp_path):
    from automask.data.validation import warn_training_issues

    ids = np.zeros((12, 16), np.uint8)
    ids[:3], ids[6:, :8], ids[6:, 8:] = 1, 2, 3
    frame = _frame([_pair(tmp_path, "a", ids)])
    spec = validate_frame(frame, class_names=["grass", "unlabelled", "road", "car"])
    with pytest.warns(UserWarning, match="class 1 is named 'unlabelled'") as record:
        warn_training_issues(spec)
    text = " ".join(str(w.message) for w in record)
    assert "void_label': 1}" not in text  # ignoring id 1 in place is refused
    value_map = eval(re.search(r"color_map=(\{.*?\}\}?) makes it 255", text).group(1))
    spec = validate_frame(frame, color_map=value_map, class_names=["grass", "road", "car"])
    assert spec.num_classes == 3


def test_a_name_in_the_other_unicode_form_is_the_file(tmp_path):
    """'café.png' written decomposed on disk (a copy from macOS) and composed in the table:
    reported as 'file not found' under a name that looks exactly like the file's."""
    import unicodedata

    image = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    decomposed = tmp_path / unicodedata.normalize("NFD", "café.png")
    Image.fromarray(image).save(decomposed)
    Image.fromarray(mask).save(tmp_path / "m.png")
    composed = str(tmp_path / unicodedata.normalize("NFC", "café.png"))
    assert composed != str(decomposed)
    spec = validate_frame(pd.DataFrame({"image": [composed], "label": [str(tmp_path / "m.png")]}))
    assert spec.frame["image"][0] == str(decomposed)


def test_colour_masks_for_a_fitted_model_are_refused_without_advice_it_cannot_take(tmp_path):
    """A model fitted through a value map ({0: 0, 3: 1, 7: 2}) refused colour test masks
    advising color_map=..., which evaluate does not take."""
    colour = np.zeros((12, 16, 3), np.uint8)
    colour[2:6, 3:9] = (128, 0, 0)
    colour[7:10, 3:9] = (9, 9, 9)
    image, mask = _pair(tmp_path, "c", _binary())
    Image.fromarray(colour).save(mask)
    frame = _frame([(image, mask)])
    with pytest.raises(DataValidationError, match="or pass color_map="):
        validate_frame(frame, num_classes=3)  # before a fit: the map is the user's to give
    for color_map, said in ((None, "fit on masks without a colour map"),
                            ({0: 0, 3: 1, 7: 2}, "fit on grey masks through a value map")):
        with pytest.raises(DataValidationError) as info:
            validate_frame(frame, num_classes=3, color_map=color_map, fitted=True)
        assert said in str(info.value) and "color_map=" not in str(info.value)
