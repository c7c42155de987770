"""Reading images and masks: modes, EXIF orientation, palettes, colour masks, headers."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask.data import image_size, read_image, read_mask
from automask.data.io import looks_truncated
from automask.errors import DataValidationError


def _rgb(h=6, w=9, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _smooth(h, w):
    """A gradient image: JPEG keeps it close to the source (noise it would not)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.dstack([yy * 255 // max(h - 1, 1), xx * 255 // max(w - 1, 1),
                      np.full((h, w), 90)]).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_read_image_lossless_formats_roundtrip(tmp_path, suffix):
    arr = _rgb()
    path = tmp_path / f"a{suffix}"
    Image.fromarray(arr).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (6, 9, 3)
    np.testing.assert_array_equal(out, arr)


def test_read_image_jpeg_is_rgb_uint8(tmp_path):
    arr = _smooth(32, 40)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (32, 40, 3) and out.dtype == np.uint8
    # lossy, but close to the source on average
    assert np.abs(out.astype(int) - arr.astype(int)).mean() < 4


def test_read_image_grayscale_rgba_palette(tmp_path):
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (5, 6, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)

    rgba = np.dstack([_rgb(5, 6), np.full((5, 6), 7, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])

    pal = Image.new("P", (4, 3))
    pal.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2, 1] * 3)
    pal.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert tuple(out[0, 1]) == (10, 20, 30) and tuple(out[0, 2]) == (200, 100, 50)


def test_read_image_16bit_scaled_to_8bit(tmp_path):
    arr = np.array([[0, 257, 65535], [32896, 514, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as pil:
        assert pil.mode.startswith("I")
    out = read_image(tmp_path / "d.png")
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], np.round(arr / 257.0).astype(np.uint8))


def test_exif_orientation_applied_and_header_size_swapped(tmp_path):
    arr = _smooth(10, 20)  # H=10, W=20 as stored
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (20, 10, 3)
    assert image_size(tmp_path / "r.jpg") == (20, 10)
    # The displayed image is the stored one rotated 90 degrees clockwise.
    expected = np.rot90(arr, k=-1)
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 6
    # and not the unrotated-then-reshaped array
    assert np.abs(out.astype(int) - np.rot90(arr, k=1).astype(int)).mean() > 30


def test_image_size_reads_header_only(tmp_path):
    Image.fromarray(_rgb(7, 11)).save(tmp_path / "a.png")
    assert image_size(tmp_path / "a.png") == (7, 11)


def test_read_mask_palette_gives_indices(tmp_path):
    pal = Image.new("P", (3, 2))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2, 2, 1, 0])
    pal.save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    np.testing.assert_array_equal(out, [[0, 1, 2], [2, 1, 0]])


def test_read_mask_grayscale_and_bilevel(tmp_path):
    m = np.array([[0, 255], [255, 0]], np.uint8)
    Image.fromarray(m).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), m)
    Image.fromarray(m).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "b.png"), m // 255)


def test_rgb_mask_is_error_unless_color_map(tmp_path):
    m = np.zeros((4, 5, 3), np.uint8)
    m[1:3, 1:4] = (128, 0, 0)
    m[0, 0] = (0, 128, 0)
    path = tmp_path / "colour.png"
    Image.fromarray(m).save(path)
    with pytest.raises(DataValidationError, match=r"is a colour \(RGB\) image of 3 colour\(s\): "
                       r"\(0, 0, 0\), \(0, 128, 0\), \(128, 0, 0\); .* pass color_map="
                       r"\{\(0, 0, 0\): 0, \(0, 128, 0\): 1, \.\.\.\}") as info:
        read_mask(path)  # the colours it holds, to write the color_map from
    assert str(path) in str(info.value)
    photo = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    with pytest.raises(DataValidationError, match=r"image of 400 colours \(.*, \.\.\.\), too "
                                                  r"many for class colours: a photograph"):
        read_mask(tmp_path / "photo.png")
    out = read_mask(path, color_map={(0, 0, 0): 0, (128, 0, 0): 1, (0, 128, 0): 2})
    expected = np.zeros((4, 5), np.uint8)
    expected[1:3, 1:4] = 1
    expected[0, 0] = 2
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(DataValidationError, match=r"\(0, 128, 0\)"):
        read_mask(path, color_map={(0, 0, 0): 0, (128, 0, 0): 1})


def test_gray_saved_as_rgb_mask_is_accepted(tmp_path):
    m = np.array([[0, 255, 0]], np.uint8)
    Image.fromarray(np.dstack([m, m, m])).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png"), m)


def test_looks_truncated(tmp_path):
    Image.fromarray(_rgb(40, 40)).save(tmp_path / "a.jpg")
    Image.fromarray(_rgb(40, 40)).save(tmp_path / "a.png")
    assert not looks_truncated(tmp_path / "a.jpg")
    assert not looks_truncated(tmp_path / "a.png")
    for name in ("a.jpg", "a.png"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        assert looks_truncated(tmp_path / f"cut_{name}")


@pytest.mark.parametrize("mode", ["L", "P", "RGB"])
def test_read_results_are_writable_arrays(tmp_path, mode):
    """Users edit what they read (and torch.from_numpy warns on read-only memory)."""
    img = Image.fromarray(_rgb()).convert(mode)
    img.save(tmp_path / "a.png")
    Image.fromarray((_rgb()[..., 0] > 127).astype(np.uint8) * 255).save(tmp_path / "m.png")
    assert read_image(tmp_path / "a.png").flags.writeable
    assert read_mask(tmp_path / "m.png").flags.writeable


# -- numpy .npy arrays: the same samples as the image files they stand for ---------------

def test_npy_arrays_read_as_the_image_files_holding_the_same_samples(tmp_path):
    rgb = _rgb(7, 11, seed=3)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.save(tmp_path / "hwc.npy", rgb)
    np.save(tmp_path / "chw.npy", np.moveaxis(rgb, -1, 0))  # (3, H, W), as torch keeps it
    np.save(tmp_path / "fortran.npy", np.asfortranarray(rgb))
    want = read_image(tmp_path / "rgb.png")
    for name in ("hwc", "chw", "fortran"):
        assert image_size(tmp_path / f"{name}.npy") == (7, 11)
        np.testing.assert_array_equal(read_image(tmp_path / f"{name}.npy"), want)
    deep = np.random.default_rng(1).integers(0, 65536, size=(7, 11), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # I;16: 65535 -> 255
    np.save(tmp_path / "deep.npy", deep)
    np.testing.assert_array_equal(read_image(tmp_path / "deep.npy"),
                                  read_image(tmp_path / "deep.png"))
    unit = np.linspace(0, 1, 77, dtype=np.float32).reshape(7, 11)  # floats in [0, 1]: x 255
    np.save(tmp_path / "unit.npy", unit)
    np.testing.assert_array_equal(read_image(tmp_path / "unit.npy")[..., 1],
                                  np.clip(unit * 255 + 0.5, 0, 255).astype(np.uint8))


def test_npy_masks_give_their_class_ids(tmp_path):
    ids = np.random.default_rng(2).integers(0, 5, size=(6, 8))  # int64
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "ids_f.npy", ids.astype(np.float32))
    np.save(tmp_path / "bool.npy", ids > 2)
    for name in ("ids", "ids_f"):
        out = read_mask(tmp_path / f"{name}.npy")
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, ids)
    np.testing.assert_array_equal(read_mask(tmp_path / "bool.npy"), (ids > 2).astype(np.uint8))
    np.save(tmp_path / "half.npy", ids + 0.5)
    with pytest.raises(DataValidationError, match="non-integer"):
        read_mask(tmp_path / "half.npy")


@pytest.mark.parametrize("array, reason", [
    (np.zeros((10, 12, 14)), r"shape \(10, 12, 14\) is not one 2-D picture.*images given in "
                             r"memory: a list of arrays, one per image"),
    (np.zeros(5), r"shape \(5,\) is not one 2-D picture"),
    (np.array([["a", "b"]]), "dtype <U1 holds no image samples"),
    (np.zeros((4, 4), complex), "dtype complex128 holds no image samples"),
    (np.array([{"a": 1}], dtype=object), r"cannot read this \.npy array \(.*[Oo]bject"),
])
def test_npy_arrays_that_hold_no_picture_are_refused_with_the_reason(tmp_path, array, reason):
    from automask.data.io import check_decodes

    path = tmp_path / "x.npy"
    np.save(path, array, allow_pickle=True)
    for read in (image_size, check_decodes, read_image, read_mask):
        with pytest.raises(OSError, match=reason) as info:
            read(path)
        assert str(path) in str(info.value)


def test_a_truncated_npy_array_is_refused_by_the_size_and_the_full_read(tmp_path):
    from automask.data.io import check_decodes

    path = tmp_path / "cut.npy"
    np.save(path, np.zeros((50, 60)))
    path.write_bytes(path.read_bytes()[:-100])
    for read in (image_size, check_decodes, read_image):
        with pytest.raises(OSError, match="cannot read this .npy array"):
            read(path)


def test_npy_masks_of_several_channels_are_refused_unless_colours_with_a_colour_map(tmp_path):
    fg = np.zeros((6, 8), np.uint8)
    fg[1:3, 2:5] = 1
    np.save(tmp_path / "onehot.npy", np.stack([1 - fg, fg]))  # (2, H, W): not grey + alpha
    np.save(tmp_path / "onehot_last.npy", np.stack([1 - fg, fg], axis=-1).astype(bool))
    for name in ("onehot", "onehot_last"):
        with pytest.raises(DataValidationError, match=r"2 channels.*argmax"):
            read_mask(tmp_path / f"{name}.npy")
    colours = np.zeros((6, 8, 3), np.uint8)
    colours[fg == 1] = (255, 0, 0)
    np.save(tmp_path / "colours.npy", colours)
    np.testing.assert_array_equal(
        read_mask(tmp_path / "colours.npy", color_map={(0, 0, 0): 0, (255, 0, 0): 1}), fg)
    with pytest.raises(DataValidationError, match="3 channels"):
        read_mask(tmp_path / "colours.npy")


def test_eight_bit_colour_samples_take_their_colour_map_as_they_are():
    from automask.data.io import _mask_from_samples

    colours = np.zeros((4, 5, 3), np.uint8)  # as tifffile reads an 8-bit RGB TIFF
    colours[1:3, 1:4] = (0, 128, 255)
    ids = _mask_from_samples(colours, 1, {(0, 0, 0): 0, (0, 128, 255): 2}, "m.tif")
    np.testing.assert_array_equal(ids, np.where(colours[..., 2] == 255, 2, 0))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiffs_of_more_than_four_bands_are_refused_as_a_npy_array_of_them_is(tmp_path, dtype):
    """A multispectral TIFF (5 or 13 samples per pixel) names its bands instead of being read
    as its first three (for Sentinel-2 those are coastal, blue and green); 4 bands read as
    the first three, by validation as well."""
    import tifffile

    from automask.data import validate_frame
    from automask.data.io import check_decodes

    bands = (np.random.default_rng(3).random((10, 12, 13)) * 200).astype(dtype)
    mask = tmp_path / "m.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    for count in (5, 13):
        path = tmp_path / f"b{count}.tif"
        tifffile.imwrite(path, bands[..., :count], photometric="minisblack",
                         planarconfig="contig")
        reason = rf"a TIFF image of {count} bands \(samples per pixel\) is not one picture"
        for read in (check_decodes, read_image, read_mask):
            with pytest.raises(OSError, match=reason):
                read(path)
        with pytest.raises(DataValidationError, match=rf"row 0 \[image\] .*b{count}\.tif: "
                                                      rf"unreadable image \(.*{reason}"):
            validate_frame(pd.DataFrame({"image": [str(path)], "label": [str(mask)]}))
    four = tmp_path / "b4.tif"
    tifffile.imwrite(four, bands[..., :4], photometric="rgb",
                     extrasamples=["unspecified"])  # red, green, blue, near infrared
    three = tmp_path / "b3.npy"
    np.save(three, bands[..., :3])
    np.testing.assert_array_equal(read_image(four), read_image(three))
    assert validate_frame(pd.DataFrame({"image": [str(four)], "label": [str(mask)]})).task \
        == "binary"


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_file_cut_short_is_named_by_the_reading_error(tmp_path, suffix):
    """Pillow's "image file is truncated" names no file: a file cut short after the data
    was checked (a copy still running, a full disk) failed a fit or a prediction of
    thousands of images without saying which."""
    path = tmp_path / f"cut{suffix}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for read in (read_image, read_mask):
        with pytest.raises(OSError, match=rf"^{re.escape(str(path))}: image file is truncated"):
            read(path)


def test_a_black_and_white_palette_mask_with_white_first_is_read_by_its_greys(tmp_path):
    """Pillow's quantize(2) (and palette optimisers) put white at index 0: read by index,
    the white object was background and the black background the object, silently."""
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 255
    quantized = Image.fromarray(mask).convert("RGB").quantize(2)
    assert quantized.getpalette()[:3] == [255, 255, 255]  # white at index 0
    quantized.save(tmp_path / "white_first.png")
    assert np.array_equal(read_mask(tmp_path / "white_first.png"), mask)
    # palettes in index order (black first) and colour palettes keep their indices
    ordered = Image.fromarray((mask > 0).astype(np.uint8), mode="P")
    ordered.putpalette([0, 0, 0, 255, 255, 255])
    ordered.save(tmp_path / "black_first.png")
    assert np.array_equal(read_mask(tmp_path / "black_first.png"), (mask > 0).astype(np.uint8))
    voc = Image.fromarray((mask > 0).astype(np.uint8) * 2, mode="P")
    voc.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])
    voc.save(tmp_path / "voc.png")
    assert set(np.unique(read_mask(tmp_path / "voc.png"))) == {0, 2}
