"""Pair an image folder with a mask folder by file stem."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd

from ..errors import DataValidationError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm"}
)


def _by_stem(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataValidationError(f"{role} folder {folder} does not exist or is not a folder")
    files: dict[str, Path] = {}
    clashes: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            clashes.append(f"{files[path.stem].name} / {path.name}")
            continue
        files[path.stem] = path
    if clashes:
        raise DataValidationError(
            f"{role} folder {folder} holds several files with the same stem: " + "; ".join(clashes)
        )
    return files


def from_folders(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    *,
    image_col: str = "image",
    label_col: str = "label",
    strict: bool = True,
) -> pd.DataFrame:
    """DataFrame of image/mask pairs matched by file stem (``a.jpg`` with ``a.png``).

    Parameters
    ----------
    images_dir, masks_dir : path
        Folders holding the images and the masks (not searched recursively; hidden
        files and non-image suffixes are skipped).
    image_col, label_col : str
        Column names of the result.
    strict : bool
        Unpaired files raise (True) or are dropped with a warning (False); either way
        they are listed. The lists are kept in ``df.attrs["unpaired"]``.

    Returns
    -------
    pandas.DataFrame
        Absolute paths, sorted by stem, with a 0..n-1 index.

    Raises
    ------
    DataValidationError
        Missing folders, no pairs at all, duplicate stems, or unpaired files when strict.
    """
    images_dir, masks_dir = Path(images_dir).expanduser(), Path(masks_dir).expanduser()
    images = _by_stem(images_dir, "image")
    masks = _by_stem(masks_dir, "mask")
    lonely_images = sorted(str(images[s]) for s in images.keys() - masks.keys())
    lonely_masks = sorted(str(masks[s]) for s in masks.keys() - images.keys())
    stems = sorted(images.keys() & masks.keys())
    if lonely_images or lonely_masks:
        lines = [f"image without mask: {p}" for p in lonely_images[:20]]
        lines += [f"mask without image: {p}" for p in lonely_masks[:20]]
        total = len(lonely_images) + len(lonely_masks)
        more = total - len(lines)
        message = (
            f"{total} unpaired file(s) between {images_dir} and {masks_dir}:\n  "
            + "\n  ".join(lines)
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
        if strict:
            raise DataValidationError(message + "\n(pass strict=False to drop them)")
        warnings.warn(message, stacklevel=2)
    if not stems:
        raise DataValidationError(f"no image/mask pairs found between {images_dir} and {masks_dir}")
    df = pd.DataFrame(
        {
            image_col: [os.path.abspath(images[s]) for s in stems],
            label_col: [os.path.abspath(masks[s]) for s in stems],
        }
    )
    df.attrs["unpaired"] = {"images": lonely_images, "masks": lonely_masks}
    return df
