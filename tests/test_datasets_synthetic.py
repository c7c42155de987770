"""make_synthetic: deterministic, learnable, valid binary and multi-class pairs."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from automask.data import validate_frame
from automask.datasets import make_synthetic


def _read(path):
    with Image.open(path) as pil:
        return np.asarray(pil)


def _load(df):
    return [(_read(i), _read(m)) for i, m in zip(df["image"], df["label"])]


def test_binary_pairs_valid_and_deterministic(tmp_path):
    df = make_synthetic(6, size=(48, 64), seed=5, root=tmp_path / "a")
    again = make_synthetic(6, size=(48, 64), seed=5, root=tmp_path / "b")
    other = make_synthetic(6, size=(48, 64), seed=6, root=tmp_path / "c")
    spec = validate_frame(df)
    assert spec.task == "binary" and len(df) == 6
    for (img, msk), (img2, msk2) in zip(_load(df), _load(again)):
        assert img.shape == (48, 64, 3) and msk.shape == (48, 64)
        assert set(np.unique(msk)) <= {0, 255} and (msk == 255).any()
        np.testing.assert_array_equal(img, img2)
        np.testing.assert_array_equal(msk, msk2)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(_load(df), _load(other)))


def test_foreground_is_separable_from_background(tmp_path):
    """Texture/colour carry the label: a per-pixel colour statistic differs clearly."""
    df = make_synthetic(8, size=64, seed=0, root=tmp_path)
    fg, bg = [], []
    for img, msk in _load(df):
        red_minus_green = img[..., 0].astype(float) - img[..., 1].astype(float)
        fg.append(red_minus_green[msk == 255].mean())
        bg.append(red_minus_green[msk == 0].mean())
    assert np.mean(fg) - np.mean(bg) > 40


def test_multiclass_indices(tmp_path):
    df = make_synthetic(10, size=(32, 32), num_classes=4, seed=1, root=tmp_path)
    values = set()
    for _, msk in _load(df):
        values |= set(np.unique(msk).tolist())
    assert values <= {0, 1, 2, 3} and len(values) >= 3
    spec = validate_frame(df, num_classes=4)
    assert spec.task == "multiclass" and spec.num_classes == 4


def test_default_root_under_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOMASK_HOME", str(tmp_path / "home"))
    df = make_synthetic(2, size=16, seed=0)
    assert df["image"].iloc[0].startswith(str(tmp_path / "home"))
    stamps = [os.stat(p).st_mtime_ns for p in df["image"]]
    df2 = make_synthetic(2, size=16, seed=0)
    assert df2.equals(df)
    assert [os.stat(p).st_mtime_ns for p in df2["image"]] == stamps  # not rewritten


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 2, "size": 0}, {"n": 2, "num_classes": 1}])
def test_bad_arguments(kwargs, tmp_path):
    with pytest.raises(ValueError):
        make_synthetic(root=tmp_path, **kwargs)
