"""Prediction and evaluation loops, and writing masks without overwriting anything.

Functions here take a model and its configuration; :class:`SemanticSegmentor` chooses the
model and passes it in.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import abc
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from .config import Config, image_value_range
from .data.validation import TABLE_SUFFIXES, read_table, refuse_url
from .datasets.folders import (  # what from_folders takes, predict takes
    IMAGE_SUFFIXES,
    STACK_MEMORY_LIMIT,
    masks_beside_images,
    stack_depth,
)
from .errors import ConfigError, DataValidationError
from .hardware import autocast_context, inference_precision
from .utils import remove_empty_folders, top_created



def root_of(data) -> Path | None:
    """Relative paths in a CSV resolve against the CSV's folder; in a DataFrame, the cwd.

    A table of paths given as a path (``.csv``, ``.txt``, tab-separated ``.tsv``; for training
    any suffix) has its folder as the root, whatever the suffix.
    """
    if isinstance(data, (str, os.PathLike)):
        return Path(data).resolve().parent
    return None


# Names data sets give the folder of their masks (case, '_', '-' and ' ' aside).
MASK_FOLDER_NAMES = frozenset({
    "mask", "masks", "label", "labels", "gt", "gts", "groundtruth", "groundtruths",
    "annotation", "annotations", "segmentation", "segmentations", "segmentationclass",
    "segmentationclassraw", "segmentationobject", "target", "targets", "seg", "segs",
    "lbl", "lbls", "labelids", "labelsids", "trainannot", "valannot", "testannot",
})


def _is_mask_folder_name(name: str) -> bool:
    """Whether a folder's name says it holds masks (``masks``, ``GT``, ``gtFine``,
    ``SegmentationClass``, CamVid's ``trainannot``, ``ground_truth``)."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    return key in MASK_FOLDER_NAMES or key.startswith("gt") and key[2:].isalpha() \
        and len(key) <= 8 or key.endswith(("masks", "labels"))


def _folder_images(folder: Path) -> list[Path]:
    """The files of ``folder`` that from_folders takes (images, .npy arrays), sorted; when
    it holds none but has sub-folders (Cityscapes' ``val/<city>/``), those of every folder
    below it, as from_folders searches them. Hidden files (macOS "._a.png" metadata,
    ".DS_Store") and folders are skipped, as it skips them. Files named as the masks of
    images beside them (``1_mask.tif`` beside ``1.tif``), and in the search below, sub-folders
    named as mask folders (``masks/`` beside ``images/``), are left out with a warning."""
    def visible(path: Path) -> bool:
        return not any(part.startswith(".") for part in path.relative_to(folder).parts)

    def images(paths) -> list[Path]:
        paths = [f for f in paths if f.suffix.lower() in IMAGE_SUFFIXES and visible(f)]
        broken = sorted(f for f in paths if f.is_symlink() and not f.exists())
        if broken:  # left out, the images they stand for would go unpredicted, unsaid
            shown = ", ".join(str(f.relative_to(folder)) for f in broken[:5])
            raise DataValidationError(
                f"folder {str(folder)!r} holds {len(broken)} broken link(s) (their target is "
                f"missing): {shown}{' ...' if len(broken) > 5 else ''}")
        return sorted(f for f in paths if f.is_file())

    files = images(folder.iterdir())
    subs = [f for f in folder.iterdir() if f.is_dir() and visible(f)]
    deep = not files and bool(subs)
    if files and subs:  # images here and in sub-folders: only these are predicted, said so
        below = {sub.name: sum(1 for f in sub.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                               and visible(f) and f.is_file())
                 for sub in sorted(subs) if not _is_mask_folder_name(sub.name)}
        below = {name: n for name, n in below.items() if n}
        if below:
            import warnings

            warnings.warn(
                f"left out {sum(below.values())} image(s) in the sub-folder(s) "
                f"{', '.join(map(repr, list(below)[:5]))} of {str(folder)!r}: a folder's own "
                "images are predicted, not those below it; pass a sub-folder, or a list of "
                "paths, to predict them", stacklevel=4)
    if deep:
        files = images(folder.rglob("*"))
        # a data set's root (images/ + masks/): its masks are no images to predict
        tops = {f.relative_to(folder).parts[0] for f in files}
        labels = sorted(t for t in tops if _is_mask_folder_name(t))
        if labels and len(labels) < len(tops):
            import warnings

            warnings.warn(
                f"left out the sub-folder(s) {', '.join(map(repr, labels))} of "
                f"{str(folder)!r}, named as the masks of the images beside them; to predict "
                "their files too, pass that folder or their paths", stacklevel=4)
            files = [f for f in files if f.relative_to(folder).parts[0] not in labels]
    if not files:
        raise DataValidationError(f"no image files in folder {str(folder)!r}"
                                  + (" nor in its sub-folders" if deep else ""))
    masks = masks_beside_images(files)
    if masks:
        import warnings

        names = ", ".join(str(m.relative_to(folder)) for m in masks[:5])
        warnings.warn(
            f"left out {len(masks)} file(s) of {str(folder)!r} named as the masks of images "
            f"beside them ({names}{' ...' if len(masks) > 5 else ''}); to predict them too, "
            "pass their paths", stacklevel=4)
        left_out = set(masks)
        files = [f for f in files if f not in left_out]
    return files


def _path_lines(path: Path, image_col: str) -> pd.DataFrame | None:
    """A ``.txt`` file of image paths one per line (after an optional ``image_col`` header
    line), read line by line: a comma or semicolon in a file's name is part of it, not a
    column separator. None for any other file (a table)."""
    if path.suffix.lower() != ".txt":
        return None
    try:
        lines = [line for line in path.read_text(encoding="utf-8-sig").splitlines()
                 if line.strip()]
    except (OSError, UnicodeDecodeError):
        return None  # read as a table, which names the problem
    if lines and lines[0].strip() == image_col:
        lines = lines[1:]
    if not lines or any(os.path.splitext(line.strip())[1].lower() not in IMAGE_SUFFIXES
                        for line in lines):
        return None
    return pd.DataFrame({image_col: pd.Series(lines, dtype=object)})


def _paths_or_table(frame: pd.DataFrame, path: Path, image_col: str) -> pd.DataFrame:
    """``frame`` read from ``path``; when it is a list of image paths without a header line
    (``find . -name '*.jpg' > list.txt``: one column, named by its first path), ``path``
    read again with ``image_col`` as the name of its column, the first path its first row.
    """
    if image_col in frame.columns or len(frame.columns) != 1:
        return frame
    first = str(frame.columns[0])
    if os.path.splitext(first)[1].lower() not in IMAGE_SUFFIXES:
        return frame  # a header naming another column: the missing column is reported
    return read_table(path, names=[image_col])


def _with_stacks(files: list[Path], image_col: str) -> pd.DataFrame:
    """A frame of ``files``, each TIFF stack among them giving a row per page, in memory,
    named ``<stem>_000``, ... (the names of the masks ``predict(save_to=...)`` writes for
    them). Raises before reading any page when two stacks share a stem, or when their
    pages would hold more than :data:`STACK_MEMORY_LIMIT` bytes."""
    from .data.io import read_stack, stack_nbytes

    stacks = [f for f in files if stack_depth(f) > 1]
    if not stacks:
        return pd.DataFrame({image_col: [str(f) for f in files]})
    stems = [f.stem for f in stacks]
    repeated = sorted({str(f) for f in stacks if stems.count(f.stem) > 1})
    if repeated:
        raise DataValidationError(
            f"TIFF stacks {repeated[:4]} share a name, so the outputs of their pages would "
            "too (<name>_000, ...); predict them separately")
    held = sum(stack_nbytes(f) for f in stacks)
    if held > STACK_MEMORY_LIMIT:
        raise DataValidationError(
            f"the TIFF stacks {[str(f) for f in stacks[:3]]}{' ...' if len(stacks) > 3 else ''} "
            f"hold {held / 2**30:.1f} GiB once decoded, more than predict holds in memory "
            f"({STACK_MEMORY_LIMIT / 2**30:.0f} GiB): predict them one at a time, or save "
            "their slices as files of their own")
    values: list = []
    names: list = []
    stack_set = set(stacks)
    for f in files:
        if f in stack_set:
            pages = read_stack(f)
            width = max(3, len(str(len(pages) - 1)))
            values += pages
            names += [f"{f.stem}_{k:0{width}d}" for k in range(len(pages))]
        else:
            values.append(str(f))
            names.append(None)  # a file: named after itself
    frame = pd.DataFrame({image_col: pd.Series(values, dtype=object)})
    frame.attrs["stems"] = names
    return frame


def _stream_bytes(stream: Any, where: str) -> bytes:
    """The bytes of an open binary file or stream holding one encoded image; ``where``
    prefixes an error (the item of a list)."""
    from .data.arrays import encoded_image

    content = stream.read()
    if isinstance(content, str):
        raise DataValidationError(
            f"{where}cannot read images from a {type(stream).__name__} opened as text; pass "
            "the file's path, or open it in binary mode ('rb') to pass one image's bytes")
    if encoded_image(content) is None:
        raise DataValidationError(
            f"{where}the {type(stream).__name__} given holds {len(content)} bytes that are "
            "no image file (PNG, JPEG, TIFF...); pass an image file's bytes, or its path")
    return bytes(content)


def as_frame(data, image_col: str) -> tuple[pd.DataFrame, Path | None]:
    """(frame with the image column, folder that relative paths resolve against)."""
    from .data.arrays import as_pandas

    data = as_pandas(data)  # a polars / pyarrow table, a Hugging Face split
    if isinstance(data, pd.DataFrame):
        if image_col not in data.columns:
            raise DataValidationError(
                f"the DataFrame has no image column {image_col!r} (columns: "
                f"{list(data.columns)})"
            )
        return data, None
    if isinstance(data, (str, os.PathLike)):
        refuse_url(data, "the data")
        if not os.fspath(data).strip():  # Path("") is the working folder
            raise DataValidationError(f"the data must name a file or folder, got {data!r} "
                                      "(an unset environment variable?)")
        p = Path(data).expanduser()
        if p.is_dir():
            return _with_stacks(_folder_images(p), image_col), None
        if p.suffix.lower() in TABLE_SUFFIXES:  # a table of paths; any other file: one image
            if not p.is_file():
                raise DataValidationError(f"CSV file not found: {str(p)!r}")
            listed = _path_lines(p, image_col)
            if listed is not None:
                return listed, root_of(p)
            return _paths_or_table(read_table(p), p, image_col), root_of(p)
        return _with_stacks([p], image_col), None  # a TIFF stack: its pages
    if isinstance(data, (pd.Series, pd.Index)):
        # a column of paths (``df["image"]``): its index is kept, so that prompts keyed by
        # it and the DataFrame returned by ``predict(save_to=...)`` line up with the input
        index = data.index if isinstance(data, pd.Series) else None
        values = pd.Series(data.to_numpy(dtype=object), index=index, dtype=object)
        return pd.DataFrame({image_col: values}), None
    from .data.arrays import split_batch

    pictures = split_batch(data)  # one in-memory image, or a batch of them
    if pictures is not None:
        return pd.DataFrame({image_col: pd.Series(pictures, dtype=object)}), None
    if isinstance(data, np.ndarray):
        if data.ndim != 1:
            pixels = ("; an image is an array of shape (H, W), (H, W, C) or (C, H, W), a "
                      "batch of images (N, H, W, C) or (N, C, H, W)"
                      if data.dtype.kind in "biuf" else "")
            raise DataValidationError(
                f"an array of image paths must be 1-D, got shape {data.shape}{pixels}")
        return pd.DataFrame({image_col: pd.Series(data.tolist(), dtype=object)}), None
    from .data.arrays import encoded_image

    if encoded_image(data) is not None:  # one encoded image file's contents
        return pd.DataFrame({image_col: pd.Series([data], dtype=object)}), None
    if isinstance(data, (bytes, bytearray)):
        raise DataValidationError(
            f"cannot read images from {type(data).__name__} {data[:60]!r}; pass the path as "
            "a str or pathlib.Path")
    if callable(getattr(data, "read", None)):  # an open file, an upload's stream, BytesIO
        content = _stream_bytes(data, "")  # one image file's bytes, not lines of paths
        return pd.DataFrame({image_col: pd.Series([content], dtype=object)}), None
    if isinstance(data, (Sequence, abc.Iterator)):
        # a list, a tuple, or an iterator such as Path.glob(...), in its order; values kept
        # as given: validation reports None / NaN / "" as a missing path. Open files (a
        # batch of uploads) are read, each as one image's bytes.
        values = [_stream_bytes(v, f"item {i}: ") if callable(getattr(v, "read", None))
                  else v for i, v in enumerate(data)]
        if not values:  # e.g. a glob that matched nothing
            raise DataValidationError(
                f"no images given: the {type(data).__name__} of paths is empty")
        return pd.DataFrame({image_col: pd.Series(values, dtype=object)}), None
    shape = getattr(data, "shape", None)
    raise DataValidationError(
        f"cannot read images from a {type(data).__name__}"
        f"{f' of shape {tuple(shape)}' if shape is not None else ''}; pass a DataFrame, a "
        "path, a list of paths, a folder, or images in memory (arrays or tensors of shape "
        "(H, W), (H, W, C) or (C, H, W), a batch of them (N, ...), PIL images)"
    )


def inference_device(cfg: Config) -> torch.device:
    if cfg.env.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


RESOLUTIONS = ("original", "input")  # where evaluate scores, see iter_proba


def iter_proba(model: torch.nn.Module, cfg: Config, task: str, spec,
               tiling: str = "auto",
               prompts: Sequence[Any] | None = None,
               resolution: str = "original",
               tta: Any = False) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (row position, (C, H, W) float32 probabilities) per image of ``spec``, in row
    order, streaming.

    ``resolution``: ``"original"``, each image's own ``(H, W)``; ``"input"``, the image's
    extent in the model input, as the model sees it (``(S, S)`` under
    ``data.resize="square"``, the resized ``(h, w)`` before padding otherwise; tiled images
    are seen at their original resolution). The caller checks the value.

    ``tiling`` ("auto", "on" or "off") chooses which images are predicted with
    overlapping windows at their original resolution instead of being resized to the
    model input (see :mod:`automask.tiling`); "auto" follows the rule the model was
    trained with (``cfg.data.large_images``, :func:`~automask.tiling.trained_tiling`). A
    bad ``tiling`` raises ConfigError here, before any work is done.

    ``prompts``: one checked :class:`~automask.data.prompts.ImagePrompt` or None per row
    (see :func:`check_prompt_request`). Prompted images take the whole-image path; the
    others are predicted exactly as without prompts (``tiling`` applies to them).

    ``tta``: flips whose predictions are averaged in (:func:`automask.tta.check_tta`; a
    bad value, or flips with prompts, raise ConfigError here).

    The stream holds the model's frozen linear weights in bf16 until it ends
    (:func:`_holding_frozen`): a caller that may stop early closes it
    (``with contextlib.closing(iter_proba(...)) as probs``), so that the weights are
    float32 again at once, not only when the stream is collected (an exception's
    traceback keeps it, and a notebook keeps the last exception).
    """
    from .hardware import ready_cpu_threads
    from .tiling import trained_tiling
    from .tta import check_tta

    ready_cpu_threads()
    flips = check_tta(tta, cfg.data.hflip, cfg.data.vflip)
    if cfg.data.image_range == "auto":  # the fit found no image of more than 8 bits
        _warn_deep_images(spec)
    prompted = prompts is not None and any(p is not None for p in prompts)
    if prompted:
        check_prompt_request(task, tiling)  # the caller's tiling: "auto" takes prompts
        if flips:
            raise ConfigError("tta cannot be used with point or box prompts (a prompt "
                              "marks one place of the image as it is); leave tta unset")
    tiling = trained_tiling(tiling, cfg.data.large_images)
    assert resolution in RESOLUTIONS, resolution
    at_input = resolution == "input"
    if prompted:
        assert not at_input, "prompted probabilities come at the original resolution"
        probs = _prompted_proba(model, cfg, task, spec, tiling, prompts)
    elif tiling == "off":
        probs = _plain_proba(model, cfg, task, spec, at_input=at_input, flips=flips)
    else:
        probs = _mixed_proba(model, cfg, task, spec, tiling, at_input, flips)
    return _holding_frozen(model, cfg, probs)


def _warn_deep_images(spec) -> None:
    """Warn when images of more than 8 bits per sample meet a model whose training images
    all had 8: nothing was learnt about how such data maps to 0-255, so each is read by its
    own rule (16-bit full scale: raw 12-bit data comes out dark)."""
    import warnings

    from .data.io import deep_image_file

    def deep_file(path: str) -> bool:
        try:
            return deep_image_file(path)
        except OSError:  # gone since the check: its read names the row
            return False

    deep = [pos for pos, path in enumerate(spec.frame[spec.image_col]) if deep_file(path)]
    if deep:
        rows = ", ".join(map(str, deep[:5])) + (", ..." if len(deep) > 5 else "")
        warnings.warn(
            f"{len(deep)} image(s) (row(s) {rows}) store more than 8 bits per sample, but the "
            "model was fitted on 8-bit images: each is scaled to 0-255 by its own rule "
            "(16-bit data from 0-65535, so raw 12-bit data looks dark; floats from their "
            "own range), which need not be how the training images were made. Predict on "
            "8-bit images made as the training ones were, or fit on images like these (the "
            "fit keeps their value range, data.image_range)", stacklevel=4)


def _holding_frozen(model: torch.nn.Module, cfg: Config,
                    probs: Iterator[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
    """``probs``, with the frozen linear weights cast to bf16 once for all the images
    rather than in every forward, on a CPU under bf16 autocast (exactly the same results;
    see :mod:`automask.models.frozen`)."""
    from .models.frozen import frozen_linears_in_bf16

    device = inference_device(cfg)
    hold = device.type == "cpu" and inference_precision(
        device, cfg.env.precision) == "bf16-mixed"
    with frozen_linears_in_bf16(model, enabled=hold):
        yield from probs


def _mixed_proba(model: torch.nn.Module, cfg: Config, task: str, spec,
                 tiling: str, at_input: bool = False,
                 flips: tuple[str, ...] = ()) -> Iterator[tuple[int, np.ndarray]]:
    """Tiled images predicted one by one, the others batched as in the plain path."""
    from .data import SegmentationDataset
    from .tiling import use_tiles

    size = cfg.model.input_size
    # reads tiled images at native scale; a file gone or replaced since the data was
    # checked is an error naming its row
    sizes = SegmentationDataset(spec, size, with_labels=False, value_range=image_value_range(cfg))
    tiled = {pos for pos in range(len(spec.frame))
             if use_tiles(sizes.original_size(pos), size, tiling)}
    if not tiled:
        yield from _plain_proba(model, cfg, task, spec, at_input=at_input, flips=flips)
        return
    plain = [pos for pos in range(len(spec.frame)) if pos not in tiled]
    plain_iter = (_plain_proba(model, cfg, task, spec.subset(plain), at_input=at_input,
                               flips=flips)
                  if plain else iter(()))
    for pos in range(len(spec.frame)):
        if pos in tiled:
            yield pos, _tiled_one(model, cfg, task, sizes.load_native(pos)[0], flips)
        else:
            sub, prob = next(plain_iter)
            assert plain[sub] == pos, (plain[sub], pos)
            yield pos, prob


def _prompted_proba(model: torch.nn.Module, cfg: Config, task: str, spec, tiling: str,
                    prompts: Sequence[Any]) -> Iterator[tuple[int, np.ndarray]]:
    """Prompted rows on the whole-image path, the others as without prompts, in row order."""
    prompted = [pos for pos, p in enumerate(prompts) if p is not None]
    free = [pos for pos, p in enumerate(prompts) if p is None]
    prompted_iter = _plain_proba(model, cfg, task, spec.subset(prompted),
                                 [prompts[pos] for pos in prompted])
    free_iter = (iter_proba(model, cfg, task, spec.subset(free), tiling) if free
                 else _no_probabilities())
    rows = set(prompted)
    with contextlib.closing(prompted_iter), contextlib.closing(free_iter):
        for pos in range(len(prompts)):
            sub, prob = next(prompted_iter if pos in rows else free_iter)
            assert (prompted if pos in rows else free)[sub] == pos, (sub, pos)
            yield pos, prob


def _no_probabilities() -> Iterator[tuple[int, np.ndarray]]:
    """An empty stream that can be closed like the others."""
    yield from ()


def _probabilities(model: torch.nn.Module, batch: torch.Tensor, task: str,
                   prompts: list | None = None) -> torch.Tensor:
    """(B, 3, S, S) normalised images -> (B, C, R, R) sigmoid or softmax probabilities.

    ``prompts``: one model-frame :class:`~automask.models.segmenter.Prompt` or None per
    image; None calls the prompt-free forward.
    """
    logits = (model(batch) if prompts is None else model(batch, prompts)).float()
    return torch.sigmoid(logits) if task == "binary" else logits.softmax(1)


def _plain_proba(model: torch.nn.Module, cfg: Config, task: str, spec,
                 prompts: Sequence[Any] | None = None,
                 at_input: bool = False,
                 flips: tuple[str, ...] = ()) -> Iterator[tuple[int, np.ndarray]]:
    """Each image resized (longer side to the input size) and padded: one forward each.

    ``prompts`` (one ImagePrompt or None per row of ``spec``) are mapped through each
    image's own resize (:func:`automask.data.prompts.to_model_prompt`). ``at_input``: the
    probabilities at the input side ``S``, cropped to the image's resized ``(h, w)``,
    instead of resized to its original size. ``flips``: each image is also predicted
    mirrored, and the maps mirrored back are averaged in (:mod:`automask.tta`).
    """
    from .data import make_predict_loader, restore_batch
    from .data.prompts import to_model_prompt
    from .data.transforms import Geometry
    from .tta import flip_content, unflip

    device = inference_device(cfg)
    model.to(device)
    loader = make_predict_loader(spec, input_size=cfg.model.input_size,
                                 batch_size=cfg.env.eval_batch_size,
                                 num_workers=cfg.data.num_workers,
                                 value_range=image_value_range(cfg),
                                 resize=cfg.data.resize,
                                 interpolation=cfg.data.interpolation)
    for batch in loader:
        mapped = None
        if prompts is not None:
            mapped = [to_model_prompt(prompts[idx], Geometry(tuple(orig), tuple(new),
                                                             cfg.model.input_size))
                      for idx, orig, new in zip(batch["index"].tolist(),
                                                batch["original_size"].tolist(),
                                                batch["resized_size"].tolist())]
        # Inference mode and autocast for this batch only: they are the thread's state, so
        # held across a ``yield`` they would run the caller's code too, and two streams
        # read in turn (_prompted_proba) would restore each other's state out of order.
        with torch.inference_mode(), autocast_context(device, cfg.env.precision):
            images = batch["image"].to(device, non_blocking=True)
            probs = _probabilities(model, images, task, mapped)
            # at the input: "restored" to the resized size itself (upsampled to S, cropped)
            target_size = batch["resized_size"] if at_input else batch["original_size"]
            restored = restore_batch(probs, target_size, batch["resized_size"])
            if flips:
                restored = [prob.float() for prob in restored]
                for flip in flips:
                    mirrored = flip_content(images, batch["resized_size"], flip)
                    again = restore_batch(_probabilities(model, mirrored, task), target_size,
                                          batch["resized_size"])
                    for prob, other in zip(restored, again):
                        prob += unflip(other.float(), flip)
                restored = [prob / (1 + len(flips)) for prob in restored]
        for idx, prob in zip(batch["index"].tolist(), restored):
            yield idx, prob.float().cpu().numpy()


def _tiled_one(model: torch.nn.Module, cfg: Config, task: str, image: np.ndarray,
               flips: tuple[str, ...] = ()) -> np.ndarray:
    """(C, H, W) probabilities of one ``(H, W, 3)`` uint8 image from overlapping windows at
    full resolution; with ``flips``, averaged with those of the mirrored image, mirrored
    back."""
    from .tiling import tiled_proba
    from .tta import FLIPS, unflip

    device = inference_device(cfg)
    model.to(device)

    def tiled(picture: np.ndarray) -> torch.Tensor:
        return tiled_proba(lambda x: _probabilities(model, x, task), picture,
                           cfg.model.input_size, cfg.env.eval_batch_size, device)

    with torch.inference_mode(), autocast_context(device, cfg.env.precision):
        prob = tiled(image)
        for flip in flips:  # the image (H, W, 3) mirrored on its axis of a (C, H, W) map
            prob += unflip(tiled(np.ascontiguousarray(np.flip(image, FLIPS[flip] - 1))), flip)
    return (prob / (1 + len(flips))).numpy()


def check_prompt_request(task: str, tiling: str) -> None:
    """Raise ConfigError when prompts cannot be used: a multi-class model, or ``tiling="on"``.

    Prompted prediction is binary only (a prompt selects one object; a multi-class model
    labels every pixel) and prompted images always take the whole-image path: a prompt
    refers to the whole image, not to a window. So ``tiling="on"`` together with prompts is
    a contradiction and raises; with ``"auto"`` (the default) or ``"off"`` the images
    without a prompt are tiled (or not) exactly as without prompts.
    """
    from .errors import ConfigError
    from .tiling import check_tiling

    if task != "binary":
        raise ConfigError(
            "points= and boxes= need a binary model; this model is multi-class (a prompt "
            "selects one object, a multi-class model labels every pixel)")
    if check_tiling(tiling) == "on":
        raise ConfigError(
            "tiling='on' cannot be combined with points= or boxes=: prompts refer to the "
            "whole image, which prompted prediction always resizes to the model input; use "
            "tiling='auto' or 'off'")


def image_sizes(spec) -> list[tuple[int, int]]:
    """``(H, W)`` of every image of ``spec`` (from the validation record or the headers)."""
    from .data import SegmentationDataset

    sizes = SegmentationDataset(spec, 1, with_labels=False)  # no sample is loaded
    return [sizes.original_size(pos) for pos in range(len(spec.frame))]


def images_spec(frame: pd.DataFrame, image_col: str, root: Path | None):
    """Validate the image column of ``frame`` (labels not needed)."""
    from .data import validate_frame

    return validate_frame(frame, image_col=image_col, root=root, require_labels=False)


def labelled_spec(data, image_col: str, label_col: str, task: str, num_classes: int,
                  class_names: list[str], void_label: int | None, color_map: dict | None):
    """Validate images and masks for evaluation against a model of ``task``."""
    from .data import validate_frame

    spec = validate_frame(
        data, image_col=image_col, label_col=label_col, root=root_of(data),
        num_classes=num_classes, class_names=class_names, void_label=void_label,
        color_map=color_map, fitted=True,
    )
    if spec.task != task:
        raise DataValidationError(f"data looks {spec.task} but the model is {task}")
    _warn_repeated_images(spec)
    return spec


def _warn_repeated_images(spec) -> None:
    """Warn when rows of evaluation data repeat an image: each row is scored, so such an
    image weighs as many times as it appears (a frame concatenated twice, say)."""
    import warnings

    from .data.validation import repeated_images

    repeated = repeated_images(spec)
    if repeated:
        extra, _, examples = repeated
        warnings.warn(f"{extra} row(s) of the evaluation data repeat the image of another row, "
                      f"e.g. {examples}; each row is scored, so those images count more than "
                      "once in the metrics", stacklevel=4)


def to_mask(prob: np.ndarray, task: str, num_classes: int) -> np.ndarray:
    """(H, W) mask from (C, H, W) probabilities: threshold 0.5 or argmax."""
    if task == "binary":
        return (prob[0] > 0.5).astype(np.uint8)
    return prob.argmax(0).astype(np.uint8 if num_classes <= 256 else np.int32)


MASK_VALUES = ("class_ids", "dataset")  # what predicted masks hold (predict's ``values``)


def value_table(values: str, task: str, num_classes: int,
                color_map: dict | None) -> np.ndarray | None:
    """None for masks of class ids; for ``values="dataset"`` the table of the value or colour
    each class id is written as (:func:`automask.data.io.dataset_values`). Raises
    ConfigError for any other ``values``, or a model that has no map to read backwards."""
    from .data.io import dataset_values

    if values not in MASK_VALUES:
        raise ConfigError(f"values must be one of {list(MASK_VALUES)}, got {values!r}")
    if values == "class_ids":
        return None
    return dataset_values(color_map, 2 if task == "binary" else num_classes)


def throughput(model: torch.nn.Module, cfg: Config, task: str, spec) -> float | None:
    """Images per second of prediction on (at most 16 of) the images of ``spec``, a
    validated frame (read again as they are, not validated again: no warning twice)."""
    n = min(len(spec.frame), 16)
    if n == 0:
        return None
    spec = spec.subset(range(n))
    t0 = time.perf_counter()
    with contextlib.closing(iter_proba(model, cfg, task, spec)) as probs:
        count = sum(1 for _ in probs)
    return count / max(time.perf_counter() - t0, 1e-9)


def path_problem(path: Path, *, folder: bool) -> str | None:
    """Why ``path`` cannot be written, or None: a folder (``folder=True``) that exists as a
    file, a file that exists as a folder, a parent on the way that is a file, or a folder
    where the first new entry would be made (``path`` itself for an existing folder, else
    the nearest existing folder above it) that this process may not write into.

    Callers raise their own error, naming ``path``, before any work is done.
    """
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        return "it is a file, not a folder" if folder else "it is a folder, not a file"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{str(parent)!r} on the way is a file, not a folder"
            break
    home = path if folder and path.is_dir() else next(
        (parent for parent in path.parents if parent.is_dir()), None)
    if home is not None and not os.access(home, os.W_OK | os.X_OK):
        return f"the folder {str(home)!r} is not writable (permission denied)"
    return None


def output_folder(value: Any, overwrite: Any, *, predictor: str | os.PathLike | None = None,
                  option: str = "--out / save_to") -> Path:
    """``value`` (``save_to`` / ``--out``) as a folder path, checked before any work: a str or
    path-like naming a folder (an empty one, as an unset environment variable gives, would be
    the working folder), not a part of the predictor in ``predictor`` (its versions, logs
    or fit state, which a later fit or save replaces with everything in them), with
    ``overwrite`` a bool (a string such as ``"no"`` would read as True)."""
    if not isinstance(overwrite, (bool, np.bool_)):
        raise DataValidationError(f"overwrite must be True or False, got "
                                  f"{type(overwrite).__name__} {overwrite!r}")
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes):
        raise DataValidationError(f"{option} must be a folder path (str or pathlib.Path), got "
                                  f"{type(value).__name__} {value!r}")
    if not os.fspath(value).strip():
        raise DataValidationError(f"{option} must name a folder, got {value!r} (an unset "
                                  "environment variable?)")
    refuse_url(value, option, writing=True)
    out = Path(value).expanduser()
    if predictor is not None:
        _refuse_predictor_part(predictor, out, f"{option} {str(value)!r} lies in",
                               ", which its next fit or save replaces; choose another folder")
    return out


def _refuse_predictor_part(predictor: str | os.PathLike, path: str | os.PathLike, said: str,
                           advice: str) -> None:
    """DataValidationError ``"<said> the predictor in <predictor> (<part>)<advice>"`` when
    ``path`` is a part of the predictor in ``predictor``
    (:func:`automask.saving.predictor_part`)."""
    from .saving import predictor_part

    part = predictor_part(predictor, path)
    if part is not None:
        raise DataValidationError(
            f"{said} the predictor in {str(predictor)!r} ({part}){advice}")


def mask_destinations(spec, out: Path, *, root: Path | None, label_col: str,
                      overwrite: bool, suffix: str = ".png") -> list[Path]:
    """One ``<stem><suffix>`` per image in ``out``, after checking that writing them is safe.

    When different image files share a stem (``a/1.png``, ``b/1.png``), each output keeps
    the image's path below the images' common folder instead (``out/a/1.png``,
    ``out/b/1.png``); a file given twice gets one output.

    Raises DataValidationError, before anything is written, when ``out`` cannot be a
    folder, when two image files still share a name (``a/1.png`` and ``a/1.jpg``), when a
    destination or a folder on its way is an existing folder or file in the way, when a
    destination is one of the input files (an
    image, or a mask of the label column) whatever ``overwrite`` says, or when a
    destination exists and ``overwrite`` is False. Each message names the files at fault.
    ``suffix``: ``".png"`` for masks, ``".npy"`` for probability maps.
    """
    problem = path_problem(out, folder=True)
    if problem is not None:
        raise DataValidationError(f"--out / save_to {str(out)!r} cannot be used: {problem}")
    images = [Path(p) for p in spec.frame[spec.image_col]]
    _refuse_memory_name_clash(images, list(spec.frame.index), out, suffix)
    names = _output_names(images)
    owners: dict[Path, list[Path]] = {}
    for image, name in zip(images, names):
        same = owners.setdefault(name, [])
        if all(_real(image) != _real(other) for other in same):
            same.append(image)
    dup = sorted(str(name) for name, files in owners.items() if len(files) > 1)
    if dup:
        shown = [str(p) for p in owners[Path(dup[0])][:3]]
        raise DataValidationError(
            f"images share file names, so their outputs in {str(out)!r} would overwrite each "
            f"other: {dup[:5]} (e.g. {shown}); rename the images or predict them into "
            "separate folders"
        )
    from .data.validation import _raw_path, _resolve

    index = list(spec.frame.index)
    inputs = {_real(p): f"image of row {index[i]!r}" for i, p in enumerate(images)}
    if label_col in spec.frame.columns:
        # resolved as validation resolves them: str or PathLike, "~", relative to root
        base = Path(root) if root is not None else Path.cwd()
        for i, value in enumerate(spec.frame[label_col]):
            raw = _raw_path(value)
            if raw is not None:
                inputs.setdefault(_real(Path(_resolve(raw, base))), f"mask of row {index[i]!r}")
    dests = [out / f"{name}{suffix}" for name in names]
    in_the_way = sorted({str(folder) for d in dests for folder in d.parents
                         if folder != out and out in folder.parents and folder.is_file()})
    if in_the_way:
        raise DataValidationError(
            f"file(s) {in_the_way[:3]} in {str(out)!r} stand where the outputs' folders go; "
            "choose another output folder")
    clash = [f"{d} ({inputs[_real(d)]})" for d in dests if _real(d) in inputs]
    if clash:
        raise DataValidationError(
            f"writing to {str(out)!r} would overwrite input files: {clash[:5]}"
            f"{' ...' if len(clash) > 5 else ''}; choose another output folder"
        )
    not_files = [str(d) for d in dests if d.is_dir()]
    if not_files:
        raise DataValidationError(
            f"output path(s) {not_files[:3]} in {str(out)!r} are folders, not files; choose "
            "another output folder"
        )
    existing = [str(d) for d in dests if d.exists() or d.is_symlink()]
    if existing and not overwrite:
        what = "mask file(s)" if suffix == ".png" else f"{suffix} file(s)"
        raise DataValidationError(
            f"{len(existing)} {what} already exist in {str(out)!r}, e.g. "
            f"{existing[:3]}; pass overwrite=True (--overwrite) to replace them, or choose "
            "another output folder"
        )
    return dests


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _refuse_memory_name_clash(images: list[Path], index: list, out: Path,
                              suffix: str) -> None:
    """DataValidationError when a picture given in memory (a temporary file named by its
    row's position, or a TIFF stack's page) and another image share a name: their outputs
    would be kept apart below their paths' common folder, whose path runs through the
    temporary folder's random name, new in every call."""
    from .data.arrays import shown

    by_stem: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        by_stem.setdefault(image.stem, []).append(i)
    for stem, rows in by_stem.items():
        if len(rows) < 2:
            continue  # a name of its own
        memory = [i for i in rows if shown(str(images[i])) != str(images[i])]
        if memory and len({_real(images[i]) for i in rows}) > 1:
            other = next(i for i in rows if _real(images[i]) != _real(images[memory[0]]))
            raise DataValidationError(
                f"row {index[memory[0]]!r} ({shown(str(images[memory[0]]))}, a picture given "
                f"in memory, named by its position) and row {index[other]!r} "
                f"({shown(str(images[other]))}) would both be saved as {stem}{suffix} in "
                f"{str(out)!r}; predict them in separate calls, or into separate folders")


def input_files(frame: pd.DataFrame, columns: dict[str, str], root: Path | None
                ) -> dict[str, str]:
    """What each file named in ``frame`` is to a call, by real path: ``columns`` maps a
    column to its role (``{"image": "image", "label": "mask"}``) and a file to e.g.
    ``"image of row 3"``. Paths resolve as validation resolves them (``~``, relative ones
    against ``root`` or the working folder); pictures held in memory name no file."""
    from .data.validation import _raw_path, _resolve

    base = Path(root) if root is not None else Path.cwd()
    files: dict[str, str] = {}
    for column, role in columns.items():
        if column not in frame.columns:
            continue
        for index, value in zip(frame.index, frame[column]):
            if not isinstance(value, (str, bytes, os.PathLike)):
                continue
            raw = _raw_path(value)
            if raw is not None:
                files.setdefault(_real(Path(_resolve(raw, base))), f"{role} of row {index!r}")
    return files


def refuse_input(out: str | os.PathLike, inputs: dict[str, str], what: str) -> None:
    """DataValidationError when the file ``out`` would be written over is one of
    ``inputs`` (:func:`input_files`, or any ``{real path: role}``), whatever an overwrite
    switch says: an output never replaces what the same call reads."""
    role = inputs.get(_real(Path(out).expanduser()))
    if role is not None:
        raise DataValidationError(
            f"cannot write {what} to {str(out)!r}: it is the {role}, an input of this call; "
            "choose another file")


def check_output_file(out: str | os.PathLike | None, what: str, *,
                      inputs: dict[str, str] | None = None,
                      predictor: str | os.PathLike | None = None) -> None:
    """Refuse, before any work, a single output file (a picture, a table, an export) that
    is one of ``inputs`` (:func:`refuse_input`) or part of the predictor in the folder
    ``predictor`` (:func:`automask.saving.predictor_part`). Any other existing file is
    replaced, atomically, as ``savefig`` replaces one."""
    if out is None:
        return
    from .saving import enclosing_predictor

    refuse_url(out, f"the file for {what}", writing=True)
    refuse_input(out, inputs or {}, what)
    # the predictor read, and any other whose folder holds the file (another run's logs)
    for folder in dict.fromkeys(f for f in (predictor, enclosing_predictor(out)) if f):
        _refuse_predictor_part(folder, out, f"cannot write {what} to {str(out)!r}: it "
                               "would write into", "; choose another file")


def _output_names(images: list[Path]) -> list[Path]:
    """Each image's stem; when different files share one, every image's path below the
    images' common folder, without its suffix (``a/1.png``, ``b/1.png`` -> ``a/1``, ``b/1``)."""
    stems: dict[str, set[str]] = {}
    for image in images:
        stems.setdefault(image.stem, set()).add(_real(image))
    if all(len(files) == 1 for files in stems.values()):
        return [Path(image.stem) for image in images]
    return paths_below_common(images)


def paths_below_common(images: list[Path]) -> list[Path]:
    """Each image's path below the images' common folder, without its suffix
    (``/d/a/1.png``, ``/d/b/1.png`` -> ``a/1``, ``b/1``; one folder: the stems)."""
    folders = [os.path.abspath(image.parent) for image in images]
    common = os.path.commonpath(folders)
    return [Path(os.path.relpath(folder, common)) / image.stem
            for folder, image in zip(folders, images)]


def write_masks(probs: Iterator[tuple[int, np.ndarray]], dests: list[Path], out: Path,
                task: str, num_classes: int, color_map: dict | None = None,
                table: np.ndarray | None = None, *, overwrite: bool = True) -> None:
    """Write each mask as a lossless PNG: 0/255 grayscale for binary tasks, a palette PNG of
    class ids for multi-class tasks, in the colours of ``color_map`` when the training
    masks were colour-coded (see :func:`automask.data.io.write_mask`). With ``table``
    (:func:`value_table`), ``table[ids]`` instead: the dataset's values in grey, or its
    colours in RGB.

    ``out`` is created here; if writing fails, the files this call created (and ``out``
    when it created it) are removed. Without ``overwrite`` no file is replaced, not even
    one another process wrote after :func:`mask_destinations` checked (FileExistsError).
    """
    from .data.io import write_mask, write_values

    def write(dest: Path, prob: np.ndarray, replace: bool) -> None:
        # written to a temporary file, then renamed
        ids = to_mask(prob, task, num_classes)
        if table is None:
            write_mask(dest, ids, task, color_map, replace=replace)
        else:
            write_values(dest, table[ids], replace=replace)

    _write_each(probs, dests, out, write, overwrite)


def write_probabilities(probs: Iterator[tuple[int, np.ndarray]], dests: list[Path],
                        out: Path, task: str, *, overwrite: bool = True) -> None:
    """Write each probability map as a float32 ``.npy`` file: ``(H, W)`` foreground
    probability for binary tasks, ``(K, H, W)`` class probabilities for multi-class tasks.

    Each file is written to a temporary file, then renamed. ``out`` is created here; if
    writing fails, the files this call created (and ``out`` when it created it) are removed.
    ``overwrite``: as :func:`write_masks`'s.
    """
    from .utils import atomic_write

    def write(dest: Path, prob: np.ndarray, replace: bool) -> None:
        with atomic_write(dest, replace=replace) as fh:
            np.save(fh, (prob[0] if task == "binary" else prob).astype(np.float32))

    _write_each(probs, dests, out, write, overwrite)


def _write_each(probs: Iterator[tuple[int, np.ndarray]], dests: list[Path], out: Path,
                write, overwrite: bool = True) -> None:
    """``write(dests[idx], prob, replace)`` for each prediction, ``replace`` with
    ``overwrite`` or for a file this call wrote already (an image given twice); on failure,
    remove what was created."""
    created_dir = top_created(out)
    out.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    written: set[Path] = set()
    # sub-folders this call made (outputs kept below a folder): (folder, highest created)
    folders: list[tuple[Path, Path]] = []
    try:
        for idx, prob in probs:
            dest = dests[idx]
            top = top_created(dest.parent)
            if top is not None:
                dest.parent.mkdir(parents=True)
                folders.append((dest.parent, top))
            if not (dest.exists() or dest.is_symlink()):
                # counted before the write: an interruption just after its rename would
                # leave the file unaccounted for
                created.append(dest)
                try:
                    write(dest, prob, overwrite or dest in written)
                except FileExistsError:  # another process's file now: not ours to remove
                    created.pop()
                    raise
            else:
                write(dest, prob, overwrite or dest in written)
            written.add(dest)
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        # the folders made go while empty: another process may write into them too
        for folder, top in reversed(folders):
            remove_empty_folders(folder, top)
        remove_empty_folders(out, created_dir)
        raise


def evaluate_probs(probs: Iterator[tuple[int, np.ndarray]], spec, task: str,
                   color_map: dict | None, scorers: dict[str, Any]) -> dict[str, Any]:
    """Update ``scorers`` with each prediction and its mask; return the computed metrics.

    A prediction smaller or larger than its mask (scored at the model's input resolution,
    :func:`iter_proba`) meets the mask resized to it by nearest neighbour, as the paper's
    authors resize masks.
    """
    from .data import read_mask
    from .data.transforms import resize_nearest

    for idx, prob in probs:
        raw = read_mask(spec.frame[spec.label_col].iloc[idx], color_map=color_map)
        if raw.shape != prob.shape[-2:]:
            raw = resize_nearest(raw, prob.shape[-2:])
        target = torch.from_numpy(spec.target_lut(idx, raw)[raw].astype(np.int64))
        prob_t = torch.from_numpy(prob)
        pred = prob_t[0] if task == "binary" else prob_t  # void (255) is left out by the metrics
        for scorer in scorers.values():
            scorer.update(pred, target)
    out = {}
    for key, scorer in scorers.items():
        value = scorer.compute()
        out[key] = value.tolist() if value.ndim else float(value)
    return out


def metric_conventions(task: str, num_classes: int) -> dict[str, Any]:
    """Metric arguments for automask's targets: class indices with 255 = void/ignore.

    Binary metrics leave void pixels out of the pixel-wise scores and count them as errors
    in the structural ones (see :mod:`automask.metrics.binary`).
    """
    if task == "multiclass":
        return {"num_classes": num_classes, "ignore_index": 255}
    return {"ignore_index": 255}
