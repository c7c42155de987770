"""Data validation that says what is wrong: leaks, truncated files, empty masks, masks that
do not fit the model's task. Real files, real splits, a real (tiny) fit and evaluate."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask import SemanticSegmentor
from automask.data import SegmentationDataModule, split_spec, validate_frame
from automask.data.validation import duplicate_images, warn_training_issues
from automask.datasets import make_synthetic
from automask.errors import DataValidationError
from conftest import shared_path


def _pairs(root: Path, n: int, empty: set[int] = frozenset(), size=(24, 32)) -> pd.DataFrame:
    """``n`` distinct image/mask PNG pairs; masks of rows in ``empty`` have no foreground."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = (rng.random((*size, 3)) * 255).astype(np.uint8)
        mask = np.zeros(size, np.uint8)
        if i not in empty:
            mask[2: 4 + i % 10, 3: 9 + i % 7] = 255
        Image.fromarray(image).save(root / f"img_{i}.png")
        Image.fromarray(mask).save(root / f"mask_{i}.png")
        rows.append({"image": str(root / f"img_{i}.png"), "label": str(root / f"mask_{i}.png")})
    return pd.DataFrame(rows)


# -- duplicated images never straddle the holdout split ------------------------------------

def test_holdout_split_keeps_every_row_of_an_image_on_one_side(tmp_path):
    frame = _pairs(tmp_path / "d", 12)
    repeated = pd.concat([frame.iloc[[1, 4, 7, 10]]] * 3)  # 4 images, each 3 more times
    data = pd.concat([frame, repeated], ignore_index=True)  # 24 rows, 12 distinct images
    spec = validate_frame(data)
    assert [len(g) for g in duplicate_images(spec)] == [4, 4, 4, 4]
    for seed in range(6):
        train, val = split_spec(spec, 0.3, seed=seed)
        train_images = set(train.frame["image"])
        val_images = set(val.frame["image"])
        assert not train_images & val_images
        assert len(train) + len(val) == 24 and len(val_images) in (3, 4)
        kept = sorted(list(train.frame.index) + list(val.frame.index))
        assert kept == list(range(24))


def test_without_repeats_the_split_is_the_split_of_the_rows(tmp_path):
    from automask.datasets.split import split_positions

    spec = validate_frame(_pairs(tmp_path / "d", 10))
    train, val = split_spec(spec, 0.2, seed=3)
    want_train, want_val = split_positions(10, 0.2, 3, spec.stats["foreground"].to_numpy())
    assert list(train.frame.index) == want_train.tolist()
    assert list(val.frame.index) == want_val.tolist()


def test_repeated_images_and_tuning_overlap_are_named_before_training(tmp_path):
    frame = _pairs(tmp_path / "d", 8)
    data = pd.concat([frame, frame.iloc[[2]], frame.iloc[[2]], frame.iloc[[5]]],
                     ignore_index=True)
    spec = validate_frame(data)
    dm = SegmentationDataModule(spec, input_size=32, batch_size=2, holdout_frac=0.25,
                                num_workers=0)
    with pytest.warns(UserWarning, match="repeat the image") as record:
        dm.setup("fit")
    message = next(str(w.message) for w in record if "repeat" in str(w.message))
    assert message.startswith("3 training row(s)") and "rows 2, 8, 9" in message
    assert frame["image"][2] in message
    assert not set(dm.train_spec.frame["image"]) & set(dm.val_spec.frame["image"])

    tuning = validate_frame(frame.iloc[[0, 5]])
    train = validate_frame(frame.iloc[[1, 2, 3, 5]])
    with pytest.warns(UserWarning, match="also in the training data") as record:
        warn_training_issues(train, tuning)
    assert "1 of the 2 tuning row(s)" in str(record[0].message)
    assert "tuning rows 5" in str(record[0].message)
    # a hard link of a training image is that image (a symlink was told already)
    linked = tmp_path / "linked.png"
    os.link(frame["image"][1], linked)
    tuning = validate_frame(pd.DataFrame({"image": [str(linked)],
                                          "label": [frame["label"][1]]}))
    with pytest.warns(UserWarning, match="1 of the 1 tuning row"):
        warn_training_issues(train, tuning)


# -- truncated images are caught even with their end marker -----------------------------

def _cut_with_marker(data: bytes, fraction: float, fmt: str) -> bytes:
    cut = data[: int(len(data) * fraction)]
    return cut + (b"\xff\xd9" if fmt == "JPEG" else b"\x00\x00\x00\x00IEND\xaeB`\x82")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image_with_its_end_marker_added_back_is_reported(tmp_path, fmt):
    frame = _pairs(tmp_path / "d", 3, size=(96, 128))
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    bad = tmp_path / f"cut{suffix}"
    buffer = io.BytesIO()
    Image.open(frame["image"][1]).save(buffer, fmt)
    bad.write_bytes(_cut_with_marker(buffer.getvalue(), 0.6, fmt))
    with Image.open(bad) as img:
        assert img.size == (128, 96)  # the header still reads fine
    frame.loc[1, "image"] = str(bad)
    with pytest.raises(DataValidationError) as info:
        validate_frame(frame)
    message = str(info.value)
    assert "1 problem(s) in 1 row(s)" in message
    assert f"row 1 [image] {bad}: truncated or corrupt" in message


def test_intact_jpegs_of_every_kind_pass_and_a_cut_progressive_one_does_not(tmp_path):
    frame = _pairs(tmp_path / "d", 4, size=(40, 48))
    pixels = np.asarray(Image.open(frame["image"][0]))
    kinds = {"cmyk": {"mode": "CMYK"}, "gray": {"mode": "L"},
             "progressive": {"mode": "RGB", "progressive": True}}
    for row, (name, options) in enumerate(kinds.items()):
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(pixels).convert(options.pop("mode")).save(path, **options)
        frame.loc[row, "image"] = str(path)
    assert validate_frame(frame).task == "binary"
    data = (tmp_path / "progressive.jpg").read_bytes()
    (tmp_path / "progressive.jpg").write_bytes(_cut_with_marker(data, 0.5, "JPEG"))
    with pytest.raises(DataValidationError, match=r"row 2 \[image\] .*progressive.jpg: trunc"):
        validate_frame(frame)


def test_a_truncated_kvasir_jpeg_is_reported(tmp_path):
    data = shared_path("data", "kvasir_seg")
    image = sorted((data / "images").glob("*.jpg"))[0]
    mask = data / "masks" / f"{image.stem}.png"
    bad = tmp_path / image.name
    bad.write_bytes(_cut_with_marker(image.read_bytes(), 0.7, "JPEG"))
    frame = pd.DataFrame({"image": [str(image), str(bad)], "label": [str(mask), str(mask)]})
    with pytest.raises(DataValidationError, match=r"row 1 \[image\] .*premature end"):
        validate_frame(frame)
    assert validate_frame(frame.iloc[[0]]).task == "binary"  # the intact file passes


# -- empty masks in a binary task ---------------------------------------------------------

def test_empty_masks_are_counted_before_training(tmp_path):
    spec = validate_frame(_pairs(tmp_path / "some", 8, empty={0, 3, 6}))
    with pytest.warns(UserWarning, match="3 of the 8 training masks are empty") as record:
        SegmentationDataModule(spec, input_size=32, batch_size=2, num_workers=0).setup("fit")
    assert "rows 0, 3, 6" in str(record[0].message)

    everything = validate_frame(_pairs(tmp_path / "all", 4, empty={0, 1, 2, 3}))
    assert everything.task == "binary"
    with pytest.warns(UserWarning, match="all 4 training masks are empty"):
        warn_training_issues(everything)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_training_issues(validate_frame(_pairs(tmp_path / "none", 4))) == []


def _id_masks(root: Path, values_per_row: list[tuple[int, ...]]) -> pd.DataFrame:
    """Image/mask PNG pairs whose masks hold the given values (0 everywhere else)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rows = []
    for i, values in enumerate(values_per_row):
        image = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
        mask = np.zeros((24, 32), np.uint8)
        for j, value in enumerate(values):
            mask[2 + 5 * j: 6 + 5 * j, 3 + i: 12 + i] = value
        Image.fromarray(image).save(root / f"img_{i}.png")
        Image.fromarray(mask).save(root / f"mask_{i}.png")
        rows.append({"image": str(root / f"img_{i}.png"), "label": str(root / f"mask_{i}.png")})
    return pd.DataFrame(rows)


def test_class_ids_that_no_training_mask_labels_are_named(tmp_path):
    # one foreground value 38: read as 39 classes, 37 of which no mask labels
    labels = _id_masks(tmp_path / "labels", [(38,), (38,), (), (38,)])
    spec = validate_frame(labels)
    assert (spec.task, spec.num_classes) == ("multiclass", 39)
    with pytest.warns(UserWarning, match=r"37 of the 39 classes label no pixel of any training "
                      r"mask \(class id\(s\) 1-37\)") as record:
        SegmentationDataModule(spec, input_size=32, batch_size=2, num_workers=0).setup("fit")
    message = str(record[0].message)
    assert "color_map={0: 0, 38: 1, 255: 255}" in message
    # the mapping it gives reads the same masks as a binary task
    remapped = validate_frame(labels, color_map={0: 0, 38: 1})
    assert (remapped.task, remapped.num_classes) == ("binary", 2)

    # a rare class missing from the training masks: named, without the hint about labels
    rare = validate_frame(_id_masks(tmp_path / "rare", [(1, 2), (1,), (2, 4), (1, 4)]),
                          class_names=["bg", "road", "car", "sign", "tree"])
    with pytest.warns(UserWarning, match=r"1 of the 5 classes .* \(class id\(s\) 3 \('sign'\)\)") \
            as record:
        assert len(warn_training_issues(rare)) == 1
    assert "color_map" not in str(record[0].message)
    # ids 5 and 7 among 0-7 (half missing, with the ignore index beside them)
    sparse = validate_frame(_id_masks(tmp_path / "sparse", [(5, 255), (7,), (5, 7)]))
    with pytest.warns(UserWarning, match=r"5 of the 8 classes .* \(class id\(s\) 1-4, 6\)") \
            as record:
        warn_training_issues(sparse)
    assert "color_map={0: 0, 5: 1, 7: 2, 255: 255}" in str(record[0].message)
    # following it (the masks hold 255 as void too) reads them as three classes and void
    followed = validate_frame(_id_masks(tmp_path / "sparse", [(5, 255), (7,), (5, 7)]),
                              color_map={0: 0, 5: 1, 7: 2, 255: 255})
    assert (followed.task, followed.num_classes) == ("multiclass", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_training_issues(followed) == []

    with warnings.catch_warnings():  # every class labelled somewhere: nothing to say
        warnings.simplefilter("error")
        assert warn_training_issues(
            validate_frame(_id_masks(tmp_path / "all", [(1, 2), (3,), (2, 255)]))) == []


# -- masks that do not fit the model's task -----------------------------------------------

def test_binary_masks_are_rejected_for_a_multiclass_task(tmp_path):
    frame = _pairs(tmp_path / "d", 3)
    with pytest.raises(DataValidationError) as info:
        validate_frame(frame, num_classes=4)
    message = str(info.value)
    assert "3 problem(s) in 3 row(s)" in message
    assert f"row 0 [label] {frame['label'][0]}: mask values {{0, 255}}" in message
    assert "num_classes=4 reads 255 as 'ignore'" in message
    # class ids with 255 as ignore, or a void label, are still fine
    ids = tmp_path / "ids.png"
    Image.fromarray(np.array([[0, 2] * 16] * 24, np.uint8)).save(ids)
    mixed = frame.assign(label=[frame["label"][0], str(ids), frame["label"][2]])
    assert validate_frame(mixed, num_classes=4).task == "multiclass"
    assert validate_frame(frame, num_classes=2).task == "binary"


def test_a_multiclass_model_refuses_to_evaluate_binary_masks(tmp_path):
    train = make_synthetic(8, size=(48, 64), num_classes=3, seed=0, root=tmp_path / "mc")
    binary = make_synthetic(3, size=(48, 64), num_classes=2, seed=1, root=tmp_path / "bin")
    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0)
    seg.fit(train, presets="tiny",
            hyperparameters={"optim.max_epochs": 1, "model.input_size": 64})
    assert seg.evaluate(train)["miou"] >= 0.0
    with pytest.raises(DataValidationError, match="num_classes=3 reads 255 as 'ignore'") as info:
        seg.evaluate(binary)
    assert binary["label"][0] in str(info.value)


# -- predict(save_to=...) never overwrites an input mask, however its path is spelt -------

@pytest.mark.parametrize("spelling", ["path", "home"])
def test_an_input_mask_given_as_a_path_object_or_with_tilde_is_never_overwritten(
        tmp_path, monkeypatch, spelling):
    from automask.prediction import images_spec, mask_destinations

    monkeypatch.setenv("HOME", str(tmp_path))
    frame = _pairs(tmp_path / "d", 2).set_axis(["a", "b"])
    out = tmp_path / "out"
    out.mkdir()
    kept = out / "img_1.png"  # where row "b"'s predicted mask would go: its own mask
    kept.write_bytes(Path(frame["label"]["b"]).read_bytes())
    label = Path(kept) if spelling == "path" else "~/out/img_1.png"
    frame["label"] = pd.Series([Path(frame["label"]["a"]), label], index=frame.index,
                               dtype=object)
    spec = images_spec(frame, "image", None)
    with pytest.raises(DataValidationError, match="would overwrite input files") as info:
        mask_destinations(spec, out, root=None, label_col="label", overwrite=True)
    assert f"{kept} (mask of row 'b')" in str(info.value)


def test_a_missing_path_in_a_list_is_reported_as_missing(tmp_path):
    from automask.prediction import as_frame, images_spec

    frame = _pairs(tmp_path / "d", 2)
    data, root = as_frame([frame["image"][0], None, Path(frame["image"][1])], "image")
    with pytest.raises(DataValidationError) as info:
        images_spec(data, "image", root)
    assert "1 problem(s) in 1 row(s)" in str(info.value)
    assert "row 1 [image]: missing image path (None)" in str(info.value)


# -- a holdout split that cannot be made fails before the fit starts --------------------

def test_an_impossible_holdout_fails_before_any_model_is_built(tmp_path, monkeypatch):
    import automask.training.builder as builder

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the data was found unusable")

    monkeypatch.setattr(builder, "build_candidate_model", no_model)
    frame = _pairs(tmp_path / "d", 3)
    run = tmp_path / "run"
    hp = {"optim.max_epochs": 1, "model.input_size": 32}
    with pytest.raises(DataValidationError, match=r"from 1 row\(s\)"):
        SemanticSegmentor(path=run, verbosity=0).fit(frame.iloc[:1], presets="tiny",
                                                     hyperparameters=hp)
    with pytest.raises(DataValidationError, match="show only one image") as info:
        SemanticSegmentor(path=run, verbosity=0).fit(
            pd.concat([frame.iloc[[1]]] * 3, ignore_index=True), presets="tiny",
            hyperparameters=hp)
    assert frame["image"][1] in str(info.value)
    assert not run.exists()


# -- train_test_split names the row whose mask it cannot read ---------------------------

def test_train_test_split_names_an_unreadable_mask_and_checks_its_size_first(tmp_path):
    from automask.datasets import train_test_split

    frame = _pairs(tmp_path / "d", 5).set_axis(list("abcde"))
    not_png = tmp_path / "notes.png"
    not_png.write_text("not an image")
    bad = frame.assign(label=[*frame["label"][:3], str(not_png), None])
    with pytest.raises(DataValidationError) as info:
        train_test_split(bad, test_size=0.4)
    assert f"row 'd' [label] {not_png}: mask cannot be read" in str(info.value)
    with pytest.raises(DataValidationError, match=r"row 'e' \[label\]: missing mask path"):
        train_test_split(bad.iloc[[0, 4]], test_size=0.5)
    with pytest.raises(ValueError, match="test_size must be a fraction"):  # before any read
        train_test_split(bad, test_size=1.5)
    with pytest.raises(TypeError, match="must be a pandas DataFrame, got list"):
        train_test_split(list(frame["image"]))
    train, test = train_test_split(frame, test_size=0.4)
    assert sorted([*train.index, *test.index]) == list("abcde") and len(test) == 2


# -- relative paths in a CSV resolve against its folder, whatever the file's suffix ------

class _Validated(Exception):
    """Raised instead of building a model: the data passed validation."""


def test_relative_paths_of_a_csv_not_named_csv_resolve_against_its_folder(tmp_path,
                                                                          monkeypatch):
    import automask.training.builder as builder

    def stop(*args, **kwargs):
        raise _Validated

    monkeypatch.setattr(builder, "build_candidate_model", stop)
    frame = _pairs(tmp_path / "data" / "d", 4)
    for col in ("image", "label"):
        frame[col] = [str(Path(p).relative_to(tmp_path / "data")) for p in frame[col]]
    table = tmp_path / "data" / "train.txt"
    frame.to_csv(table, index=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(_Validated):
        SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
            table, presets="tiny", hyperparameters={"optim.max_epochs": 1})


# -- a table of paths given as .txt or .tsv is read as a table, not as one image ------------

@pytest.mark.parametrize("suffix, sep", [(".txt", ","), (".tsv", "\t")])
def test_a_txt_or_tsv_table_of_paths_is_read_as_a_table(tmp_path, suffix, sep):
    """predict's input and fit's data given as ``list.txt`` / ``list.tsv``: the rows are the
    table's, relative paths resolve against its folder, and a .tsv is split at tabs."""
    from automask.data.validation import validate_frame
    from automask.prediction import as_frame

    frame = _pairs(tmp_path / "data", 2)
    names = [Path(p).relative_to(tmp_path) for p in frame["image"]]
    masks = [Path(p).relative_to(tmp_path) for p in frame["label"]]
    table = tmp_path / f"list{suffix}"
    table.write_text("image" + sep + "label\n"
                     + "".join(f"{a}{sep}{b}\n" for a, b in zip(names, masks)))
    data, root = as_frame(table, "image")
    assert list(data["image"]) == [str(n) for n in names] and root == tmp_path
    spec = validate_frame(str(table), image_col="image", label_col="label", root=root)
    assert [Path(p).name for p in spec.frame["image"]] == [n.name for n in names]


def test_a_hand_written_or_windows_table_of_paths_is_read_as_meant(tmp_path):
    """``image, label`` with ``a.png, a_mask.png`` rows (spaces after the commas, as written
    by hand) was refused as missing the column 'label' (it was ' label'); a table written on
    Windows (``data\\img_0.png``) named no file here. Both now read as meant; a path that
    is wrong either way is still named."""
    frame = _pairs(tmp_path / "data", 3)
    rel = [(Path(i).relative_to(tmp_path), Path(m).relative_to(tmp_path))
           for i, m in zip(frame["image"], frame["label"])]
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("image , label\n" + "".join(f"{i}, {m}\n" for i, m in rel))
    windows = tmp_path / "windows.csv"
    windows.write_text("image,label\r\n" + "".join(
        f"{str(i).replace('/', chr(92))},{str(m).replace('/', chr(92))}\r\n" for i, m in rel))
    want = validate_frame(frame)
    for table in (spaced, windows):
        spec = validate_frame(str(table), root=tmp_path)
        assert list(spec.frame["image"]) == list(want.frame["image"]), table.name
        assert list(spec.frame["label"]) == list(want.frame["label"]), table.name
        assert spec.stats["foreground"].tolist() == want.stats["foreground"].tolist()
    windows.write_text("image,label\n" + f"data{chr(92)}gone.png,{str(rel[0][1])}\n")
    with pytest.raises(DataValidationError, match=r"row 0 \[image\] .*data\\gone\.png: "
                       r"file not found"):
        validate_frame(str(windows), root=tmp_path)


def test_problems_of_the_tuning_data_are_said_to_be_in_the_tuning_data(tmp_path):
    train = _pairs(tmp_path / "train", 4)
    tuning = _pairs(tmp_path / "tune", 2).assign(label=["gone.png", str(tmp_path / "x.png")])
    with pytest.raises(DataValidationError) as info:
        SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
            train, tuning, presets="tiny", hyperparameters={"optim.max_epochs": 1})
    text = str(info.value)
    assert text.startswith("in the tuning data (tuning_data): 2 problem(s) in 2 row(s)")
    assert "row 0 [label]" in text and "gone.png: file not found" in text
    with pytest.raises(DataValidationError, match=r"^in the tuning data.*missing column"):
        SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
            train, tuning.rename(columns={"label": "mask"}), presets="tiny")
    assert not (tmp_path / "run").exists()


# -- numpy arrays as images and masks: folders, validation, a fit, predict, evaluate -------

def test_npy_images_and_masks_pair_validate_train_predict_and_evaluate(tmp_path):
    from automask.datasets import from_folders

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(6):
        image = rng.integers(0, 4096, size=(3, 24, 32), dtype=np.uint16)  # 12-bit, (C, H, W)
        mask = np.zeros((24, 32), bool)
        mask[4: 12 + i, 6: 20] = True
        image[:, mask] += 2048
        np.save(tmp_path / "images" / f"scan_{i}.npy", image)
        np.save(tmp_path / "masks" / f"scan_{i}.npy", mask)
    frame = from_folders(tmp_path / "images", tmp_path / "masks")
    assert len(frame) == 6 and frame["image"].str.endswith(".npy").all()
    assert validate_frame(frame).task == "binary"

    np.save(tmp_path / "volume.npy", np.zeros((8, 24, 32), np.uint16))
    bad = frame.assign(image=[str(tmp_path / "volume.npy")] + list(frame["image"][1:]))
    with pytest.raises(DataValidationError, match=r"shape \(8, 24, 32\) is not one 2-D") as info:
        validate_frame(bad)
    assert "volume.npy" in str(info.value) and "row 0" in str(info.value)

    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0)
    seg.fit(frame, presets="tiny", hyperparameters={"optim.max_epochs": 1,
                                                   "model.input_size": 64})
    masks = seg.predict(tmp_path / "images")  # a folder: its .npy arrays, as from_folders
    assert [m.shape for m in masks] == [(24, 32)] * 6
    assert 0.0 <= seg.evaluate(frame)["iou"] <= 1.0


def test_problems_of_both_tables_are_said_at_once_each_named(tmp_path):
    """A bad training row hid the tuning data's bad row until the first was fixed and the
    fit run again; the message did not say which table its rows were of."""
    train = _pairs(tmp_path / "train", 4)
    train.loc[2, "image"] = str(tmp_path / "nope2.png")
    tuning = _pairs(tmp_path / "tune", 2)
    tuning.loc[1, "label"] = str(tmp_path / "nope.png")
    with pytest.raises(DataValidationError) as info:
        SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
            train, tuning, presets="tiny", hyperparameters={"optim.max_epochs": 1})
    text = str(info.value)
    assert text.startswith("in the training data (train_data): 1 problem(s) in 1 row(s)")
    assert "row 2 [image]" in text and "nope2.png: file not found" in text
    assert "\nin the tuning data (tuning_data): 1 problem(s)" in text
    assert "row 1 [label]" in text and "nope.png: file not found" in text
    assert not (tmp_path / "run").exists()
