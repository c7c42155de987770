"""Palette (``P`` mode) images whose colours are all grey: their grey levels."""
from __future__ import annotations

from typing import Any

import numpy as np


def palette_greys(img: Any) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """``(indices, greys, backwards)`` of a Pillow palette image.

    ``indices`` is the ``(H, W)`` uint8 array of palette indices; ``greys`` the grey level
    each pixel shows when every palette entry the image uses is grey (R = G = B), else
    None; ``backwards`` whether those grey levels fall anywhere as the index rises (white
    at a lower index than black, as Pillow's ``quantize`` writes a black-and-white mask).
    """
    indices = np.array(img, dtype=np.uint8)
    palette = img.getpalette()
    if not palette:
        return indices, None, False
    rgb = np.zeros((256, 3), np.int64)
    entries = np.asarray(palette[:768], np.int64).reshape(-1, 3)
    rgb[:len(entries)] = entries
    used = np.flatnonzero(np.bincount(indices.ravel(), minlength=256))
    colours = rgb[used]
    if not ((colours[:, 0] == colours[:, 1]).all() and (colours[:, 1] == colours[:, 2]).all()):
        return indices, None, False
    greys = rgb[:, 0].astype(np.uint8)[indices]
    return indices, greys, bool((np.diff(colours[:, 0]) < 0).any())
