"""Pair an image folder with a mask folder by file stem; read class names from classes.txt."""
from __future__ import annotations

import logging
import os
import re
import struct
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataValidationError
from .color_maps import color_table_for, read_color_map

log = logging.getLogger("automask")

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm",
     ".npy"}
)


def _stem(path: Path) -> str:
    """The file's stem in Unicode NFC, so that a name written decomposed (as macOS writes
    ``é``) pairs with the same name written composed."""
    return unicodedata.normalize("NFC", path.stem)


def _by_stem(folder: Path, role: str,
             suffixes: frozenset[str] | set[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """The files of ``folder`` with one of ``suffixes`` keyed by stem; when it holds none
    but has sub-folders (Cityscapes' ``train/aachen/...``), those of every folder below it,
    keyed by their path below ``folder`` without the suffix (``aachen/aachen_000000``).
    Hidden files and folders are skipped."""
    if not folder.is_dir():
        raise DataValidationError(f"{role} folder {folder} does not exist or is not a folder")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files, others = _keyed_files(folder, entries, role, suffixes)
    if files or not any(p.is_dir() for p in entries):
        deep = False
    else:  # only folders: search below them
        deep = True
        below = sorted(p for p in folder.rglob("*")
                       if not any(part.startswith(".")
                                  for part in p.relative_to(folder).parts))
        files, _ = _keyed_files(folder, [p for p in below if not p.is_dir()], role, suffixes)
    if not files:
        held = (f"it holds only {', '.join(others[:10])}" + (" ..." if len(others) > 10 else "")
                if others else "it is empty")
        kinds = (", ".join(sorted(suffixes)) if len(suffixes) <= len(IMAGE_SUFFIXES)
                 else "any format Pillow reads, or .npy")
        raise DataValidationError(
            f"{role} folder {folder} holds no image files ({kinds})"
            f"{', nor do its sub-folders' if deep else ''}: {held}"
        )
    return files


def _keyed_files(folder: Path, entries: list[Path], role: str,
                 suffixes: frozenset[str] | set[str] = IMAGE_SUFFIXES
                 ) -> tuple[dict[str, Path], list[str]]:
    """(files of ``entries`` with one of ``suffixes`` keyed by their path below ``folder``
    without the suffix, what else the entries are); raises on broken links and on two files
    of one key."""
    files: dict[str, Path] = {}
    clashes: list[str] = []
    broken: list[str] = []
    others: list[str] = []  # what the folder holds besides image files (for messages)
    for path in entries:
        if path.suffix.lower() not in suffixes or not path.is_file():
            if path.is_symlink() and not path.exists():
                broken.append(str(path))
            else:
                others.append(path.name + ("/" if path.is_dir() else ""))
            continue
        rel = path.relative_to(folder)
        stem = "/".join([*rel.parent.parts, _stem(path)]) if rel.parent.parts else _stem(path)
        if stem in files:
            clashes.append(f"{files[stem].relative_to(folder)} / {rel}")
            continue
        files[stem] = path
    if broken:
        raise DataValidationError(
            f"{role} folder {folder} holds broken links (their target is missing): "
            + "; ".join(broken)
        )
    if clashes:
        raise DataValidationError(
            f"{role} folder {folder} holds several files with the same stem: " + "; ".join(clashes)
        )
    return files, others


def _by_name_only(files: dict[str, Path], folder: Path, role: str) -> dict[str, Path]:
    """Files found below sub-folders, keyed by their stem alone: to pair with a folder
    that keeps its files at the top. Two files of one stem in different sub-folders raise."""
    out: dict[str, Path] = {}
    clashes: list[str] = []
    for key, path in files.items():
        stem = key.rsplit("/", 1)[-1]
        if stem in out:
            clashes.append(f"{out[stem].relative_to(folder)} / {path.relative_to(folder)}")
        out.setdefault(stem, path)
    if clashes:
        raise DataValidationError(
            f"{role} folder {folder} holds files of the same stem in different sub-folders, "
            "and the other folder has no sub-folders to tell them apart: " + "; ".join(clashes))
    return out


def listing(folder: Path, role: str = "image",
            suffixes: frozenset[str] | set[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """The files of one folder keyed as :func:`from_folders` keys them: by stem, or, when
    the folder holds only sub-folders, by their path below it (``a/x``). ``role`` names
    the folder in errors (missing, empty, broken links, two files of one key)."""
    return _by_stem(folder, role, suffixes)


def listings(first: Path, second: Path, roles: tuple[str, str] = ("image", "mask"),
             suffixes: frozenset[str] | set[str] = IMAGE_SUFFIXES
             ) -> tuple[dict[str, Path], dict[str, Path]]:
    """The files of two folders keyed for pairing, as :func:`from_folders` pairs them: by
    stem, or by the path below the folder where it holds only sub-folders; when only one of
    the two does, its files are keyed by stem alone. ``roles`` name the folders in errors.
    """
    keyed = _by_stem(first, roles[0], suffixes), _by_stem(second, roles[1], suffixes)
    nested = [any("/" in key for key in side) for side in keyed]
    if nested == [True, False]:  # sub-folders on one side only: pair by stem alone
        return _by_name_only(keyed[0], first, roles[0]), keyed[1]
    if nested == [False, True]:
        return keyed[0], _by_name_only(keyed[1], second, roles[1])
    return keyed


# Name endings that public data sets add to an image's stem for its mask (ISIC's
# "_segmentation", DeepGlobe's "_sat"/"_mask", CamVid's "_L", PH2's "_lesion", ...).
MASK_STEM_SUFFIXES = ("", "_mask", "-mask", "_masks", "_segmentation", "_Segmentation",
                      "_seg", "_gt", "_GT", "_label", "_labels", "_lesion", "_anno", "_L",
                      "-labels")
IMAGE_STEM_SUFFIXES = ("", "_sat", "_image", "_img", "_rgb", "_Dermoscopic_Image", "-volume")
# Where a name ending may begin ("21_manual1", "im0001.ah", "x-ann", "benign (1) mask").
_ENDING_STARTS = frozenset("_-. ")
_MAX_SHARED_ENDINGS = 6  # bounds the (image, mask) endings tried to (6 + listed)^2
STACK_MEMORY_LIMIT = 4 * 2**30  # bytes of TIFF stack pages from_folders reads into memory


def shared_endings(stems: Any) -> tuple[str, ...]:
    """The endings that every one of two or more ``stems`` has, each starting at ``_``,
    ``-``, ``.`` or a space and leaving a name before it, longest first (at most
    :data:`_MAX_SHARED_ENDINGS`): ``("_manual1",)`` for DRIVE's ``21_manual1``,
    ``22_manual1``. A single stem gives none: all of its parts are shared with itself, so
    ``scan_01`` would pass for ``scan`` plus an ending."""
    stems = list(stems)
    if len(stems) < 2:
        return ()
    common = os.path.commonprefix([stem[::-1] for stem in stems])[::-1]
    shortest = min(len(stem) for stem in stems)
    found = [common[i:] for i, ch in enumerate(common)
             if ch in _ENDING_STARTS and len(common) - i < shortest]
    return tuple(found[:_MAX_SHARED_ENDINGS])


def _keyed(files: dict[str, Path], suffix: str) -> dict[str, Path]:
    """Files keyed by stem without ``suffix`` (stems without it keep their name)."""
    out: dict[str, Path] = {}
    for stem, path in files.items():
        key = stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem
        out.setdefault(key, path)
    return out


def _check_keys(files: dict[str, Path], suffix: str, folder: Path, role: str) -> None:
    """Raise when two files get the same name once ``suffix`` is dropped (``a.png`` and
    ``a_mask.png`` under ``mask_suffix="_mask"``): one of them would be lost unseen."""
    seen: dict[str, Path] = {}
    clashes: list[str] = []
    for stem, path in files.items():
        key = stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem
        if key in seen:
            clashes.append(f"{seen[key].name} / {path.name} (as {key!r})")
        else:
            seen[key] = path
    if clashes:
        raise DataValidationError(
            f"{role} folder {folder}: these files have the same name once the ending "
            f"{suffix!r} is dropped, so only one could be paired: " + "; ".join(clashes)
        )


def _best_suffixes(images: dict[str, Path], masks: dict[str, Path],
                   image_suffix: str | None, mask_suffix: str | None) -> tuple[str, str]:
    """The (image, mask) stem suffixes that pair the most files, names that differ in
    letter case only counted as pairs; then the most pairs as written; then exact stems.

    A name ending is only tried when every file of its folder has it, so that a stray
    ``x_mask.png`` is never paired with an unrelated ``x_img.png``: the endings listed in
    :data:`IMAGE_STEM_SUFFIXES` / :data:`MASK_STEM_SUFFIXES`, then any other that all of
    two or more files share (:func:`shared_endings`: DRIVE's ``21_training.tif`` with
    ``21_manual1.gif``). Ties go to the earlier option, so exact stems first, then the
    listed endings.
    """
    def folded(keys) -> set[str]:
        return {key.casefold() for key in keys}

    def options(files: dict[str, Path], known: tuple[str, ...], given: str | None):
        if given is not None:
            return (given,)
        # a further mask (x_mask_1 beside x_mask) has its mask's ending
        listed = tuple(s for s in known if not s or all(
            stem.endswith(s) or _further_of(stem, files).endswith(s) for stem in files))
        return listed + tuple(s for s in shared_endings(files) if s not in listed)

    image_options = options(images, IMAGE_STEM_SUFFIXES, image_suffix)
    mask_options = options(masks, MASK_STEM_SUFFIXES, mask_suffix)
    best, best_pairs = (image_options[0], mask_options[0]), (-1, -1)
    for i_sfx in image_options:
        keyed_images = _keyed(images, i_sfx)
        for m_sfx in mask_options:
            keyed_masks = _keyed(masks, m_sfx)
            pairs = (len(folded(keyed_images) & folded(keyed_masks)),
                     len(keyed_images.keys() & keyed_masks.keys()))
            if pairs > best_pairs:
                best, best_pairs = (i_sfx, m_sfx), pairs
    return best


def pair_stems(images: dict[str, Path], masks: dict[str, Path], *,
               image_suffix: str | None = None, mask_suffix: str | None = None,
               image_folder: Path | None = None, mask_folder: Path | None = None
               ) -> tuple[dict[str, Path], dict[str, Path], tuple[str, str]]:
    """Pair files keyed by stem: ``(images, masks, (image_suffix, mask_suffix))`` keyed by
    the shared name, the endings dropped.

    Each ending is the one given, else the common one of :data:`IMAGE_STEM_SUFFIXES` /
    :data:`MASK_STEM_SUFFIXES` (every file of its side has it) that pairs the most files,
    exact stems winning ties. Two files of a side with the same shared name raise
    :class:`DataValidationError` naming them (``*_folder`` in the message). Names that
    differ in letter case only pair as well (:func:`_fold_case`).
    """
    image_sfx, mask_sfx = _best_suffixes(images, masks, image_suffix, mask_suffix)
    _check_keys(images, image_sfx, image_folder, "image")
    _check_keys(masks, mask_sfx, mask_folder, "mask")
    images, masks = _fold_case(_keyed(images, image_sfx), _keyed(masks, mask_sfx))
    return images, masks, (image_sfx, mask_sfx)


def _fold_case(images: dict[str, Path], masks: dict[str, Path]
               ) -> tuple[dict[str, Path], dict[str, Path]]:
    """``images`` and ``masks`` with each mask keyed by the image name it equals but for
    letter case (``IMG_1.JPG`` with ``img_1.png``: folders written on a disk that ignores
    case), where that pairs more files than the names as written and no two names of one
    side differ in case only; else both as given."""
    exact = len(images.keys() & masks.keys())
    if exact == min(len(images), len(masks)):
        return images, masks  # every file of one side has its pair already
    image_keys = {key.casefold(): key for key in images}
    mask_folded = {key.casefold() for key in masks}
    if len(image_keys) < len(images) or len(mask_folded) < len(masks):
        return images, masks  # "a" beside "A": which pairs which is no longer clear
    if len(image_keys.keys() & mask_folded) <= exact:
        return images, masks
    return images, {image_keys.get(key.casefold(), key): path for key, path in masks.items()}


def suffix_hint(images: Any, masks: Any) -> str:
    """For names that share no stem, the message's hint: the ending to pass when the masks'
    (images') names are the images' (masks') plus one ending (``x_shadow.png`` for
    ``x.jpg``), else the options to pass."""
    def ending(longer: Any, shorter: Any) -> str | None:
        found = set()
        for stem in longer:
            bases = [b for b in shorter if stem.startswith(b) and len(stem) > len(b)]
            if not bases:
                return None
            found.add(stem[len(max(bases, key=len)):])
        return found.pop() if len(found) == 1 else None

    mask_end, image_end = ending(list(masks), list(images)), ending(list(images), list(masks))
    if mask_end:
        return (f"; the masks' names end with {mask_end!r}: pass mask_suffix={mask_end!r} "
                f"(automask: --mask-suffix {mask_end})")
    if image_end:
        return (f"; the images' names end with {image_end!r}: pass image_suffix="
                f"{image_end!r} (automask: --image-suffix {image_end})")
    return ("; if the masks' (images') names add an ending to the shared name, pass it as "
            "mask_suffix= (image_suffix=; automask: --mask-suffix, --image-suffix)")


def _split_shared_folder(folder: Path, mask_suffix: str | None, image_suffix: str | None
                         ) -> tuple[dict[str, Path], dict[str, Path]]:
    """Images and masks kept in one folder (``1.tif`` beside ``1_mask.tif``): the files whose
    stem ends with the mask ending are the masks (with their further masks, ``1_mask_1``),
    the others the images. The ending is
    ``mask_suffix``, else the one of :data:`MASK_STEM_SUFFIXES` that pairs the most files."""
    split = _shared_split(_by_stem(folder, "image"), mask_suffix, image_suffix)
    if split is None:
        raise DataValidationError(
            f"the image folder and the mask folder are the same folder, {folder}, and no "
            "name ending tells its masks from its images"
            + (f" (no file pairs with a mask ending in {mask_suffix!r})" if mask_suffix else
               f" (tried {', '.join(repr(s) for s in MASK_STEM_SUFFIXES[1:])})")
            + "; pass mask_suffix=, or put the masks in a folder of their own"
        )
    return split


def _shared_split(files: dict[str, Path], mask_suffix: str | None, image_suffix: str | None
                  ) -> tuple[dict[str, Path], dict[str, Path]] | None:
    """(images, masks) of one folder's ``files`` keyed by stem, split by the mask ending
    that pairs the most of them (``mask_suffix`` when given); None when none pairs any."""
    best, best_pairs = None, 0
    for m_sfx in (mask_suffix,) if mask_suffix else MASK_STEM_SUFFIXES[1:]:
        masks = {stem: p for stem, p in files.items() if stem.endswith(m_sfx)}
        masks.update({stem: p for stem, p in files.items() if _further_of(stem, masks)})
        images = {stem: p for stem, p in files.items() if stem not in masks}
        if not masks or not images:
            continue
        i_sfx, _ = _best_suffixes(images, masks, image_suffix, m_sfx)
        pairs = len(_keyed(images, i_sfx).keys() & _keyed(masks, m_sfx).keys())
        if pairs > best_pairs:
            best, best_pairs = (images, masks), pairs
    return best


def masks_beside_images(paths: list[Path]) -> list[Path]:
    """Of ``paths`` (image files), those named as the mask of another in the same folder,
    as :func:`from_folders` pairs one folder's images and masks (``1_mask.tif`` beside
    ``1.tif``, DeepGlobe's ``x_mask.png`` beside ``x_sat.jpg``, CamVid's ``x_L.png``
    beside ``x.png``), and their further masks (``x_mask_1.png``); sorted."""
    by_folder: dict[Path, dict[str, Path]] = {}
    for path in paths:
        by_folder.setdefault(path.parent, {}).setdefault(_stem(path), path)
    found: list[Path] = []
    for files in by_folder.values():
        split = _shared_split(files, None, None)
        if split is None:
            continue
        try:
            images, masks, _ = pair_stems(*split)
        except DataValidationError:  # names that clash once their endings are dropped
            continue
        paired = {s: masks[s] for s in images.keys() & masks.keys()}
        found += paired.values()
        lonely = [(images | masks)[s] for s in images.keys() ^ masks.keys()]
        found += [p for further in further_masks(lonely, paired).values() for p in further]
    return sorted(found)


def from_folders(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    *,
    image_col: str = "image",
    label_col: str = "label",
    strict: bool = True,
    mask_suffix: str | None = None,
    image_suffix: str | None = None,
    extra_masks: str | None = None,
) -> pd.DataFrame:
    """DataFrame of image/mask pairs matched by file stem (``a.jpg`` with ``a.png``).

    Parameters
    ----------
    images_dir, masks_dir : path
        Folders holding the images and the masks (hidden files and non-image suffixes
        are skipped). They may be one folder when the masks' names end with a mask ending
        (``1.tif`` beside ``1_mask.tif``): the files with the ending are the masks. A
        folder that holds only sub-folders (Cityscapes' ``leftImg8bit/train/<city>/``) is
        searched below them, and its files are paired by their path below it
        (``aachen/x_leftImg8bit.png`` with ``aachen/x_gtFine_labelIds.png`` under the
        endings given), or by stem alone when the other folder keeps its files at the top.
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
        folder has, and any other ending that all files of a folder of two or more share
        after a ``_``, ``-``, ``.`` or space (DRIVE's ``21_training.tif`` with
        ``21_manual1.gif``, STARE's ``im0001.ppm`` with ``im0001.ah.ppm``); the choice
        that pairs the most files is used (exact stems win ties, then the listed
        endings); it is kept in ``df.attrs["suffixes"]``.
    extra_masks : {None, "union"}
        What to do with an image's further masks, named as its mask plus a number
        (BUSI's ``benign (4)_mask_1.png`` beside ``benign (4)_mask.png``: one mask per
        lesion). None: they are unpaired files (an error when ``strict``, which names
        them as further masks). ``"union"``: each such image's label is the pixel-wise
        maximum of its masks (the union of binary masks), a uint8 array in memory; the
        files merged are kept in ``df.attrs["extra_masks"]``.

    Returns
    -------
    pandas.DataFrame
        Absolute paths, sorted by stem, with a 0..n-1 index. An image that is a TIFF
        stack (a volume's slices) paired with a mask stack of as many pages gives one row
        per page, image and mask as arrays in memory (:func:`automask.data.read_stack`),
        its page count in ``df.attrs["stacks"]``; other stacks are read as their first
        page, with a warning when validated. ``df.attrs["class_names"]``
        holds the names of a ``classes.txt`` in or beside the masks folder (its path in
        ``df.attrs["class_names_from"]``). When the masks
        are colour images and a colour table (``class_dict.csv``, see
        :mod:`automask.datasets.color_maps`) sits in or beside their folder,
        ``df.attrs["color_map"]`` holds its colour -> class id map, and its names fill
        ``df.attrs["class_names"]`` when there is no ``classes.txt``; else
        ``df.attrs["color_map"]`` is None. ``fit(df)`` and ``automask fit`` take both for
        the ``color_map`` and ``class_names`` not given (see :func:`found_beside`).

    Raises
    ------
    DataValidationError
        Missing folders, a folder without image files, one folder for images and masks
        whose names no mask ending tells apart, broken links, duplicate stems (also once
        ``mask_suffix`` / ``image_suffix`` is dropped), no pairs at all, unpaired files
        when strict, or further masks of an image that do not merge (another size).
    """
    if extra_masks not in (None, "union"):
        raise ValueError(f"extra_masks must be None or 'union', got {extra_masks!r}")
    images_dir, masks_dir = Path(images_dir).expanduser(), Path(masks_dir).expanduser()
    if images_dir.is_dir() and masks_dir.is_dir() and images_dir.samefile(masks_dir):
        images, masks = _split_shared_folder(images_dir, mask_suffix, image_suffix)
    else:
        images, masks = listings(images_dir, masks_dir)
    stems_by_side = images, masks
    images, masks, (image_sfx, mask_sfx) = pair_stems(
        images, masks, image_suffix=image_suffix, mask_suffix=mask_suffix,
        image_folder=images_dir, mask_folder=masks_dir)
    if not images.keys() & masks.keys():
        raise DataValidationError(
            f"no image/mask pairs found between {images_dir} and {masks_dir}: no image "
            f"shares its name with a mask{suffix_hint(*stems_by_side)}")
    stems = sorted(images.keys() & masks.keys())
    extras = further_masks([images[s] for s in images.keys() - masks.keys()]
                           + [masks[s] for s in masks.keys() - images.keys()],
                           {s: masks[s] for s in stems})
    merged = {p for paths in extras.values() for p in paths} if extra_masks else set()
    lonely_images = sorted(str(images[s]) for s in images.keys() - masks.keys()
                           if images[s] not in merged)
    lonely_masks = sorted(str(masks[s]) for s in masks.keys() - images.keys()
                          if masks[s] not in merged)
    if lonely_images or lonely_masks:
        further = {str(p): s for s, paths in extras.items() for p in paths}
        lines = [_unpaired_line(p, "image without mask", further, images, masks)
                 for p in lonely_images[:20]]
        lines += [_unpaired_line(p, "mask without image", further, images, masks)
                  for p in lonely_masks[:20]]
        total = len(lonely_images) + len(lonely_masks)
        more = total - len(lines)
        message = (
            f"{total} unpaired file(s) between {images_dir} and {masks_dir}:\n  "
            + "\n  ".join(lines)
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
        tail = "(pass strict=False to drop them (automask: --drop-unpaired)"
        if further:
            tail += ("; extra_masks='union' (automask: --extra-masks union) to merge an "
                     "image's further masks into one")
        if strict:
            raise DataValidationError(message + "\n" + tail + ")")
        warnings.warn(message, stacklevel=2)
    labels: list[Any] = [os.path.abspath(masks[s]) for s in stems]
    if extra_masks:
        for pos, stem in enumerate(stems):
            if stem in extras:
                labels[pos] = union_of_masks([masks[stem], *extras[stem]])
    pictures: list[Any] = [os.path.abspath(images[s]) for s in stems]
    stacks = {pos: depth for pos, depth in
              ((pos, _stack_depth(images[s], masks[s])) for pos, s in enumerate(stems)
               if isinstance(labels[pos], str)) if depth > 1}
    if stacks:  # a volume's slices: one row per page, in memory
        from ..data.io import read_stack, stack_nbytes

        held = sum(stack_nbytes(pictures[pos]) + stack_nbytes(labels[pos]) for pos in stacks)
        if held > STACK_MEMORY_LIMIT:
            raise DataValidationError(
                f"the TIFF stacks {', '.join(pictures[pos] for pos in list(stacks)[:3])}"
                f"{' ...' if len(stacks) > 3 else ''} and their masks hold "
                f"{held / 2**30:.1f} GiB once decoded, more than from_folders holds in memory "
                f"({STACK_MEMORY_LIMIT / 2**30:.0f} GiB): save their slices as files of their "
                "own (an image and a mask per slice), or give some of the pages "
                "(automask.data.read_stack) in a DataFrame")
        rows = [list(zip(read_stack(pictures[pos]), read_stack(labels[pos])))
                if pos in stacks else [(pictures[pos], labels[pos])]
                for pos in range(len(stems))]
        pictures = [image for row in rows for image, _ in row]
        labels = [label for row in rows for _, label in row]
    df = pd.DataFrame({image_col: pd.Series(pictures, dtype=object),
                       label_col: pd.Series(labels, dtype=object)})
    df.attrs["stacks"] = {os.path.abspath(images[stems[pos]]): depth
                          for pos, depth in stacks.items()}
    df.attrs["unpaired"] = {"images": lonely_images, "masks": lonely_masks}
    df.attrs["extra_masks"] = ({os.path.abspath(images[s]): [os.path.abspath(p) for p in
                                                              extras[s]]
                                for s in stems if s in extras} if extra_masks else {})
    df.attrs["suffixes"] = {"image": image_sfx, "mask": mask_sfx}
    classes_file = find_classes_file(masks_dir)
    df.attrs["class_names"] = read_class_names(classes_file) if classes_file else None
    df.attrs["class_names_from"] = str(classes_file) if classes_file else None
    df.attrs["color_map"] = None
    table = color_table_for(masks_dir, os.path.abspath(masks[stems[0]]))
    if table is not None:
        df.attrs["color_map"], names = read_color_map(table)
        if df.attrs["class_names"] is None and names is not None:
            df.attrs["class_names"], df.attrs["class_names_from"] = names, str(table)
    return df


CLASSES_FILE = "classes.txt"
_NUMBERED = re.compile(r"^(\d+)\s*[:,=\s]\s*(\S.*)$")


_FURTHER = re.compile(r"(?P<base>.+?)[_\- .]\d{1,3}")  # "x_mask" + "_1"


def _further_of(stem: str, stems: Any) -> str:
    """The stem of ``stems`` that ``stem`` is named after plus a number (``x_mask`` for
    ``x_mask_1``), else ``""``."""
    match = _FURTHER.fullmatch(stem)
    return match["base"] if match and match["base"] in stems else ""


def _stack_depth(image: Path, mask: Path) -> int:
    """The pages of a TIFF image stack and of its TIFF mask stack when they hold as many
    (ISBI 2012's ``train-volume.tif`` with ``train-labels.tif``), else 1."""
    depth = stack_depth(image)
    return depth if depth > 1 and stack_depth(mask) == depth else 1


def stack_depth(path: Path) -> int:
    """The full-size pages of a TIFF stack (:func:`automask.data.io.stacked_images`); 1
    for any other file. Only a TIFF whose first page links to another is opened."""
    if path.suffix.lower() not in (".tif", ".tiff") or not several_pages(path):
        return 1
    from ..data.io import stacked_images  # (imports torch: only for stacks)

    return stacked_images(path)


def several_pages(path: Path) -> bool:
    """Whether a TIFF file's first page links to another, from its header and first page
    directory alone (a few bytes, no decoding); False for anything else."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            order = {b"II": "<", b"MM": ">"}.get(head[:2])
            if order is None:
                return False
            version = struct.unpack(order + "H", head[2:4])[0]
            if version == 42:  # classic TIFF: 2-byte count, 12-byte entries, 4-byte offsets
                count_fmt, entry, offset_fmt = "H", 12, "I"
                first = struct.unpack(order + "I", head[4:8])[0]
            elif version == 43:  # BigTIFF: 8-byte count, 20-byte entries, 8-byte offsets
                count_fmt, entry, offset_fmt = "Q", 20, "Q"
                first = struct.unpack(order + "Q", head[8:16])[0]
            else:
                return False
            fh.seek(first)
            size = struct.calcsize(count_fmt)
            count = struct.unpack(order + count_fmt, fh.read(size))[0]
            fh.seek(first + size + count * entry)
            following = fh.read(struct.calcsize(offset_fmt))
            return len(following) == struct.calcsize(offset_fmt) and \
                struct.unpack(order + offset_fmt, following)[0] != 0
    except (OSError, struct.error):
        return False  # read (and reported) with the other files later


def further_masks(lonely: list[Path], paired_masks: dict[str, Path]) -> dict[str, list[Path]]:
    """``{shared name: [further mask files]}``: of the ``lonely`` files, those named as a
    paired mask plus a number (``benign (4)_mask_1.png`` beside ``benign (4)_mask.png``),
    sorted by that number."""
    by_stem = {_stem(path): name for name, path in paired_masks.items()}
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in lonely:
        base = _further_of(_stem(path), by_stem)
        if base:
            number = int(_stem(path)[len(base) + 1:])  # after the separator
            found.setdefault(by_stem[base], []).append((number, path))
    return {name: [path for _, path in sorted(paths)] for name, paths in found.items()}


def _unpaired_line(path: str, kind: str, further: dict[str, str], images: dict[str, Path],
                   masks: dict[str, Path]) -> str:
    """A line of the unpaired files' message; a further mask of a paired image says so."""
    if path not in further:
        return f"{kind}: {path}"
    name = further[path]
    return (f"further mask of image {images[name]} (beside its mask {masks[name].name}): "
            f"{path}")


def union_of_masks(paths: list[Path]) -> np.ndarray:
    """The pixel-wise maximum of the masks in ``paths`` (the union of binary masks), uint8.
    Masks of different sizes, or of values above 255, raise naming the files."""
    from ..data.io import read_mask

    try:
        arrays = [read_mask(path) for path in paths]
    except DataValidationError as exc:  # e.g. colour masks: their union is no mask
        raise DataValidationError(
            f"extra_masks='union' merges masks of one channel (0/255 or class ids): {exc}"
        ) from None
    for path, array in zip(paths[1:], arrays[1:]):
        if array.shape != arrays[0].shape:
            raise DataValidationError(
                f"extra_masks='union': mask {path} is {array.shape[1]}x{array.shape[0]} "
                f"but {paths[0]}, a mask of the same image, is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]} (width x height)")
    union = np.maximum.reduce(arrays)
    if union.size and (int(union.min()) < 0 or int(union.max()) > 255):
        raise DataValidationError(
            f"extra_masks='union': the masks {', '.join(str(p) for p in paths)} hold values "
            f"outside 0-255 ({int(union.min())} to {int(union.max())}); merge them yourself")
    return union.astype(np.uint8)


def found_beside(data: Any, num_classes: int | None, class_names: list[str] | None,
                 color_map: dict | None, void_label: Any) -> tuple[list[str] | None, dict | None]:
    """``(class_names, color_map)``, each taken from ``data.attrs`` when not given: the
    ``classes.txt`` names and colour table that :func:`from_folders` found beside the
    folders. A void id that is the last name's (CamVid's "Unlabelled") drops that name;
    fewer than two names, or a count other than ``num_classes``, are not taken."""
    attrs = getattr(data, "attrs", None)
    if not isinstance(attrs, dict):  # a CSV path: nothing was found beside anything
        return class_names, color_map
    table = attrs.get("color_map")
    names = attrs.get("class_names")
    if color_map is None and table:
        color_map = dict(table)
        log.info("colour masks: using the colour table found beside them "
                 "(df.attrs['color_map'], %d colours)", len(color_map))
    elif color_map is not None and table:  # the user's own map: the table's names may differ
        names = None
    if class_names is None and names:
        names = [str(name) for name in names]
        if color_map and not any(isinstance(key, tuple) for key in color_map):
            names = _renumbered_names(names, color_map)  # ADE20K's "other" at 0 -> 255
        names = without_void(names, void_label)
        if names and len(names) >= 2 and num_classes in (None, len(names)):
            class_names = names
            log.info("class names found beside the masks (df.attrs['class_names'], from "
                     "%s): %s", attrs.get("class_names_from") or "?", ", ".join(names))
    return class_names, color_map


def _renumbered_names(names: list[str], value_map: dict) -> list[str] | None:
    """Names found beside value-mapped masks, by class id.

    When the names are one per mask value (as many as the value map's keys, which are
    ``0..n-1``: ADE20K's "other" at 0), they are renumbered through ``{value: class_id}``:
    values sent to 255 (void) lose their name. None when the map does not send them onto
    the ids ``0..k-1`` one to one. Otherwise the names are the classes' own (``{0: 0,
    128: 1}`` with "background", "object") and come back as they are.
    """
    if len(value_map) != len(names) or any(not 0 <= value < len(names) for value in value_map):
        return names
    by_id: dict[int, str] = {}
    for value, class_id in value_map.items():
        if class_id != 255 and by_id.setdefault(int(class_id), names[value]) != names[value]:
            return None  # two named values merged into one class
    return [by_id[c] for c in range(len(by_id))] if sorted(by_id) == list(range(len(by_id))) \
        else None


def without_void(names: list[str] | None, void_label: Any) -> list[str] | None:
    """``names`` less the last when ``void_label`` is its id (CamVid's "Unlabelled", 11 of
    12 names): the void is not a class."""
    if names is not None and isinstance(void_label, int) and void_label == len(names) - 1:
        return names[:-1]
    return names


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
    ``classes.txt``; a numbered line of id 255, the ignore value (``255 void``), names no
    class. Blank lines and lines starting with ``#`` are skipped.

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
    if 2 * sum(m is not None for m in numbered) < len(entries):
        # bare names, a few of which begin with a number ("2 wheeler"): ids by position
        lines = [f"{lineno} {line!r}" for (lineno, line), m in zip(entries, numbered) if m]
        warnings.warn(f"{path}: read as one bare class name per line (the class id is the "
                      f"line's position); line(s) {', '.join(lines[:3])} begin with a number "
                      "but most lines do not", stacklevel=2)
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
    if 255 in names and len(names) > 1:  # the ignore value (VOC's '255 void'): no class
        del names[255]
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DataValidationError(f"{path}: class ids {_id_ranges(missing)} have no name")
    return [names[i] for i in range(len(names))]


def _id_ranges(ids: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)
