"""Sliding-window prediction for images larger than the model input.

An image is tiled at its original resolution with ``S x S`` windows (``S`` = the model's
``input_size``) that overlap by :data:`OVERLAP` of their side; the last window of each
row and column is aligned with the image border, so every pixel is covered. Each window
is normalised and padded exactly as a whole image would be (SAM's mean/std, zero padding
at the bottom and right when the image is narrower than ``S``). The per-window
probabilities (sigmoid for binary tasks, softmax for multi-class) are blended with a
separable tent-shaped weight that is 1 in the window centre and falls linearly to a
small positive value (never zero) at its border, divided by the summed weights. Windows
go through the model ``batch_size`` at a time, so memory grows with the batch, not with
the image.

``tiling`` chooses when: ``"auto"`` tiles images whose longer side exceeds
:data:`AUTO_RATIO` times ``S``; ``"on"`` tiles every image larger than ``S`` (a smaller
image would be a single window anyway and takes the plain path); ``"off"`` always
resizes the longer side to ``S`` (the plain path). A predictor's ``tiling="auto"``
follows the rule its model was trained with (:func:`trained_tiling`): a model trained on
whole images resized (``data.large_images="resize"``, the paper presets) predicts them
resized too.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .errors import ConfigError

TILING_MODES = ("auto", "on", "off")
AUTO_RATIO = 1.25  # "auto" tiles when the longer side > AUTO_RATIO * input_size
OVERLAP = 0.25  # fraction of the window side shared by neighbouring windows
# data.large_images -> the tiling mode whose rule picks the same images (native-scale crops
# in training, windows in prediction)
TRAINED_RULE = {"auto": "auto", "crop": "on", "resize": "off"}


def check_tiling(tiling: str) -> str:
    """Return ``tiling`` if it is one of :data:`TILING_MODES`, else raise ConfigError."""
    if not isinstance(tiling, str) or tiling not in TILING_MODES:
        raise ConfigError(f"tiling must be one of {list(TILING_MODES)}, got {tiling!r}")
    return tiling


def trained_tiling(tiling: str, large_images: str) -> str:
    """The tiling a prediction uses: ``"auto"`` takes the rule the model was trained with
    (``data.large_images``: ``"auto"`` -> ``"auto"``, ``"crop"`` -> ``"on"``, ``"resize"``
    -> ``"off"``), so that an image is predicted at the scale its kind was trained at;
    ``"on"`` and ``"off"`` are the caller's choice and stay (ConfigError for any other)."""
    if check_tiling(tiling) != "auto":
        return tiling
    return TRAINED_RULE[large_images]


def use_tiles(size: Sequence[int], input_size: int, tiling: str) -> bool:
    """Whether an ``(H, W)`` image is predicted with sliding windows under ``tiling``
    (ConfigError for a ``tiling`` other than :data:`TILING_MODES`)."""
    longest = max(int(size[0]), int(size[1]))
    if check_tiling(tiling) == "off":
        return False
    if tiling == "on":
        return longest > input_size
    return longest > AUTO_RATIO * input_size


def window_starts(length: int, window: int, overlap: float = OVERLAP) -> list[int]:
    """Start offsets of windows of side ``window`` covering ``[0, length)``.

    The stride is ``round(window * (1 - overlap))`` (at least 1); the last window ends at
    ``length``. A ``length`` no larger than ``window`` gives the single start 0.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if length <= window:
        return [0]
    stride = max(1, int(round(window * (1.0 - overlap))))
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def window_grid(size: Sequence[int], window: int,
                overlap: float = OVERLAP) -> list[tuple[int, int]]:
    """``(top, left)`` of every window over an ``(H, W)`` image, row by row."""
    rows = window_starts(int(size[0]), window, overlap)
    cols = window_starts(int(size[1]), window, overlap)
    return [(top, left) for top in rows for left in cols]


def blend_weights(window: int) -> np.ndarray:
    """``(window, window)`` float32 separable tent: 1 at the centre, falling linearly to
    ``1 / window`` or so at the border (never zero)."""
    idx = np.arange(window, dtype=np.float64) + 0.5  # pixel centres
    ramp = np.minimum(idx, window - idx)  # (window,), distance to the nearer edge
    ramp /= ramp.max()  # in (0, 1], 1 in the centre
    return np.outer(ramp, ramp).astype(np.float32)


def tiled_proba(forward: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray,
                input_size: int, batch_size: int, device: torch.device,
                overlap: float = OVERLAP) -> torch.Tensor:
    """Blended probabilities of a whole image from overlapping windows.

    Parameters
    ----------
    forward : callable
        ``(B, 3, S, S)`` normalised windows -> ``(B, C, S, S)`` probabilities (or at a
        lower resolution ``R``, upsampled bilinearly as in :func:`automask.data.restore`).
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 (as :func:`automask.data.read_image` gives), at its original
        resolution.
    input_size : int
        Window side ``S``.
    batch_size : int
        Windows per forward call (at most).
    device : torch.device
        Where the windows are sent.
    overlap : float
        Fraction of the window side shared by neighbours, in [0, 1).

    Returns
    -------
    torch.Tensor
        ``(C, H, W)`` float32 on the CPU.

    Raises
    ------
    ValueError
        ``image`` not an ``(H, W, 3)`` uint8 array with ``H, W >= 1``, or ``input_size`` /
        ``batch_size`` not an integer >= 1 (before any forward); ``forward`` not returning
        one ``(C, R, R)`` map per window.
    """
    from .data.transforms import Geometry, normalize_pad, restore

    for name, value in (("input_size", input_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) != 3 or shape[2] != 3 or min(shape[:2]) < 1:
        raise ValueError(f"image must be an (H, W, 3) array with H, W >= 1, got shape {shape}")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        # other values would be normalised as if they were 0..255 (16-bit: far out of range)
        raise ValueError(f"image must be a uint8 numpy array (pixels 0..255), got "
                         f"{getattr(image, 'dtype', type(image).__name__)}; read deeper "
                         "images with automask.data.read_image")
    height, width = image.shape[:2]
    size = int(input_size)
    grid = window_grid((height, width), size, overlap)
    weight = torch.from_numpy(blend_weights(size))  # (S, S)
    total = torch.zeros((height, width), dtype=torch.float32)  # summed weights
    acc: torch.Tensor | None = None  # (C, H, W) weighted probabilities
    for start in range(0, len(grid), int(batch_size)):
        part = grid[start:start + int(batch_size)]
        crops = [image[top:top + size, left:left + size] for top, left in part]
        batch = torch.stack([normalize_pad(np.ascontiguousarray(c), size) for c in crops])
        probs = forward(batch.to(device)).float().cpu()  # (b, C, R, R)
        if probs.dim() != 4 or probs.shape[0] != len(part):
            # zip would drop windows, and a (b, R, R) map would be taken for R classes
            raise ValueError(f"forward must return (B, C, R, R) maps, one per window; got "
                             f"shape {tuple(probs.shape)} for {len(part)} windows")
        for (top, left), crop, prob in zip(part, crops, probs):
            h, w = crop.shape[:2]
            win = restore(prob, Geometry((h, w), (h, w), size))  # (C, h, w)
            if acc is None:
                acc = torch.zeros((win.shape[0], height, width), dtype=torch.float32)
            wgt = weight[:h, :w]
            acc[:, top:top + h, left:left + w] += win * wgt
            total[top:top + h, left:left + w] += wgt
    assert acc is not None and bool((total > 0).all()), "windows must cover every pixel"
    return acc / total
