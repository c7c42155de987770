"""Audit of input handling: files a medical, remote-sensing or street-scene user passes are
read as they are meant (masks by their stored values, aligned with their image), and bad
ones are named with their row and path before any work is done."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from automask import cli
from automask.data import read_mask, validate_frame
from automask.errors import DataValidationError

from test_image_range import _png16  # pytest's default import mode puts tests/ on sys.path

from cli_process import run_automask

_ORIENTATION = 274  # the EXIF / TIFF orientation tag


def _ids(h: int = 6, w: int = 10) -> np.ndarray:
    """(h, w) uint8 class ids 0, 1, 2 in an asymmetric layout (so turns are visible)."""
    ids = np.zeros((h, w), dtype=np.uint8)
    ids[1:3, 1:6] = 1
    ids[4:, 7:] = 2
    return ids


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_colour_masks_keep_their_class_ids(tmp_path, suffix):
    """A grey mask saved as 16-bit RGB reads its ids, not their top 8 bits (all 0)."""
    ids = _ids()
    samples = np.repeat(ids[:, :, None], 3, axis=2).astype(np.uint16)  # (H, W, 3)
    mask = tmp_path / f"mask{suffix}"
    if suffix == ".png":
        _png16(mask, samples)
    else:
        tifffile.imwrite(mask, samples, photometric="rgb")
    np.testing.assert_array_equal(read_mask(mask), ids)
    Image.fromarray(np.zeros((*ids.shape, 3), np.uint8)).save(tmp_path / "img.png")
    spec = validate_frame(pd.DataFrame({"image": [tmp_path / "img.png"], "label": [mask]}))
    assert spec.task == "multiclass" and spec.num_classes == 3


def test_float64_and_turned_sixteen_bit_masks_read_like_their_8_bit_twins(tmp_path):
    """A float64 TIFF mask (Pillow cannot open it) reads; a 16-bit colour TIFF mask with an
    orientation tag is turned exactly as Pillow turns the same mask stored in 8 bits."""
    ids = _ids()
    tifffile.imwrite(tmp_path / "f64.tif", ids.astype(np.float64))
    np.testing.assert_array_equal(read_mask(tmp_path / "f64.tif"), ids)
    # a color_map given for the colour masks of the same data leaves grey ids as they are,
    # as for 16-bit and float masks that Pillow opens
    np.testing.assert_array_equal(read_mask(tmp_path / "f64.tif", color_map={(9, 9, 9): 1}),
                                  ids)
    samples = np.repeat(ids[:, :, None], 3, axis=2)
    for orientation in range(1, 9):
        tag = [(_ORIENTATION, "H", 1, orientation, True)]
        tifffile.imwrite(tmp_path / "m8.tif", samples[..., 0], extratags=tag)
        tifffile.imwrite(tmp_path / "m16.tif", samples.astype(np.uint16), photometric="rgb",
                         extratags=tag)
        np.testing.assert_array_equal(read_mask(tmp_path / "m16.tif"),
                                      read_mask(tmp_path / "m8.tif"), err_msg=str(orientation))


def test_sixteen_bit_colour_masks_need_a_color_map_of_8_bit_colours(tmp_path):
    """Colours at 16-bit scale map through color_map; other colours are named as such."""
    ids = _ids()
    colours = np.array([(0, 0, 0), (255, 0, 0), (0, 0, 255)], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", colours[ids] * 257, photometric="rgb")
    cmap = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 0, 255): 2}
    np.testing.assert_array_equal(read_mask(tmp_path / "c.tif", color_map=cmap), ids)
    with pytest.raises(DataValidationError, match="colour image"):
        read_mask(tmp_path / "c.tif")
    tifffile.imwrite(tmp_path / "odd.tif", colours[ids] * 3, photometric="rgb")
    with pytest.raises(DataValidationError, match=r"odd\.tif.*uint16"):
        read_mask(tmp_path / "odd.tif", color_map=cmap)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.uint16])
def test_white_is_zero_tiff_masks_are_read_by_their_stored_values(tmp_path, dtype):
    """An ImageJ mask with an inverting LUT (255 = object, WhiteIsZero) or a bool mask
    written by tifffile is not inverted: the object stays the foreground."""
    obj = _ids() == 1
    stored = obj if dtype is bool else obj.astype(dtype) * 255
    tifffile.imwrite(tmp_path / "m.tif", stored, photometric="miniswhite")
    expected = obj.astype(np.uint8) * (1 if dtype is bool else 255)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.tif"), expected)
    Image.fromarray(np.zeros((*obj.shape, 3), np.uint8)).save(tmp_path / "img.png")
    spec = validate_frame(pd.DataFrame({"image": [tmp_path / "img.png"],
                                        "label": [tmp_path / "m.tif"]}))
    assert spec.task == "binary"
    assert spec.stats["foreground"].iat[0] == pytest.approx(obj.mean())


def test_a_compressed_white_is_zero_bilevel_mask_is_read_by_its_stored_bits(
        tmp_path, monkeypatch):
    """A CCITT Group 4 bilevel mask (as scanners and fax-style writers store them) with
    WhiteIsZero reads its stored bits, 1 = object, through Pillow's own codecs: tifffile
    would need the optional imagecodecs package for it (here: as if it were absent)."""
    from automask.data import io

    def no_codecs(path):
        raise OSError(f"{path}: cannot decode this TIFF (pip install imagecodecs)")

    monkeypatch.setattr(io, "_tiff_page", no_codecs)
    obj = _ids() == 1
    # Pillow writes what it is given as displayed: the stored bits are its inverse, obj
    Image.fromarray(~obj).save(tmp_path / "g4.tif", compression="group4", tiffinfo={262: 0})
    with Image.open(tmp_path / "g4.tif") as img:  # Pillow shows it inverted
        assert img.tag_v2[262] == 0 and np.array_equal(np.array(img), ~obj)
    np.testing.assert_array_equal(read_mask(tmp_path / "g4.tif"), obj.astype(np.uint8))


def test_tables_saved_by_excel_in_windows_1252_and_utf_16_are_read(tmp_path):
    """Excel's "CSV (Comma delimited)" on a Western Windows is Windows-1252 and its "Unicode
    Text" UTF-16 with tabs: both read as their UTF-8 version (they were refused as "not
    text (an image?)"); text in neither encoding names its line and the fix."""
    for name in ("café.png", "café_mask.png"):
        Image.fromarray(_ids()).save(tmp_path / name)
    rows = "image,label\ncafé.png,café_mask.png\n"
    (tmp_path / "utf8.csv").write_text(rows, encoding="utf-8")
    (tmp_path / "cp1252.csv").write_bytes(rows.encode("cp1252"))
    (tmp_path / "unicode.txt").write_bytes(rows.replace(",", "\t").encode("utf-16"))
    want = validate_frame(tmp_path / "utf8.csv", root=tmp_path).frame
    assert want["image"].tolist() == [str(tmp_path / "café.png")]
    for table in ("cp1252.csv", "unicode.txt"):
        pd.testing.assert_frame_equal(validate_frame(tmp_path / table, root=tmp_path).frame,
                                      want)
    (tmp_path / "other.csv").write_bytes(b"image,label\n\x81a.png,b.png\n")
    with pytest.raises(DataValidationError, match=r"other.csv' is text, but neither UTF-8 nor "
                                                  r"Windows-1252 \(byte 0x81 on line 2\); "
                                                  r"save it as UTF-8"):
        validate_frame(tmp_path / "other.csv")


def test_a_semicolon_separated_csv_from_excel_is_read_as_its_columns(tmp_path):
    """Excel where the comma is the decimal mark saves "CSV" with semicolons; such a table
    is split at them (a path holding a comma included), for fit, evaluate and predict."""
    from automask.prediction import as_frame

    folder = tmp_path / "scans, 2024"
    folder.mkdir()
    Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(_ids()).save(folder / "a_mask.png")
    table = tmp_path / "data.csv"
    table.write_text("image;label;note\nscans, 2024/a.png;scans, 2024/a_mask.png;x\n",
                     encoding="utf-8-sig")  # with the byte-order mark Excel writes
    spec = validate_frame(table, root=tmp_path)
    assert spec.frame["image"].tolist() == [str(folder / "a.png")]
    assert spec.task == "multiclass" and spec.num_classes == 3
    frame, root = as_frame(table, "image")
    assert frame["label"].tolist() == ["scans, 2024/a_mask.png"] and root == tmp_path
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image;x0;y0;x1;y1\nscans, 2024/a.png;1;2;5;6\n")
    assert cli._read_boxes(str(boxes), table, "image")[0] == [(1, 2, 5, 6)]


def test_a_mask_saved_as_a_tiff_stack_is_warned_about_with_its_row(tmp_path):
    """A mask of several pages (one per class, or a volume's slices) is read as its first
    page, as a stacked image is: the warning names the row, the column and the file."""
    ids = _ids()
    Image.fromarray(np.zeros((*ids.shape, 3), np.uint8)).save(tmp_path / "img.png")
    tifffile.imwrite(tmp_path / "classes.tif", np.stack([ids == 1, ids == 2]).astype(np.uint8))
    frame = pd.DataFrame({"image": [tmp_path / "img.png"], "label": [tmp_path / "classes.tif"]},
                         index=["p7"])
    with pytest.warns(UserWarning, match=r"row 'p7' \[label\] .*classes\.tif \(2 images\)"):
        spec = validate_frame(frame)
    assert spec.task == "binary"  # the first page only: class 1


def test_an_animated_gif_is_warned_about_and_a_single_frame_gif_is_not(tmp_path):
    """An animated GIF image is read as its first frame, with the warning a TIFF stack gets;
    a one-frame GIF (masks of older datasets, such as DRIVE's) reads without a word."""
    import warnings

    ids = _ids()
    frames = [Image.fromarray(np.full((*ids.shape, 3), v, np.uint8)) for v in (0, 90, 180)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.zeros((*ids.shape, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(((ids > 0) * 255).astype(np.uint8)).save(tmp_path / "mask.gif")
    frame = pd.DataFrame({"image": [tmp_path / "clip.gif", tmp_path / "img.png"],
                          "label": [tmp_path / "mask.gif"] * 2})
    with pytest.warns(UserWarning, match=r"1 image or mask file\(s\) hold a stack of images "
                                         r"\(TIFF pages of one size, GIF frames\).*row 0 "
                                         r"\[image\] .*clip\.gif \(3 images\)"):
        validate_frame(frame)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_frame(frame.iloc[1:]).task == "binary"


def test_a_fit_warns_about_a_stacked_image_once(tmp_path):
    """A fit of two candidates reads its data once for the warnings: a stack in the tuning
    data is named once, not again when each candidate's prediction speed is measured on
    those images."""
    import warnings

    from automask import SemanticSegmentor
    from automask.datasets import make_synthetic

    frame = make_synthetic(6, size=48, num_classes=2, seed=0, root=tmp_path / "data")
    rgb = np.asarray(Image.open(frame["image"].iloc[0]).convert("RGB"))
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([rgb, rgb]))  # two RGB pages
    tuning = pd.DataFrame({"image": [str(tmp_path / "stack.tif"), frame["image"].iloc[1]],
                           "label": list(frame["label"].iloc[:2])})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
            frame, tuning_data=tuning, presets="tiny",
            hyperparameters={"model.input_size": 48, "optim.max_epochs": 1,
                             "optim.lr": [1e-3, 2e-3]})
    stacks = [str(w.message) for w in caught if "hold a stack of images" in str(w.message)]
    assert len(seg.models_) == 2
    assert all(r.predict_images_per_s > 0 for r in seg.models_.values())
    assert len(stacks) == 1 and "stack.tif (2 images)" in stacks[0], stacks


def _good_pair(tmp_path) -> None:
    """A readable image and mask, ``img.png`` and ``mask.png``, beside the bad files."""
    ids = _ids()
    Image.fromarray(np.zeros((*ids.shape, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(ids).save(tmp_path / "mask.png")


def _problems(frame: pd.DataFrame) -> str:
    """The text of the DataValidationError that ``frame`` must raise."""
    with pytest.raises(DataValidationError) as info:
        validate_frame(frame)
    return str(info.value)


def test_an_empty_image_or_mask_file_is_named_as_empty(tmp_path):
    """A zero-byte file (an interrupted copy) is named as empty, not as an unknown format;
    a file of other bytes stays "not an image Pillow can read"."""
    _good_pair(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"not an image")
    frame = pd.DataFrame({"image": [tmp_path / "empty.png", tmp_path / "img.png",
                                    tmp_path / "text.png"],
                          "label": [tmp_path / "mask.png", tmp_path / "empty.png",
                                    tmp_path / "mask.png"]})
    text = _problems(frame)
    assert "row 0 [image] " in text and "row 1 [label] " in text
    assert text.count("an empty file (0 bytes): an interrupted copy or download?") == 2, text
    assert "row 2 [image] " in text and "text.png: not an image Pillow can read" in text


def test_volume_and_array_files_are_named_with_what_to_do(tmp_path):
    """DICOM, NIfTI (gzipped too) and NRRD files in the path columns (what medical
    imaging users have) are named by their format, found from their bytes whatever their
    name, with the way to give them to automask (2-D PNG/TIFF slices)."""
    import gzip

    _good_pair(tmp_path)
    (tmp_path / "scan").write_bytes(b"\0" * 128 + b"DICM" + b"\2\0" * 40)  # no suffix
    header = bytearray(352)
    header[:4] = (348).to_bytes(4, "little")
    header[344:348] = b"n+1\0"
    with gzip.open(tmp_path / "labels.nii.gz", "wb") as fh:
        fh.write(bytes(header) + b"\0" * 64)
    (tmp_path / "ct.nrrd").write_bytes(b"NRRD0004\ntype: short\n")
    frame = pd.DataFrame({"image": [tmp_path / "scan", tmp_path / "img.png",
                                    tmp_path / "ct.nrrd"],
                          "label": [tmp_path / "mask.png", tmp_path / "labels.nii.gz",
                                    tmp_path / "mask.png"]})
    text = _problems(frame)
    for row, column, name, kind in [(0, "image", "scan", "DICOM"),
                                    (1, "label", "labels.nii.gz", "NIfTI"),
                                    (2, "image", "ct.nrrd", "NRRD")]:
        assert f"row {row} [{column}] {tmp_path / name}: a {kind} file, which automask " \
               "does not read" in text, (kind, text)
    assert text.count("save each 2-D image or slice as a PNG or TIFF file or a .npy") == 3


def test_urls_in_the_path_columns_are_named_as_urls(tmp_path):
    """A URL is named as such with its row, not as a missing file under the working folder
    ('<cwd>/https:/host/a.png: file not found')."""
    Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(tmp_path / "a.png")
    frame = pd.DataFrame({"image": ["https://example.org/a.png", tmp_path / "a.png"],
                          "label": [tmp_path / "m.png", "s3://bucket/m.png"]})
    with pytest.raises(DataValidationError) as info:
        validate_frame(frame)
    text = str(info.value)
    assert "row 0 [image] https://example.org/a.png: a URL, not a file path" in text
    assert "row 1 [label] s3://bucket/m.png: a URL, not a file path" in text
    assert "https:/example" not in text  # not resolved as a relative path


def test_images_held_in_memory_are_named_as_such_not_as_missing_files(tmp_path):
    """An array or PIL image in a path column was joined to the working folder as its text
    ('<cwd>/[[[0 0 0] ...: file not found')."""
    from automask.prediction import as_frame

    Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(tmp_path / "a.png")
    frame = pd.DataFrame({"image": [np.zeros((6, 10, 3), np.uint8), tmp_path / "a.png"],
                          "label": [tmp_path / "a.png", Image.new("L", (10, 6))]})
    with pytest.raises(DataValidationError) as info:
        validate_frame(frame)
    text = str(info.value)
    assert "row 0 [image]: an in-memory ndarray of shape (6, 10, 3), not a file path" in text
    assert "row 1 [label]: an in-memory Image of shape (6, 10), not a file path" in text
    assert "[[" not in text and "file not found" not in text
    assert ("SemanticSegmentor's fit, predict, predict_proba, evaluate, leaderboard and plots "
            "take them in memory") in text
    # an image is 2-D or 3-D, a batch 4-D: more dimensions are named with the shapes taken
    with pytest.raises(DataValidationError, match=r"shape \(2, 2, 6, 10, 3\); an image is"):
        as_frame(np.zeros((2, 2, 6, 10, 3), np.uint8), "image")


def test_an_output_folder_that_cannot_be_written_is_named_before_any_prediction(
        tmp_path, unwritable):
    """predict(save_to=...) into a read-only folder (or a new folder under one) fails when
    the destinations are checked, not with a PermissionError after the first prediction
    (a read-only folder under a non-root user gives the same message)."""
    from automask import prediction

    Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(tmp_path / "a.png")
    spec = prediction.images_spec(pd.DataFrame({"image": [tmp_path / "a.png"]}), "image", None)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    unwritable(locked)
    try:
        for out in (locked, locked / "masks"):
            with pytest.raises(DataValidationError,
                               match=re.escape(f"'{out}' cannot be used: the folder "
                                               f"'{locked}' is not writable")):
                prediction.mask_destinations(spec, out, root=None, label_col="label",
                                             overwrite=False)
        dests = prediction.mask_destinations(spec, tmp_path / "free", root=None,
                                             label_col="label", overwrite=False)
        assert dests == [tmp_path / "free" / "a.png"]
    finally:
        locked.chmod(0o755)


def _jpeg_mask(path, size: int) -> None:
    """A 64 x 64 binary 0/255 mask with a size x size object, saved as a JPEG."""
    mask = np.zeros((64, 64), np.uint8)
    mask[30:30 + size, 30:30 + size] = 255
    Image.fromarray(mask).save(path, quality=75)


def test_jpeg_binary_masks_with_a_tiny_or_no_object_are_read_as_binary(tmp_path):
    """JPEG compression leaves a 1-pixel object as noise near 0 plus its pixel near 255,
    with no value in 128-254, and an object-free mask with noise may stay near 0: beside
    other JPEG binary masks both are soft binary masks, not class ids (which named the
    good rows as fitting neither task)."""
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "img.png")
    for name, size in (("big", 20), ("dot", 1)):
        _jpeg_mask(tmp_path / f"{name}.jpg", size)
    values = np.unique(read_mask(tmp_path / "dot.jpg"))
    assert values.max() == 255 and not ((values >= 128) & (values < 255)).any()
    noise = np.zeros((64, 64), np.uint8)
    noise[::7, ::5] = 9  # what a blurred empty mask keeps
    Image.fromarray(noise).save(tmp_path / "none.jpg", quality=75)
    assert read_mask(tmp_path / "none.jpg").max() < 32
    frame = pd.DataFrame({"image": [tmp_path / "img.png"] * 3,
                          "label": [tmp_path / n for n in ("big.jpg", "dot.jpg", "none.jpg")]})
    with pytest.warns(UserWarning, match="3 mask"):
        spec = validate_frame(frame)
    assert spec.task == "binary" and spec.stats["kind"].tolist() == ["soft"] * 3
    fg = spec.stats["foreground"].tolist()
    assert fg[0] == pytest.approx(400 / 64**2, abs=0.01) and 0 < fg[1] < 3 / 64**2
    assert fg[2] == 0.0
    with pytest.raises(DataValidationError, match="come from a JPEG file"):
        validate_frame(frame.iloc[[2]])  # alone, small values may be JPEG'd class ids


def test_a_training_table_without_a_header_line_is_told_to_add_one(tmp_path):
    """A CSV of image and mask paths without a header line (its first row read as the
    column names) is named as such, with the header it needs, not only as 'missing
    column(s)'. A list of image paths alone is read for prediction without one (its first
    path the first row; tests/test_audit_predict.py predicts such lists)."""
    from automask.prediction import as_frame, images_spec

    Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(_ids()).save(tmp_path / "a_mask.png")
    (tmp_path / "test.txt").write_text("a.png\na.png\n")
    (tmp_path / "train.csv").write_text("a.png,a_mask.png\na.png,a_mask.png\n")
    frame, root = as_frame(tmp_path / "test.txt", "image")
    assert list(frame["image"]) == ["a.png", "a.png"] and root == tmp_path
    assert len(images_spec(frame, "image", root).frame) == 2
    with pytest.raises(DataValidationError, match=r"\['a\.png', 'a_mask\.png'\] are file "
                                                  r"paths: the table needs a header line "
                                                  r".*'image,label'"):
        validate_frame(tmp_path / "train.csv")


def test_a_colour_mask_saved_as_jpeg_names_the_compression_as_the_cause(tmp_path):
    """Colour-coded class masks saved as JPEG hold hundreds of colours no class has: the
    error says why, instead of only listing colours such as (0, 0, 2)."""
    ids = np.zeros((32, 32), np.uint8)
    ids[5:20, 5:20] = 1
    ids[22:, 22:] = 2
    colours = np.array([(0, 0, 0), (255, 0, 0), (0, 0, 255)], np.uint8)
    cmap = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 0, 255): 2}
    Image.fromarray(colours[ids]).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", color_map=cmap), ids)
    Image.fromarray(colours[ids]).save(tmp_path / "m.jpg", quality=90)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img.png")
    frame = pd.DataFrame({"image": [tmp_path / "img.png"], "label": [tmp_path / "m.jpg"]})
    with pytest.raises(DataValidationError, match=r"row 0 \[label\] .*m\.jpg: mask holds "
                       r"colours missing from color_map: .* lossy .* save colour masks "
                       r"losslessly \(PNG\)"):
        validate_frame(frame, color_map=cmap)


def test_a_sixteen_bit_mask_kept_in_its_alpha_channel_is_named(tmp_path):
    """A 16-bit grey + alpha or RGBA PNG of one colour whose alpha holds the mask is
    refused as its 8-bit twin is, not read as an empty mask."""
    obj = (_ids() == 1).astype(np.uint16) * 65535
    flat = np.zeros_like(obj)
    _png16(tmp_path / "la.png", np.dstack([flat, obj]))
    _png16(tmp_path / "rgba.png", np.dstack([flat, flat, flat, obj]))
    for name in ("la.png", "rgba.png"):
        with pytest.raises(DataValidationError, match=rf"{name} .*alpha channel varies"):
            read_mask(tmp_path / name)


def test_evaluation_rows_that_repeat_an_image_are_warned_about(tmp_path):
    """Evaluation data with a row repeated (a frame concatenated twice) scores that image
    twice: a warning names the rows, as training data gets one."""
    import warnings

    from automask.prediction import labelled_spec

    Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(tmp_path / "b.png")
    Image.fromarray((_ids() == 1).astype(np.uint8)).save(tmp_path / "m.png")
    frame = pd.DataFrame({"image": [tmp_path / "a.png", tmp_path / "b.png"],
                          "label": [tmp_path / "m.png"] * 2})
    args = ("image", "label", "binary", 2, ["background", "foreground"], None, None)
    with pytest.warns(UserWarning, match=r"1 row\(s\) of the evaluation data repeat the image "
                                         r"of another row, e\.g\. rows 0, 2 .*a\.png"):
        labelled_spec(pd.concat([frame, frame.iloc[:1]], ignore_index=True), *args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # distinct images: nothing to say
        labelled_spec(frame, *args)


def test_read_stack_gives_each_full_size_page_as_stored(tmp_path):
    """ISBI 2012's volumes are TIFF stacks: read_stack gives their pages as stored
    (16-bit samples kept), leaves out a pyramid's reduced pages, and names a file that is
    no TIFF."""
    from automask.data import read_stack

    rng = np.random.default_rng(0)
    volume = rng.integers(0, 65535, (3, 12, 16), dtype=np.uint16)
    with tifffile.TiffWriter(tmp_path / "volume.tif") as tif:
        for page in volume:
            tif.write(page)
        tif.write(volume[0, ::2, ::2], subfiletype=1)  # a reduced-resolution overview
    pages = read_stack(tmp_path / "volume.tif")
    assert len(pages) == 3 and all(p.dtype == np.uint16 for p in pages)
    for got, want in zip(pages, volume):
        np.testing.assert_array_equal(got, want)
    Image.fromarray(_ids()).save(tmp_path / "one.png")
    with pytest.raises(DataValidationError, match=r"one\.png is not a TIFF file"):
        read_stack(tmp_path / "one.png")
    with pytest.raises(DataValidationError, match=r"stack file not found: .*gone\.tif"):
        read_stack(tmp_path / "gone.tif")


def test_from_folders_gives_a_volume_and_its_label_stack_one_row_per_slice(tmp_path,
                                                                          monkeypatch):
    """An EM volume kept as one TIFF stack with its label stack (as ISBI 2012 ships them)
    was read as its first slice, with a warning: the other slices were lost to training.
    from_folders gives one row per slice, which validates without that warning and fits;
    stacks larger than it holds in memory are refused before they are read; a stack whose
    mask holds another number of pages stays one row. predict on a stack file, or on a
    folder that holds one, predicts each page, naming the outputs <stack>_000, ..."""
    import warnings

    from automask import SemanticSegmentor
    from automask.datasets import from_folders

    rng = np.random.default_rng(1)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    volume = rng.integers(0, 255, (4, 32, 32), dtype=np.uint8)
    labels = (rng.random((4, 32, 32)) > 0.5).astype(np.uint8) * 255
    tifffile.imwrite(images / "train-volume.tif", volume, photometric="minisblack")
    tifffile.imwrite(masks / "train-labels.tif", labels, photometric="minisblack")
    Image.fromarray(volume[0]).save(images / "single-volume.png")
    Image.fromarray(labels[0]).save(masks / "single-labels.png")
    df = from_folders(images, masks)  # ISBI's names pair: "-volume" with "-labels"
    assert len(df) == 5 and df.attrs["stacks"] == {str(images / "train-volume.tif"): 4}
    assert df.attrs["suffixes"] == {"image": "-volume", "mask": "-labels"}
    assert df["image"].iloc[0] == str(images / "single-volume.png")  # sorted by stem
    for k in range(4):
        np.testing.assert_array_equal(df["image"].iloc[1 + k], volume[k])
        np.testing.assert_array_equal(df["label"].iloc[1 + k], labels[k])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
            df, presets="tiny", hyperparameters={"optim.max_epochs": 1,
                                                 "model.input_size": 32})
        masks_out = seg.predict(df)
    assert not [w for w in caught if "stack" in str(w.message)]  # no "only the first"
    assert seg.task_ == "binary" and len(masks_out) == 5
    assert all(m.shape == (32, 32) for m in masks_out)

    # a stack given to predict: each page predicted, the outputs named by stack and page
    stack = images / "train-volume.tif"
    pages = seg.predict(list(volume))
    got = seg.predict(stack)
    assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, pages))
    written = seg.predict(stack, save_to=tmp_path / "out")
    assert [Path(p).name for p in written["label"]] == [
        f"train-volume_00{k}.png" for k in range(4)]
    for k in range(4):
        saved = np.asarray(Image.open(tmp_path / "out" / f"train-volume_00{k}.png"))
        assert np.array_equal(saved > 0, pages[k] > 0)
    proc = run_automask("predict", str(tmp_path / "run"), "--data", str(stack), "--out",
                        str(tmp_path / "maps"), "--proba")
    assert proc.returncode == 0 and "wrote 4 probability maps" in proc.stdout, proc.stderr
    maps = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert maps == [f"train-volume_00{k}.npy" for k in range(4)]
    # a folder holding a stack and an image: the stack's pages, then the image
    written = seg.predict(images, save_to=tmp_path / "folder_out")
    assert [Path(p).name for p in written["label"]] == [
        "single-volume.png", *(f"train-volume_00{k}.png" for k in range(4))]
    for k in range(4):
        saved = np.asarray(Image.open(tmp_path / "folder_out" / f"train-volume_00{k}.png"))
        assert np.array_equal(saved > 0, pages[k] > 0)
    from automask import prediction

    monkeypatch.setattr(prediction, "STACK_MEMORY_LIMIT", 4 * 32 * 32 - 1)
    with pytest.raises(DataValidationError, match=r"hold 0\.0 GiB once decoded, more than "
                                                  r"predict holds in memory"):
        seg.predict(images)
    monkeypatch.undo()
    twins = tmp_path / "twins"
    for side in ("a", "b"):  # two stacks of one name: their pages' outputs would clash
        (twins / side).mkdir(parents=True)
        (twins / side / "vol.tif").write_bytes(stack.read_bytes())
    with pytest.raises(DataValidationError, match=r"TIFF stacks .*share a name"):
        seg.predict(twins)

    from automask.datasets import folders
    from automask.errors import DataValidationError as Refused

    monkeypatch.setattr(folders, "STACK_MEMORY_LIMIT", 2 * 4 * 32 * 32 - 1)  # 8 pages' bytes
    with pytest.raises(Refused, match=r"train-volume\.tif and their masks hold 0\.0 GiB once "
                                      r"decoded, more than from_folders holds in memory"):
        from_folders(images, masks)
    monkeypatch.undo()
    tifffile.imwrite(masks / "train-labels.tif", labels[:2], photometric="minisblack")
    df = from_folders(images, masks)
    assert len(df) == 2 and df.attrs["stacks"] == {}
    with pytest.warns(UserWarning, match=r"hold a stack of images.*read_stack"):
        validate_frame(df)
