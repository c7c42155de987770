"""Colour tables: R G B CLASS_ID lines, class_dict.csv tables, and from_folders finding them."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from automask import cli
from automask.data import validate_frame
from automask.datasets import from_folders, read_color_map
from automask.datasets.folders import found_beside
from automask.errors import ConfigError, DataValidationError

# CamVid's download from Kaggle, abridged: names in alphabetical order, "Void" among them
CAMVID_TABLE = "name,r,g,b\nAnimal,64,128,64\nRoad,128,64,128\nSky,128,128,128\nVoid,0,0,0\n"
CAMVID = {(64, 128, 64): 0, (128, 64, 128): 1, (128, 128, 128): 2, (0, 0, 0): 3}


@pytest.mark.parametrize(
    ("text", "expected", "names"),
    [
        (CAMVID_TABLE, CAMVID, ["Animal", "Road", "Sky", "Void"]),
        # DeepGlobe's land-cover table: spaces after the commas
        ("name, r, g, b\nurban_land, 0, 255, 255\nunknown, 0, 0, 0\n",
         {(0, 255, 255): 0, (0, 0, 0): 1}, ["urban_land", "unknown"]),
        # capitalised columns in another order, an id column, ids out of row order
        ("B,G,R,Class_ID,Name\n0,0,0,1,rest\n255,255,255,0,road\n",
         {(0, 0, 0): 1, (255, 255, 255): 0}, ["road", "rest"]),
        # quoted names with commas; two colours of one class
        ('name,r,g,b,id\n"car, truck",1,2,3,0\n"car, truck",4,5,6,0\nsky,7,8,9,1\n',
         {(1, 2, 3): 0, (4, 5, 6): 0, (7, 8, 9): 1}, ["car, truck", "sky"]),
        # colours without names; ids that leave a gap name nothing
        ("red,green,blue\n0,0,0\n9,9,9\n", {(0, 0, 0): 0, (9, 9, 9): 1}, None),
        ("r g b id name\n0 0 0 0 a\n9 9 9 2 c\n", {(0, 0, 0): 0, (9, 9, 9): 2}, None),
        # the numbered lines (automask's own layout), comments and a blank line
        ("# R G B class\n0 0 0 0\n\n128,64,128,1  # road\n", {(0, 0, 0): 0, (128, 64, 128): 1},
         None),
    ],
)
def test_colour_tables_are_read(tmp_path, text, expected, names):
    path = tmp_path / "class_dict.csv"
    path.write_text(text, encoding="utf-8-sig")  # with a BOM, as Excel writes CSV
    assert read_color_map(path) == (expected, names)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("name,red,green\na,1,2\n", r"line 1: the header .* has no column b"),
        ("name,r,g,b\na,1,2,x\n", r"line 2: column 'b' is not an integer: 'x'"),
        ("name,r,g,b\na,1,2\n", r"line 2: 3 field\(s\) for the header's 4"),
        ("name,r,g,b\na,1,2,3\nb,1,2,3\n", r"line 3: colour \(1, 2, 3\) is listed twice"),
        ("name,r,g,b\na,1,2,300\n", r"line 2: colour \(1, 2, 300\) is not 8-bit"),
        ("r,g,b,id,name\n1,2,3,0,a\n4,5,6,0,b\n", r"line 3: class id 0 is named both 'a' and 'b'"),
        ("r,g,b,id\n1,2,3,-1\n", r"line 2: class id -1 is negative"),
        ("0 0 0 0\n128 64 x 1\n", r"line 2: expected R G B CLASS_ID \(four integers\)"),
        ("# nothing\n\n", "lists no colour"),
        ("name,r,g,b\n", "lists no colour"),
    ],
)
def test_bad_colour_tables_name_the_file_and_line(tmp_path, text, says):
    path = tmp_path / "colours.csv"
    path.write_text(text)
    with pytest.raises(DataValidationError, match=says) as info:
        read_color_map(path)
    assert "colours.csv" in str(info.value)


def _colour_data(root, colours=CAMVID, count=3):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    palette = np.array(list(colours), np.uint8)
    for i in range(count):
        ids = np.zeros((16, 16), np.int64)
        ids[:, 4:] = 1
        ids[8:, 8 + i:] = 2
        ids[12:, :4] = len(colours) - 1
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(palette[ids]).save(root / "masks" / f"{i}.png")
    return ids


def test_from_folders_takes_the_colour_table_beside_colour_masks(tmp_path):
    ids = _colour_data(tmp_path)
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    assert df.attrs["color_map"] is None  # no table yet
    (tmp_path / "class_dict.csv").write_text(CAMVID_TABLE)  # beside the masks folder
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    assert df.attrs["color_map"] == CAMVID
    assert df.attrs["class_names"] == ["Animal", "Road", "Sky", "Void"]
    spec = validate_frame(df, color_map=df.attrs["color_map"], void_label=3)
    assert spec.num_classes == 3
    # a classes.txt names the classes instead; the table still maps the colours
    (tmp_path / "masks" / "classes.txt").write_text("a\nb\nc\nd\n")
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    assert df.attrs["color_map"] == CAMVID and df.attrs["class_names"] == ["a", "b", "c", "d"]
    # grey masks of class ids: a table beside them is not theirs to apply
    for i in range(3):
        Image.fromarray(ids.astype(np.uint8)).save(tmp_path / "masks" / f"{i}.png")
    (tmp_path / "masks" / "classes.txt").unlink()
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    assert df.attrs["color_map"] is None and df.attrs["class_names"] is None


def test_fit_command_reads_the_table_found_or_given(tmp_path):
    """``automask fit --images --masks`` on colour masks: the class_dict.csv beside them
    (colours and names) is in the frame's attrs, which fit takes through found_beside;
    ``--color-map`` and ``--class-names`` given win."""
    _colour_data(tmp_path)
    (tmp_path / "masks" / "class_dict.csv").write_text(CAMVID_TABLE)
    parser = cli.build_parser()
    folders = ["fit", "--path", str(tmp_path / "run"), "--images", str(tmp_path / "images"),
               "--masks", str(tmp_path / "masks")]
    train, names, hp, color_map = cli._fit_inputs(parser.parse_args(folders))
    assert color_map is None and names is None and len(train) == 3 and hp == {}
    assert found_beside(train, None, names, color_map, None) == (
        ["Animal", "Road", "Sky", "Void"], CAMVID)
    # the void id last: its name is not a class's
    train, names, hp, color_map = cli._fit_inputs(
        parser.parse_args([*folders, "--void-label", "3"]))
    assert hp == {"data.void_label": 3}
    assert found_beside(train, None, names, color_map, 3) == (["Animal", "Road", "Sky"], CAMVID)
    other = tmp_path / "other.txt"
    other.write_text("64 128 64 1\n128 64 128 0\n128 128 128 2\n0 0 0 3\n")
    train, names, _, color_map = cli._fit_inputs(parser.parse_args(
        [*folders, "--color-map", str(other), "--class-names", "w,x,y,z"]))
    assert color_map[(64, 128, 64)] == 1 and names == ["w", "x", "y", "z"]
    assert found_beside(train, None, names, color_map, None) == (names, color_map)
    # a map given without names: the table's names found beside are not its names
    assert found_beside(train, None, None, color_map, None) == (None, color_map)
    (tmp_path / "bad.csv").write_text("name,r,g,b\nx,1,2\n")
    with pytest.raises(cli.AutomaskError, match=r"--color-map: .*bad.csv.* line 2"):
        cli._fit_inputs(parser.parse_args([*folders, "--color-map", str(tmp_path / "bad.csv")]))


def test_a_void_colour_among_the_classes_is_refused_with_the_table_fix(tmp_path):
    """CamVid's table lists "Void" among the classes (alphabetically): the error says how to
    number it in the colour map; both ways it names then fit."""
    _colour_data(tmp_path, count=2)
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    middle = {(64, 128, 64): 0, (0, 0, 0): 1, (128, 64, 128): 2, (128, 128, 128): 3}
    with pytest.raises(ConfigError, match=r"void_label=1 lies among the class ids 0\.\.3 that "
                                          r"color_map gives .* the id 255 in color_map .* "
                                          r"move the void row last"):
        validate_frame(df, color_map=middle, void_label=1)
    last = {(64, 128, 64): 0, (128, 64, 128): 1, (128, 128, 128): 2, (0, 0, 0): 3}
    ignored = {**last, (0, 0, 0): 255}
    for color_map, void in ((last, 3), (ignored, None)):
        spec = validate_frame(df, color_map=color_map, void_label=void)
        assert spec.task == "multiclass" and spec.num_classes == 3


def test_score_reads_colour_coded_ground_truths_through_their_table(tmp_path, capsys):
    """score_folders(color_map=...) and ``automask score`` (the class_dict.csv beside the
    ground truths found by itself) score colour-coded ground truths by class id, against
    automask's palette masks and against predictions saved in the same colours."""
    from automask.data.io import write_mask
    from automask.metrics import score, score_folders

    rng = np.random.default_rng(0)
    palette = np.array(list(CAMVID), np.uint8)
    (tmp_path / "gt").mkdir()
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    truths, preds = [], []
    for i in range(3):
        truth = rng.integers(0, 4, (12, 16))
        pred = np.where(rng.random((12, 16)) < 0.7, truth, rng.integers(0, 4, (12, 16)))
        Image.fromarray(palette[truth]).save(tmp_path / "gt" / f"{i}.png")
        write_mask(tmp_path / "ours" / f"{i}.png", pred, "multiclass", CAMVID)
        Image.fromarray(palette[pred]).save(tmp_path / "theirs" / f"{i}.png")
        truths.append(truth)
        preds.append(pred)
    expected = score(preds, truths, task="multiclass")
    for folder in ("ours", "theirs"):
        got = score_folders(tmp_path / folder, tmp_path / "gt", color_map=CAMVID)
        assert got.pop("n_images") == 3
        assert got == expected
    # a test set holding classes 0 and 1 and the void (3) only: still the table's classes,
    # not a binary task
    (tmp_path / "two").mkdir()
    (tmp_path / "gt_two").mkdir()
    for i, truth in enumerate(truths):
        two = np.where(truth == 2, 3, truth)
        Image.fromarray(palette[two]).save(tmp_path / "gt_two" / f"{i}.png")
        write_mask(tmp_path / "two" / f"{i}.png", (two == 1).astype(np.uint8), "multiclass")
    got = score_folders(tmp_path / "two", tmp_path / "gt_two", color_map=CAMVID, ignore_index=3)
    assert len(got["iou_per_class"]) == 3 and got["iou_per_class"][1] == 1.0
    assert np.isnan(got["iou_per_class"][2])  # Sky: in no mask, never predicted
    with pytest.raises(ValueError, match="colour image"):  # without the map: refused
        score_folders(tmp_path / "ours", tmp_path / "gt", task="multiclass")
    with pytest.raises(ConfigError, match="color_map entries"):
        score_folders(tmp_path / "ours", tmp_path / "gt", color_map={(0, 0): 1})
    (tmp_path / "class_dict.csv").write_text(CAMVID_TABLE)
    # (no --task: a table of four classes is multi-class data, even where the predictions
    # hold only 0 and 1)
    assert cli.main(["score", "--pred", str(tmp_path / "theirs"), "--gt",
                     str(tmp_path / "gt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {**expected, "n_images": 3}
    assert cli.main(["score", "--pred", str(tmp_path / "ours"), "--gt",
                     str(tmp_path / "gt"), "--task", "multiclass"]) == 0
    printed = capsys.readouterr().out
    assert "Animal" in printed and "Void" in printed  # per-class lines named by the table
    assert cli.main(["score", "--pred", str(tmp_path / "two"), "--gt",
                     str(tmp_path / "gt_two"), "--ignore-index", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Sky" in printed and "Void" not in printed  # the void's name, last, left out


def test_colour_masks_without_a_map_are_refused_naming_the_table_found(tmp_path):
    """fit(df) on colour masks without color_map: the error says the map is in df.attrs,
    where from_folders put the table it found."""
    _colour_data(tmp_path, count=2)
    (tmp_path / "class_dict.csv").write_text(CAMVID_TABLE)
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(DataValidationError, match=r"is a colour \(RGB\) image(.|\n)*pass "
                                                  r"color_map=df.attrs\['color_map'\]"):
        validate_frame(df)
    df.attrs["color_map"] = None  # no table found: the colour advice alone
    with pytest.raises(DataValidationError, match="is a colour") as info:
        validate_frame(df)
    assert "df.attrs" not in str(info.value)
    assert validate_frame(df, color_map=CAMVID).num_classes == 4


def test_fit_takes_the_table_and_names_found_beside_the_folders(tmp_path, caplog):
    """fit(from_folders(...)) on colour masks with a class_dict.csv beside them trains
    without color_map or class_names (it refused the colour masks before), says so, and
    predicts and evaluates through the table; names given win over those found."""
    from automask import SemanticSegmentor

    ids = _colour_data(tmp_path)
    (tmp_path / "class_dict.csv").write_text(CAMVID_TABLE)
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    hp = {"optim.max_epochs": 1, "model.input_size": 32, "data.void_label": 3}
    caplog.set_level("INFO", logger="automask")
    seg = SemanticSegmentor(path=tmp_path / "run").fit(df, presets="tiny", hyperparameters=hp)
    assert seg.color_map_ == CAMVID and seg.classes_ == ["Animal", "Road", "Sky"]
    assert "colour table found beside them" in caplog.text
    assert "Animal, Road, Sky" in caplog.text
    assert seg.predict(df.head(1))[0].shape == ids.shape
    assert len(seg.evaluate(df)["iou_per_class"]) == 3
    seg = SemanticSegmentor(path=tmp_path / "run2").fit(
        df, presets="tiny", hyperparameters=hp, class_names=["x", "y", "z"])
    assert seg.classes_ == ["x", "y", "z"] and seg.color_map_ == CAMVID


def test_names_found_beside_that_do_not_fit_the_masks_are_named_by_their_file(tmp_path):
    """fit(df) takes classes.txt's names: when they are too few for the masks' ids, the
    error says whose names they are (the user gave none) and how to give others."""
    from automask import SemanticSegmentor

    ids = _colour_data(tmp_path)  # ids 0..3 as colours
    for i in range(3):
        Image.fromarray(ids.astype(np.uint8)).save(tmp_path / "masks" / f"{i}.png")
    (tmp_path / "masks" / "classes.txt").write_text("background\nroad\ncar\n")
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    assert df.attrs["class_names_from"] == str(tmp_path / "masks" / "classes.txt")
    with pytest.raises(DataValidationError, match=r"outside \[0, 3\)(.|\n)*class names are "
                                                  r"those of .*classes.txt, found beside"):
        SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(df, presets="tiny")
    with pytest.raises(DataValidationError) as info:  # names given: no word of the file
        SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
            df, presets="tiny", class_names=["a", "b", "c"])
    assert "classes.txt" not in str(info.value)
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        df, presets="tiny", class_names=["a", "b", "c", "d"],
        hyperparameters={"optim.max_epochs": 1, "model.input_size": 32})
    assert seg.classes_ == ["a", "b", "c", "d"]


def test_a_void_row_before_other_classes_is_named_with_the_table_it_came_from(tmp_path):
    """A class_dict.csv found beside colour masks, its void row before the last class:
    fit(df) with data.void_label set to that row's id is refused with the way out (the
    row moved last), and, as the names were not given, with the file they came from.
    Before, this ConfigError did not say whose names they were."""
    from automask import SemanticSegmentor
    from automask.errors import ConfigError

    _colour_data(tmp_path)
    (tmp_path / "class_dict.csv").write_text(
        "name,r,g,b\nAnimal,64,128,64\nVoid,0,0,0\nRoad,128,64,128\nSky,128,128,128\n")
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(ConfigError) as info:
        SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
            df, presets="tiny", hyperparameters={"data.void_label": 1})
    says = str(info.value)
    assert "move the void row last and pass void_label=3" in says
    assert f"those of {tmp_path / 'class_dict.csv'}, found beside the masks" in says


def test_the_void_row_of_id_255_keeps_the_other_names(tmp_path):
    """The README advises listing the void colour with the id 255; doing so dropped every
    class name (the names were 0..2 and 255, not consecutive)."""
    path = tmp_path / "class_dict.csv"
    path.write_text("name,r,g,b,id\nBackground,0,0,0,0\nCar,255,0,0,1\nSky,0,0,255,2\n"
                    "Void,0,200,0,255\n")
    colours, names = read_color_map(path)
    assert names == ["Background", "Car", "Sky"]
    assert colours[(0, 200, 0)] == 255 and colours[(255, 0, 0)] == 1


def test_a_classes_txt_line_for_255_names_no_class(tmp_path):
    from automask.datasets.folders import read_class_names

    path = tmp_path / "classes.txt"
    path.write_text("0 background\n1 road\n2 car\n255 void\n")
    assert read_class_names(path) == ["background", "road", "car"]
    path.write_text("0 background\n1 road\n7 car\n8 bus\n9 van\n12 sign\n")
    with pytest.raises(DataValidationError, match=r"class ids 2-6, 10, 11 have no name"):
        read_class_names(path)
