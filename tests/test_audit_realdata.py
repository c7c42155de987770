"""Audit with users' own files: lossy WebP masks of grey content, float and 32-bit images
beyond the 8/16-bit ranges, read by :mod:`automask.data.io` and taken through a tiny fit."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask.data.io import read_image, read_mask
from automask.errors import DataValidationError



def _tiff(path, array: np.ndarray) -> None:
    """Write a 2-D float32 (mode F) or int32 (mode I) array as a TIFF, with Pillow."""
    Image.fromarray(array).save(path, format="TIFF")


def _square_mask(h: int = 48, w: int = 64) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[10:38, 16:50] = 255
    return mask


def _lossy_webp(path, mask: np.ndarray) -> None:
    """A grey mask saved as lossy WebP, as many tools do: decoded with chroma noise."""
    Image.fromarray(mask).convert("RGB").save(path, "WEBP", quality=50)
    rgb = np.array(Image.open(path)).astype(int)
    assert (rgb.max(axis=2) - rgb.min(axis=2)).max() > 0  # the channels really differ


def test_lossy_webp_grey_mask_is_read_as_grey(tmp_path):
    mask = _square_mask()
    path = tmp_path / "m.webp"
    _lossy_webp(path, mask)
    values = read_mask(path)
    assert values.shape == mask.shape and values.dtype == np.uint8
    assert np.array_equal(values > 128, mask > 128)


def test_lossy_colour_mask_is_still_refused(tmp_path):
    rgb = np.zeros((48, 64, 3), dtype=np.uint8)
    rgb[10:38, 16:50] = (200, 30, 30)
    Image.fromarray(rgb).save(tmp_path / "m.webp", "WEBP", quality=50)
    with pytest.raises(DataValidationError, match="colour"):
        read_mask(tmp_path / "m.webp")


@pytest.mark.parametrize("data", [
    np.linspace(0, 4000, 48 * 64, dtype=np.float32),      # reflectance-like floats
    np.linspace(-1, 1, 48 * 64, dtype=np.float32),        # normalised, signed
    np.linspace(0, 200_000, 48 * 64).astype(np.int32),    # 32-bit counts
    np.linspace(-1500, 1500, 48 * 64).astype(np.int32),   # signed
], ids=["float-4000", "float-signed", "int32-counts", "int32-signed"])
def test_images_beyond_8_16_bit_ranges_are_stretched_not_clipped(tmp_path, data):
    path = tmp_path / "i.tif"
    _tiff(path, data.reshape(48, 64))
    rgb = read_image(path)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and rgb.max() == 255
    # a gradient stays a gradient: no half of the image saturated to one value
    assert len(np.unique(rgb)) > 200
    assert (rgb == 255).mean() < 0.01 and (rgb == 0).mean() < 0.01


def test_in_range_data_keeps_its_scale(tmp_path):
    _tiff(tmp_path / "f.tif", np.full((8, 8), 0.5, dtype=np.float32))
    _tiff(tmp_path / "g.tif", np.full((8, 8), 100.0, dtype=np.float32))
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "u.tif")
    assert (read_image(tmp_path / "f.tif") == 128).all()
    assert (read_image(tmp_path / "g.tif") == 100).all()
    assert (read_image(tmp_path / "u.tif") == 255).all()


def test_fit_predict_evaluate_on_float_tiffs_and_webp_masks(tmp_path):
    from automask import SemanticSegmentor

    rng = np.random.default_rng(0)
    rows = []
    for k in range(4):
        mask = _square_mask(40 + 4 * k, 56)
        image = (rng.normal(1000, 50, mask.shape) + 2000 * (mask > 0)).astype(np.float32)
        image_path, mask_path = tmp_path / f"i{k}.tif", tmp_path / f"m{k}.webp"
        _tiff(image_path, image)
        _lossy_webp(mask_path, mask)
        rows.append((str(image_path), str(mask_path)))
    frame = pd.DataFrame(rows, columns=["image", "label"])
    seg = SemanticSegmentor(label="label", path=str(tmp_path / "run"), verbosity=0)
    with pytest.warns(UserWarning, match="anti-aliased or JPEG"):
        seg.fit(frame, presets="tiny",
                hyperparameters={"model.input_size": 64, "optim.max_epochs": 1})
    predictions = seg.predict(frame)
    assert [p.shape for p in predictions] == [(40 + 4 * k, 56) for k in range(4)]
    with pytest.warns(UserWarning, match="anti-aliased or JPEG"):
        scores = seg.evaluate(frame)
    assert 0.0 <= scores["iou"] <= 1.0


_STORE = {  # orientation tag -> how the stored pixels relate to the upright picture
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("mode,compression", [
    ("L", None), ("L", "tiff_lzw"), ("RGB", None), ("P", None),
])
def test_tiff_orientation_is_applied_once(tmp_path, orientation, mode, compression):
    # Pillow >= 11 turns TIFFs itself (scrambling memory-mapped ones); the image and the
    # mask must come out upright, at the size image_size announces
    upright = np.zeros((30, 40), dtype=np.uint8)
    upright[3:10, 2:20] = 1
    upright[18:27, 25:37] = 2
    stored = Image.fromarray(upright).transpose(_STORE[orientation]).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "x.tif"
    options = {"compression": compression} if compression else {}
    stored.save(path, exif=exif, **options)
    from automask.data.io import image_size

    assert image_size(path) == (30, 40)
    assert np.array_equal(read_mask(path), upright)
    gray = read_image(path)[..., 0]
    expected = np.array(Image.fromarray(upright).convert(mode).convert("RGB"))[..., 0]
    assert np.array_equal(gray, expected)
