"""train_test_split: seeded, disjoint, stratified on foreground fraction."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask.datasets import train_test_split
from automask.datasets.split import split_positions
from automask.errors import DataValidationError


def _frame(tmp_path, fractions):
    rows = []
    for i, frac in enumerate(fractions):
        m = np.zeros((10, 10), np.uint8)
        m.flat[: int(round(frac * 100))] = 255
        Image.fromarray(m).save(tmp_path / f"{i}.png")
        rows.append((f"img{i}.png", str(tmp_path / f"{i}.png")))
    return pd.DataFrame(rows, columns=["image", "label"], index=[f"r{i}" for i in range(len(rows))])


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    df = _frame(tmp_path, np.linspace(0, 1, 25))
    train, test = train_test_split(df, test_size=0.2, seed=3)
    assert len(test) == 5 and len(train) == 20
    assert set(train.index).isdisjoint(test.index)
    assert set(train.index) | set(test.index) == set(df.index)
    again = train_test_split(df, test_size=0.2, seed=3)
    assert again[1].index.equals(test.index)
    assert not train_test_split(df, test_size=0.2, seed=4)[1].index.equals(test.index)


def test_stratified_on_foreground(tmp_path):
    fractions = [0.01] * 10 + [0.9] * 10
    df = _frame(tmp_path, fractions)
    for seed in range(6):
        _, test = train_test_split(df, test_size=0.2, seed=seed)
        big = sum(int(i[1:]) >= 10 for i in test.index)
        assert big == 2
    # without stratification some seed gives an unbalanced test set
    counts = set()
    for s in range(20):
        _, test = train_test_split(df, 0.2, seed=s, stratify_foreground=False)
        counts.add(sum(int(i[1:]) >= 10 for i in test.index))
    assert counts != {2}


def test_masks_held_in_memory_are_read_for_stratification(tmp_path):
    """from_folders holds merged further masks and a stack's pages in memory: splitting
    such a frame stopped with "mask cannot be read" (the array taken for a path). It is
    stratified as the same masks in files are, and the rows keep their arrays."""
    df = _frame(tmp_path, [0.01] * 10 + [0.9] * 10)
    arrays = df.assign(label=[np.asarray(Image.open(p)) for p in df["label"]])
    for seed in range(4):
        train, test = train_test_split(arrays, test_size=0.2, seed=seed)
        assert test.index.equals(train_test_split(df, test_size=0.2, seed=seed)[1].index)
        assert sum(int(i[1:]) >= 10 for i in test.index) == 2  # stratified
        assert all(isinstance(v, np.ndarray) for v in test["label"])


def test_tiny_and_invalid(tmp_path):
    train, test = split_positions(2, 0.5, seed=0, foreground=np.array([0.1, 0.9]))
    assert len(train) == 1 and len(test) == 1
    with pytest.raises(DataValidationError):
        split_positions(1, 0.5)
    with pytest.raises(ValueError, match="test_size"):
        split_positions(10, 1.5)


def test_a_repeated_image_stays_on_one_side(tmp_path):
    """A row repeating an image (the same path, a link to it, a path through '..') landed
    on both sides for 19 of 30 seeds: test images that were also trained on."""
    import os

    df = _frame(tmp_path, np.linspace(0, 1, 6))
    for i in range(6):
        Image.fromarray(np.full((10, 10, 3), i, np.uint8)).save(tmp_path / f"img{i}.png")
    df["image"] = [str(tmp_path / f"img{i}.png") for i in range(6)]
    os.symlink(tmp_path / "img1.png", tmp_path / "link.png")
    (tmp_path / "sub").mkdir()
    extra = pd.DataFrame({
        "image": [df["image"].iat[1], str(tmp_path / "link.png"),
                  str(tmp_path / "sub" / ".." / "img1.png")],
        "label": [df["label"].iat[1]] * 3}, index=["again", "link", "dots"])
    repeated = pd.concat([df, extra])
    img1 = {"r1", "again", "link", "dots"}
    for seed in range(30):
        train, test = train_test_split(repeated, test_size=0.4, seed=seed)
        assert set(train.index) | set(test.index) == set(repeated.index)
        assert img1 <= set(train.index) or img1 <= set(test.index), seed
    # without repeats: the split of the rows, as before
    for seed in range(5):
        train, test = train_test_split(df, test_size=0.4, seed=seed)
        fg = np.linspace(0, 1, 6)
        want = split_positions(6, 0.4, seed, fg)[1]
        assert list(test.index) == [f"r{i}" for i in want]
    one = pd.concat([df.iloc[[1]], extra])
    with pytest.raises(DataValidationError, match="show only one image"):
        train_test_split(one, stratify_foreground=False)
