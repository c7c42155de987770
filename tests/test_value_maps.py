"""Value maps: ``color_map={value: class_id}`` renumbers the values of grey and
palette-index masks as they are read (ADE20K's and LoveDA's void 0 below classes 1..K,
sparse label values), through fit, save/load, evaluate, score_folders and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask.data.io import (
    class_colors,
    color_map_from_rows,
    color_map_rows,
    dataset_values,
    is_value_map,
    read_mask,
    write_values,
)
from automask.data import validate_frame
from automask.data.validation import check_color_map
from automask.datasets import read_color_map
from automask.errors import ConfigError, DataValidationError
from automask.metrics import score_folders
from automask.metrics.folders import read_target

from cli_process import run_automask

# ADE20K-style: 0 is void ("other"), classes 1..3 -> ids 0..2, void 255 (always ignored)
ADE = {0: 255, 1: 0, 2: 1, 3: 2}


def _ade_mask(shift: int = 0) -> np.ndarray:
    """(24, 30) uint8 mask: a void band on top, then classes 1, 2, 3 as vertical bands."""
    mask = np.ones((24, 30), np.uint8)
    mask[:, 10 + shift:20] = 2
    mask[:, 20:] = 3
    mask[:4] = 0
    return mask


def test_read_mask_renumbers_grey_palette_16bit_and_npy_masks(tmp_path):
    mask = _ade_mask()
    expected = np.array([255, 0, 1, 2], np.uint8)[mask]
    Image.fromarray(mask).save(tmp_path / "grey.png")
    palette = Image.fromarray(mask, mode="L").convert("P")  # indices = values
    palette.putpalette([200, 10, 10] * 256)  # every index the same colour: indices count
    palette.save(tmp_path / "palette.png")
    np.save(tmp_path / "array.npy", mask.astype(np.int32))
    for name in ("grey.png", "palette.png", "array.npy"):
        got = read_mask(tmp_path / name, color_map=ADE)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), name
        # score_folders reads ground truths (.npy ones through their own path) alike
        assert np.array_equal(read_target(tmp_path / name, ADE), expected), name
    # 16-bit ids (values above 255), as some data sets store them
    wide = (mask.astype(np.uint16) * 1000)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    got = read_mask(tmp_path / "wide.png", color_map={0: 255, 1000: 0, 2000: 1, 3000: 2})
    assert np.array_equal(got, expected)
    assert np.array_equal(read_mask(tmp_path / "grey.png"), mask)  # without it: as stored


def test_full_scale_16bit_masks_take_either_key_255_or_65535(tmp_path):
    """A 0/65535 mask reads as 0/255; a map written for its stored values applies too."""
    mask = np.zeros((6, 8), np.uint16)
    mask[2:, 3:] = 65535
    Image.fromarray(mask).save(tmp_path / "wide.png")
    np.save(tmp_path / "wide.npy", mask)
    expected = (mask > 0).astype(np.uint8)
    for name in ("wide.png", "wide.npy"):
        for value_map in ({0: 0, 65535: 1}, {0: 0, 255: 1}):
            got = read_mask(tmp_path / name, color_map=value_map)
            assert np.array_equal(got, expected), (name, value_map)
            assert np.array_equal(read_target(tmp_path / name, value_map), expected), name
    with pytest.raises(DataValidationError, match="missing from color_map: 255"):
        read_mask(tmp_path / "wide.png", color_map={0: 0, 1: 1})


def test_values_missing_from_a_value_map_are_named(tmp_path):
    mask = _ade_mask()
    mask[0, 0] = 7  # above every key
    Image.fromarray(mask).save(tmp_path / "m.png")
    with pytest.raises(DataValidationError, match=r"m\.png holds values missing from "
                                                  r"color_map: 3, 7 \(a value map"):
        read_mask(tmp_path / "m.png", color_map={0: 255, 1: 0, 2: 1})
    np.save(tmp_path / "neg.npy", np.array([[-1, 0], [1, 2]], np.int16))  # not wrapped
    with pytest.raises(DataValidationError, match=r"missing from color_map: -1 \(a value"):
        read_mask(tmp_path / "neg.npy", color_map={0: 0, 1: 1, 2: 2})
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "colour.png")  # a value map has no colours
    with pytest.raises(DataValidationError, match="is a colour"):
        read_mask(tmp_path / "colour.png", color_map={0: 0, 200: 1})


@pytest.mark.parametrize("bad, match", [
    ({0: 0, (1, 1, 1): 1}, "mixes colours"),
    ({70000: 1}, r"mask value in \[0, 65535\]"),
    ({-1: 1}, "got -1: 1"),
    ({True: 1}, "got True: 1"),
    ({1: 256}, "got 1: 256"),
    ({1.0: 1}, "got 1.0: 1"),
])
def test_bad_value_maps_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        check_color_map(bad)


def test_dataset_values_read_the_map_backwards_and_read_back_as_the_ids(tmp_path):
    ids = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    cases = [
        (ADE, np.array([1, 2, 3], np.uint8)),
        ({0: 255, 1000: 0, 2000: 1, 3000: 2}, np.array([1000, 2000, 3000], np.uint16)),
        ({5: 1, 7: 0, 9: 2, 4: 0}, np.array([7, 5, 9], np.uint8)),  # merged: first listed
        ({(0, 0, 0): 0, (9, 9, 9): 255, (200, 10, 10): 1, (0, 90, 0): 2},
         np.array([[0, 0, 0], [200, 10, 10], [0, 90, 0]], np.uint8)),
    ]
    for i, (color_map, expected) in enumerate(cases):
        table = dataset_values(color_map, 3)
        assert table.dtype == expected.dtype and np.array_equal(table, expected), color_map
        path = write_values(tmp_path / f"{i}.png", table[ids])
        assert np.array_equal(read_mask(path, color_map=color_map), ids), color_map
    with pytest.raises(ConfigError, match="without a color_map"):
        dataset_values(None, 2)
    with pytest.raises(ConfigError, match=r"class id\(s\) \[2\] have no value"):
        dataset_values({0: 0, 1: 1}, 3)


def test_value_maps_and_colour_maps_round_trip_as_json_rows():
    colours = {(128, 64, 128): 0, (0, 0, 0): 255}
    for cmap in (ADE, colours, {np.int64(5): np.int64(1)}):
        rows = json.loads(json.dumps(color_map_rows(cmap)))
        assert color_map_from_rows(rows) == cmap
    assert color_map_from_rows([]) is None and color_map_rows(None) == []
    assert is_value_map(ADE) and not is_value_map(colours) and not is_value_map(None)
    # a value map gives the palette no colours (its keys are no colours)
    assert np.array_equal(class_colors(3, ADE), class_colors(3))
    assert tuple(class_colors(3, colours)[0]) == (128, 64, 128)


def test_value_lines_in_a_colour_table_file(tmp_path):
    (tmp_path / "v.txt").write_text("# ADE-like\n0 255\n1,0\n2 1\n3 2\n")
    assert read_color_map(tmp_path / "v.txt") == (ADE, None)
    for text, match in (("0 255\n1 2 3 4\n", r"line 2: expected VALUE CLASS_ID"),
                        ("1 0\n1 1\n", "value 1 is listed twice"),
                        ("70000 1\n", "mask value 70000 is not in 0-65535"),
                        ("1 2 3 4\n5 6\n", r"line 2: expected R G B CLASS_ID")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(DataValidationError, match=match):
            read_color_map(tmp_path / "bad.txt")


def _ade_data(root):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i in range(6):
        mask = _ade_mask(shift=i % 3)
        image = (rng.random((24, 30, 3)) * 40 + mask[..., None] * 50).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
        rows.append({"image": str(root / "images" / f"{i}.png"),
                     "label": str(root / "masks" / f"{i}.png")})
    return pd.DataFrame(rows)


def test_fit_with_the_advised_value_map_trains_saves_and_scores_alike(tmp_path):
    """void_label=0 below classes 1..3 is refused with a value map; fitting with it trains
    three classes with the void ignored, the map survives save and load, predictions hold
    class ids, and score_folders with the map scores them as evaluate does."""
    from automask import SemanticSegmentor

    df = _ade_data(tmp_path / "ade")
    hp = {"optim.max_epochs": 1, "model.input_size": 32}
    names = ["other", "wall", "floor", "ceiling"]
    with pytest.raises(ConfigError, match=r"color_map=\{0: 255, \*\*\{v: v - 1 for v in "
                                          r"range\(1, 4\)\}\}.*'other' out of class_names"):
        SemanticSegmentor(path=tmp_path / "r0").fit(
            df, presets="tiny", hyperparameters={**hp, "data.void_label": 0},
            class_names=names)
    assert not (tmp_path / "r0").exists()
    seg = SemanticSegmentor(path=tmp_path / "run").fit(
        df, presets="tiny", hyperparameters=hp, color_map={0: 255, **{v: v - 1 for v in
                                                                       range(1, 4)}},
        class_names=names[1:])
    assert (seg.task_, seg.classes_, seg.color_map_) == ("multiclass", names[1:], ADE)
    loaded = SemanticSegmentor.load(tmp_path / "run")
    assert loaded.color_map_ == ADE and all(type(k) is int for k in loaded.color_map_)
    scores = loaded.evaluate(df)
    assert len(scores["iou_per_class"]) == 3
    out = tmp_path / "pred"
    out.mkdir()
    for i, pred in enumerate(loaded.predict(df)):
        assert pred.shape == (24, 30) and set(np.unique(pred)) <= {0, 1, 2}
        Image.fromarray(pred).save(out / f"{i}.png")  # class ids, as predict writes them
    # the dataset's own values: classes 1..3 as the masks held them, read back as the ids
    ids = loaded.predict(df)
    values = loaded.predict(df, values="dataset")
    assert all(np.array_equal(v, ade + 1) for v, ade in zip(values, ids))
    written = loaded.predict(df, save_to=tmp_path / "as_ade", values="dataset")
    for path, expected in zip(written["label"], ids):
        with Image.open(path) as picture:
            assert picture.mode == "L"
            assert np.array_equal(np.array(picture), expected + 1)
        assert np.array_equal(read_mask(path, color_map=ADE), expected)
    with pytest.raises(ConfigError, match="values must be one of"):
        loaded.predict(tmp_path / "nowhere.csv", values="original")  # before any reading
    folder = score_folders(out, tmp_path / "ade" / "masks", color_map=ADE)
    assert folder["n_images"] == 6
    assert folder["miou"] == pytest.approx(scores["miou"], abs=1e-9)
    assert folder["iou_per_class"] == pytest.approx(scores["iou_per_class"], abs=1e-9)
    # without the map the ground truths' void 0 is class 0: another score
    plain = score_folders(out, tmp_path / "ade" / "masks", task="multiclass",
                          num_classes=4)
    assert len(plain["iou_per_class"]) == 4


def test_cli_score_reads_value_lines_for_the_ground_truths_only(tmp_path):
    df = _ade_data(tmp_path / "ade")
    truth = [np.array([255, 0, 1, 2], np.uint8)[read_mask(p)] for p in df["label"]]
    (tmp_path / "pred").mkdir()
    for i, ids in enumerate(truth):  # perfect predictions, as class ids
        Image.fromarray(np.where(ids == 255, 0, ids).astype(np.uint8)).save(
            tmp_path / "pred" / f"{i}.png")
    (tmp_path / "ade.txt").write_text("0 255\n1 0\n2 1\n3 2\n")
    result = run_automask(
        "score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "ade" / "masks"),
        "--color-map", str(tmp_path / "ade.txt"), "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["miou"] == 1.0 and got["iou_per_class"] == [1.0, 1.0, 1.0]


def _binary_frame(root, fill: float, values=(0, 255)):
    """Three binary masks whose foreground (``values[1]``) covers ``fill`` of each."""
    root.mkdir(parents=True)
    rows = []
    for i in range(3):
        mask = np.full((20, 20), values[0], np.uint8)
        mask[: int(20 * fill) + i % 2] = values[1]
        Image.fromarray(np.dstack([mask] * 3)).save(root / f"{i}.png")
        Image.fromarray(mask).save(root / f"{i}_m.png")
        rows.append({"image": str(root / f"{i}.png"), "label": str(root / f"{i}_m.png")})
    return pd.DataFrame(rows)


def test_masks_that_are_mostly_foreground_get_the_value_map_that_inverts_them(tmp_path):
    """ISBI 2012's masks mark membranes with 0 between cells of 255: the foreground is
    78% of every mask. A warning says so and gives the value map that inverts them;
    following it, the foreground is the membranes and nothing is said."""
    import warnings

    from automask.data.validation import warn_training_issues

    for values, fix in (((0, 255), "color_map={0: 1, 255: 0}"),
                        ((0, 1), "color_map={0: 1, 1: 0, 255: 255}")):
        frame = _binary_frame(tmp_path / f"v{values[1]}", 0.8, values)
        with pytest.warns(UserWarning, match=r"foreground covers 8\d% of the training masks"
                                             r"(.|\n)*mark the object with 0") as record:
            warn_training_issues(validate_frame(frame))
        message = next(str(w.message) for w in record if "foreground covers" in str(w.message))
        assert fix in message
        inverted = validate_frame(frame, color_map=eval(fix.split("=", 1)[1]))
        assert inverted.stats["foreground"].max() < 0.25
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert warn_training_issues(inverted) == []
    with warnings.catch_warnings():  # large objects, not most of every mask: nothing said
        warnings.simplefilter("error")
        assert warn_training_issues(validate_frame(_binary_frame(tmp_path / "half", 0.6))) == []


@pytest.mark.shared
def test_isbi_membranes_are_flagged_and_the_other_binary_sets_are_not():
    import warnings

    from automask.data.validation import warn_training_issues
    from automask.datasets import from_folders

    from conftest import shared_path

    for name in ("kvasir_seg", "ph2_skin_lesion", "aerial_roads", "isbi2012_em_membranes"):
        root = shared_path("data", name)
        spec = validate_frame(from_folders(root / "images", root / "masks"))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            warn_training_issues(spec)
        flagged = any("foreground covers" in str(w.message) for w in record)
        assert flagged == (name == "isbi2012_em_membranes"), name


def test_names_found_beside_the_masks_follow_the_value_map(tmp_path, caplog):
    """A classes.txt beside ADE20K-style masks names the void value 0 too ("other"): when a
    value map renumbers the masks, fit takes the names by class id and drops the void's;
    a map that merges named values takes no names (rather than wrong ones)."""
    from automask import SemanticSegmentor
    from automask.datasets import from_folders

    _ade_data(tmp_path / "ade")
    (tmp_path / "ade" / "masks" / "classes.txt").write_text("other\nwall\nfloor\nceiling\n")
    df = from_folders(tmp_path / "ade" / "images", tmp_path / "ade" / "masks")
    assert df.attrs["class_names"] == ["other", "wall", "floor", "ceiling"]
    hp = {"optim.max_epochs": 1, "model.input_size": 32}
    caplog.set_level("INFO", logger="automask")
    seg = SemanticSegmentor(path=tmp_path / "run").fit(df, presets="tiny", hyperparameters=hp,
                                                       color_map=ADE)
    assert seg.classes_ == ["wall", "floor", "ceiling"]
    assert "wall, floor, ceiling" in caplog.text
    swapped = {0: 255, 1: 1, 2: 0, 3: 2}  # ids in another order: the names follow them
    seg = SemanticSegmentor(path=tmp_path / "run2").fit(df, presets="tiny", hyperparameters=hp,
                                                        color_map=swapped)
    assert seg.classes_ == ["floor", "wall", "ceiling"]
    merged = {0: 255, 1: 0, 2: 0, 3: 1}  # wall and floor as one class: no name fits it
    seg = SemanticSegmentor(path=tmp_path / "run3").fit(df, presets="tiny", hyperparameters=hp,
                                                        color_map=merged)
    assert seg.classes_ == ["background", "foreground"]  # two classes: a binary task


def test_names_of_the_classes_themselves_are_kept_under_a_value_map():
    """Names that are not one per mask value ({0, 128} masks read through {0: 0, 128: 1},
    named background and object) are the classes' own: the map leaves them as they are."""
    from automask.datasets.folders import found_beside

    frame = pd.DataFrame({"image": [], "label": []})
    frame.attrs["class_names"] = ["background", "object"]
    assert found_beside(frame, None, None, {0: 0, 128: 1}, None)[0] == ["background", "object"]
    frame.attrs["class_names"] = ["other", "wall", "floor"]  # one per value 0..2
    assert found_beside(frame, None, None, {0: 255, 1: 0, 2: 1}, None)[0] == ["wall", "floor"]


def test_values_past_8_bits_name_the_way_out(tmp_path):
    """16-bit masks with 65535 as void were refused without naming the value map that
    takes them; -1 (PyTorch's ignore_index) in .npy masks gets the one way that works."""
    rng = np.random.default_rng(0)
    image = tmp_path / "i.png"
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(image)
    wide = np.zeros((8, 8), np.uint16)
    wide[:4] = 1
    wide[0] = 65535
    Image.fromarray(wide).save(tmp_path / "m16.png")
    frame = pd.DataFrame({"image": [str(image)], "label": [str(tmp_path / "m16.png")]})
    with pytest.raises(DataValidationError, match=r"found 0\.\.65535; pass a value map that "
                                                  r"renumbers them.*\(65535: 255 for an "
                                                  r"ignore value\)"):
        validate_frame(frame)
    spec = validate_frame(frame, color_map={0: 0, 1: 1, 65535: 255})  # the way out works
    assert spec.num_classes == 2
    negative = wide.astype(np.int64)
    negative[0] = -1
    np.save(tmp_path / "m.npy", negative)
    frame["label"] = [str(tmp_path / "m.npy")]
    with pytest.raises(DataValidationError, match=r"found -1\.\.1; negative values .*write "
                                                  r"the masks with 255 for ignored pixels"):
        validate_frame(frame)
