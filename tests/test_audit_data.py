"""Audit of data reading, validation, splits and configuration: each test guards one
promise of the README ("Data", "Presets", "Hyperparameters") that a bug had broken."""
from __future__ import annotations

import io
import struct

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask.config import resolve
from automask.data import IGNORE_INDEX, SegmentationDataset, split_spec, validate_frame
from automask.data.io import image_size, read_image, read_mask
from automask.datasets.split import _foreground_of, split_positions
from automask.errors import ConfigError, DataValidationError


def _save(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def _disk(height, width, radius, value=255):
    yy, xx = np.mgrid[:height, :width]
    inside = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < radius ** 2
    return np.where(inside, value, 0).astype(np.uint8)


# -- configuration ------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1.5, 2.0])
def test_val_check_interval_above_one_is_refused_when_resolved(value):
    """optim.val_check_interval above 1 is a ConfigError naming it, not a mid-fit error."""
    with pytest.raises(ConfigError, match=r"optim\.val_check_interval") as info:
        resolve("tiny", {"optim.val_check_interval": value}, for_fit=False)
    assert repr(float(value)) in str(info.value)
    [(_, cfg)] = resolve("tiny", {"optim.val_check_interval": "0.5"}, for_fit=False)
    assert cfg.optim.val_check_interval == 0.5


@pytest.mark.parametrize("presets, hyperparameters, named", [
    ("tiny", "optim.lr=1e-3", "hyperparameters"),
    ("tiny", [("optim.lr", 1e-3)], "hyperparameters"),
    (["tiny"], {}, "presets"),
])
def test_hyperparameters_and_presets_of_the_wrong_type_are_config_errors(
        presets, hyperparameters, named):
    """A non-dict hyperparameters or a non-str preset is a ConfigError naming the argument."""
    with pytest.raises(ConfigError, match=named):
        resolve(presets, hyperparameters, for_fit=False)


@pytest.mark.parametrize("kwargs, named", [
    ({"num_classes": "abc"}, "num_classes"),
    ({"num_classes": float("nan")}, "num_classes"),
    ({"num_classes": [3]}, "num_classes"),
    ({"void_label": "x"}, "void_label"),
    ({"void_label": float("nan")}, "void_label"),
    ({"color_map": [((0, 0, 0), 0)]}, "color_map"),
    ({"color_map": {(0, 0, True): 1}}, "color_map"),
    ({"class_names": ["sky", "road", "sky"]}, "class_names"),
])
def test_fit_options_of_the_wrong_type_are_config_errors_naming_them(kwargs, named):
    """num_classes, void_label, color_map, class_names: a ConfigError naming the option."""
    frame = pd.DataFrame({"image": ["never_read.png"], "label": ["never_read_mask.png"]})
    with pytest.raises(ConfigError, match=named):
        validate_frame(frame, **kwargs)


# -- splits -------------------------------------------------------------------------------

def test_jpeg_mask_foreground_for_stratification_is_its_binarised_foreground(tmp_path):
    """train_test_split stratifies a JPEG binary mask on the foreground training will see."""
    path = tmp_path / "m.jpg"
    Image.fromarray(_disk(48, 64, 18)).save(path, quality=80)
    decoded = read_mask(path)
    assert len(np.unique(decoded)) > 2  # compression noise: a soft mask
    assert _foreground_of(str(path)) == pytest.approx(float((decoded > 128).mean()))


def test_stratified_split_separates_empty_masks_from_the_others():
    """Many empty masks: each side of a stratified split still gets images with foreground."""
    foreground = np.array([0.0] * 6 + [0.2, 0.3, 0.4, 0.5])
    for seed in range(20):
        train, test = split_positions(len(foreground), 0.2, seed, foreground)
        assert (foreground[train] > 0).any() and (foreground[test] > 0).any(), seed


def test_a_class_held_by_one_image_is_never_held_out(tmp_path):
    """The holdout split keeps the only image of a rare class on the training side."""
    rng = np.random.default_rng(0)
    rows = []
    for i, cls in enumerate([1, 1, 1, 1, 3]):
        image = _save(tmp_path / f"i{i}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        rows.append((image, _save(tmp_path / f"m{i}.png", _disk(16, 16, 5, cls))))
    spec = validate_frame(pd.DataFrame(rows, columns=["image", "label"]))
    assert spec.task == "multiclass"
    rare = 4
    for seed in range(20):
        train, val = split_spec(spec, 0.2, seed)
        assert len(val) == 1 and len(train) == 4
        assert rare in set(train.frame.index), seed


def _binary_spec(tmp_path, masks, **kwargs):
    rng = np.random.default_rng(0)
    tmp_path.mkdir()
    rows = []
    for i, mask in enumerate(masks):
        image = _save(tmp_path / f"i{i}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        rows.append((image, _save(tmp_path / f"m{i}.png", mask)))
    return validate_frame(pd.DataFrame(rows, columns=["image", "label"]), **kwargs)


def test_the_holdout_takes_no_mask_void_everywhere_nor_the_one_image_with_objects(tmp_path):
    """A holdout of only void masks scored no epoch (the first candidate was kept, without a
    word); the one image with objects held out left training nothing to learn from."""
    disk = _disk(16, 16, 5, 1)
    bordered = disk.copy()
    bordered[0] = 255  # a void border: 255 reads as ignored in these 0/1 masks
    void = np.full((16, 16), 255, np.uint8)
    spec = _binary_spec(tmp_path / "a", [bordered] * 5 + [void])
    assert spec.task == "binary" and spec.stats["labelled"].iat[5] == 0.0
    for seed in range(30):
        train, val = split_spec(spec, 0.2, seed)
        assert 5 not in set(val.frame.index), seed
    empty = np.zeros((16, 16), np.uint8)
    spec = _binary_spec(tmp_path / "b", [empty, empty, empty, disk, empty, empty])
    for seed in range(30):
        train, val = split_spec(spec, 0.2, seed)
        assert 3 in set(train.frame.index), seed
    # void-only masks where nothing else is left to hold out: refused, not scored as nothing
    spec = _binary_spec(tmp_path / "c", [void, bordered])
    outcomes = set()
    for seed in range(10):
        try:
            train, val = split_spec(spec, 0.5, seed)
            outcomes.add("split")
        except DataValidationError as exc:
            assert "void everywhere, so no epoch could be scored" in str(exc)
            assert "i0.png" in str(exc)
            outcomes.add("refused")
    assert outcomes == {"split", "refused"}


def test_no_candidate_with_a_score_is_said_when_the_first_is_kept():
    from automask.training.plan import select_best

    class Record:
        val_score = None

    with pytest.warns(UserWarning, match="no candidate has a validation 'iou' score"):
        assert select_best({"a": Record(), "b": Record()}, "iou") == "a"


def test_a_class_id_beyond_num_classes_says_how_to_allow_it(tmp_path):
    """A tuning mask with a class the training masks lack: the error names the num_classes fix."""
    rng = np.random.default_rng(1)
    image = _save(tmp_path / "i.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = _save(tmp_path / "m.png", _disk(16, 16, 5, 3))
    frame = pd.DataFrame({"image": [image], "label": [mask]})
    with pytest.raises(DataValidationError, match=r"m\.png") as info:
        validate_frame(frame, num_classes=3)
    assert "num_classes=4" in str(info.value)


# -- reading ------------------------------------------------------------------------------

def _png_with_late_exif(array, orientation):
    """PNG bytes whose eXIf chunk comes after the pixel data (as some writers put it)."""
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    img.save(buffer, "PNG", exif=exif)
    data = buffer.getvalue()
    chunks, pos = [], 8
    while pos < len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        chunks.append((data[pos + 4:pos + 8], data[pos:pos + 12 + length]))
        pos += 12 + length
    exif_chunk = [raw for kind, raw in chunks if kind == b"eXIf"]
    assert exif_chunk
    body = b"".join(raw for kind, raw in chunks if kind not in (b"eXIf", b"IEND"))
    return data[:8] + body + exif_chunk[0] + chunks[-1][1]


def test_png_with_exif_after_the_pixels_has_one_size_everywhere(tmp_path):
    """A PNG whose eXIf follows IDAT: header size, decoded image and its mask agree."""
    rng = np.random.default_rng(2)
    path = tmp_path / "late.png"
    path.write_bytes(_png_with_late_exif(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8), 6))
    shown = read_image(path).shape[:2]
    assert image_size(path) == shown
    mask = np.zeros(shown, dtype=np.uint8)
    mask[: shown[0] // 2] = 255
    frame = pd.DataFrame({"image": [str(path)], "label": [_save(tmp_path / "m.png", mask)]})
    spec = validate_frame(frame)
    item = SegmentationDataset(spec, 48)[0]
    assert tuple(item["original_size"].tolist()) == shown


def test_a_16_bit_binary_mask_at_full_scale_trains_as_binary(tmp_path):
    """A 16-bit 0/65535 mask is a binary mask (foreground 65535), like 8-bit 0/255."""
    rng = np.random.default_rng(3)
    image = _save(tmp_path / "i.png", rng.integers(0, 255, (20, 28, 3), dtype=np.uint8))
    eight = _disk(20, 28, 7)
    mask = _save(tmp_path / "m16.png", eight.astype(np.uint16) * 257)
    assert Image.open(mask).mode.startswith("I")
    spec = validate_frame(pd.DataFrame({"image": [image], "label": [mask]}))
    assert spec.task == "binary"
    target = SegmentationDataset(spec, 28)[0]["target"][:20, :28].numpy()
    np.testing.assert_array_equal(target, (eight > 0).astype(np.int64))


def test_rows_sharing_an_index_label_are_told_apart_in_errors(tmp_path):
    """A frame with a repeated index label (pd.concat): each bad row is named by its position."""
    rng = np.random.default_rng(4)
    image = _save(tmp_path / "i.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = _save(tmp_path / "m.png", _disk(16, 16, 5))
    good = pd.DataFrame({"image": [image], "label": [mask]})
    bad = pd.DataFrame({"image": [image], "label": [str(tmp_path / "absent.png")]})
    frame = pd.concat([good, bad])  # both rows have index label 0
    with pytest.raises(DataValidationError, match=r"absent\.png") as info:
        validate_frame(frame)
    assert "row 0 (position 1)" in str(info.value)


def test_0_255_masks_beside_0_1_masks_with_void_read_255_as_void(tmp_path):
    """Where 0/1 masks use 255 as ignore, a mask holding only 0 and 255 is background + void
    (its 255 pixels are ignored, as in the others), not a 0/255 foreground mask."""
    rows = []
    for i in range(3):
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 1
        mask[:, :2] = 255  # void border
        if i == 2:
            mask[mask == 1] = 0  # only background and void left
        image = np.full((16, 16, 3), 40 * i, np.uint8)
        rows.append({"image": _save(tmp_path / f"i{i}.png", image),
                     "label": _save(tmp_path / f"m{i}.png", mask)})
    with pytest.warns(UserWarning, match="255 is read as ignore"):
        spec = validate_frame(pd.DataFrame(rows), image_col="image", label_col="label")
    assert spec.task == "binary"
    target = SegmentationDataset(spec, input_size=16)[2]["target"]  # the {0, 255} mask
    assert int((target == 1).sum()) == 0  # no void pixel became foreground
    assert int((target == 255).sum()) >= 16 * 2  # the void border is ignored


def test_class_names_naming_the_void_label_are_refused(tmp_path):
    """class_names that name the void id as a class (CamVid's "Unlabelled" = 11) are a
    ConfigError naming both, instead of a class that can never be trained."""
    mask = np.zeros((16, 16), np.uint8)
    mask[2:6, 2:6], mask[8:12, 8:12], mask[:, :1] = 1, 2, 3  # classes 0-2, void 3
    frame = pd.DataFrame([{"image": _save(tmp_path / "i.png", np.zeros((16, 16, 3), np.uint8)),
                           "label": _save(tmp_path / "m.png", mask)}])
    names = ["background", "road", "car", "void"]
    with pytest.raises(ConfigError, match=r"void_label=3 .*'void'"):
        validate_frame(frame, class_names=names, void_label=3)
    spec = validate_frame(frame, class_names=names[:3], void_label=3)
    assert spec.num_classes == 3 and spec.class_names == names[:3]


def test_a_void_name_among_the_class_names_gets_advice_that_works(tmp_path):
    """A colour table with its void row in the middle (CamVid's Kaggle class_dict.csv
    puts "Void" before "Wall") was told to leave the name out "(e.g. class_names[:1] when
    it is the last)", which drops the classes after it or shifts their names. The error
    says that the void id must come after the classes, and following it (the void row
    last, void_label its id, the other names) validates with the void pixels ignored."""
    colours = {"sky": (128, 128, 128), "void": (0, 0, 0), "road": (128, 64, 128),
               "car": (64, 0, 128)}
    layout = np.zeros((16, 16), np.uint8)  # 0 sky, 1 void, 2 road, 3 car
    layout[:, 8:], layout[:4], layout[12:, :4] = 2, 1, 3
    picture = np.zeros((16, 16, 3), np.uint8)
    for k, colour in enumerate(colours.values()):
        picture[layout == k] = colour
    frame = pd.DataFrame([{"image": _save(tmp_path / "i.png", np.zeros((16, 16, 3), np.uint8)),
                           "label": _save(tmp_path / "m.png", picture)}])
    table = {colour: k for k, colour in enumerate(colours.values())}
    with pytest.raises(ConfigError) as info:
        validate_frame(frame, color_map=table, class_names=list(colours), void_label=1)
    says = str(info.value)
    assert "('void') of 4, before 'road'" in says and "move the void row last" in says
    assert "void_label=3" in says and "class_names[:" not in says
    moved = {colours["sky"]: 0, colours["road"]: 1, colours["car"]: 2,
             colours["void"]: 3}  # the void row moved last
    spec = validate_frame(frame, color_map=moved, class_names=["sky", "road", "car"],
                          void_label=3)
    assert spec.task == "multiclass" and spec.num_classes == 3
    target = SegmentationDataset(spec, input_size=16)[0]["target"]
    assert int((target == IGNORE_INDEX).sum()) == int((layout == 1).sum())
    assert int((target == 1).sum()) == int((layout == 2).sum())
    assert int((target == 2).sum()) == int((layout == 3).sum())


def test_a_row_whose_mask_is_its_own_image_file_is_refused(tmp_path):
    """A label column naming the image itself (the same path, or a link to it) would train
    the model on mask -> mask; the row is refused, named, before any work."""
    rng = np.random.default_rng(5)
    good = {"image": _save(tmp_path / "i0.png", rng.integers(0, 255, (16, 16), dtype=np.uint8)),
            "label": _save(tmp_path / "m0.png", _disk(16, 16, 5))}
    mask = _save(tmp_path / "m1.png", _disk(16, 16, 4))
    link = tmp_path / "link.png"
    link.symlink_to(mask)
    for image in (mask, str(link)):
        frame = pd.DataFrame([good, {"image": image, "label": mask}], index=["a", "b"])
        with pytest.raises(DataValidationError, match="the mask is the row's image file") as info:
            validate_frame(frame)
        assert "row 'b'" in str(info.value) and "m1.png" in str(info.value)
    validate_frame(pd.DataFrame([good]))  # separate files pass


def test_a_mask_replaced_by_one_of_another_size_after_the_check_is_named_by_its_row(tmp_path):
    """A mask file swapped for one of another size between the check and the read: the
    error names the row as the user wrote it (5, not np.int64(5)) and says the file
    changed, as for an image."""
    rng = np.random.default_rng(6)
    rows = [{"image": _save(tmp_path / f"i{i}.png",
                            rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
             "label": _save(tmp_path / f"m{i}.png", _disk(16, 16, 5))} for i in range(2)]
    spec = validate_frame(pd.DataFrame(rows, index=[4, 5]))
    _save(tmp_path / "m1.png", _disk(12, 20, 4))  # replaced after the check
    dataset = SegmentationDataset(spec, 16)
    dataset[0]
    with pytest.raises(DataValidationError) as info:
        dataset[1]
    message = str(info.value)
    assert message.startswith("row 5 ") and "m1.png" in message
    assert "12x20 (H x W) now" in message and "replaced meanwhile" in message


def test_one_id_above_the_classes_in_every_bad_row_offers_void_label(tmp_path):
    """CamVid's case: 11 names or num_classes=11, masks holding 0-10 and the void 11. The
    refusal offers void_label=11 beside num_classes=12 (which would learn the void as a
    class); ids beyond one void get no such offer."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(3):
        mask = rng.integers(0, 3, (16, 16), dtype=np.uint8)
        mask[:2] = 3  # the void
        rows.append({"image": _save(tmp_path / f"i{i}.png",
                                    rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
                     "label": _save(tmp_path / f"m{i}.png", mask)})
    frame = pd.DataFrame(rows)
    for kwargs in ({"num_classes": 3}, {"class_names": ["a", "b", "c"]}):
        with pytest.raises(DataValidationError, match=r"pass void_label=3 \(hyperparameter "
                                                      r"data\.void_label, --void-label 3\)"):
            validate_frame(frame, **kwargs)
    assert validate_frame(frame, num_classes=3, void_label=3).num_classes == 3
    with pytest.raises(DataValidationError) as info:
        validate_frame(frame, num_classes=2)  # ids 2 and 3 beyond: not one void
    assert "void_label" not in str(info.value)


def test_classes_drawn_as_spread_grey_levels_are_refused_with_the_value_map_that_reads_them(
        tmp_path):
    """Masks of classes drawn visible (0/85/170/255): the refusal offers the value map of
    the data's grey levels, which then reads them as classes 0-3; many grey levels (a
    soft mask) get no such offer."""
    rng = np.random.default_rng(8)
    rows = []
    for i in range(3):
        levels = rng.integers(0, 4 if i else 2, (16, 16)) * 85  # mask 0 holds only 0 and 85
        rows.append({"image": _save(tmp_path / f"i{i}.png",
                                    rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
                     "label": _save(tmp_path / f"m{i}.png", levels.astype(np.uint8))})
    frame = pd.DataFrame(rows)
    with pytest.raises(DataValidationError,
                       match=r"pass color_map=\{0: 0, 85: 1, 170: 2, 255: 3\} to read the 4 "):
        validate_frame(frame)
    spec = validate_frame(frame, color_map={0: 0, 85: 1, 170: 2, 255: 3})
    assert spec.task == "multiclass" and spec.num_classes == 4
    soft = rng.integers(0, 256, (16, 16)).astype(np.uint8)  # 200-odd grey levels
    _save(tmp_path / "m1.png", soft)
    with pytest.raises(DataValidationError) as info:
        validate_frame(frame)
    assert "grey levels" not in str(info.value)
