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


# Name endings that public data sets add to an image's stem for its mask (ISIC's
# "_segmentation", DeepGlobe's "_sat"/"_mask", CamVid's "_L", PH2's "_lesion", ...).
MASK_STEM_SUFFIXES = ("", "_mask", "-mask", "_masks", "_segmentation", "_Segmentation",
                      "_seg", "_gt", "_GT", "_label", "_labels", "_lesion", "_anno", "_L")
IMAGE_STEM_SUFFIXES = ("", "_sat", "_image", "_img", "_rgb", "_Dermoscopic_Image")


def _keyed(files: dict[str, Path], suffix: str) -> dict[str, Path]:
    """Files keyed by stem without ``suffix`` (stems without it keep their name)."""
    out: dict[str, Path] = {}
    for stem, path in files.items():
        key = stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem
        out.setdefault(key, path)
    return out


def _best_suffixes(images: dict[str, Path], masks: dict[str, Path],
                   image_suffix: str | None, mask_suffix: str | None) -> tuple[str, str]:
    """The (image, mask) stem suffixes that pair the most files; exact stems win ties.

    A name ending is only tried when every file of its folder has it, so that a stray
    ``x_mask.png`` is never paired with an unrelated ``x_img.png``.
    """
    def options(files: dict[str, Path], known: tuple[str, ...], given: str | None):
        if given is not None:
            return (given,)
        return tuple(s for s in known if not s or all(stem.endswith(s) for stem in files))

    image_options = options(images, IMAGE_STEM_SUFFIXES, image_suffix)
    mask_options = options(masks, MASK_STEM_SUFFIXES, mask_suffix)
    best, best_pairs = (image_options[0], mask_options[0]), -1
    for i_sfx in image_options:
        keyed_images = _keyed(images, i_sfx)
        for m_sfx in mask_options:
            pairs = len(keyed_images.keys() & _keyed(masks, m_sfx).keys())
            if pairs > best_pairs:
                best, best_pairs = (i_sfx, m_sfx), pairs
    return best


def from_folders(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    *,
    image_col: str = "image",
    label_col: str = "label",
    strict: bool = True,
    mask_suffix: str | None = None,
    image_suffix: str | None = None,
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
    mask_suffix, image_suffix : str, optional
        Ending of the mask's (image's) stem that is not part of the shared name, e.g.
        ``"_segmentation"`` for ``ISIC_001.jpg`` with ``ISIC_001_segmentation.png``. When
        None, exact stems are tried along with the endings common in public data sets
        (:data:`MASK_STEM_SUFFIXES`, :data:`IMAGE_STEM_SUFFIXES`) that every file of its
        folder has, and the choice that pairs the most files is used (exact stems win
        ties); it is kept in ``df.attrs["suffixes"]``.

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
    image_sfx, mask_sfx = _best_suffixes(images, masks, image_suffix, mask_suffix)
    images, masks = _keyed(images, image_sfx), _keyed(masks, mask_sfx)
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
    df.attrs["suffixes"] = {"image": image_sfx, "mask": mask_sfx}
    return df
