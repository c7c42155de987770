"""``score_folders()``: score a folder of predicted masks against a folder of ground truths."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from automask.errors import DataValidationError
from automask.metrics.inputs import check_ignore_index
from automask.metrics.scoring import score


def readable_suffixes() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()} | {".npy"}


def read_map(path: str | Path, color_map: dict | None = None) -> np.ndarray:
    """Read a 2-D mask/map (or a ``(K, H, W)`` ``.npy`` score array) as stored.

    Unlike :func:`automask.data.read_mask`, which refuses colour masks for training, this
    accepts maps saved in colour by other tools, since scoring must take any model's output.

    Palette (``P``), grey (``L``), 16/32-bit (``I;16``, ``I``, ``F``) and 1-bit images keep their
    values (palette indices, not colours, unless every entry the image uses is grey and they
    are more than 16 or fall as the index rises: then the grey levels it shows, as a
    quantized saliency map or a white-first black-and-white palette holds them); colour
    images are converted to grey with Pillow's ITU-R 601-2 luma (OpenCV's
    ``IMREAD_GRAYSCALE``, used by PySODMetrics scripts, uses the same weights but may round
    differently by one level), or, given the ``color_map`` of
    colour-coded masks (``{(r, g, b): class_id}``), mapped through it to class ids. A value
    map (``{value: class_id}``) is not applied: maps hold class ids already.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return _numbers(path)
    try:
        with Image.open(path) as im:
            if _colours(color_map) and im.mode in ("RGB", "RGBA"):
                from automask.data.io import read_mask  # (pulls in Lightning: only here)

                return read_mask(path, color_map=color_map)
            if im.mode == "P":  # a grey map saved with a palette (quantized): its greys
                from automask.utils.palette import palette_greys

                indices, greys, backwards = palette_greys(im)
                levels = len(np.unique(indices)) if greys is not None else 0
                # class ids keep their indices: a handful of entries in index order
                many = levels > _MAX_CLASS_ENTRIES
                return greys if greys is not None and (backwards or many) else indices
            if im.mode in _COLOUR_MODES:
                im = im.convert("L")
            return np.array(im)
    except UnidentifiedImageError:
        raise _not_an_image(path) from None
    except OSError as exc:  # "image file is truncated": an interrupted copy
        raise _undecodable(path, exc) from exc


def _numbers(path: Path) -> np.ndarray:
    """A ``.npy`` map as stored; TypeError naming the file for values that are no numbers
    (strings, records; complex ones are refused by :func:`score`, also naming the file)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # pickled objects, a damaged header
        raise DataValidationError(f"{path} is not a .npy array numpy can read ({exc})") from exc
    if array.dtype.kind not in "biufc":
        raise TypeError(f"{path} holds values of dtype {array.dtype}, not numbers: save a map "
                        "of bool, integer or float values")
    return array


def _undecodable(path: Path, exc: OSError) -> DataValidationError:
    from automask.data.io import reading_error  # (pulls in Lightning: only here)

    return DataValidationError(f"{path} cannot be decoded ({reading_error(exc, path)}): a "
                               "truncated or damaged file, such as an interrupted copy?")


def _colours(color_map: dict | None) -> bool:
    """Whether ``color_map`` maps colours ``(r, g, b)`` (not the values of a value map)."""
    return bool(color_map) and any(isinstance(key, tuple) for key in color_map)


def _not_an_image(path: Path) -> DataValidationError:
    try:
        empty = path.stat().st_size == 0
    except OSError:  # its size unreadable: the general reason
        empty = False
    if empty:
        return DataValidationError(
            f"{path} is an empty file (0 bytes): an interrupted copy or download?")
    return DataValidationError(f"{path} is not an image Pillow can read (nor a .npy array)")


# A palette map using more grey entries than this is a quantized grey map, not class ids.
_MAX_CLASS_ENTRIES = 16
_COLOUR_MODES = ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB", "PA")


def _refuse_lossy_class_ids(paths: list[Path], maps: list, truths: list, task: str | None,
                            ignore_index: Any) -> None:
    """A multi-class ground truth read from a JPEG file holding ids from 2 to 254 (other
    than ``ignore_index``) is refused, naming it, as ``evaluate`` refuses it: compression
    turns class ids into other ids at every edge, classes that do not exist."""
    # (imported here, as read_target imports automask.data: metrics stand alone)
    from automask.data.validation import _JPEG_SUFFIXES

    jpeg = [i for i, path in enumerate(paths) if path.suffix.lower() in _JPEG_SUFFIXES]
    if not jpeg:
        return
    if task is None:
        from automask.metrics.inputs import as_tensor
        from automask.metrics.scoring import infer_task, one_channel

        try:
            task = infer_task([one_channel(as_tensor(m)) for m in maps],
                              [one_channel(as_tensor(t)) for t in truths], ignore_index)
        except (ValueError, TypeError):
            return  # scoring names the problem
    if task != "multiclass":
        return
    for i in jpeg:
        values = {int(v) for v in np.unique(truths[i])} - {ignore_index}
        if any(1 < v < 255 for v in values):
            shown = sorted(values)
            more = " ..." if len(shown) > 8 else ""
            raise ValueError(
                f"{paths[i].name}: ground truth values {shown[:8]}{more} "
                "come from a JPEG file: its compression turns class ids into other ids at "
                "every edge (new classes that do not exist); save class-id masks losslessly "
                "(PNG)")


def read_target(path: Path, color_map: dict | None = None) -> np.ndarray:
    """A ground truth read as :meth:`automask.SemanticSegmentor.evaluate` reads one
    (:func:`automask.data.read_mask`), so that the two score the same masks alike: palette
    indices, 16-bit and float samples as stored, WhiteIsZero TIFFs un-inverted, EXIF
    orientation applied, a grey mask saved in colour (or as lossy colour) read as grey,
    colours (or a value map's values) mapped through ``color_map`` when given; ``.npy`` as
    :func:`read_map`, then through a value map.

    Raises
    ------
    ValueError
        A colour mask with non-grey pixels (its luma is no label: a red object (255, 0, 0)
        would read as 76, background for a binary mask), or a file that is no mask; the
        message names the file.
    """
    if path.suffix.lower() == ".npy":
        target = read_map(path)
        if color_map and not _colours(color_map) and target.ndim == 2 \
                and target.dtype.kind in "biu":  # a value map's values
            from automask.data.io import _apply_value_map

            return _apply_value_map(target, color_map, path)
        return target
    # (imported here: automask.data pulls in Lightning, metrics stand alone)
    from automask.data.io import read_mask

    try:
        return read_mask(path, color_map=color_map)
    except UnidentifiedImageError:
        raise _not_an_image(path) from None
    except OSError as exc:
        raise _undecodable(path, exc) from exc
    except DataValidationError:
        if color_map is None:
            _refuse_colour(path)  # the first non-grey pixel named rather than color_map advice
        raise


def _refuse_colour(path: Path) -> None:
    """Raise ValueError naming the first non-grey pixel of a colour ground truth."""
    with Image.open(path) as im:
        if im.mode not in _COLOUR_MODES or im.mode in ("LA", "PA"):
            return
        rgb = np.asarray(im.convert("RGB"))  # (H, W, 3)
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    if not grey.all():
        y, x = (int(v) for v in np.argwhere(~grey)[0])
        raise ValueError(
            f"ground truth {path.name} is a {im.mode} colour image with non-grey pixels (the "
            f"first at row {y}, column {x}: {tuple(rgb[y, x].tolist())}); save masks as grey "
            "or class-index (palette) images"
        )


def score_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    task: str | None = None,
    metrics: list[str] | None = None,
    color_map: dict | None = None,
    extra_masks: str | None = None,
    **conventions: Any,
) -> dict[str, float | list[float]]:
    """Pair ``pred_dir/<stem>.*`` with ``gt_dir/<stem>.*`` and :func:`score` them.

    Any extension Pillow reads is accepted, and ``.npy``; files are paired by stem (name
    without extension), so ``a.png`` predictions match ``a.jpg`` masks. Other files and
    hidden files are skipped. As in :func:`automask.datasets.from_folders`, ground truths
    whose names all add one of the usual endings pair too (``ISIC_001.png`` with
    ``ISIC_001_segmentation.png``), and a folder that holds only sub-folders is searched
    below them: its files pair by their path below it (``a/1.png``, as ``predict`` names
    the outputs of images in different folders that share a name), or by stem alone when
    the other folder keeps its files at the top.

    Parameters
    ----------
    pred_dir, gt_dir
        Folders of predicted maps and ground-truth masks.
    task, metrics, **conventions
        As for :func:`automask.metrics.score`.
    color_map : dict, optional
        ``{(r, g, b): class_id}`` of colour-coded ground truths (a predictor's
        ``color_map_``, or :func:`automask.datasets.read_color_map` of a ``class_dict.csv``):
        ground truths, and predictions saved in colour, are mapped through it; grey and
        palette predictions keep their values (automask's own masks hold the class ids).
        Or a value map ``{value: class_id}`` that renumbered the training masks (ADE20K's
        void 0 as ``{0: 255, 1: 0, 2: 1, ...}``): the ground truths' values are mapped
        through it, and the predictions, which hold class ids, are not.
        A map of more than two classes (255 and ``ignore_index`` aside) makes ``task``
        default to multi-class, and ``num_classes`` to its largest class id plus one.
    extra_masks : {None, "union"}
        A ground truth's further masks, named as it plus a number (BUSI's
        ``x_mask_1.png`` beside ``x_mask.png``, one lesion per mask), as
        :func:`automask.datasets.from_folders` takes them: ``"union"`` scores the image
        against the union of its masks; by default they are unpaired files, named as such.

    Returns
    -------
    dict
        As :func:`score`, plus ``"n_images"``.

    Raises
    ------
    ValueError
        A folder missing or without masks, duplicate stems, or stems present on one side only
        (all listed; further masks named as those of their ground truth), or a colour
        ground truth with non-grey pixels; further masks that do not merge (another size);
        a bad image names its file. An ``ignore_index`` that is not an integer is refused
        before any file is read, one that no ground truth can hold (999 for 8-bit masks)
        before any is scored.
    TypeError
        A map of an unusable dtype (complex, strings), naming its file.
    ConfigError
        A ``color_map`` that is not ``{(r, g, b): class id}`` or ``{value: class id}``,
        before any file is read.
    """
    from automask.datasets.folders import (
        MASK_STEM_SUFFIXES,
        further_masks,
        listings,
        pair_stems,
        union_of_masks,
    )

    if extra_masks not in (None, "union"):
        raise ValueError(f"extra_masks must be None or 'union', got {extra_masks!r}")
    check_ignore_index(conventions.get("ignore_index"))  # before listing or reading a file
    if color_map is not None:
        from automask.data.validation import check_color_map

        check_color_map(color_map)
        ids = set(color_map.values()) - {255, conventions.get("ignore_index")}
        if task is None and len(ids) > 2:
            task = "multiclass"  # a table of several classes (0/1 maps would read as binary)
        if task == "multiclass" and conventions.get("num_classes") is None and ids:
            # every class of the table, also those no mask of this set holds
            conventions = {**conventions, "num_classes": max(ids) + 1}
    preds, gts = listings(Path(pred_dir), Path(gt_dir), ("prediction", "ground-truth"),
                          readable_suffixes())
    # ISIC_001.png against ISIC_001_segmentation.png: the endings from_folders pairs
    preds, gts, _ = pair_stems(preds, gts, image_folder=Path(pred_dir),
                               mask_folder=Path(gt_dir))
    only_pred = sorted(set(preds) - set(gts))
    # x_mask_1 beside x_mask: {"x": [x_mask_1 path]}
    extras = further_masks([gts[s] for s in set(gts) - set(preds)],
                           {s: gts[s] for s in preds.keys() & gts.keys()})
    key_of = {path: key for key, path in gts.items()}
    further = {key_of[path]: stem for stem, paths in extras.items() for path in paths}
    only_gt = sorted(set(gts) - set(preds) - (set(further) if extra_masks else set()))
    if only_pred or only_gt:
        parts = []
        if only_pred:
            parts.append(f"predictions without a ground truth: {', '.join(only_pred)}")
        if only_gt:
            parts.append("ground truths without a prediction: " + ", ".join(
                f"{key} (a further mask of ground truth {gts[further[key]].name})"
                if key in further else key for key in only_gt))
        if further and not extra_masks:
            parts.append("pass extra_masks='union' to score an image against the union of "
                         "its masks")
        if not preds.keys() & gts.keys():
            parts.append("no file pairs, with or without the endings data sets add to a "
                         "mask's name (" + ", ".join(MASK_STEM_SUFFIXES[1:6]) + ", ...): "
                         "name each prediction as its ground truth")
        raise ValueError("unpaired files by stem; " + "; ".join(parts))
    if not preds:
        raise ValueError(f"no mask files found in {pred_dir} and {gt_dir}")
    stems = sorted(preds)
    try:
        maps = [read_map(preds[s], color_map) for s in stems]
        truths = [union_of_masks([gts[s], *extras[s]]) if extra_masks and s in extras
                  else read_target(gts[s], color_map) for s in stems]
        _refuse_lossy_class_ids([gts[s] for s in stems], maps, truths, task,
                                conventions.get("ignore_index"))
        with warnings.catch_warnings(record=True) as caught:  # re-issued naming the files
            warnings.simplefilter("always")
            result = score(maps, truths, task=task, metrics=metrics, **conventions)
        for caught_one in caught:
            text = re.sub(r"'prediction (\d+)'",
                          lambda found: repr(preds[stems[int(found.group(1))]].name),
                          str(caught_one.message))
            warnings.warn(text, caught_one.category, stacklevel=2)
    except (ValueError, TypeError) as err:
        message = str(err)
        if message.startswith("image "):
            index = int(message.split(":", 1)[0].split()[1])
            message = f"{preds[stems[index]].name} vs {gts[stems[index]].name}: {message}"
            raise (TypeError if isinstance(err, TypeError) else ValueError)(message) from err
        raise
    return {**result, "n_images": len(stems)}
