"""Pair an image folder with a mask folder by file stem; read class names from classes.txt."""
from __future__ import annotations

import os
import re
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
    classes_file = find_classes_file(masks_dir)
    df.attrs["class_names"] = read_class_names(classes_file) if classes_file else None
    return df


CLASSES_FILE = "classes.txt"
_NUMBERED = re.compile(r"^(\d+)\s*[:,=\s]\s*(\S.*)$")


def find_classes_file(masks_dir: str | os.PathLike) -> Path | None:
    """``classes.txt`` in the mask folder, else beside it (in its parent); None if neither."""
    masks_dir = Path(masks_dir).expanduser()
    for candidate in (masks_dir / CLASSES_FILE, masks_dir.parent / CLASSES_FILE):
        if candidate.is_file():
            return candidate
    return None


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, in class-id order.

    Two layouts are read: one name per line (the line order gives the ids 0, 1, ...), or
    an id and a name per line (``0 Sky``, ``1: Building``, ``2,Pole``), as CamVid's
    ``classes.txt``. Blank lines and lines starting with ``#`` are skipped.

    Parameters
    ----------
    path : str or PathLike
        The text file.

    Returns
    -------
    list of str
        Name of class 0, 1, ... (background first for binary data sets).

    Raises
    ------
    DataValidationError
        Unreadable file, no names, numbered lines mixed with plain ones, or ids that are
        repeated or leave a gap; the message names the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"cannot read class names from {path}: {exc}") from exc
    entries = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise DataValidationError(f"{path} holds no class names (one name per line)")
    numbered = [_NUMBERED.match(line) for _, line in entries]
    if not any(numbered):
        return [line for _, line in entries]
    names: dict[int, str] = {}
    for (lineno, line), match in zip(entries, numbered):
        if match is None:
            raise DataValidationError(
                f"{path} line {lineno}: {line!r} has no class id, but other lines do "
                "('<id> <name>' on every line, or a bare name on every line)"
            )
        class_id, name = int(match.group(1)), match.group(2).strip()
        if class_id in names:
            raise DataValidationError(f"{path} line {lineno}: class id {class_id} repeated")
        names[class_id] = name
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DataValidationError(f"{path}: class ids {missing} have no name")
    return [names[i] for i in range(len(names))]
