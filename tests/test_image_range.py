"""``data.image_range``: images with more than 8 bits per sample read with one value range
for a whole dataset (12-bit data in 16-bit files, CT values, float reflectances), resolved
at fit and kept for prediction; and the TIFFs Pillow reads truncated (16-bit colour: its top
8 bits only; also 16-bit colour PNGs) or not at all (64-bit floats), read otherwise."""
from __future__ import annotations

import json
import struct
import zlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image, UnidentifiedImageError

from automask.config import resolve
from automask.data.cache import SampleCache
from automask.data.dataset import SegmentationDataset
from automask.data.io import check_decodes, dataset_value_range, image_size, read_image
from automask.data.validation import validate_frame
from automask.errors import ConfigError, DataValidationError


def _save(path, array: np.ndarray) -> str:
    """A 2-D array as PNG (uint8, uint16) or TIFF (int32, float32), with Pillow."""
    fmt = "TIFF" if array.dtype in (np.int32, np.float32) else "PNG"
    Image.fromarray(array).save(path, format=fmt)
    return str(path)


def _scene(shape=(40, 56), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(image in [0, 1], binary mask): a bright rectangle on a noisy background."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[8:30, 12:44] = 255
    image = np.clip(0.3 + 0.4 * (mask > 0) + rng.normal(0, 0.05, shape), 0, 1)
    return image, mask


@pytest.mark.parametrize("arrays,expected", [
    ([np.array([[0, 4000]], np.uint16), np.array([[7, 2500]], np.uint16)], (0.0, 4095.0)),
    ([np.array([[0, 1000]], np.uint16)], (0.0, 1023.0)),
    ([np.array([[3, 200]], np.uint16)], (0.0, 255.0)),
    ([np.array([[0, 5000]], np.uint16), np.array([[0, 40000]], np.uint16)], (0.0, 65535.0)),
    ([np.array([[-1024, 900]], np.int32), np.array([[-50, 3071]], np.int32)],
     (-1024.0, 3071.0)),
    ([np.array([[0.0, 0.7]], np.float32), np.array([[0.2, 1.0]], np.float32)], (0.0, 1.0)),
    ([np.array([[120.0, 9000.0]], np.float32), np.array([[np.nan, 30.0]], np.float32)],
     (30.0, 9000.0)),
])
def test_one_range_for_the_deep_images_of_a_dataset(tmp_path, arrays, expected):
    paths = [_save(tmp_path / f"i{k}.{'tif' if a.dtype != np.uint16 else 'png'}", a)
             for k, a in enumerate(arrays)]
    paths.append(_save(tmp_path / "eight.png", np.full((4, 4), 255, np.uint8)))  # not counted
    assert dataset_value_range(paths) == expected


def test_eight_bit_datasets_have_no_range(tmp_path):
    paths = [_save(tmp_path / "a.png", np.full((4, 4), 9, np.uint8))]
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "b.jpg")
    assert dataset_value_range([*paths, str(tmp_path / "b.jpg")]) is None


def test_twelve_bit_data_keeps_its_grey_levels_with_the_range(tmp_path):
    levels = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    path = _save(tmp_path / "twelve.png", levels)
    own_rule = read_image(path)
    assert len(np.unique(own_rule)) == 17  # 65535 full scale: 4096 levels become 17
    ranged = read_image(path, value_range=(0.0, 4095.0))
    assert len(np.unique(ranged)) == 256 and ranged.max() == 255
    np.testing.assert_array_equal(ranged[..., 0], np.round(levels / 4095 * 255).astype(np.uint8))
    # beyond the range: clipped; NaN: the low end; 8-bit images: untouched
    assert read_image(path, value_range=(1000.0, 2000.0))[0, 0, 0] == 0
    assert read_image(path, value_range=(1000.0, 2000.0))[-1, -1, 0] == 255
    nan = _save(tmp_path / "nan.tif", np.array([[np.nan, 2.0]], np.float32))
    assert read_image(nan, value_range=(0.0, 4.0))[0, :, 0].tolist() == [0, 128]
    eight = _save(tmp_path / "eight.png", np.full((4, 4), 77, np.uint8))
    assert (read_image(eight, value_range=(0.0, 4095.0)) == 77).all()


def test_the_dataset_reads_and_caches_with_its_range(tmp_path):
    image, mask = _scene()
    path = _save(tmp_path / "i.png", np.round(image * 4095).astype(np.uint16))
    _save(tmp_path / "m.png", mask)
    spec = validate_frame(pd.DataFrame({"image": [path], "label": [str(tmp_path / "m.png")]}),
                          image_col="image", label_col="label")
    cache = SampleCache(64, None)
    ranged = SegmentationDataset(spec, 64, cache=cache, value_range=(0.0, 4095.0))
    own = SegmentationDataset(spec, 64, cache=cache)
    first = ranged.load_resized(0)[0]
    assert first.max() > 200  # the rectangle at about 0.7 of full scale
    assert own.load_resized(0)[0].max() < 20  # not served the other range's cached entry
    assert own.decodes == 1
    np.testing.assert_array_equal(ranged.load_resized(0)[0], first)
    assert ranged.decodes == 1  # the second read came from the cache


@pytest.mark.parametrize("bad", ["12bit", "0", "5,5", "0,nan", "0,1,2", "", [0, 4095]])
def test_bad_ranges_are_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match="data.image_range"):
        resolve("tiny", {"data.image_range": bad})


def _twelve_bit_frame(tmp_path, n=4):
    """Rows of 12-bit PNGs (16-bit files) and masks, and 8-bit copies of the same images."""
    rows, copies = [], []
    for k in range(n):
        image, mask = _scene(seed=k)
        deep = np.round(image * 4095).astype(np.uint16)
        rows.append((_save(tmp_path / f"i{k}.png", deep), _save(tmp_path / f"m{k}.png", mask)))
        eight = np.round(deep / 4095 * 255).astype(np.uint8)  # what the range reads
        copies.append(_save(tmp_path / f"e{k}.png", eight))
    return pd.DataFrame(rows, columns=["image", "label"]), copies


def test_fit_resolves_the_range_trains_and_predicts_with_it(tmp_path):
    from automask import SemanticSegmentor

    frame, copies = _twelve_bit_frame(tmp_path)
    hp = {"model.input_size": 64, "optim.max_epochs": 2}
    deep = SemanticSegmentor(label="label", path=str(tmp_path / "deep"), verbosity=0)
    deep.fit(frame, presets="tiny", hyperparameters=hp)
    eight = SemanticSegmentor(label="label", path=str(tmp_path / "eight"), verbosity=0)
    eight.fit(frame.assign(image=copies), presets="tiny", hyperparameters=hp)
    assert deep._config(None).data.image_range == "0,4095"
    assert eight._config(None).data.image_range == "auto"  # nothing to scale
    history = [[r.history for r in s.models_.values()] for s in (deep, eight)]
    assert history[0] == history[1]  # the same losses and scores, epoch by epoch
    saved = json.loads(next((tmp_path / "deep").rglob("predictor.json")).read_text())
    assert [m["config"]["data.image_range"] for m in saved["models"].values()] == ["0,4095"]
    loaded = SemanticSegmentor.load(str(tmp_path / "deep"))
    for tiling in ("off", "on"):  # whole images and overlapping windows
        deep_probs = loaded.predict_proba(frame[["image"]], tiling=tiling)
        eight_probs = loaded.predict_proba(pd.DataFrame({"image": copies}), tiling=tiling)
        for a, b in zip(deep_probs, eight_probs):  # 16-bit files read as their 8-bit copies
            np.testing.assert_array_equal(a, b)
    # 12-bit files given to the model fitted on 8-bit copies: read at 16-bit full scale,
    # dark, without a word before; now a warning names their rows. Not for 8-bit images,
    # nor for the model whose fit found the range.
    with pytest.warns(UserWarning, match=r"^4 image\(s\) \(row\(s\) 0, 1, 2, 3\) store more "
                                         r"than 8 bits per sample, but the model was fitted "
                                         r"on 8-bit images"):
        eight.predict(frame[["image"]])
    # the same images in memory (uint16 arrays, as a 16-bit file reads): the same warning;
    # 8-bit arrays, wider integers within 0-255 and floats in [0, 1] read as 8-bit data
    arrays = [np.asarray(Image.open(p)) for p in frame["image"]]
    assert arrays[0].dtype == np.uint16
    with pytest.warns(UserWarning, match=r"^4 image\(s\) .* store more than 8 bits"):
        eight.predict(arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eight.predict(pd.DataFrame({"image": copies}))
        loaded.predict(frame[["image"]])
        small = [np.asarray(Image.open(p)) for p in copies]
        eight.predict([small[0], small[1].astype(np.int64), small[2] / 255.0])


def test_a_range_the_user_sets_is_kept_and_per_image_stays_per_image(tmp_path):
    from automask import SemanticSegmentor

    frame, copies = _twelve_bit_frame(tmp_path, n=3)
    seg = SemanticSegmentor(label="label", path=str(tmp_path / "run"), verbosity=0)
    seg.fit(frame, presets="tiny", hyperparameters={
        "model.input_size": 64, "optim.max_epochs": 1,
        "data.image_range": ["per_image", "0,8191"]})
    assert sorted(c.config.data.image_range for c in seg.models_.values()) == [
        "0,8191", "per_image"]
    per_image = next(n for n, c in seg.models_.items() if c.config.data.image_range ==
                     "per_image")
    deep = seg.predict_proba(frame[["image"]], model=per_image)
    eight = seg.predict_proba(pd.DataFrame({"image": copies}), model=per_image)
    assert any(not np.array_equal(a, b) for a, b in zip(deep, eight))


# --- TIFFs Pillow reads truncated (16-bit colour) or not at all (64-bit floats) ---------

def _colour12(shape=(40, 56), seed=0) -> np.ndarray:
    """(H, W, 3) uint16 12-bit colour data."""
    return np.random.default_rng(seed).integers(0, 4096, (*shape, 3)).astype(np.uint16)


@pytest.mark.parametrize("compression", [None, "zlib", "lzw"])
def test_sixteen_bit_colour_tiffs_keep_their_low_bits(tmp_path, compression):
    if compression == "lzw":
        import imagecodecs  # noqa: F401  (the tiff extra, in dev: LZW's codec)
    data = _colour12()
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, data, photometric="rgb", compression=compression)
    assert Image.open(path).mode == "RGB"  # what Pillow makes of it: the top 8 bits
    assert np.array(Image.open(path)).max() <= 15
    expected = np.round(data / 4095 * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(path, value_range=(0.0, 4095.0)), expected)
    np.testing.assert_array_equal(read_image(path), ((data.astype(int) + 128) // 257))
    assert dataset_value_range([path]) == (0.0, 4095.0)


def test_colour_tiffs_with_planes_alpha_or_a_fourth_band(tmp_path):
    data = _colour12()
    expected = np.round(data / 4095 * 255).astype(np.uint8)
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(data, 2, 0), photometric="rgb", planarconfig="separate")
    four = tmp_path / "four.tif"  # RGB + near infrared
    tifffile.imwrite(four, np.concatenate([data, data[..., :1]], axis=2), photometric="rgb",
                     extrasamples=[0])
    for path in (planar, four):
        np.testing.assert_array_equal(read_image(path, value_range=(0, 4095)), expected)
    grey_alpha = tmp_path / "grey_alpha.tif"  # alpha at 65535 counts for neither
    tifffile.imwrite(grey_alpha, np.stack([data[..., 0], np.full_like(data[..., 0], 65535)],
                                          axis=2), photometric="minisblack", extrasamples=[2])
    assert dataset_value_range([grey_alpha]) == (0.0, 4095.0)
    np.testing.assert_array_equal(read_image(grey_alpha, value_range=(0, 4095)),
                                  np.repeat(expected[..., :1], 3, axis=2))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_colour_tiffs_are_turned_upright_as_pillow_turns_their_8_bit_twins(tmp_path,
                                                                           orientation):
    data = _colour12((24, 40))
    tag = [(274, "H", 1, orientation, True)]
    deep, eight = tmp_path / "deep.tif", tmp_path / "eight.tif"
    tifffile.imwrite(deep, data, photometric="rgb", extratags=tag)
    tifffile.imwrite(eight, np.round(data / 4095 * 255).astype(np.uint8), photometric="rgb",
                     extratags=tag)
    upright = read_image(eight)  # Pillow's own path
    assert upright.shape[:2] == image_size(eight) == image_size(deep)
    np.testing.assert_array_equal(read_image(deep, value_range=(0, 4095)), upright)


def test_float64_tiffs_are_read_and_validated(tmp_path):
    image, mask = _scene()
    path = tmp_path / "f64.tif"
    tifffile.imwrite(path, image)  # float64: Pillow cannot open it
    with pytest.raises(UnidentifiedImageError):
        Image.open(path)
    _save(tmp_path / "m.png", mask)
    spec = validate_frame(pd.DataFrame({"image": [str(path)], "label": [str(tmp_path / "m.png")]}),
                          image_col="image", label_col="label")
    assert image_size(path) == mask.shape and len(spec) == 1
    np.testing.assert_array_equal(read_image(path)[..., 1], np.round(image * 255))
    assert dataset_value_range([path]) == (0.0, 1.0)


def test_a_cut_off_colour_tiff_is_reported_with_its_row(tmp_path):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, _colour12(), photometric="rgb")
    (tmp_path / "cut.tif").write_bytes(good.read_bytes()[:6000])
    _save(tmp_path / "m.png", np.zeros((40, 56), np.uint8))
    frame = pd.DataFrame({"image": [str(good), str(tmp_path / "cut.tif")],
                          "label": [str(tmp_path / "m.png")] * 2})
    with pytest.raises(DataValidationError, match=r"row 1 \[image\] .*cut\.tif: truncated"):
        validate_frame(frame, image_col="image", label_col="label")


def _png16(path, array: np.ndarray, exif: bytes = b"") -> None:
    """An (H, W, C) uint16 array as a 16-bit PNG (C = 2 grey + alpha, 3 RGB, 4 RGBA), written
    chunk by chunk: Pillow cannot write 16-bit colour PNGs."""
    height, width, channels = array.shape
    kind = {2: 4, 3: 2, 4: 6}[channels]
    rows = array.astype(">u2").reshape(height, -1).view(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter 0 on every row

    def chunk(name: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + name + data
                + struct.pack(">I", zlib.crc32(name + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, kind, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                           + (chunk(b"eXIf", exif) if exif else b"")
                           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_sixteen_bit_colour_pngs_keep_their_low_bits(tmp_path, channels):
    data = _colour12()
    stored = np.concatenate([data, np.full_like(data, 65535)], axis=2)
    stored = stored[..., [0, 3]] if channels == 2 else stored[..., :channels]
    path = tmp_path / "c.png"
    _png16(path, stored)
    assert np.array(Image.open(path)).max() <= 255 and Image.open(path).mode != "I;16"
    picture = data if channels > 2 else np.repeat(data[..., :1], 3, axis=2)
    expected = np.round(picture / 4095 * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(path, value_range=(0.0, 4095.0)), expected)
    assert dataset_value_range([path]) == (0.0, 4095.0)  # alpha at 65535 not counted
    cut = tmp_path / "cut.png"
    raw = path.read_bytes()
    cut.write_bytes(raw[:len(raw) // 2] + raw[-12:])  # IEND put back: not truncated-looking
    with pytest.raises(OSError, match="cut.png"):
        check_decodes(cut)


def test_a_sixteen_bit_colour_png_is_turned_upright_as_its_8_bit_twin(tmp_path):
    data = _colour12((24, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show upright
    _png16(tmp_path / "deep.png", data, exif=exif.tobytes())
    eight = tmp_path / "eight.png"
    Image.fromarray(np.round(data / 4095 * 255).astype(np.uint8)).save(eight, exif=exif)
    upright = read_image(eight)
    assert upright.shape[:2] == (40, 24) == image_size(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png", value_range=(0, 4095)),
                                  upright)


def test_a_tiff_stack_is_warned_about_a_pyramid_is_not(tmp_path):
    import warnings

    mask = _save(tmp_path / "m.png", np.zeros((20, 30), np.uint8))
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 20, 30), np.uint8))  # 5 slices
    with tifffile.TiffWriter(tmp_path / "pyramid.tif") as tif:  # one image, one overview
        tif.write(np.zeros((20, 30), np.uint8))
        tif.write(np.zeros((10, 15), np.uint8), subfiletype=1)
    frame = pd.DataFrame({"image": [str(tmp_path / "pyramid.tif"), str(tmp_path / "stack.tif")],
                          "label": [mask, mask]}, index=["a", "b"])
    with pytest.warns(UserWarning, match=r"row 'b' .*stack\.tif \(5 images\)") as caught:
        validate_frame(frame, image_col="image", label_col="label")
    assert not any("pyramid" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a single image: nothing to say
        validate_frame(frame.iloc[:1], image_col="image", label_col="label")
