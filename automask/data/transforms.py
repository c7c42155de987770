"""Model-space geometry: resize longest side, pad to a square, normalise, and map back.

SAM's image encoder takes an ``S x S`` input (``S = 1024`` for the released models). An
``H x W`` image is resized so that its longest side is ``S`` (same rounding as
``segment_anything.utils.transforms.ResizeLongestSide``), normalised with SAM's pixel
mean/std and zero-padded at the bottom and right. With ``data.resize="square"`` (the
paper's authors' rule) it is stretched to ``S x S`` instead and nothing is padded.
:class:`Geometry` records both sizes so that a model-space prediction can be mapped back:
crop the padding, then resize to ``H x W`` (bilinear for probabilities or logits, nearest
only for label maps).

Masks are always resampled with nearest neighbour, computed with exact integer
arithmetic (``src = floor((2 * dst + 1) * n_in / (2 * n_out))``, the pixel-centre rule),
so that upsampling a mask and coming back reproduces it exactly.

Training augmentation (:class:`AugmentConfig`, :func:`augment`) works on the resized
uint8 sample, jointly on image and mask, driven by a ``numpy.random.Generator`` so that it
is deterministic under a seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255

_MEAN_NP = np.array(PIXEL_MEAN, dtype=np.float32)
_INV_STD_NP = (1.0 / np.array(PIXEL_STD, dtype=np.float64)).astype(np.float32)


@dataclass(frozen=True)
class Geometry:
    """How one image maps into model space.

    Attributes
    ----------
    original_size : tuple of int
        ``(H, W)`` of the image as read (after EXIF orientation).
    resized_size : tuple of int
        ``(h, w)`` after resizing the longest side to ``input_size``; the rest of the
        ``S x S`` input is padding.
    input_size : int
        Side ``S`` of the square model input.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: int


def resized_shape(original_size: Sequence[int], input_size: int,
                  mode: str = "longest_side") -> tuple[int, int]:
    """``(h, w)`` with the longest side scaled to ``input_size``, each side at least 1;
    ``(input_size, input_size)`` under ``mode="square"`` (``data.resize``: the image is
    stretched to the square input, nothing padded).

    Rounds like ``ResizeLongestSide.get_preprocess_shape`` (``int(x + 0.5)``); the clamp
    to 1 only matters for extreme aspect ratios where SAM's rule would give 0.
    """
    height, width = int(original_size[0]), int(original_size[1])
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {original_size!r}")
    if mode == "square":
        return int(input_size), int(input_size)
    if mode != "longest_side":
        raise ValueError(f"mode must be 'longest_side' or 'square' (data.resize), got {mode!r}")
    scale = input_size * 1.0 / max(height, width)
    new_h = max(1, int(height * scale + 0.5))
    new_w = max(1, int(width * scale + 0.5))
    return new_h, new_w


def geometry_for(original_size: Sequence[int], input_size: int,
                 mode: str = "longest_side") -> Geometry:
    """Geometry of an ``original_size = (H, W)`` image for an ``input_size`` model.

    Parameters
    ----------
    original_size : sequence of int
        ``(H, W)``.
    input_size : int
        Side of the square model input.
    mode : {"longest_side", "square"}
        ``data.resize``: keep the aspect ratio and pad, or stretch to the square.

    Returns
    -------
    Geometry
    """
    if int(input_size) < 1:
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
    size = (int(original_size[0]), int(original_size[1]))
    return Geometry(size, resized_shape(size, int(input_size), mode), int(input_size))


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` output pixels (pixel-centre nearest rule)."""
    dst = np.arange(n_out, dtype=np.int64)
    return ((2 * dst + 1) * n_in) // (2 * n_out)


def resize_nearest(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes of ``array`` to ``size = (h, w)``."""
    rows = nearest_indices(array.shape[0], int(size[0]))
    cols = nearest_indices(array.shape[1], int(size[1]))
    return array[rows[:, None], cols[None, :]]


_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize_image(image: np.ndarray, size: Sequence[int],
                 interpolation: str = "bilinear") -> np.ndarray:
    """Resize of an ``(H, W, 3)`` uint8 image by Pillow's ``interpolation`` filter
    (``"bilinear"`` or ``"bicubic"``, antialiased when shrinking)."""
    height, width = int(size[0]), int(size[1])
    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((width, height), _FILTERS[interpolation]))


def normalize_pad(image: np.ndarray, input_size: int) -> torch.Tensor:
    """``(h, w, 3)`` uint8 -> ``(3, S, S)`` float32, normalised then zero-padded (SAM's rule).

    Computed with numpy, which stays on one thread: torch's intra-op threads would fight
    the training step for the same cores when loading runs in the main process.
    """
    height, width = image.shape[:2]
    assert height <= input_size and width <= input_size, (image.shape, input_size)
    out = np.zeros((3, input_size, input_size), dtype=np.float32)
    for c in range(3):
        np.multiply(
            np.subtract(image[:, :, c], _MEAN_NP[c], dtype=np.float32),
            _INV_STD_NP[c],
            out=out[c, :height, :width],
        )
    return torch.from_numpy(out)


def pad_target(target: np.ndarray, input_size: int) -> torch.Tensor:
    """``(h, w)`` class ids -> ``(S, S)`` int64 with IGNORE_INDEX on the padding."""
    height, width = target.shape
    out = np.full((input_size, input_size), IGNORE_INDEX, dtype=np.int64)
    out[:height, :width] = target
    return torch.from_numpy(out)


def _nearest_torch(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    rows = torch.from_numpy(nearest_indices(maps.shape[-2], int(size[0]))).to(maps.device)
    cols = torch.from_numpy(nearest_indices(maps.shape[-1], int(size[1]))).to(maps.device)
    return maps.index_select(-2, rows).index_select(-1, cols)


def restore(maps: torch.Tensor, geometry: Geometry, mode: str = "bilinear") -> torch.Tensor:
    """Map model-space maps back to the original image size.

    Parameters
    ----------
    maps : torch.Tensor
        ``(C, R, R)`` or ``(R, R)`` maps over the padded square input. ``R`` is usually
        ``S``; a lower-resolution map (e.g. SAM's ``S / 4`` mask logits) is first
        upsampled to ``S`` bilinearly, as SAM's ``postprocess_masks`` does.
    geometry : Geometry
        Geometry of the sample, from :func:`geometry_for` or a dataset item.
    mode : {"bilinear", "nearest"}
        ``"bilinear"`` (align_corners=False) for probabilities or logits; ``"nearest"``
        for label maps only.

    Returns
    -------
    torch.Tensor
        ``(C, H, W)`` (or ``(H, W)``) at ``geometry.original_size``; bilinear output is
        floating point, nearest keeps the input dtype.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    squeeze = maps.dim() == 2
    if squeeze:
        maps = maps.unsqueeze(0)
    if maps.dim() != 3:
        raise ValueError(f"maps must be (C, R, R) or (R, R), got shape {tuple(maps.shape)}")
    size = geometry.input_size
    height, width = geometry.resized_size
    if height > size or width > size:
        # e.g. S / 4 maps given to restore_batch without input_size: the crop below would
        # keep all of them and stretch them over the image
        raise ValueError(
            f"resized size {height}x{width} exceeds the input size {size}; pass the model "
            "input size (restore_batch's input_size) when the maps are at a lower resolution"
        )
    if maps.shape[-2:] != (size, size):
        if mode == "nearest":
            maps = _nearest_torch(maps, (size, size))
        else:
            maps = F.interpolate(
                maps[None].float(), size=(size, size), mode="bilinear", align_corners=False
            )[0]
    maps = maps[:, :height, :width]  # (C, h, w)
    target = tuple(geometry.original_size)
    if mode == "nearest":
        out = _nearest_torch(maps, target) if maps.shape[-2:] != target else maps
    else:
        if not maps.is_floating_point():
            maps = maps.float()
        if maps.shape[-2:] == target:
            out = maps
        else:
            out = F.interpolate(maps[None], size=target, mode="bilinear", align_corners=False)[0]
    return out[0] if squeeze else out


def restore_batch(
    maps: torch.Tensor,
    original_size: torch.Tensor,
    resized_size: torch.Tensor,
    mode: str = "bilinear",
    input_size: int | None = None,
) -> list[torch.Tensor]:
    """:func:`restore` for a batch, with the sizes as collated by the data loader.

    Parameters
    ----------
    maps : torch.Tensor
        ``(B, C, R, R)``.
    original_size, resized_size : torch.Tensor
        ``(B, 2)`` int tensors (the ``original_size`` and ``resized_size`` batch keys).
    mode : {"bilinear", "nearest"}
    input_size : int, optional
        Model input side ``S``; defaults to ``R`` (maps at full input resolution).

    Returns
    -------
    list of torch.Tensor
        One ``(C, H_i, W_i)`` tensor per sample.
    """
    if maps.dim() != 4:
        raise ValueError(f"maps must be (B, C, R, R), got shape {tuple(maps.shape)}")
    size = int(input_size) if input_size is not None else int(maps.shape[-1])
    out = []
    for i in range(maps.shape[0]):
        geo = Geometry(
            (int(original_size[i][0]), int(original_size[i][1])),
            (int(resized_size[i][0]), int(resized_size[i][1])),
            size,
        )
        out.append(restore(maps[i], geo, mode=mode))
    return out


@dataclass
class AugmentConfig:
    """Joint image/mask training augmentation (applied in model space, before padding).

    Attributes
    ----------
    hflip, vflip : bool
        Random horizontal / vertical flips with probability 0.5.
    scale_range : tuple of float
        Random zoom factor range ``(lo, hi)``, ``0 < lo <= hi``. Zoom-in crops a random
        window of the sample's size; zoom-out leaves a smaller sample (more padding).
    rotate_degrees : float
        Rotation drawn uniformly from ``[-d, d]``, ``0 <= d <= 180``; uncovered pixels are
        black in the image and IGNORE_INDEX in the mask.
    color_jitter : float
        Brightness, contrast and saturation factors drawn from ``[1 - c, 1 + c]``,
        ``0 <= c < 1``.
    """

    hflip: bool = True
    vflip: bool = False
    scale_range: tuple[float, float] = (1.0, 1.0)
    rotate_degrees: float = 0.0
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(
                    f"AugmentConfig.{name} must be a bool, got {getattr(self, name)!r}"
                )
        try:
            low, high = (float(v) for v in self.scale_range)
        except (TypeError, ValueError):
            raise ValueError(
                f"AugmentConfig.scale_range must be a pair of floats, got {self.scale_range!r}"
            ) from None
        if not (0.0 < low <= high) or not math.isfinite(high):
            raise ValueError(
                f"AugmentConfig.scale_range must satisfy 0 < lo <= hi, got {self.scale_range!r}"
            )
        self.scale_range = (low, high)
        deg = float(self.rotate_degrees)
        if not (0.0 <= deg <= 180.0):
            raise ValueError(
                f"AugmentConfig.rotate_degrees must be in [0, 180], got {self.rotate_degrees!r}"
            )
        self.rotate_degrees = deg
        jitter = float(self.color_jitter)
        if not (0.0 <= jitter < 1.0):
            raise ValueError(
                f"AugmentConfig.color_jitter must be in [0, 1), got {self.color_jitter!r}"
            )
        self.color_jitter = jitter


def _jitter_colors(image: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Scale brightness, contrast and saturation of a uint8 RGB image by ``factors``."""
    brightness, contrast, saturation = (float(f) for f in factors)
    img = image.astype(np.float32) * brightness
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (h, w)
    img = (img - gray.mean()) * contrast + gray.mean()
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = gray[..., None] + (img - gray[..., None]) * saturation
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def augment(
    image: np.ndarray,
    mask: np.ndarray | None,
    config: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply ``config`` jointly to a resized sample.

    Parameters
    ----------
    image : numpy.ndarray
        ``(h, w, 3)`` uint8.
    mask : numpy.ndarray or None
        ``(h, w)`` uint8 class ids (IGNORE_INDEX allowed), resampled with nearest only.
    config : AugmentConfig
    rng : numpy.random.Generator
        Source of every random draw; the same state gives the same output.

    Returns
    -------
    tuple
        ``(image, mask)``; sizes never exceed the input's.
    """
    # Draw every number up front so the stream does not depend on which options are on.
    draws = rng.random(3)
    scale = rng.uniform(*config.scale_range)
    angle = rng.uniform(-config.rotate_degrees, config.rotate_degrees)
    crop_u = rng.random(2)
    jitter = rng.uniform(1.0 - config.color_jitter, 1.0 + config.color_jitter, size=3)
    if config.hflip and draws[0] < 0.5:
        image = image[:, ::-1]
        mask = mask[:, ::-1] if mask is not None else None
    if config.vflip and draws[1] < 0.5:
        image = image[::-1]
        mask = mask[::-1] if mask is not None else None
    height, width = image.shape[:2]
    if scale != 1.0:
        new_h = max(1, int(round(height * scale)))
        new_w = max(1, int(round(width * scale)))
        if new_h > height or new_w > width:
            # zoom-in: a window of the zoomed sample, resampled from the matching window of
            # the sample only (the whole zoomed sample would cost scale**2 times as much)
            top = int(crop_u[0] * (max(new_h - height, 0) + 1))
            left = int(crop_u[1] * (max(new_w - width, 0) + 1))
            out_h, out_w = min(height, new_h), min(width, new_w)
            box = (left * width / new_w, top * height / new_h,
                   (left + out_w) * width / new_w, (top + out_h) * height / new_h)
            pil = Image.fromarray(np.ascontiguousarray(image))
            image = np.asarray(pil.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box))
            if mask is not None:
                rows = nearest_indices(height, new_h)[top:top + out_h]
                cols = nearest_indices(width, new_w)[left:left + out_w]
                mask = mask[rows[:, None], cols[None, :]]
        else:
            image = resize_image(np.ascontiguousarray(image), (new_h, new_w))
            mask = resize_nearest(mask, (new_h, new_w)) if mask is not None else None
    if config.color_jitter > 0.0:
        # before the rotation: the pixels it uncovers stay black (IGNORE_INDEX in the mask)
        # and do not pull the contrast pivot (the mean grey) towards black
        image = _jitter_colors(image, jitter)
    if config.rotate_degrees > 0.0 and angle != 0.0:
        pil = Image.fromarray(np.ascontiguousarray(image))
        image = np.asarray(pil.rotate(angle, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)))
        if mask is not None:
            pil_mask = Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8)))
            mask = np.asarray(
                pil_mask.rotate(angle, Image.Resampling.NEAREST, fillcolor=IGNORE_INDEX)
            )
    image = np.ascontiguousarray(image)
    mask = np.ascontiguousarray(mask) if mask is not None else None
    return image, mask
