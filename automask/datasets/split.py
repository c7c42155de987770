"""Seeded train/test splits, stratified on foreground fraction for binary masks.

Small masks and large masks behave differently (a model that misses small polyps can
still score well on large ones), so a holdout split should hold the same mix. Rows are
put into foreground-fraction quantile bins and scikit-learn's ``train_test_split``
stratifies on them; bins are merged until each has enough rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split as _sk_split

from ..errors import DataValidationError

_MAX_BINS = 5


def _bins(foreground: np.ndarray, n_test: int, n_train: int) -> np.ndarray | None:
    """Quantile bin of each row, with as many bins (<= 5) as the split sizes allow."""
    values = np.nan_to_num(np.asarray(foreground, dtype=np.float64), nan=0.0)
    for n_bins in range(min(_MAX_BINS, n_test, n_train), 1, -1):
        edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1]))
        # A quantile equal to the smallest (or largest) value, as with many empty masks,
        # puts every row in one bin on one side of the edge; the other side separates them.
        for side in ("right", "left"):
            labels = np.searchsorted(edges, values, side=side)
            counts = np.bincount(labels)
            counts = counts[counts > 0]
            if len(counts) >= 2 and counts.min() >= 2:
                return labels
    return None


def split_positions(
    n: int, test_size: float, seed: int = 0, foreground: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(train, test)`` of an ``n``-row split.

    Parameters
    ----------
    n : int
        Number of rows (at least 2).
    test_size : float
        Fraction in (0, 1); at least one row goes to each side.
    seed : int
    foreground : array, optional
        Per-row foreground fraction; stratifies the split when given.

    Returns
    -------
    tuple of numpy.ndarray
        Sorted int64 positions.
    """
    if not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size!r}")
    if n < 2:
        raise DataValidationError(f"cannot split {n} row(s) into two non-empty parts")
    n_test = min(n - 1, max(1, int(round(n * float(test_size)))))
    positions = np.arange(n)
    strata = None
    if foreground is not None:
        strata = _bins(foreground, n_test, n - n_test)
    train, test = _sk_split(
        positions, test_size=n_test, random_state=int(seed) % (2**32), stratify=strata
    )
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def _foreground_of(path: str) -> float:
    """Fraction of non-background pixels, the masks read as the data checks read them.

    0/1 and 0/255 masks count their non-zero pixels; an anti-aliased or JPEG-compressed
    binary mask counts pixels above 128 (as it is binarised for training); a class-id
    mask counts pixels > 0 among those not equal to 255 (ignore).
    """
    from ..data.io import read_mask
    from ..data.validation import SOFT_THRESHOLD, _is_soft_binary

    mask = read_mask(path)
    values, counts = np.unique(mask, return_counts=True)
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
        return float((mask > 0).mean())
    if ((values >= SOFT_THRESHOLD) & (values < 255)).any() and _is_soft_binary(values, counts):
        return float((mask > SOFT_THRESHOLD).mean())
    labelled = mask != 255
    total = int(labelled.sum())
    return float(((mask > 0) & labelled).sum() / total) if total else 0.0


def _row_foreground(index, value, label_col: str) -> float:
    """:func:`_foreground_of` one row's mask; an unreadable one is named with its row."""
    from ..data.validation import _raw_path

    path = _raw_path(value)
    if path is None:
        raise DataValidationError(f"row {index!r} [{label_col}]: missing mask path ({value!r})")
    try:
        return _foreground_of(path)
    except (OSError, ValueError, SyntaxError, DataValidationError) as exc:
        raise DataValidationError(
            f"row {index!r} [{label_col}] {path}: mask cannot be read to stratify the split "
            f"({exc}); fix the row, or pass stratify_foreground=False") from exc


def _image_groups(df: pd.DataFrame, image_col: str) -> list[list[int]]:
    """Row positions per distinct image file (the same path after resolving links and
    ``..``), in order of first appearance; a row whose image is not a path (a picture in
    memory), or a frame without ``image_col``, is a group of its own."""
    import os

    from ..data.validation import image_key

    groups: dict[object, list[int]] = {}
    values = df[image_col].tolist() if image_col in df.columns else [None] * len(df)
    for pos, value in enumerate(values):
        key: object = ("row", pos)
        if isinstance(value, (str, os.PathLike)) and str(value).strip():
            key = image_key(str(value).strip())
        groups.setdefault(key, []).append(pos)
    return list(groups.values())


def train_test_split(
    df: pd.DataFrame,
    test_size: float = 0.2,
    seed: int = 0,
    stratify_foreground: bool = True,
    label_col: str = "label",
    image_col: str = "image",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a DataFrame of image/mask paths into train and test frames.

    The split is made over distinct image files, as the fit's validation holdout is: rows
    that repeat an image (the same path, or a link to it) land on the same side, so that
    no test image is also trained on. Without repeated images it is a split of the rows.

    Parameters
    ----------
    df : pandas.DataFrame
        Rows to split (index kept).
    test_size : float
        Fraction of rows in the test frame.
    seed : int
        Seed of the split.
    stratify_foreground : bool
        Read each mask in ``label_col`` (a path, or a mask in memory) and stratify on
        foreground-fraction bins (pixels > 0 among those not equal to 255 for class-id
        masks).
    label_col : str
        Mask path column, used when stratifying.
    image_col : str
        Image path column, whose repeated images stay together; a frame without it is
        split by rows.

    Returns
    -------
    tuple of pandas.DataFrame
        ``(train, test)``, each in the original row order; ``test_size`` is the fraction
        of distinct images in the test frame.

    Raises
    ------
    DataValidationError
        Fewer than two rows or distinct images, or a mask that cannot be read to stratify.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    split_positions(len(df), test_size, seed)  # a bad size or too few rows: before any read
    members = _image_groups(df, image_col)
    if len(members) < 2:
        raise DataValidationError(
            f"cannot split: the {len(df)} rows show only one image "
            f"({df[image_col].iat[0]}), and a split keeps an image's rows on one side")
    foreground = None
    if stratify_foreground:
        if label_col not in df.columns:
            raise DataValidationError(
                f"stratify_foreground=True needs the mask column {label_col!r}; the data has "
                f"columns {[str(c) for c in df.columns]}"
            )
        from ..data.arrays import as_files

        # masks held in memory (from_folders' merged masks, a stack's pages) read as files
        with as_files(df[[label_col]], [label_col]) as labels:
            foreground = np.array([_row_foreground(index, value, label_col)
                                   for index, value in zip(labels.index, labels[label_col])])
    if foreground is not None:  # an image's rows count with their mean
        foreground = np.array([foreground[rows].mean() for rows in members])
    train_g, test_g = split_positions(len(members), test_size, seed, foreground)

    def rows(chosen: np.ndarray) -> np.ndarray:
        return np.sort(np.concatenate([members[g] for g in chosen])).astype(np.int64)

    return df.iloc[rows(train_g)], df.iloc[rows(test_g)]
