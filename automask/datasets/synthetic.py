"""Generated image/mask pairs: textured shapes on a textured background, plus noise.

Each foreground class has its own colour and stripe texture (orientation and frequency),
jittered per image; the background is a smooth colour field with a different, blotchy
texture. Shapes (ellipses, rotated rectangles, diamonds) vary in size, position and
angle, so a model has something real to learn, and the task is not solvable from colour
alone at pixel level because of the noise. Generation is deterministic for a seed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..utils.download import cache_dir

# Base colours (RGB) of foreground classes 1, 2, ...; class k > len uses a hue wheel.
_CLASS_COLOURS = [
    (200, 60, 50), (60, 170, 70), (70, 90, 210), (210, 190, 60),
    (170, 70, 190), (60, 190, 190), (230, 130, 40), (120, 120, 120),
]
_DONE = ".complete"


def _class_colour(cls: int) -> np.ndarray:
    if cls <= len(_CLASS_COLOURS):
        return np.array(_CLASS_COLOURS[cls - 1], dtype=np.float32)
    hue = (cls * 0.618034) % 1.0
    rgb = [0.5 + 0.4 * math.cos(2 * math.pi * (hue + off)) for off in (0.0, 1 / 3, 2 / 3)]
    return np.array(rgb, dtype=np.float32) * 255


def _sample(
    rng: np.random.Generator, height: int, width: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One ``(H, W, 3)`` uint8 image and ``(H, W)`` uint8 class-id mask."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= max(height, width)
    xx /= max(height, width)
    # Background: a smooth colour gradient and blotches.
    base = rng.uniform(70, 150, size=3).astype(np.float32)
    tilt = rng.uniform(-40, 40, size=(2, 3)).astype(np.float32)
    image = base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1]
    for _ in range(3):
        fy, fx, ph = rng.uniform(1.0, 4.0), rng.uniform(1.0, 4.0), rng.uniform(0, 2 * math.pi)
        blotch = np.sin(2 * math.pi * fy * yy + ph) * np.cos(2 * math.pi * fx * xx - ph)
        image += 12.0 * blotch[..., None] * rng.uniform(-1, 1, size=3).astype(np.float32)
    mask = np.zeros((height, width), dtype=np.uint8)
    n_shapes = int(rng.integers(1, 4))
    for i in range(n_shapes):
        cls = 1 if num_classes == 2 else int(rng.integers(1, num_classes))
        if i == 0 and num_classes > 2:
            cls = 1 + int(rng.integers(0, num_classes - 1))
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        cy, cx = cy / max(height, width), cx / max(height, width)
        a = rng.uniform(0.08, 0.28) * min(height, width) / max(height, width)
        b = a * rng.uniform(0.5, 1.0)
        theta = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        kind = int(rng.integers(0, 3))
        if kind == 0:
            inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        elif kind == 1:
            inside = (np.abs(u) <= a) & (np.abs(v) <= b)
        else:
            inside = np.abs(u) / a + np.abs(v) / b <= 1.0
        if not inside.any():  # tiny images: at least the centre pixel
            inside = np.zeros_like(inside)
            side = max(height, width)
            inside[min(height - 1, int(cy * side)), min(width - 1, int(cx * side))] = True
        # Class texture: stripes at a class-specific angle and frequency.
        angle = cls * 0.9
        freq = 10.0 + 6.0 * (cls % 4)
        along = xx * math.cos(angle) + yy * math.sin(angle)
        stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * along)
        colour = _class_colour(cls) + rng.uniform(-20, 20, size=3).astype(np.float32)
        texture = colour * (0.75 + 0.35 * stripes[..., None])
        image[inside] = texture[inside]
        mask[inside] = cls
    image += rng.normal(0.0, 10.0, size=image.shape).astype(np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask


def make_synthetic(
    n: int,
    size: int | tuple[int, int] = (128, 128),
    num_classes: int = 2,
    seed: int = 0,
    root: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Write ``n`` generated image/mask PNG pairs and return their DataFrame.

    Parameters
    ----------
    n : int
        Number of pairs (>= 1).
    size : int or (H, W)
        Image size.
    num_classes : int
        Classes including background (>= 2). Binary masks are written as 0/255, others
        as class indices.
    seed : int
        Same seed, same files.
    root : path, optional
        Folder to write ``images/`` and ``masks/`` into. Default: a folder under the
        automask cache named after the arguments, reused when already complete.

    Returns
    -------
    pandas.DataFrame
        Columns ``image`` and ``label`` with absolute paths.
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(size, (int, np.integer)):
        height = width = int(size)
    else:
        height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    if (
        isinstance(num_classes, bool)
        or int(num_classes) != num_classes
        or not 2 <= num_classes <= 255
    ):
        raise ValueError(f"num_classes must be an integer in [2, 255], got {num_classes!r}")
    n, num_classes = int(n), int(num_classes)
    if root is None:
        folder = cache_dir() / "synthetic" / f"n{n}_{height}x{width}_k{num_classes}_seed{seed}"
    else:
        folder = Path(root).expanduser()
    images_dir, masks_dir = folder / "images", folder / "masks"
    names = [f"{i:05d}.png" for i in range(n)]
    df = pd.DataFrame(
        {
            "image": [os.path.abspath(images_dir / name) for name in names],
            "label": [os.path.abspath(masks_dir / name) for name in names],
        }
    )
    if root is None and (folder / _DONE).exists():
        return df
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        rng = np.random.default_rng([int(seed), i])
        image, mask = _sample(rng, height, width, num_classes)
        if num_classes == 2:
            mask = mask * np.uint8(255)
        Image.fromarray(image).save(images_dir / name)
        Image.fromarray(mask).save(masks_dir / name)
    if root is None:
        (folder / _DONE).write_text("ok\n")
    return df
