"""Training on images much larger than the model input: crops at native scale.

Prediction tiles such an image with ``S x S`` windows at its original resolution (see
:mod:`automask.tiling`), so a model trained on the image shrunk to ``S`` would be asked
to segment structures at a scale it never saw (a 2 px road in a 1500 px tile is under
half a pixel wide after shrinking to 256). ``data.large_images`` chooses how training
and validation treat large images:

- ``"auto"`` (default): crops for images whose longer side exceeds
  :data:`automask.tiling.AUTO_RATIO` times ``S`` -- the same rule, through the same
  function (:func:`automask.tiling.use_tiles`), that switches on tiled prediction under
  ``tiling="auto"``;
- ``"crop"``: crops for every image larger than ``S`` (as ``tiling="on"``);
- ``"resize"``: never; the image is resized to ``S`` as before (as ``tiling="off"``).

Training draws one random ``S x S`` window per image and epoch from the image at its
native scale. Scale augmentation is applied around native scale: a zoom factor ``z``
drawn from ``data.scale_min..scale_max`` picks a window of side ``round(S / z)`` in the
native image, which is then resized to at most ``S`` (bilinear for the image, nearest for
the mask); ``z = 1`` is a plain slice with no interpolation at all. Flips, rotation and
colour jitter follow as for any other sample.

Validation looks at such an image at native scale too, through fixed windows: the
non-overlapping window grid of :func:`grid_boxes` (the window grid of tiled prediction
with overlap 0, last window aligned with the border), each window one validation sample
scored on its own. A grid of up to :data:`VAL_WINDOWS_PER_SIDE` windows per side is used
whole, so every pixel is scored (e.g. a 1500 px tile at ``S = 1024``: 2 x 2 windows); a
larger grid is thinned to that many rows and columns of windows spread evenly from border
to border (a 1500 px tile at ``S = 256``: 3 x 3 of its 6 x 6 windows), which bounds
validation to 9 forward passes per image (tiled prediction of that tile takes 8 x 8).
In a binary task, where the image's object lies outside those windows, up to 4 of them that
hold the least of it give way to the grid's windows that hold the most (its mask is read
once for this), so that an empty prediction never scores as perfect on empty windows.

The window position and zoom are drawn with a NumPy generator seeded by the sample's
``(seed, position, epoch)``, like every other augmentation draw, which keeps samples
reproducible whichever worker loads them. torchvision's ``RandomCrop`` draws from torch's
global generator, so it is not used here (a crop is a slice of the array in any case).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..config import LARGE_IMAGE_MODES
from ..errors import ConfigError
from .transforms import resize_image, resize_nearest

VAL_WINDOWS_PER_SIDE = 3  # validation windows per image side, at most (see grid_boxes)

Box = tuple[int, int, int, int]  # (top, left, height, width) in native pixels


def check_large_images(mode: object) -> str:
    """Return ``mode`` if it is one of ``LARGE_IMAGE_MODES``, else raise ConfigError.

    Parameters
    ----------
    mode : object
        The value of ``data.large_images``.

    Returns
    -------
    str

    Raises
    ------
    ConfigError
        Naming ``data.large_images`` and the value.
    """
    if not isinstance(mode, str) or mode not in LARGE_IMAGE_MODES:
        raise ConfigError(
            f"invalid value {mode!r} for 'data.large_images': valid values are "
            f"{', '.join(map(repr, LARGE_IMAGE_MODES))}"
        )
    return mode


def crops_image(size: Sequence[int], input_size: int, mode: str) -> bool:
    """Whether an ``(H, W)`` image is trained and validated on as native-scale crops.

    Parameters
    ----------
    size : sequence of int
        ``(H, W)`` of the image.
    input_size : int
        Model input side ``S``.
    mode : {"auto", "crop", "resize"}
        ``data.large_images``.

    Returns
    -------
    bool
        The answer of :func:`automask.tiling.use_tiles` under the matching tiling mode
        (``auto`` -> ``"auto"``, ``crop`` -> ``"on"``, ``resize`` -> ``"off"``).
    """
    from ..tiling import TRAINED_RULE, use_tiles

    return use_tiles(size, int(input_size), TRAINED_RULE[check_large_images(mode)])


def random_crop(
    image: np.ndarray,
    mask: np.ndarray | None,
    input_size: int,
    zoom: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A random window of a native-scale image, zoomed by ``zoom``, at most ``S x S``.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 at native scale (not modified).
    mask : numpy.ndarray or None
        ``(H, W)`` class ids or raw mask values (not modified); cropped by the same
        slice and, when ``zoom != 1``, resampled with nearest neighbour only, so void and
        ignore values survive unchanged.
    input_size : int
        Model input side ``S``.
    zoom : float
        Zoom factor (> 0): the window has side ``round(S / zoom)`` in native pixels
        (clipped to the image) and is resized by ``zoom``; 1 takes the pixels as they are.
    rng : numpy.random.Generator
        Draws the window position (two uniform numbers).

    Returns
    -------
    tuple
        ``(image, mask)``, C-contiguous copies of at most ``S x S`` pixels.
    """
    if not zoom > 0:
        raise ValueError(f"zoom must be > 0, got {zoom!r}")
    size = int(input_size)
    source_image, source_mask = image, mask
    height, width = image.shape[:2]
    side = max(1, int(round(size / zoom)))
    crop_h, crop_w = min(height, side), min(width, side)
    u_top, u_left = rng.random(2)
    top = min(int(u_top * (height - crop_h + 1)), height - crop_h)
    left = min(int(u_left * (width - crop_w + 1)), width - crop_w)
    image = image[top:top + crop_h, left:left + crop_w]
    mask = mask[top:top + crop_h, left:left + crop_w] if mask is not None else None
    if zoom != 1.0:
        out = (min(size, max(1, int(round(crop_h * zoom)))),
               min(size, max(1, int(round(crop_w * zoom)))))
        image = resize_image(np.ascontiguousarray(image), out)
        mask = resize_nearest(mask, out) if mask is not None else None
    # copies, never views of the (cached, possibly memory-mapped) source: a slice spanning
    # whole rows is already C-contiguous and ascontiguousarray would hand back a view
    image = _own_copy(image, source_image)
    mask = _own_copy(mask, source_mask) if mask is not None else None
    return image, mask


def _own_copy(array: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``array`` as a C-contiguous array that shares no memory with ``source``."""
    if np.may_share_memory(array, source):
        return np.array(array, order="C", copy=True)
    return np.ascontiguousarray(array)


def grid_boxes(size: Sequence[int], input_size: int,
               per_side: int | None = VAL_WINDOWS_PER_SIDE,
               objects: Callable[[], np.ndarray | None] | None = None) -> list[Box]:
    """The validation windows of an ``(H, W)`` image: the non-overlapping grid.

    Windows of side ``S`` start at ``0, S, 2S, ...``; the last one of each row and
    column is aligned with the image border (:func:`automask.tiling.window_grid` with
    overlap 0), so the grid covers every pixel and only the last strip is seen twice. A
    side no larger than ``S`` is one window of that side. When a side has more than
    ``per_side`` windows, ``per_side`` of them are kept, evenly spread and always
    including the first and the last.

    A thinned grid can miss an image's object altogether (a road crossing the strips
    between the kept windows); scored on empty windows, an empty prediction would then be
    perfect. With ``objects``, the windows of the whole grid that hold the most object
    pixels replace those of the sample that hold the fewest, up to half of the sample
    (4 of 9), so that the sample holds object wherever the image does, and keeps windows
    spread over the rest to see false positives.

    Parameters
    ----------
    size : sequence of int
        ``(H, W)``.
    input_size : int
        Model input side ``S``.
    per_side : int or None
        Most windows kept along each side (at least 1); None keeps the whole grid.
    objects : callable, optional
        Called only when the grid is thinned: the image's ``(H, W)`` bool map of object
        pixels (a binary task's class 1), or None to keep the even spread.

    Returns
    -------
    list of tuple
        ``(top, left, height, width)`` per window, row by row.
    """
    from ..tiling import window_starts

    height, width = int(size[0]), int(size[1])
    side = int(input_size)
    if per_side is not None and int(per_side) < 1:
        raise ValueError(f"per_side must be a positive integer or None, got {per_side!r}")
    all_rows, all_cols = window_starts(height, side, 0.0), window_starts(width, side, 0.0)
    rows, cols = _spread(all_rows, per_side), _spread(all_cols, per_side)
    starts = [(top, left) for top in rows for left in cols]
    if objects is not None and (len(rows) < len(all_rows) or len(cols) < len(all_cols)):
        found = objects()
        if found is not None and found.shape == (height, width) and found.any():
            starts = _with_objects(starts, all_rows, all_cols, found, side)
    return [(top, left, min(side, height), min(side, width)) for top, left in starts]


def _with_objects(starts: list[tuple[int, int]], rows: list[int], cols: list[int],
                  objects: np.ndarray, side: int) -> list[tuple[int, int]]:
    """``starts`` with up to half of its windows, those holding the fewest object pixels,
    swapped for the windows of the grid ``rows x cols`` holding the most that ``starts``
    lacks (more than the window they replace); row by row."""
    def count(top: int, left: int) -> int:
        return int(objects[top:top + side, left:left + side].sum())

    kept = sorted(starts, key=lambda s: (count(*s), s))  # fewest object pixels first
    chosen = set(starts)
    others = sorted(((count(t, c), (t, c)) for t in rows for c in cols
                     if (t, c) not in chosen), key=lambda x: (-x[0], x[1]))
    for i, (pixels, start) in enumerate(others[:len(starts) // 2]):
        if pixels <= count(*kept[i]):
            break
        chosen.discard(kept[i])
        chosen.add(start)
    return sorted(chosen)


def _spread(starts: list[int], keep: int | None) -> list[int]:
    """``keep`` of ``starts``, evenly spread, first and last included (all if fewer)."""
    if keep is None or len(starts) <= int(keep):
        return starts
    picks = np.unique(np.round(np.linspace(0, len(starts) - 1, int(keep))).astype(int))
    return [starts[i] for i in picks]
