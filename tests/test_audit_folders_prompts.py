"""Audit of folder discovery, benchmark split reading and prompt checking: each test pins a
bug found by probing (files made in tmp_path only)."""
from __future__ import annotations

import os
from pathlib import Path
import unicodedata

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask.data.prompts import check_prompts
from automask.datasets import fetch_benchmark, from_folders
from automask.errors import ConfigError, DataValidationError


def _write(path, array=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8) if array is None else array).save(path)


# ------------------------------------------------------------------------ from_folders
def test_one_folder_for_images_and_masks_is_split_by_the_mask_ending(tmp_path):
    # a.jpg + a_mask.png in one folder (as in Kaggle's LGG MRI set: 1.tif + 1_mask.tif):
    # each file used to be paired with itself, silently.
    for name in ("a.jpg", "a_mask.png", "b.jpg", "b_mask.png"):
        _write(tmp_path / "data" / name)
    os.symlink(tmp_path / "data", tmp_path / "link")
    for masks in (tmp_path / "data", tmp_path / "link"):
        df = from_folders(tmp_path / "data", masks)
        assert [Path(p).name for p in df["image"]] == ["a.jpg", "b.jpg"]
        assert [Path(p).name for p in df["label"]] == ["a_mask.png", "b_mask.png"]
    df = from_folders(tmp_path / "data", tmp_path / "data", mask_suffix="_mask")
    assert [Path(p).name for p in df["label"]] == ["a_mask.png", "b_mask.png"]
    # nothing tells the masks apart: refused, naming the folder
    for name in ("c.jpg", "d.png"):
        _write(tmp_path / "plain" / name)
    with pytest.raises(DataValidationError, match="same folder") as info:
        from_folders(tmp_path / "plain", tmp_path / "plain")
    assert str(tmp_path / "plain") in str(info.value)
    with pytest.raises(DataValidationError, match="'_gt'"):
        from_folders(tmp_path / "data", tmp_path / "data", mask_suffix="_gt")


def test_explicit_suffix_never_drops_a_file_unseen(tmp_path):
    # With mask_suffix="_mask", a.png and a_mask.png both stand for image "a": one of them
    # used to vanish, listed nowhere.
    _write(tmp_path / "images" / "a.jpg")
    _write(tmp_path / "masks" / "a.png")
    _write(tmp_path / "masks" / "a_mask.png")
    with pytest.raises(DataValidationError, match="a.png / a_mask.png") as info:
        from_folders(tmp_path / "images", tmp_path / "masks", mask_suffix="_mask")
    assert str(tmp_path / "masks") in str(info.value)
    _write(tmp_path / "images" / "b_img.jpg")
    _write(tmp_path / "images" / "b.jpg")
    _write(tmp_path / "masks" / "b.png")
    with pytest.raises(DataValidationError, match="b.jpg / b_img.jpg"):
        from_folders(tmp_path / "images", tmp_path / "masks", image_suffix="_img",
                     mask_suffix="")


def test_broken_link_is_named(tmp_path):
    # A mask that is a dangling link used to be skipped: the error blamed its image.
    _write(tmp_path / "images" / "a.jpg")
    _write(tmp_path / "images" / "b.jpg")
    _write(tmp_path / "masks" / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "masks" / "b.png")
    with pytest.raises(DataValidationError, match="broken link") as info:
        from_folders(tmp_path / "images", tmp_path / "masks", strict=False)
    assert str(tmp_path / "masks" / "b.png") in str(info.value)


def test_folder_without_image_files_is_named(tmp_path):
    # Masks saved as MATLAB .mat files (.npy arrays are read), or images one sub-folder
    # down: the error used to list every image as "without mask", or say "no pairs between
    # A and B" without saying which.
    _write(tmp_path / "images" / "a.jpg")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    with pytest.raises(DataValidationError, match=r"mask folder .* no image files") as info:
        from_folders(tmp_path / "images", tmp_path / "masks", strict=False)
    assert "a.mat" in str(info.value)
    (tmp_path / "nested" / "train").mkdir(parents=True)
    (tmp_path / "nested" / "train" / "a.txt").write_text("x")
    with pytest.raises(DataValidationError, match=r"image folder .* no image files") as info:
        from_folders(tmp_path / "nested", tmp_path / "images")
    assert "train/" in str(info.value) and "nor do its sub-folders" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataValidationError, match=r"image folder .*empty.* no image files"):
        from_folders(tmp_path / "empty", tmp_path / "images")


def test_decomposed_and_composed_names_pair(tmp_path):
    # macOS writes "é" decomposed (NFD); a mask saved elsewhere has it composed (NFC).
    _write(tmp_path / "images" / unicodedata.normalize("NFD", "café 1.jpg"))
    _write(tmp_path / "masks" / unicodedata.normalize("NFC", "café 1.png"))
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    assert len(df) == 1
    assert os.path.isfile(df["image"].iloc[0]) and os.path.isfile(df["label"].iloc[0])


# --------------------------------------------------------------------- fetch_benchmark
def test_benchmark_split_files_skip_macos_metadata(tmp_path):
    # "._train.csv" (AppleDouble, binary) beside train.csv used to crash read_csv with a
    # UnicodeDecodeError naming no file, or come back as a split of its own.
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / ".complete").write_text("made by automask\n")  # already unpacked
    pd.DataFrame({"image": ["a.jpg"], "label": ["a.png"]}).to_csv(folder / "train.csv")
    (folder / "._train.csv").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X \xff\xfe")
    splits = fetch_benchmark("toy", root=tmp_path, url="http://127.0.0.1:9/unused.zip",
                             progress=False)
    assert list(splits) == ["train"]
    assert splits["train"]["image"].tolist() == [str(folder / "a.jpg")]
    (folder / "val.csv").write_bytes(b"image,label\n\xff\xfe,x\n")
    with pytest.raises(DataValidationError, match="val.csv"):
        fetch_benchmark("toy", root=tmp_path, url="http://127.0.0.1:9/unused.zip",
                        progress=False)



def test_unknown_benchmark_with_empty_url_is_a_config_error(tmp_path):
    # url="" (an unset mirror variable) used to end in "'NoneType' object is not
    # subscriptable" instead of naming the unknown benchmark.
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        fetch_benchmark("nope", root=tmp_path, url="", progress=False)
    assert not any(tmp_path.iterdir())

# ----------------------------------------------------------------------------- prompts
class _Key:
    """An index label that counts how often it is hashed."""

    hashes = 0

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        _Key.hashes += 1
        return hash(self.n)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Key) and other.n == self.n


def test_prompt_dict_check_is_linear_in_the_data(tmp_path):
    # The index used to be turned into a set once per dict key: quadratic (seconds for
    # 20,000 prompted images).
    n = 300
    index = [_Key(i) for i in range(n)]
    boxes = {key: (0, 0, 2, 2) for key in index}
    _Key.hashes = 0
    out = check_prompts(None, boxes, index, [(4, 4)] * n)
    assert [p.box.tolist() for p in out] == [[0.0, 0.0, 2.0, 2.0]] * n
    assert _Key.hashes < 20 * n, _Key.hashes


def test_folders_of_sub_folders_pair_by_the_path_below_them(tmp_path):
    """Cityscapes keeps images and masks one folder per city, the masks of three kinds side
    by side: both sides are searched below their sub-folders and paired by that path; a
    flat mask folder pairs with nested images by stem, unless two stems repeat."""
    for city, n in (("aachen", 2), ("bochum", 1)):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            _write(tmp_path / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png")
            for kind in ("labelIds", "color"):
                _write(tmp_path / "gtFine" / "train" / city / f"{stem}_gtFine_{kind}.png")
    (tmp_path / "gtFine" / "train" / ".cache").mkdir()
    _write(tmp_path / "gtFine" / "train" / ".cache" / "x_gtFine_labelIds.png")  # hidden
    with pytest.warns(UserWarning, match="3 unpaired file"):  # the colour masks
        df = from_folders(tmp_path / "leftImg8bit" / "train", tmp_path / "gtFine" / "train",
                          image_suffix="_leftImg8bit", mask_suffix="_gtFine_labelIds",
                          strict=False)
    rel = [(str(Path(i).relative_to(tmp_path)), str(Path(m).relative_to(tmp_path)))
           for i, m in zip(df["image"], df["label"])]
    assert rel == [
        (f"leftImg8bit/train/{c}/{c}_{i:06d}_000019_leftImg8bit.png",
         f"gtFine/train/{c}/{c}_{i:06d}_000019_gtFine_labelIds.png")
        for c, i in (("aachen", 0), ("aachen", 1), ("bochum", 0))]
    assert len(df.attrs["unpaired"]["masks"]) == 3  # the colour masks
    assert all("_color" in p for p in df.attrs["unpaired"]["masks"])

    flat = tmp_path / "flat_masks"
    for c, i in (("aachen", 0), ("aachen", 1), ("bochum", 0)):
        _write(flat / f"{c}_{i:06d}_000019.png")
    df = from_folders(tmp_path / "leftImg8bit" / "train", flat, image_suffix="_leftImg8bit")
    assert [Path(p).parent.name for p in df["image"]] == ["aachen", "aachen", "bochum"]
    assert [Path(p).name for p in df["label"]] == [
        "aachen_000000_000019.png", "aachen_000001_000019.png", "bochum_000000_000019.png"]
    _write(tmp_path / "twice" / "a" / "x.jpg")
    _write(tmp_path / "twice" / "b" / "x.jpg")
    _write(tmp_path / "one_mask" / "x.png")
    with pytest.raises(DataValidationError, match=r"same stem in different sub-folders.*"
                                                  r"a/x\.jpg / b/x\.jpg"):
        from_folders(tmp_path / "twice", tmp_path / "one_mask")
