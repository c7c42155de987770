"""from_folders: pairing by stem, unpaired files, the shared real datasets."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from automask.data import IGNORE_INDEX, SegmentationDataset, validate_frame
from automask.datasets import from_folders
from automask.errors import DataValidationError
from conftest import shared_path


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _layout(tmp_path, image_stems, mask_stems):
    for stem in image_stems:
        _write(tmp_path / "images" / f"{stem}.jpg", np.zeros((4, 4, 3), np.uint8))
    for stem in mask_stems:
        _write(tmp_path / "masks" / f"{stem}.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "images" / "README.md").write_text("not an image")
    (tmp_path / "masks" / ".hidden.png").write_bytes(b"")


def test_pairs_by_stem_sorted_absolute(tmp_path):
    _layout(tmp_path, ["b", "a", "c"], ["c", "a", "b"])
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    assert list(df.columns) == ["image", "label"]
    assert [os.path.basename(p) for p in df["image"]] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [os.path.basename(p) for p in df["label"]] == ["a.png", "b.png", "c.png"]
    assert all(os.path.isabs(p) for p in df["image"])
    assert df.attrs["unpaired"] == {"images": [], "masks": []}


def test_names_that_differ_in_letter_case_only_pair(tmp_path):
    """Folders written on a disk that ignores case (``IMG_1.JPG`` with ``img_1_mask.png``)
    found no pair at all; they pair now, the usual endings still dropped, and so do
    score_folders' predictions. Two names of one side that differ in case only keep the
    names as written (which would pair with which is unclear)."""
    from automask.metrics import score_folders

    _layout(tmp_path, ["IMG_1", "IMG_2", "Img_3"], ["img_1_mask", "img_2_mask", "IMG_3_mask"])
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    assert [(os.path.basename(i), os.path.basename(m)) for i, m in zip(df["image"], df["label"])
            ] == [("IMG_1.jpg", "img_1_mask.png"), ("IMG_2.jpg", "img_2_mask.png"),
                  ("Img_3.jpg", "IMG_3_mask.png")]
    # predictions named after the images, ground truths as the masks' names: distinct
    # masks, so that an IoU of 1 means each met its own
    for rows, (pred, gt) in enumerate([("IMG_1", "img_1"), ("IMG_2", "img_2"),
                                       ("Img_3", "IMG_3")], start=1):
        mask = np.zeros((4, 4), np.uint8)
        mask[:rows] = 255
        _write(tmp_path / "preds" / f"{pred}.png", mask)
        _write(tmp_path / "gts" / f"{gt}.png", mask)
    assert score_folders(tmp_path / "preds", tmp_path / "gts", metrics=["iou"]) == {
        "iou": 1.0, "n_images": 3}
    both = tmp_path / "both"
    _layout(both, ["a", "A"], ["a_mask", "b_mask"])
    with pytest.raises(DataValidationError, match="unpaired"):
        from_folders(both / "images", both / "masks")


def test_custom_column_names(tmp_path):
    _layout(tmp_path, ["a"], ["a"])
    df = from_folders(tmp_path / "images", tmp_path / "masks", image_col="img", label_col="gt")
    assert list(df.columns) == ["img", "gt"]


def test_unpaired_strict_lists_them(tmp_path):
    _layout(tmp_path, ["a", "b", "only_img"], ["a", "b", "only_mask"])
    with pytest.raises(DataValidationError) as info:
        from_folders(tmp_path / "images", tmp_path / "masks")
    msg = str(info.value)
    assert str(tmp_path / "images" / "only_img.jpg") in msg
    assert str(tmp_path / "masks" / "only_mask.png") in msg


def test_unpaired_lenient_warns(tmp_path):
    _layout(tmp_path, ["a", "only_img"], ["a"])
    with pytest.warns(UserWarning, match="only_img"):
        df = from_folders(tmp_path / "images", tmp_path / "masks", strict=False)
    assert len(df) == 1
    assert df.attrs["unpaired"]["images"] == [str(tmp_path / "images" / "only_img.jpg")]


def test_missing_folder_and_duplicate_stems(tmp_path):
    with pytest.raises(DataValidationError, match="does not exist"):
        from_folders(tmp_path / "nope", tmp_path / "masks")
    _layout(tmp_path, ["a"], ["a"])
    _write(tmp_path / "images" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataValidationError, match="same stem"):
        from_folders(tmp_path / "images", tmp_path / "masks")


BINARY_SHARED = ["kvasir_seg", "ph2_skin_lesion", "isbi2012_em_membranes", "aerial_roads"]


@pytest.mark.shared
@pytest.mark.parametrize("name", BINARY_SHARED)
def test_shared_binary_datasets_load(name):
    root = shared_path("data", name)
    df = from_folders(root / "images", root / "masks")
    spec = validate_frame(df)
    assert spec.task == "binary" and spec.num_classes == 2 and spec.num_outputs == 1
    assert len(spec.frame) == len(list((root / "images").iterdir()))
    item = SegmentationDataset(spec, input_size=128)[0]
    assert item["image"].shape == (3, 128, 128)
    assert set(item["target"].unique().tolist()) <= {0, 1, IGNORE_INDEX}
    assert (item["target"] == 1).any()


@pytest.mark.shared
def test_shared_camvid_multiclass_with_void():
    root = shared_path("data", "camvid")
    names = [line.split(maxsplit=1)[1] for line in (root / "classes.txt").read_text().splitlines()
             if line.strip()]
    assert names[11] == "Unlabelled"
    df = from_folders(root / "images", root / "masks")
    spec = validate_frame(df, void_label=11, class_names=names[:11])
    assert spec.task == "multiclass" and spec.num_classes == 11 and spec.num_outputs == 11
    assert spec.class_names[0] == "Sky"
    # Without the void option the "Unlabelled" value counts as a 12th class.
    assert validate_frame(df).num_classes == 12
    ds = SegmentationDataset(spec, input_size=96)
    with Image.open(df["label"].iloc[0]) as pil:
        raw = np.asarray(pil)
    item = ds[0]
    values = set(item["target"].unique().tolist())
    assert values <= set(range(11)) | {IGNORE_INDEX}
    if (raw == 11).any():
        assert IGNORE_INDEX in values


@pytest.mark.parametrize(
    ("image_stems", "mask_stems", "expected"),
    [
        (["ISIC_01", "ISIC_02"], ["ISIC_01_segmentation", "ISIC_02_segmentation"],
         {"image": "", "mask": "_segmentation"}),
        (["104_sat", "208_sat"], ["104_mask", "208_mask"], {"image": "_sat", "mask": "_mask"}),
        (["a", "b_mask"], ["a", "b_mask"], {"image": "", "mask": ""}),  # exact stems win
    ],
)
def test_common_mask_name_endings_are_paired(tmp_path, image_stems, mask_stems, expected):
    _layout(tmp_path, image_stems, mask_stems)
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    assert df.attrs["suffixes"] == expected
    assert len(df) == 2
    for image, mask in zip(df["image"], df["label"]):
        stem = os.path.splitext(os.path.basename(image))[0]
        assert os.path.basename(mask).startswith(stem.removesuffix(expected["image"]))


def test_explicit_mask_suffix(tmp_path):
    _layout(tmp_path, ["x1"], ["x1-ann"])
    # one file a side tells no ending apart from the name: no pair at all, and the ending
    # to pass is named (strict=False could not help)
    for strict in (True, False):
        with pytest.raises(DataValidationError, match=r"no image/mask pairs.*end with "
                                                      r"'-ann': pass mask_suffix='-ann' "
                                                      r"\(automask: --mask-suffix -ann\)"):
            from_folders(tmp_path / "images", tmp_path / "masks", strict=strict)
    df = from_folders(tmp_path / "images", tmp_path / "masks", mask_suffix="-ann")
    assert [os.path.basename(p) for p in df["label"]] == ["x1-ann.png"]


def test_no_pairs_names_an_image_ending_or_both_options(tmp_path):
    _layout(tmp_path / "a", ["x1_leftImg8bit"], ["x1"])
    with pytest.raises(DataValidationError, match=r"pass image_suffix='_leftImg8bit'"):
        from_folders(tmp_path / "a" / "images", tmp_path / "a" / "masks")
    _layout(tmp_path / "b", ["x1_leftImg8bit"], ["x1_gtFine_labelIds"])
    with pytest.raises(DataValidationError, match=r"pass it as mask_suffix= \(image_suffix="):
        from_folders(tmp_path / "b" / "images", tmp_path / "b" / "masks")
    df = from_folders(tmp_path / "b" / "images", tmp_path / "b" / "masks",
                      image_suffix="_leftImg8bit", mask_suffix="_gtFine_labelIds")
    assert len(df) == 1 and df.attrs["suffixes"] == {"image": "_leftImg8bit",
                                                     "mask": "_gtFine_labelIds"}


@pytest.mark.parametrize(
    ("image_stems", "mask_stems", "expected"),
    [
        # DRIVE: an ending on each side, neither of them a listed one
        (["21_training", "22_training", "23_training"],
         ["21_manual1", "22_manual1", "23_manual1"], {"image": "_training", "mask": "_manual1"}),
        # STARE: the annotator's initials after a dot (im0001.ah.ppm)
        (["im0001", "im0002"], ["im0001.ah", "im0002.ah"], {"image": "", "mask": ".ah"}),
        # ISPRS Potsdam: "_RGB" (not the listed "_rgb") with the listed "_label"
        (["top_2_10_RGB", "top_2_11_RGB"], ["top_2_10_label", "top_2_11_label"],
         {"image": "_RGB", "mask": "_label"}),
        # Cityscapes' two-part ending: the longest shared one that pairs
        (["a_1_leftImg8bit", "b_2_leftImg8bit"], ["a_1_gtFine_labelIds", "b_2_gtFine_labelIds"],
         {"image": "_leftImg8bit", "mask": "_gtFine_labelIds"}),
        (["x1", "x2"], ["x1-ann", "x2-ann"], {"image": "", "mask": "-ann"}),
    ],
)
def test_endings_every_file_of_a_folder_shares_are_paired(tmp_path, image_stems, mask_stems,
                                                          expected):
    _layout(tmp_path, image_stems, mask_stems)
    df = from_folders(tmp_path / "images", tmp_path / "masks")
    assert df.attrs["suffixes"] == expected
    assert len(df) == len(image_stems)
    for image, mask in zip(df["image"], df["label"]):
        image_stem = os.path.splitext(os.path.basename(image))[0]
        mask_stem = os.path.splitext(os.path.basename(mask))[0]
        assert (image_stem.removesuffix(expected["image"])
                == mask_stem.removesuffix(expected["mask"]))


def test_shared_endings_never_beat_exact_stems_or_pair_a_single_file(tmp_path):
    # "a_x" and "b_x" pair as written; dropping the shared "_x" pairs no more files
    _layout(tmp_path / "a", ["a_x", "b_x", "c_x"], ["a_x", "b_x", "d_x"])
    with pytest.warns(UserWarning, match="2 unpaired file"):
        df = from_folders(tmp_path / "a" / "images", tmp_path / "a" / "masks", strict=False)
    assert df.attrs["suffixes"] == {"image": "", "mask": ""}
    assert [os.path.basename(p) for p in df["label"]] == ["a_x.png", "b_x.png"]
    # one file a side: "scan_01" and "scan_02" are two names, not "scan" twice
    _layout(tmp_path / "b", ["scan_01"], ["scan_02"])
    with pytest.raises(DataValidationError, match="no image/mask pairs"):
        from_folders(tmp_path / "b" / "images", tmp_path / "b" / "masks")
    # an ending only some of the files have is not shared
    _layout(tmp_path / "c", ["x1", "x2", "x3"], ["x1_manual1", "x2_manual1", "x3_manual2"])
    with pytest.raises(DataValidationError, match="no image/mask pairs"):
        from_folders(tmp_path / "c" / "images", tmp_path / "c" / "masks")


def _busi(folder, masks_folder=None):
    """BUSI's layout: ``x (n).png`` with ``x (n)_mask.png``, and for an image with two
    lesions ``x (n)_mask_1.png`` beside (one lesion per mask); the image folder holds the
    masks too unless ``masks_folder`` is given."""
    masks_folder = masks_folder or folder
    square = np.zeros((6, 8), np.uint8)
    square[1:3, 1:3] = 255
    for n in (1, 2, 3):
        _write(folder / f"benign ({n}).png", np.full((6, 8, 3), 40 * n, np.uint8))
        _write(masks_folder / f"benign ({n})_mask.png", square)
    second = np.zeros((6, 8), np.uint8)
    second[4:6, 5:8] = 255  # a second lesion, 6 pixels
    _write(masks_folder / "benign (2)_mask_1.png", second)
    third = np.zeros((6, 8), np.uint8)
    third[2:3, 1:6] = 255  # overlapping the first: 3 new pixels
    _write(masks_folder / "benign (2)_mask_2.png", third)
    return square | second | third


@pytest.mark.parametrize("separate", [False, True])
def test_an_images_further_masks_are_named_and_merged_on_request(tmp_path, separate):
    """BUSI's ``x_mask_1.png`` beside ``x_mask.png``: without an option the error names
    it as a further mask of its image (it was "image without mask" in one folder, and two
    folders paired nothing at all); ``extra_masks="union"`` takes the union of the masks
    as the label, which fit and evaluate read; ``strict=False`` drops them."""
    images = tmp_path / "busi"
    masks = tmp_path / "masks" if separate else images
    union = _busi(images, masks if separate else None)
    with pytest.raises(DataValidationError) as info:
        from_folders(images, masks)
    message = str(info.value)
    assert message.count("further mask of image " + str(images / "benign (2).png")) == 2
    assert str(masks / "benign (2)_mask_1.png") in message and "extra_masks='union'" in message
    assert "image without mask" not in message and "mask without image" not in message

    df = from_folders(images, masks, extra_masks="union")
    assert len(df) == 3 and df.attrs["unpaired"] == {"images": [], "masks": []}
    assert df.attrs["extra_masks"] == {str(images / "benign (2).png"): [
        str(masks / "benign (2)_mask_1.png"), str(masks / "benign (2)_mask_2.png")]}
    assert df["label"][0] == str(masks / "benign (1)_mask.png")
    merged = df["label"][1]
    assert merged.dtype == np.uint8 and np.array_equal(merged, union)
    assert int((merged > 0).sum()) == 4 + 6 + 3
    if not separate:  # the merged label in memory is read by fit and evaluate
        from automask import SemanticSegmentor

        seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
            df, presets="tiny", hyperparameters={"optim.max_epochs": 1, "model.input_size": 32})
        assert seg.task_ == "binary" and 0 <= seg.evaluate(df)["iou"] <= 1

    with pytest.warns(UserWarning, match="further mask of image"):
        df = from_folders(images, masks, strict=False)
    assert df["label"].tolist() == [str(masks / f"benign ({n})_mask.png") for n in (1, 2, 3)]
    assert len(df.attrs["unpaired"]["masks"]) == 2  # in one folder too, they are masks


def test_further_masks_in_one_folder_with_image_endings_pair(tmp_path):
    """DeepGlobe's ``x_sat.jpg`` beside ``x_mask.png`` in one folder, with a further mask
    ``x_mask_1.png``: the further mask was counted among the images, so no image ending
    was shared by all of them and nothing paired; it is a mask of its own image now."""
    for k in range(3):
        _write(tmp_path / f"{k}_sat.png", np.full((4, 4, 3), 9 * k, np.uint8))
        _write(tmp_path / f"{k}_mask.png", np.eye(4, dtype=np.uint8) * 255)
    _write(tmp_path / "0_mask_1.png", np.fliplr(np.eye(4, dtype=np.uint8)) * 255)
    df = from_folders(tmp_path, tmp_path, extra_masks="union")
    assert df.attrs["suffixes"] == {"image": "_sat", "mask": "_mask"}
    assert df["image"].tolist() == [str(tmp_path / f"{k}_sat.png") for k in range(3)]
    assert df.attrs["extra_masks"] == {str(tmp_path / "0_sat.png"): [
        str(tmp_path / "0_mask_1.png")]}
    assert int((df["label"][0] > 0).sum()) == 8  # both diagonals of a 4x4 square


def test_further_masks_that_do_not_merge_name_the_files(tmp_path):
    _busi(tmp_path)
    _write(tmp_path / "benign (2)_mask_2.png", np.zeros((5, 8), np.uint8))
    with pytest.raises(DataValidationError, match=r"benign \(2\)_mask_2.png is 8x5 but .*"
                                                  r"benign \(2\)_mask.png.* is 8x6"):
        from_folders(tmp_path, tmp_path, extra_masks="union")
    _write(tmp_path / "benign (2)_mask_2.png", np.full((6, 8, 3), (128, 64, 0), np.uint8))
    with pytest.raises(DataValidationError, match=r"merges masks of one channel .*"
                                                  r"benign \(2\)_mask_2.png is a colour"):
        from_folders(tmp_path, tmp_path, extra_masks="union")
    with pytest.raises(ValueError, match="extra_masks must be None or 'union'"):
        from_folders(tmp_path, tmp_path, extra_masks="max")
    # a numbered name whose base is no mask stays an unpaired image
    _write(tmp_path / "benign (2)_mask_2.png", np.zeros((6, 8), np.uint8))
    _write(tmp_path / "other_1.png", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(DataValidationError, match=r"image without mask: .*other_1.png"):
        from_folders(tmp_path, tmp_path, extra_masks="union")


def test_extra_masks_option_of_the_command_line(tmp_path):
    from automask import cli

    _busi(tmp_path)
    parser = cli.build_parser()
    args = ["evaluate", "run", "--images", str(tmp_path), "--masks", str(tmp_path)]
    frame = cli._folders(parser.parse_args([*args, "--extra-masks", "union"]), "image", "label")
    assert isinstance(frame["label"][1], np.ndarray) and len(frame.attrs["extra_masks"]) == 1
    with pytest.raises(DataValidationError, match=r"--extra-masks union"):
        cli._folders(parser.parse_args(args), "image", "label")


def test_drop_unpaired_option_of_the_command_line(tmp_path):
    """The unpaired files' error names the command line's way out, which drops them
    with a warning listing them."""
    from automask import cli

    _layout(tmp_path, ["a", "b", "only_img"], ["a", "b"])
    parser = cli.build_parser()
    args = ["evaluate", "run", "--images", str(tmp_path / "images"), "--masks",
            str(tmp_path / "masks")]
    with pytest.raises(DataValidationError, match=r"automask: --drop-unpaired"):
        cli._folders(parser.parse_args(args), "image", "label")
    with pytest.warns(UserWarning, match="only_img"):
        frame = cli._folders(parser.parse_args([*args, "--drop-unpaired"]), "image", "label")
    assert len(frame) == 2


def test_a_tiff_withseveral_pages_is_told_from_its_header(tmp_path):
    """from_folders looks for TIFF stacks in every TIFF pair from the first page directory
    alone (it imported torch and took 3.6 ms a pair): single pages, stacks, BigTIFF and
    big-endian files, and files that are no TIFF or cut short."""
    import tifffile

    from automask.datasets.folders import several_pages

    page = np.zeros((6, 5), np.uint8)
    tifffile.imwrite(tmp_path / "one.tif", page)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((6, 5, 3), np.uint8))
    tifffile.imwrite(tmp_path / "three.tif", np.stack([page] * 3), photometric="minisblack")
    tifffile.imwrite(tmp_path / "big.tif", np.stack([page] * 2), bigtiff=True,
                     photometric="minisblack")
    tifffile.imwrite(tmp_path / "big_one.tif", page, bigtiff=True)
    tifffile.imwrite(tmp_path / "motorola.tif", np.stack([page] * 2), byteorder=">",
                     photometric="minisblack")
    (tmp_path / "cut.tif").write_bytes((tmp_path / "three.tif").read_bytes()[:12])
    Image.fromarray(page).save(tmp_path / "png.tif", format="PNG")  # misnamed
    found = {name: several_pages(tmp_path / f"{name}.tif") for name in
             ("one", "rgb", "three", "big", "big_one", "motorola", "cut", "png")}
    assert found == {"one": False, "rgb": False, "three": True, "big": True,
                     "big_one": False, "motorola": True, "cut": False, "png": False}
    from automask.data.io import stacked_images

    for name in ("one", "rgb", "three", "big", "big_one", "motorola"):
        assert found[name] == (stacked_images(tmp_path / f"{name}.tif") > 1), name


def test_bare_class_names_of_which_one_begins_with_a_number_are_names(tmp_path):
    """"2 wheeler" among bare names is a name, not class id 2 (the file was refused);
    a file numbered on most lines, one missing its id, is still refused."""
    from automask.datasets.folders import read_class_names
    from automask.errors import DataValidationError

    path = tmp_path / "classes.txt"
    path.write_text("background\ncar\n2 wheeler\nperson\n")
    with pytest.warns(UserWarning, match="line\\(s\\) 3 '2 wheeler' begin with a number"):
        assert read_class_names(path) == ["background", "car", "2 wheeler", "person"]
    path.write_text("0 background\n1 car\nperson\n")
    with pytest.raises(DataValidationError, match="has no class id, but other lines do"):
        read_class_names(path)
