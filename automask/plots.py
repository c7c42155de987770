"""Pictures of a predictor: prediction overlays, a model comparison, training curves.

Every function returns a :class:`matplotlib.figure.Figure` drawn on matplotlib's Agg
canvas (pyplot and its global backend are left alone, so nothing opens a window and
figures are freed like any object) and writes a PNG when ``path`` is given.

Binary tasks colour the prediction against the ground truth with Okabe-Ito's
colour-blind-safe colours: true positives bluish green, false positives vermillion,
false negatives blue. Multi-class tasks colour each class with
:func:`automask.data.io.class_colors`, the palette of the PNGs that ``predict(save_to=...)``
writes (for a predictor fit on colour-coded masks, their colours), with a legend of class
names.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .errors import DataValidationError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

IGNORE = 255
# Okabe-Ito colours (RGB 0-255)
TP_COLOR = (0, 158, 115)      # bluish green: predicted and true
FP_COLOR = (213, 94, 0)       # vermillion: predicted, not true
FN_COLOR = (0, 114, 178)      # blue: true, missed
TRUTH_COLOR = (204, 121, 167)  # reddish purple: ground-truth foreground
PRED_COLOR = (230, 159, 0)    # orange: predicted foreground when there is no ground truth
IGNORE_COLOR = (160, 160, 160)  # grey: ignored pixels
ALPHA = 0.55
_CELL_INCHES = 2.6


# ------------------------------------------------------------------ overlays
def blend(image: np.ndarray, regions: Sequence[tuple[np.ndarray, Sequence[int]]],
          alpha: float = ALPHA) -> np.ndarray:
    """Paint boolean ``regions`` over an RGB image: ``(1 - alpha) * image + alpha * colour``.

    Parameters
    ----------
    image : ndarray
        ``(H, W, 3)`` uint8 RGB.
    regions : sequence of (mask, colour)
        ``(H, W)`` boolean masks and their RGB colours; later regions paint over earlier.
    alpha : float
        Opacity of the colours.

    Returns
    -------
    ndarray
        ``(H, W, 3)`` uint8.
    """
    out = image.astype(np.float32)
    for mask, colour in regions:
        m = np.asarray(mask, dtype=bool)[..., None]
        out = np.where(m, (1 - alpha) * out + alpha * np.asarray(colour, np.float32), out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def binary_regions(truth: np.ndarray | None, pred: np.ndarray
                   ) -> list[tuple[str, np.ndarray, tuple[int, int, int]]]:
    """(label, mask, colour) of TP, FP, FN (and ignored) pixels of a binary prediction.

    ``truth`` holds 0 / 1 (255 ignored); ``pred`` 0 / 1. Without a truth, the predicted
    foreground alone.
    """
    p = np.asarray(pred) > 0
    if truth is None:
        return [("prediction", p, PRED_COLOR)]
    t = np.asarray(truth)
    ignored = t == IGNORE
    fg = (t > 0) & ~ignored
    return [("TP (correct)", p & fg, TP_COLOR),
            ("FP (false alarm)", p & ~fg & ~ignored, FP_COLOR),
            ("FN (missed)", ~p & fg, FN_COLOR),
            ("ignored", ignored, IGNORE_COLOR)]


def class_regions(mask: np.ndarray, num_classes: int, color_map: dict | None = None
                  ) -> list[tuple[int, np.ndarray, tuple[int, int, int]]]:
    """(class id, mask, colour) per class present in ``mask``, ignored pixels last; the
    colours of ``color_map`` for classes it colours (colour-coded training masks)."""
    from .data.io import class_colors

    colors = class_colors(max(num_classes, 1), color_map)
    m = np.asarray(mask)
    out = [(int(c), m == c, tuple(int(v) for v in colors[c]))
           for c in np.unique(m) if c != IGNORE and c < num_classes]
    if (m == IGNORE).any():
        out.append((IGNORE, m == IGNORE, IGNORE_COLOR))
    return out


# ------------------------------------------------------------------- figures
def plot_masks(
    images: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]],
    truths: Sequence[np.ndarray] | None = None,
    *,
    task: str,
    class_names: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    alpha: float = ALPHA,
    color_map: Mapping[tuple[int, int, int], int] | None = None,
) -> "Figure":
    """Grid of overlays: one row per image; image | ground truth | one column per model.

    Parameters
    ----------
    images : sequence of ndarray
        ``(H, W, 3)`` uint8 RGB images.
    predictions : mapping of str to sequence of ndarray
        Column title -> one ``(H, W)`` mask per image (0/1 for binary, class ids for
        multi-class).
    truths : sequence of ndarray, optional
        Ground-truth masks (0/1 or class ids, 255 ignored); the column is left out when
        None.
    task : {"binary", "multiclass"}
    class_names : sequence of str, optional
        Names of the class ids for the legend (multi-class).
    names : sequence of str, optional
        A name per image (its file stem), shown above the image.
    path : path-like, optional
        Where to save the figure, in the format of its suffix (PNG with ``.png`` added
        when it has none).
    alpha : float
        Opacity of the overlays.
    color_map : mapping, optional
        ``{(r, g, b): class_id}`` of colour-coded masks (multi-class): each class it
        colours is drawn in that colour, as in the masks (a predictor's ``color_map_``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    check_path(path)
    n = len(images)
    if n == 0:
        raise DataValidationError("no images to draw")
    images = [_as_rgb(image, row) for row, image in enumerate(images)]
    for title, masks in predictions.items():
        if len(masks) != n:
            raise DataValidationError(f"{len(masks)} masks for {title!r} but {n} images")
    if truths is not None and len(truths) != n:
        raise DataValidationError(f"{len(truths)} ground-truth masks but {n} images; give "
                                  "one per image, or truths=None to leave the column out")
    if names is not None:
        if isinstance(names, (str, bytes)) or len(names) != n:
            raise DataValidationError(
                f"names must be a sequence of one name per image ({n}), got {names!r:.200}")
        names = [str(name) for name in names]
    if task not in ("binary", "multiclass"):
        raise DataValidationError(f"unknown task {task!r}; expected 'binary' or 'multiclass'")
    for title, masks in [("ground truth", truths or [])] + list(predictions.items()):
        for row, mask in enumerate(masks):
            shape = np.shape(mask)
            if shape != images[row].shape[:2]:
                raise DataValidationError(
                    f"{title!r} mask of image {row} is {shape}, its image "
                    f"{images[row].shape[:2]} (height, width); they must match")
    num_classes = _max_class(predictions, truths) + 1 if task == "multiclass" else 2
    num_classes = max(num_classes, len(class_names or ()))
    columns = 1 + (truths is not None) + len(predictions)
    fonts = text_fonts([*(class_names or ()), *(names or ()), *map(str, predictions)])
    fig = Figure(figsize=(_CELL_INCHES * columns, _CELL_INCHES * n + 0.9),
                 layout="constrained")
    axes = fig.subplots(n, columns, squeeze=False)
    legend: dict[str, tuple[int, int, int]] = {}
    for row in range(n):
        image = np.asarray(images[row])
        cells = [("image" if names is None else _short(f"image {names[row]}"), image)]
        if truths is not None:
            if task == "binary":
                fg = (np.asarray(truths[row]) > 0) & (np.asarray(truths[row]) != IGNORE)
                regions = [("ground truth", fg, TRUTH_COLOR),
                           ("ignored", np.asarray(truths[row]) == IGNORE, IGNORE_COLOR)]
            else:
                regions = _named(class_regions(truths[row], num_classes, color_map),
                                 class_names)
            cells.append(("ground truth", _paint(image, regions, legend, alpha)))
        for title, masks in predictions.items():
            if task == "binary":
                regions = binary_regions(None if truths is None else truths[row], masks[row])
            else:
                regions = _named(class_regions(masks[row], num_classes, color_map),
                                 class_names)
            cells.append((_short(str(title)), _paint(image, regions, legend, alpha)))
        for ax, (title, picture) in zip(axes[row], cells):
            ax.imshow(picture, interpolation="nearest")
            # file and class names are text, not mathtext: '$' in one must not break drawing
            ax.set_title(title, fontsize=9, parse_math=False, fontfamily=fonts)
            ax.set_axis_off()
    handles = [Patch(facecolor=np.array(c) / 255, edgecolor="black", linewidth=0.5, label=k)
               for k, c in legend.items()]
    if handles:
        box = fig.legend(handles=handles, loc="outside lower center",
                         ncol=min(len(handles), 6), fontsize=8, frameon=False)
        for text in box.get_texts():
            text.set_parse_math(False)
            text.set_fontfamily(fonts)
    _save(fig, path)
    return fig


def plot_history(run_dir: str | os.PathLike, *, metric: str | None = None,
                 candidates: Sequence[str] | None = None,
                 path: str | os.PathLike | None = None,
                 curves: dict[str, Any] | None = None) -> "Figure":
    """Training loss and validation metric per epoch, one line per candidate.

    Reads the CSV logs a fit writes, ``<run_dir>/logs/<candidate>/metrics.csv``.

    Parameters
    ----------
    run_dir : path-like
        The run directory of a fit.
    metric : str, optional
        Validation metric column (``"val_iou"`` or ``"iou"``); the first ``val_*`` column
        of the logs when None.
    candidates : sequence of str, optional
        Candidates to draw; all with logs when None.
    path : path-like, optional
        Where to save the figure, in the format of its suffix (PNG with ``.png`` added
        when it has none).
    curves : dict of str to DataFrame, optional
        In place of the logs: ``{candidate: frame}`` with an ``epoch`` column and
        ``train_loss`` / ``val_*`` columns (a predictor's records keep the validation
        scores, for a predictor whose logs are gone).

    Returns
    -------
    matplotlib.figure.Figure
        Two axes: "training loss" and "validation <metric>" against the epoch.

    Raises
    ------
    DataValidationError
        No logs under ``run_dir``, or a candidate or metric that is not in them.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .prediction import check_output_file

    check_output_file(check_path(path), "the picture", predictor=run_dir)
    if curves is None:
        curves = read_history(run_dir, candidates)
    if metric is not None and not metric.startswith("val_"):
        metric = f"val_{metric}"
    if metric is None:
        metric = next((c for df in curves.values() for c in df.columns if c.startswith("val_")
                       and not c.endswith("_step")), None)
    logged = {c for df in curves.values() for c in df.columns if c.startswith("val_")}
    if metric is not None and logged and metric not in logged:  # none yet: not validated
        raise DataValidationError(
            f"no column {metric!r} in the logs under {run_dir}; columns: "
            f"{sorted({c for df in curves.values() for c in df.columns})}"
        )
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, val_ax = fig.subplots(1, 2)
    for name, df in curves.items():
        if "train_loss" in df.columns:
            loss = df.dropna(subset=["train_loss"]).groupby("epoch")["train_loss"].mean()
            loss_ax.plot(loss.index + 1, loss.values, marker="o", markersize=3, label=name)
        if metric is not None and metric in df.columns:
            # every validation: k of them in an epoch (optim.val_check_interval < 1) at
            # fractions 1/k, 2/k, ..., 1 of it, the last at the epoch's end as the loss
            val = df.dropna(subset=[metric])
            epoch = val["epoch"].to_numpy(dtype=float)
            nth = val.groupby("epoch").cumcount().to_numpy() + 1
            per = val.groupby("epoch")[metric].transform("size").to_numpy()
            val_ax.plot(epoch + nth / per, val[metric].to_numpy(), marker="o", markersize=3,
                        label=name)
    loss_ax.set_title("training loss")
    val_ax.set_title(f"validation {metric.removeprefix('val_') if metric else '(none logged)'}")
    for ax in (loss_ax, val_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            for text in ax.legend(fontsize=8).get_texts():
                text.set_parse_math(False)
    _save(fig, path)
    return fig


def read_history(run_dir: str | os.PathLike, candidates: Sequence[str] | None = None
                 ) -> dict[str, Any]:
    """``{candidate: DataFrame of its metrics.csv}`` from ``<run_dir>/logs``.

    An empty log (a candidate that has logged nothing yet) reads as no rows; one that
    cannot be read as a fit's CSV log raises :class:`DataValidationError` naming the file.
    """
    import pandas as pd

    from .saving import candidate_of_log_folder  # a checkpoint path's '/' as %2F

    logs = Path(run_dir) / "logs"
    found = {candidate_of_log_folder(p.parent.name): p
             for p in sorted(logs.glob("*/metrics.csv"))}
    if not found:
        raise DataValidationError(
            f"no training logs under {logs} (a fit writes logs/<candidate>/metrics.csv in "
            "its run directory)"
        )
    if candidates is not None:
        unknown = [c for c in candidates if c not in found]
        if unknown:
            raise DataValidationError(
                f"no logs for candidate(s) {unknown}; logged: {', '.join(found)}"
            )
        found = {c: found[c] for c in candidates}
    curves = {}
    for name, p in found.items():
        try:
            df = pd.read_csv(p)
        except pd.errors.EmptyDataError:  # created, nothing logged yet (or killed before)
            df = pd.DataFrame({"epoch": pd.Series(dtype=float)})
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataValidationError(f"cannot read the training log {p}: {exc}") from None
        if "epoch" not in df.columns:
            raise DataValidationError(
                f"the training log {p} has no 'epoch' column (columns: {list(df.columns)}); "
                "it is not a log that a fit wrote")
        # a fit logs numbers only: a cell of text (an edited or foreign log) is named
        text = [c for c in df.columns if df[c].dtype.kind not in "biufc"
                and pd.to_numeric(df[c], errors="coerce").isna().gt(df[c].isna()).any()]
        if text:
            raise DataValidationError(
                f"the training log {p} holds text in column(s) {text}, where a fit logs "
                "numbers; it is not a log that a fit wrote")
        curves[name] = df.apply(pd.to_numeric) if len(df.columns) else df
    return _without_discarded_epochs(curves)


def _without_discarded_epochs(curves: dict[str, Any]) -> dict[str, Any]:
    """Leave out the rows of an epoch that an interruption cut short and a resume ran
    again: a ``<name>-resumed-N`` log that starts at epoch e replaces the rows from epoch e
    on in the logs of ``<name>`` before it (a half epoch's loss, logged step by step)."""
    parts: dict[str, list[tuple[int, str]]] = {}
    for name in curves:
        base, sep, n = name.rpartition("-resumed-")
        key, order = (base, int(n)) if sep and n.isdigit() else (name, 0)
        parts.setdefault(key, []).append((order, name))
    out = dict(curves)
    for members in parts.values():
        members.sort()
        for i, (_, later) in enumerate(members):
            start = out[later]["epoch"].min()
            if start != start:  # no rows (NaN): nothing replaced
                continue
            for _, earlier in members[:i]:
                df = out[earlier]
                out[earlier] = df[~(df["epoch"] >= start)]
    return out


# --------------------------------------------------- from a fitted predictor
def predictor_examples(seg, data, n: int | None, models: Sequence[str | None]
                       ) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[str],
                                  dict[str, list[np.ndarray]]]:
    """(images, truths or None, stems, {model: masks}) of the first ``n`` rows of ``data``.

    Truths are read when ``data`` has the label column, mapped as evaluate maps them
    (0/1 for binary, class ids for multi-class, 255 ignored). Images and masks may be held
    in memory, as :meth:`~automask.SemanticSegmentor.predict` takes them (named by their
    row position).
    """
    from .data.arrays import as_files
    from .prediction import as_frame

    seg._check_fitted()
    frame, root = as_frame(data, seg.image)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise DataValidationError(f"n must be a whole number of at least 1, got {n!r}")
        frame = frame.iloc[:n]
    with as_files(frame, [seg.image, seg.label]) as files:
        return _examples_of_files(seg, files, root, models)


def _examples_of_files(seg, frame, root, models: Sequence[str | None]):
    """:func:`predictor_examples` of the rows of ``frame``, every picture in a file."""
    from .data import read_image, read_mask, validate_frame
    from .prediction import images_spec, iter_proba, to_mask

    labelled = seg.label in frame.columns
    spec = validate_frame(
        frame, image_col=seg.image, label_col=seg.label, root=root,
        require_labels=labelled, num_classes=seg.num_classes_ if labelled else None,
        class_names=seg.classes_ if labelled else None,
        void_label=seg.void_label_ if labelled else None,
        color_map=seg.color_map_ if labelled else None,
    )
    from .config import image_value_range

    value_range = image_value_range(seg._config(models[0]))  # shown as the model saw them
    images = [read_image(p, value_range=value_range) for p in spec.frame[seg.image]]
    truths = None
    if labelled:
        truths = []
        for idx, p in enumerate(spec.frame[seg.label]):
            raw = read_mask(p, color_map=seg.color_map_)
            truths.append(spec.target_lut(idx, raw)[raw].astype(np.uint8))
    predictions = {}
    for model in models:
        name = model or seg.best_model_
        with contextlib.closing(iter_proba(seg._model(model), seg._config(model), seg.task_,
                                           images_spec(spec.frame, seg.image, None))) as masks:
            predictions[name] = [to_mask(prob, seg.task_, seg.num_classes_)
                                 for _, prob in masks]
    stems = [Path(p).stem for p in spec.frame[seg.image]]
    return images, truths, stems, predictions


def plot_predictions(seg, data, n: int = 4, model: str | None = None,
                     path: str | os.PathLike | None = None) -> "Figure":
    """Image | ground truth | prediction for the first ``n`` images of ``data``."""
    _refuse_inputs(path, seg, data)
    images, truths, stems, preds = predictor_examples(seg, data, n, [model])
    (masks,) = preds.values()
    return plot_masks(images, {"prediction": masks}, truths, task=seg.task_,
                      class_names=seg.classes_, names=stems, path=path,
                      color_map=seg.color_map_)


def plot_comparison(seg, data, models: Sequence[str] | None = None, n: int = 4,
                    path: str | os.PathLike | None = None) -> "Figure":
    """Image | ground truth | one column per model, for the first ``n`` images."""
    _refuse_inputs(path, seg, data)
    if isinstance(models, str):  # one model's name, not its letters
        models = [models]
    models = list(models) if models is not None else list(seg.models_)
    if not models:
        raise DataValidationError("no models to compare")
    unknown = [m for m in models if m not in seg.models_]
    if unknown:
        raise DataValidationError(f"unknown model(s) {unknown}; trained: {', '.join(seg.models_)}")
    images, truths, stems, preds = predictor_examples(seg, data, n, models)
    return plot_masks(images, preds, truths, task=seg.task_, class_names=seg.classes_,
                      names=stems, path=path, color_map=seg.color_map_)


def _refuse_inputs(path, seg, data) -> None:
    """:func:`check_path`, then refuse a picture path that is a file ``data`` names (an
    image, a mask, the CSV itself) or part of ``seg``'s saved predictor: a picture never
    replaces what it is drawn from."""
    path = check_path(path)
    if path is None:
        return
    from .prediction import as_frame, check_output_file, input_files

    frame, root = as_frame(data, seg.image)
    inputs = input_files(frame, {seg.image: "image", seg.label: "mask"}, root)
    if isinstance(data, (str, os.PathLike)):
        inputs.setdefault(os.path.realpath(Path(data).expanduser()), "data file")
    check_output_file(path, "the picture", inputs=inputs, predictor=getattr(seg, "path_", None))


# ------------------------------------------------------------------ helpers
def _as_rgb(image, row: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 from an RGB, RGBA or grayscale (``(H, W)``, ``(H, W, 1)``) image.

    Values as :func:`automask.data.read_image` reads files with more than 8 bits per
    sample: boolean images as 0 / 255, 16-bit images (``uint16``, ``int16``) with 65535 as
    255, floats in [0, 1] times 255 and in [0, 255] rounded, other data (negative, beyond
    65535, float reflectances) stretched from its smallest to its largest finite value,
    NaNs as the smallest. Other integer arrays holding 0-255 (``np.array(img, int)``) are
    taken as they are.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        a = a[..., :3] if a.shape[-1] != 1 else a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3 or 0 in a.shape:
        raise DataValidationError(
            f"image {row} has shape {np.shape(image)}; expected (H, W, 3) RGB, (H, W, 4) "
            "RGBA or (H, W) grayscale with H, W > 0")
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind not in "biuf":
        raise DataValidationError(f"image {row} has values of type {a.dtype}; expected "
                                  "numbers (uint8, 16-bit, float or bool)")
    from .data.io import _to_uint8  # an int64 array of 0..255 is 8-bit values there too

    return _to_uint8(a)


_TITLE_CHARS = 30  # what a cell's width holds at the titles' font size


def text_fonts(texts: Sequence[str]) -> list[str]:
    """Font families for class and file names: matplotlib's default font, then, for the
    characters it lacks (Chinese, Japanese, Korean, Arabic, ... names), the first installed
    fonts that have them; matplotlib draws each character with the first family that has
    it. Characters no installed font has are named in one warning (they show as boxes),
    instead of matplotlib's warning per character at every drawing."""
    from matplotlib import font_manager

    first = font_manager.findfont(font_manager.FontProperties())
    missing = {ord(c) for c in "".join(texts) if c.isprintable() and not c.isspace()}
    missing -= _charmap(first)
    families = [font_manager.get_font(first).family_name]
    for entry in sorted(font_manager.fontManager.ttflist, key=lambda e: e.fname):
        if not missing:
            break
        if entry.name in families or entry.name.startswith("Last Resort"):
            continue  # matplotlib's Last Resort font has a placeholder box for everything
        found = missing & _charmap(entry.fname)
        if found:
            families.append(entry.name)
            missing -= found
    if missing:
        shown = "".join(map(chr, sorted(missing)[:20]))
        warnings.warn(f"no installed font has the characters {shown!r} of these class or file "
                      "names: they are drawn as boxes; install a font that has them (e.g. Noto "
                      "Sans CJK for Chinese, Japanese and Korean) and matplotlib uses it",
                      stacklevel=3)
    return families


@functools.lru_cache(maxsize=None)
def _charmap(fname: str) -> frozenset[int]:
    """The code points a font file has glyphs for (empty when it cannot be read)."""
    from matplotlib import font_manager

    try:
        return frozenset(font_manager.get_font(fname).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def _short(text: str, limit: int = _TITLE_CHARS) -> str:
    """``text`` cut in its middle to at most ``limit`` characters (the start and the end
    of a long file name are what tell it from its neighbours)."""
    text = " ".join(text.split())  # no line breaks or tabs in a title
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def _named(regions, class_names):
    out = []
    for cls, mask, colour in regions:
        if cls == IGNORE:
            label = "ignored"
        elif class_names and cls < len(class_names):
            label = f"{cls} {_short(str(class_names[cls]))}"
        else:
            label = f"class {cls}"
        out.append((label, mask, colour))
    return out


def _paint(image, regions, legend: dict, alpha: float) -> np.ndarray:
    for label, mask, colour in regions:
        if np.asarray(mask).any():
            legend.setdefault(label, colour)
    return blend(image, [(m, c) for _, m, c in regions], alpha)


def _max_class(predictions, truths) -> int:
    arrays = [m for masks in predictions.values() for m in masks] + list(truths or [])
    values = [int(np.max(np.where(a == IGNORE, 0, a))) for a in map(np.asarray, arrays) if a.size]
    return max(values, default=1)


def check_path(path: str | os.PathLike | None) -> Path | None:
    """``path`` as a Path once it is known to be writable as a picture, before any drawing.

    Raises :class:`DataValidationError` naming the path when it is a folder, when a folder
    above it is a file or the nearest existing one is not writable, or when its suffix is
    not a format matplotlib writes. ``~`` is the home folder. A name without a suffix is
    written as PNG with ``.png`` added, as matplotlib's ``savefig`` does (``"preds"`` ->
    ``preds.png``). Folders that do not exist yet are created when the picture is saved.
    """
    if path is None:
        return None
    from .data.validation import refuse_url

    refuse_url(path, "the picture's path", writing=True)
    from matplotlib.figure import Figure

    if str(os.fspath(path)).endswith(("/", os.sep)):  # a folder, which Path() would drop
        raise DataValidationError(f"cannot save the picture to {str(path)!r}: it names a "
                                  "folder; give a file name such as 'predictions.png'")
    path = Path(path).expanduser()
    if not path.suffix and path.name not in ("", ".", "..") and not path.is_dir():
        path = path.with_name(path.name + ".png")
    if path.is_dir():
        raise DataValidationError(f"cannot save the picture to {str(path)!r}: it is a folder; "
                                  "give a file name such as 'predictions.png'")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataValidationError(
                    f"cannot save the picture to {str(path)!r}: {str(parent)!r} is a file, "
                    "not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise DataValidationError(
                    f"cannot save the picture to {str(path)!r}: the folder {str(parent)!r} "
                    "is not writable")
            break
    fmt = path.suffix.lstrip(".").lower()
    formats = Figure().canvas.get_supported_filetypes()
    if fmt not in formats:
        raise DataValidationError(
            f"cannot save the picture to {str(path)!r}: unknown format {fmt!r}; use one of "
            f"{', '.join(sorted(formats))}")
    return path


def _save(fig, path) -> None:
    if path is None:
        return
    from .utils import atomic_write

    path = check_path(path)
    with atomic_write(path) as fh, warnings.catch_warnings():
        # text_fonts has named the characters no font has, once
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        fig.savefig(fh, format=path.suffix.lstrip(".").lower())
