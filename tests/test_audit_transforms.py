"""Audit of the training/prediction transforms: joint image/mask augmentation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from automask.data import SegmentationDataset, validate_frame
from automask.data.transforms import (
    IGNORE_INDEX,
    AugmentConfig,
    augment,
    geometry_for,
    restore,
    restore_batch,
    resize_nearest,
)
from automask.errors import DataValidationError


def test_colour_jitter_leaves_the_pixels_a_rotation_uncovers_black():
    # a uniform sample: every pixel the rotation uncovers is IGNORE_INDEX in the mask and
    # must be black in the image (AugmentConfig), whatever contrast factor is drawn
    image = np.full((40, 60, 3), 150, dtype=np.uint8)
    mask = np.ones((40, 60), dtype=np.uint8)
    cfg = AugmentConfig(hflip=False, rotate_degrees=45.0, color_jitter=0.5)
    for seed in range(8):
        out, target = augment(image, mask, cfg, np.random.default_rng(seed))
        uncovered = target == IGNORE_INDEX
        assert uncovered.any()
        assert (out[uncovered] == 0).all(), seed
        # the covered pixels got one jittered grey, not a value pulled by the black corners
        assert len(np.unique(out[~uncovered & _interior(target)].reshape(-1, 3), axis=0)) == 1


def _interior(target: np.ndarray) -> np.ndarray:
    """Pixels whose 3 x 3 neighbourhood is covered (away from the bilinear border)."""
    covered = np.pad(target != IGNORE_INDEX, 1, constant_values=True)
    out = np.ones_like(target, dtype=bool)
    for dy in range(3):
        for dx in range(3):
            out &= covered[dy:dy + target.shape[0], dx:dx + target.shape[1]]
    return out


def test_restore_batch_refuses_low_resolution_maps_without_the_input_size():
    geo = geometry_for((30, 50), 64)  # resized to 38 x 64
    probs = torch.rand(1, 2, 16, 16)  # S / 4 maps
    sizes = torch.tensor([geo.original_size]), torch.tensor([geo.resized_size])
    with pytest.raises(ValueError, match="input size"):
        restore_batch(probs, *sizes)
    out = restore_batch(probs, *sizes, input_size=64)[0]
    torch.testing.assert_close(out, restore(probs[0], geo))
    assert out.shape == (2, 30, 50)


def test_zoom_in_resamples_only_the_window_it_keeps(monkeypatch):
    # scale 4 on a 60 x 45 sample: the 240 x 180 zoomed sample is never built (at S = 1024
    # that was 16x the pixels: ~0.16 s and ~50 MB per sample); same pixels as before
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 45, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (60, 45), dtype=np.uint8)
    cfg = AugmentConfig(hflip=False, scale_range=(4.0, 4.0))
    sizes = []
    real = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    out, target = augment(image, mask, cfg, np.random.default_rng(7))
    monkeypatch.setattr(Image.Image, "resize", real)
    assert sizes and all(w <= 45 and h <= 60 for w, h in sizes), sizes
    assert out.shape == (60, 45, 3) and target.shape == (60, 45)
    # the window of the whole zoomed sample that the same draws pick
    draws = np.random.default_rng(7)
    draws.random(3), draws.uniform(4.0, 4.0), draws.uniform(0.0, 0.0)
    u_top, u_left = draws.random(2)
    top, left = int(u_top * (240 - 60 + 1)), int(u_left * (180 - 45 + 1))
    full_mask = resize_nearest(mask, (240, 180))[top:top + 60, left:left + 45]
    np.testing.assert_array_equal(target, full_mask)
    full = np.asarray(Image.fromarray(image).resize((180, 240), Image.Resampling.BILINEAR))
    diff = np.abs(out.astype(int) - full[top:top + 60, left:left + 45].astype(int))
    assert diff.max() <= 2  # float rounding of the window's coordinates only


def test_a_mask_rewritten_with_values_above_255_is_refused_not_wrapped(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    mask = np.zeros((8, 8), dtype=np.uint16)
    mask[:4] = 1
    Image.fromarray(mask).save(tmp_path / "m.png")
    frame = pd.DataFrame([{"image": str(tmp_path / "i.png"), "label": str(tmp_path / "m.png")}])
    spec = validate_frame(frame)
    mask[6:] = 256  # edited after validation: 256 read as uint8 would be background
    Image.fromarray(mask).save(tmp_path / "m.png")
    with pytest.raises(DataValidationError, match=r"m\.png.*0\.\.256"):
        SegmentationDataset(spec, 8)[0]
