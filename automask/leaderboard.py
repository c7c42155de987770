"""Leaderboards: one row per model, runs aggregated over seeds, and the paper's table.

:func:`build_leaderboard` is what :meth:`automask.SemanticSegmentor.leaderboard` calls. It
has three views (``style``):

* ``"models"``: one row per trained candidate (and per external folder), raw fractions;
* ``"methods"``: candidates whose configurations differ only by ``env.seed`` are one row,
  each metric the mean over the runs with its sample standard deviation (``ddof=1``, NaN
  for a single run) in a ``<column>_std`` column;
* ``"paper"``: the ``methods`` view printed as the Conv-LoRA paper prints its tables:
  paper labels, ``#Params (M) / Ratio (%)``, metrics x100 as ``mean ± std`` strings with
  the paper's arrows, external rows first, then the PEFT registry's order.

External rows score folders of masks or probability maps from any other model with the
same metrics and conventions as :meth:`~automask.SemanticSegmentor.evaluate`.
:func:`save_table` writes any of these frames as CSV or Markdown.
"""
from __future__ import annotations

import math
import os
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .data.arrays import as_files, as_pandas
from .errors import ConfigError, DataValidationError

if TYPE_CHECKING:  # pragma: no cover
    from .segmentor import SemanticSegmentor

STYLES = ("models", "methods", "paper")

#: Row labels of the paper's tables, by PEFT registry name.
PAPER_LABELS: dict[str, str] = {
    "scratch": "SAM (from scratch)",
    "decoder_only": "Decoder-only",
    "bitfit": "BitFit",
    "adapter": "Adapter",
    "vpt": "VPT",
    "lst": "LST",
    "sam_adapter": "SAM-Adapter",
    "ssf": "SSF",
    "lora": "LoRA",
    "conv_lora": "Conv-LoRA",
    "full": "Full fine-tuning",
}

#: Column labels of the paper's tables, by metric name (arrows added from the metric).
METRIC_LABELS: dict[str, str] = {
    "sm": "S_alpha",
    "em": "E_phi",
    "em_adp": "E_phi (adaptive)",
    "em_max": "E_phi (max)",
    "wfm": "F_beta^w",
    "fm": "F_beta (mean)",
    "fm_adp": "F_beta (adaptive)",
    "fm_max": "F_beta (max)",
    "mae": "MAE",
    "iou": "IoU",
    "dice": "Dice",
    "iou_pooled": "IoU (pooled)",
    "dice_pooled": "Dice (pooled)",
    "ber": "BER",
    "ber_per_image": "BER (per image)",
    "acc": "Acc",
    "miou": "mIoU",
    "iou_per_class": "IoU",
}

PARAMS_COLUMN = "#Params (M) / Ratio (%)"
_PLUS_MINUS = " ± "


# ----------------------------------------------------------------------------- building
def build_leaderboard(
    seg: "SemanticSegmentor",
    data: pd.DataFrame | str | os.PathLike | None = None,
    *,
    extra: Mapping[str, str | os.PathLike] | None = None,
    style: str | None = None,
    metrics: Sequence[str] | None = None,
    resolution: str = "original",
    tiling: str = "auto",
) -> pd.DataFrame:
    """The leaderboard of a fitted predictor (see the module docstring for the views).

    Parameters
    ----------
    seg : SemanticSegmentor
        A fitted or loaded predictor.
    data : DataFrame or CSV path, optional
        Labelled test data; every model (and every external folder) is scored on it (cells
        may hold images and masks in memory, as in ``evaluate``).
    extra : mapping of str to path, optional
        Row name -> folder of another model's predictions (PNG/JPEG masks or probability
        maps, ``.npy`` arrays), paired with ``data`` by file stem: the image's stem, else
        the mask's; in a folder of sub-folders (``predict``'s outputs for images that
        share a name), by the image's path below the images' common folder first.
        Needs ``data``.
    style : {"models", "methods", "paper"}, optional
        Default: ``"methods"`` when some candidates differ only by ``env.seed``, else
        ``"models"``.
    metrics : sequence of str or str, optional
        Test metrics (default: the task's default set); a string is split at commas
        (``"sm,em"``), as :meth:`~automask.SemanticSegmentor.evaluate` takes it.

    Returns
    -------
    DataFrame

    Raises
    ------
    ConfigError
        Unknown style or metric, an empty list of metrics, ``extra`` or ``metrics``
        without ``data``, or an external row named like a trained model (or not a
        non-empty string).
    DataValidationError
        An external folder missing, or without a prediction for some rows of ``data``
        (the message names them), or a prediction that does not fit its mask.
    """
    if style is not None and style not in STYLES:
        raise ConfigError(f"unknown leaderboard style {style!r}; valid: {', '.join(STYLES)}")
    if isinstance(metrics, str):  # "iou" or "sm,em", as evaluate and the command line take
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if metrics is not None:
        metrics = list(metrics)
        if not metrics:
            raise ConfigError("leaderboard metrics is empty; give metric names, or None for "
                              "the task's default set")
        from .metrics import build_metrics
        from .prediction import metric_conventions

        try:
            build_metrics(seg.task_, list(metrics),
                          **metric_conventions(seg.task_, seg.num_classes_))
        except ValueError as exc:
            raise ConfigError(f"leaderboard metrics: {exc}") from exc
    if extra is not None and not isinstance(extra, Mapping):
        raise ConfigError(
            f"extra must be a dict of row name to predictions folder, e.g. "
            f"{{'SAM-Adapter': 'preds/sam_adapter'}}, got a {type(extra).__name__}: "
            f"{extra!r:.80}")
    extra = dict(extra or {})
    bad = [name for name in extra if not isinstance(name, str) or not name.strip()]
    if bad:
        raise ConfigError(f"external row names must be non-empty strings, got {bad[:3]!r}")
    if extra and data is None:
        raise ConfigError("external rows (extra=...) need labelled test data (data=...)")
    if metrics is not None and data is None:  # they would be checked, then dropped unsaid
        raise ConfigError(f"leaderboard metrics {metrics} score test data: give labelled "
                          "data (data=..., --data), or leave metrics out for the "
                          "validation scores alone")
    from .prediction import RESOLUTIONS

    if resolution not in RESOLUTIONS:
        raise ConfigError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    if extra and resolution != "original":
        raise ConfigError("external rows (extra=...) are scored at each mask's original "
                          "resolution: their files hold no model input; use "
                          "resolution='original' with them")
    groups = _run_groups(seg)
    taken = set(seg.models_) | {group for group, _ in groups.values()}
    clash = sorted(set(extra) & taken)
    if clash:
        raise ConfigError(f"external row names {clash} are already names of trained models "
                          "or of their groups of runs")
    external = []
    data = as_pandas(data)  # a polars / pyarrow table, a Hugging Face split
    columns = [seg.image, seg.label] if isinstance(data, pd.DataFrame) else []
    with as_files(data, columns) as data:  # images and masks in memory, as temporary files
        if extra:  # every folder is paired, then scored, before any model is evaluated
            frame = _validated(seg, data)
            pairs = {name: pair_predictions(frame, seg.image, folder)
                     for name, folder in extra.items()}
            for name, files in pairs.items():
                row: dict[str, Any] = {"model": name, "source": "external", "group": name,
                                       "best": False}
                row.update(_test_columns(score_external(seg, data, files, metrics),
                                         seg.classes_))
                external.append(row)
        rows = [_model_row(seg, name, groups[name], data, metrics, resolution, tiling)
                for name in seg.models_]
    rows += external
    board = pd.DataFrame(rows)
    for column in ("input_size", "seed"):  # integers, left empty on external rows
        if column in board:
            board[column] = board[column].astype("Int64")
    val = f"val_{seg.eval_metric_}"
    board = _sort_by(board, val, seg.eval_metric_)
    if style is None:
        style = "methods" if board.groupby("group", sort=False).size().max() > 1 else "models"
    if style == "models":
        return board
    methods = aggregate_runs(board)
    methods = _sort_by(methods, val, seg.eval_metric_)
    if style == "methods":
        return methods
    return paper_table(methods, decimals=2 if seg.task_ == "multiclass" else 1)


def _sort_by(board: pd.DataFrame, column: str, metric: str) -> pd.DataFrame:
    from .metrics import HIGHER_IS_BETTER

    return board.sort_values(column, ascending=not HIGHER_IS_BETTER[metric],
                             na_position="last", kind="stable").reset_index(drop=True)


def _run_groups(seg: "SemanticSegmentor") -> dict[str, tuple[str, str]]:
    """Candidate -> (group name, variant): runs that differ only by ``env.seed`` share a
    group; the variant names what else distinguishes the group besides its method."""
    flat = {name: info["config"].to_dict() for name, info in seg.models_.items()}
    keys = sorted({k for cfg in flat.values() for k in cfg})
    # A PEFT option only some methods have varies only among the runs that have it.
    varying = [k for k in keys if k != "env.seed"
               and len({repr(cfg[k]) for cfg in flat.values() if k in cfg}) > 1]
    out = {}
    for name, cfg in flat.items():
        others = [k for k in varying if k != "peft.method" and k in cfg]
        variant = ",".join(f"{k.split('.')[-1]}={cfg[k]}" for k in others)
        group = cfg["peft.method"] if not others else (
            ",".join(f"{k.split('.')[-1]}={cfg[k]}" for k in varying if k in cfg))
        out[name] = (group, variant)
    return out


def _model_row(seg, name: str, group: tuple[str, str], data, metrics,
               resolution: str = "original", tiling: str = "auto") -> dict[str, Any]:
    info = seg.models_[name]
    cfg = info["config"]
    group, variant = group
    row: dict[str, Any] = {
        "model": name,
        "source": "fit",
        "group": group,
        "variant": variant,
        "method": cfg.peft.method,
        # what the model was built from: 'scratch' trains from random weights whatever
        # model.checkpoint says
        "pretrained": (info.get("checkpoint") or {}).get(
            "source", cfg.model.checkpoint) != "random",
        "backbone": cfg.model.backbone,
        "input_size": cfg.model.input_size,
        "seed": seg.seed if cfg.env.seed is None else cfg.env.seed,
        "trainable_params_m": round(info["trainable_params"] / 1e6, 2),
        "ratio_pct": _ratio_pct(info),
        f"val_{seg.eval_metric_}": info["val_score"],
        "fit_time_s": round(info["fit_time"], 1),
        "predict_images_per_s": info.get("predict_images_per_s"),
        # why training ended early (a non-finite loss): its score is that of an earlier epoch
        "stopped": info.get("stopped"),
        "best": name == seg.best_model_,
    }
    if data is not None:
        row.update(_test_columns(seg.evaluate(data, metrics=metrics, model=name,
                                              resolution=resolution, tiling=tiling),
                                 seg.classes_))
    return row


def _ratio_pct(info: Mapping[str, Any]) -> float:
    """Trainable parameters in % of all parameters of the adapted model, the paper's
    convention (4.02M / 641.61M = 0.63% for Conv-LoRA on vit_h), rounded to 2 decimals."""
    return round(100.0 * info["trainable_params"] / info["total_params"], 2)


def _test_columns(scores: Mapping[str, Any], classes: Sequence[str]) -> dict[str, float]:
    out = {}
    for key, value in scores.items():
        if isinstance(value, list):
            for cls, v in zip(classes, value):
                out[f"test_{key}[{cls}]"] = v
        else:
            out[f"test_{key}"] = value
    return out


# --------------------------------------------------------------------------- aggregation
def aggregate_runs(board: pd.DataFrame) -> pd.DataFrame:
    """One row per ``group`` of a ``models`` leaderboard: mean and sample std of every
    metric and timing column over the group's runs.

    Parameters
    ----------
    board : DataFrame
        A ``models`` leaderboard (columns ``group``, ``model``, ``seed``, metrics...).

    Returns
    -------
    DataFrame
        Columns ``model`` (the group's name), the columns that are equal within a group
        (``source``, ``variant``, ``method``, ... where present), ``runs``, ``seeds``
        (comma-separated), then for each metric column ``c``: ``c`` (the mean over runs)
        and ``c_std`` (standard deviation with ``ddof=1``; NaN for one run), then ``best``,
        True for the group holding the best model. A board without rows gives
        a frame without rows.

    Raises
    ------
    DataValidationError
        ``board`` has rows but lacks the ``group`` or ``best`` column, or has rows without
        a group (they would otherwise be dropped from the result without a word).
    """
    if len(board) == 0:
        return pd.DataFrame(columns=["model", "runs", "seeds", "best"])
    missing = [c for c in ("group", "best") if c not in board.columns]
    if missing:
        raise DataValidationError(
            f"aggregate_runs needs a 'models' leaderboard; the board lacks the column(s) "
            f"{missing} (columns: {list(board.columns)})")
    no_group = board["group"].isna()
    if no_group.any():
        names = board.loc[no_group, "model"] if "model" in board else board.index[no_group]
        raise DataValidationError(
            f"aggregate_runs: {int(no_group.sum())} row(s) of the board have no 'group' "
            f"(model {list(names)[:5]!r}); give every row a group (its own name for a "
            f"single run)")
    measured = [c for c in board.columns
                if c.startswith(("val_", "test_")) or c in ("fit_time_s", "predict_images_per_s")]
    fixed = [c for c in ("source", "variant", "method", "pretrained", "backbone", "input_size",
                         "trainable_params_m", "ratio_pct") if c in board.columns]
    rows = []
    for group, runs in board.groupby("group", sort=False):
        if "seed" in runs:
            runs = runs.sort_values("seed", kind="stable")
        row: dict[str, Any] = {"model": group}
        for col in fixed:
            values = runs[col].dropna().unique()
            assert len(values) <= 1, (group, col, values)  # runs differ by seed only
            row[col] = values[0] if len(values) else None
        row["runs"] = len(runs)
        seeds = runs["seed"].dropna() if "seed" in runs else pd.Series([], dtype=float)
        row["seeds"] = ",".join(str(int(s)) for s in seeds)
        for col in measured:
            values = pd.to_numeric(runs[col], errors="coerce").dropna()
            row[col] = values.mean() if len(values) else np.nan
            row[f"{col}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
        row["best"] = bool(runs["best"].any())
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- paper view
def paper_label(method: str | None, pretrained: bool = True, variant: str | None = "") -> str:
    """Row label of the paper's table: ``full`` on a random init is the paper's "SAM (from
    scratch)"; a variant (other varying hyperparameters) is added in parentheses. A missing
    variant (None, or NaN: the empty string of a board read back from CSV) is no variant."""
    key = _paper_key(method, pretrained)
    label = PAPER_LABELS.get(key, str(key))
    if variant is None or (not isinstance(variant, str) and _isnan(variant)):
        variant = ""
    return f"{label} ({variant})" if variant else label


def _paper_key(method: str | None, pretrained: Any) -> str | None:
    """The paper's row of a method: ``full`` without pretrained weights is ``scratch``."""
    random_init = pretrained is not None and not _isnan(pretrained) and not bool(pretrained)
    return "scratch" if method == "full" and random_init else method


def _method_order(method: str | None, pretrained: bool) -> int:
    from .peft import PEFT_METHODS

    order = ["scratch"] + [m for m in PEFT_METHODS if m != "scratch"]
    key = _paper_key(method, pretrained)
    return order.index(key) if key in order else len(order)


def metric_header(column: str) -> str:
    """``test_sm`` -> ``S_alpha ↑``, ``test_ber`` -> ``BER ↓``, ``val_iou`` -> ``val IoU ↑``,
    ``test_iou_per_class[cup]`` -> ``IoU cup ↑``."""
    from .metrics import HIGHER_IS_BETTER

    prefix, name = column.split("_", 1)
    cls = None
    if name.endswith("]") and "[" in name:
        name, cls = name[:-1].split("[", 1)
    label = METRIC_LABELS.get(name, name)
    if cls is not None:
        label = f"{label} {cls}"
    arrow = "↑" if HIGHER_IS_BETTER.get(name, True) else "↓"
    return f"{'val ' if prefix == 'val' else ''}{label} {arrow}"


def format_params(params_m: float | None, ratio_pct: float | None) -> str:
    """``4.02 / 0.63%`` (``641.09 / 100%``); ``-`` for a model without counts."""
    if params_m is None or ratio_pct is None or _isnan(params_m) or _isnan(ratio_pct):
        return "-"
    ratio = "100" if round(ratio_pct, 2) == 100 else f"{ratio_pct:.2f}"
    return f"{params_m:.2f} / {ratio}%"


def format_cell(mean: float, std: float | None, decimals: int) -> str:
    """``mean ± std`` x100, the mean to ``decimals`` places and the std to one more (the
    paper's ``90.8 ± 0.57``); the mean alone when ``std`` is None or NaN; ``-`` for NaN."""
    if mean is None or _isnan(mean):
        return "-"
    text = f"{100 * mean:.{decimals}f}"
    if std is not None and not _isnan(std):
        text += f"{_PLUS_MINUS}{100 * std:.{decimals + 1}f}"
    return text


def paper_table(methods: pd.DataFrame, decimals: int = 1) -> pd.DataFrame:
    """The paper's layout of a ``methods`` leaderboard (all cells strings).

    Columns: ``Method``, ``#Params (M) / Ratio (%)``, then one per metric (the test metrics
    when present, else the validation metric), with the paper's arrows. Rows: external rows
    first (in the given order), then methods in registry order (``full`` on a random init
    counts as the paper's from-scratch row, first). Values x100; ``ber`` and ``mae`` get one
    more decimal, as in the paper (``2.54``).
    """
    metric_cols = [c for c in methods.columns if c.startswith("test_") and not c.endswith("_std")]
    if not metric_cols:
        metric_cols = [c for c in methods.columns
                       if c.startswith("val_") and not c.endswith("_std")]
    keyed = []
    for position, (_, row) in enumerate(methods.iterrows()):
        external = row.get("source") == "external"
        order = -1 if external else _method_order(row.get("method"), row.get("pretrained"))
        keyed.append(((order, position), row))
    out = []
    for _, row in sorted(keyed, key=lambda item: item[0]):
        if row.get("source") == "external":
            label = row["model"]
        else:
            label = paper_label(row["method"], row.get("pretrained"), row.get("variant"))
        cells = {"Method": label,
                 PARAMS_COLUMN: format_params(row.get("trainable_params_m"),
                                              row.get("ratio_pct"))}
        for col in metric_cols:
            name = col.split("_", 1)[1].split("[", 1)[0]
            places = decimals + 1 if name in ("ber", "ber_per_image", "mae") else decimals
            cells[metric_header(col)] = format_cell(row[col], row.get(f"{col}_std"), places)
        out.append(cells)
    return pd.DataFrame(out)


def paper_params(summary: pd.DataFrame) -> pd.DataFrame:
    """:func:`automask.models.parameter_summary` as the paper's first two columns:
    ``Method`` (paper labels, registry order) and ``#Params (M) / Ratio (%)``."""
    return pd.DataFrame({
        "Method": [paper_label(m) for m in summary["method"]],
        PARAMS_COLUMN: [format_params(t, r)
                        for t, r in zip(summary["trainable_m"], summary["ratio_pct"])],
    })


def _isnan(value: Any) -> bool:
    """True for a missing number: NaN, and pandas' missing markers ``pd.NA`` and ``pd.NaT``
    (which nullable columns hold, e.g. a board read back with ``convert_dtypes``)."""
    if value is pd.NA or value is pd.NaT:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------ external rows
def _validated(seg: "SemanticSegmentor", data):
    from .prediction import labelled_spec

    return labelled_spec(data, seg.image, seg.label, seg.task_, seg.num_classes_,
                         seg.classes_, seg.void_label_, seg.color_map_)


def pair_predictions(spec, image_col: str, folder: str | os.PathLike) -> list[Path]:
    """The prediction file of each row of ``spec`` in ``folder``, by name.

    A row's prediction is ``folder/<image stem>.*``, else ``folder/<mask stem>.*`` (any
    extension Pillow reads, or ``.npy``). Files for other images are ignored. A folder
    that holds only sub-folders is searched below them, as ``predict`` writes the masks of
    images that share a name (``a/x.png``, ``b/x.png``: the image's path below the images'
    common folder), and a stem found once in the whole tree serves too.

    Raises
    ------
    DataValidationError
        The folder is missing or holds no prediction, two files share a name, two
        different images would share one file, or some rows have no file (the first ones
        are named, with the count).
    """
    from .datasets.folders import listing
    from .metrics.folders import readable_suffixes
    from .prediction import paths_below_common

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataValidationError(f"external predictions folder not found: {str(root)!r}")
    files = listing(root, "external predictions", readable_suffixes())
    stems: dict[str, list[Path]] = {}
    for key, path in files.items():  # a tree's files by stem too, where it is unique
        stems.setdefault(key.rsplit("/", 1)[-1], []).append(path)
    by_stem = {stem: paths[0] for stem, paths in stems.items() if len(paths) == 1}
    images = [Path(p) for p in spec.frame[image_col]]
    found, missing, owner = [], [], {}

    def nfc(name: str) -> str:  # the listing's keys are NFC (a name macOS wrote decomposed)
        return unicodedata.normalize("NFC", name)

    for i, (image, mask, below) in enumerate(zip(images, spec.frame[spec.label_col],
                                                  paths_below_common(images))):
        match = (files.get(nfc(below.as_posix())) or by_stem.get(nfc(image.stem))
                 or by_stem.get(nfc(Path(mask).stem)))
        if match is None:
            missing.append(f"row {i} ({image.stem})")
        elif owner.setdefault(match, (i, str(image)))[1] != str(image):  # one file, two images
            first, other = owner[match]
            raise DataValidationError(
                f"rows {first} ({other!r}) and {i} ({str(image)!r}) are different images "
                f"with the same file stem, so both would be scored against the one "
                f"prediction {match.name!r} in {str(root)!r}; give the images distinct "
                "names (and their predictions the same names)")
        found.append(match)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataValidationError(
            f"{len(missing)} of {len(found)} rows have no prediction in {str(root)!r} "
            f"(looked for the image's or the mask's file stem): {shown}")
    return found


def score_external(
    seg: "SemanticSegmentor",
    data,
    files: Sequence[Path],
    metrics: Sequence[str] | None = None,
) -> dict[str, float | list[float]]:
    """Score one prediction file per row of ``data`` as :meth:`evaluate` scores a model.

    Binary predictions are read as :func:`automask.metrics.score` reads them (the integer
    maps of the folder on one scale: 8-bit maps divided by 255, 16-bit ones by 65535, 0/1
    masks; probabilities; ``(1, H, W)`` and
    ``(H, W, 1)`` arrays as ``(H, W)``); multi-class predictions are class-index maps. Void
    pixels of the ground truth (255) are treated as ``evaluate`` treats them.
    """
    import torch

    from .data import read_mask
    from .metrics import DEFAULT_METRICS, read_map, score
    from .metrics.inputs import as_tensor, binary_prediction
    from .metrics.scoring import _integer_scale, one_channel
    from .prediction import metric_conventions

    spec = _validated(seg, data)
    names = list(metrics) if metrics is not None else list(DEFAULT_METRICS[seg.task_])
    conventions = metric_conventions(seg.task_, seg.num_classes_)  # void: ignore_index 255
    preds, targets = [], []
    for idx, path in enumerate(files):
        raw = read_mask(spec.frame[seg.label].iloc[idx], color_map=seg.color_map_)
        target = torch.from_numpy(spec.target_lut(idx, raw)[raw].astype(np.int64))
        try:
            # (H, W, 1) .npy: (H, W); colour masks of a colour-coded data set: by their map
            pred = one_channel(as_tensor(read_map(
                path, seg.color_map_ if seg.task_ == "multiclass" else None)))
            if tuple(pred.shape[-2:]) != tuple(target.shape):
                raise ValueError(f"is {tuple(pred.shape[-2:])} but its mask is "
                                 f"{tuple(target.shape)} (height, width)")
        except (OSError, ValueError) as exc:
            raise DataValidationError(f"external prediction {str(path)!r} {exc}") from exc
        preds.append(pred)
        targets.append(target)
    if seg.task_ == "binary":  # the integer maps' scales, as score() reads them
        scales = _integer_scale(preds, [str(f) for f in files], [Path(f).name for f in files],
                                conventions.get("ignore_index"))
        for idx, path in enumerate(files) if scales is not None else ():
            try:
                preds[idx] = binary_prediction(preds[idx], integer_scale=scales[idx])
            except ValueError as exc:
                raise DataValidationError(f"external prediction {str(path)!r} {exc}") from exc
    try:
        return score(preds, targets, task=seg.task_, metrics=names, **conventions)
    except ValueError as exc:
        message = str(exc)
        if message.startswith("image "):
            index = int(message.split(":", 1)[0].split()[1])
            message = f"{str(files[index])!r}: {message.split(':', 1)[1].strip()}"
        raise DataValidationError(f"external prediction {message}") from exc


# -------------------------------------------------------------------------------- saving
def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table of ``df`` (every cell as text, ``|`` escaped)."""
    def cell(value: Any) -> str:
        missing = value is None or (not isinstance(value, str) and _isnan(value))
        text = "" if missing else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    header = [cell(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def table_format(path: str | os.PathLike) -> str:
    """``"csv"`` or ``"md"`` from a file's suffix; :class:`ConfigError` for any other."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".md", ".markdown"):
        return "md"
    raise ConfigError(f"cannot write a table to {str(path)!r}: use a .csv or .md file")


def check_table_path(path: str | os.PathLike) -> str:
    """:func:`table_format` of ``path``, after checking that the file can be written there
    (not an existing folder, no file on the way): :class:`ConfigError` otherwise, so a
    command can fail before it scores anything."""
    from .prediction import path_problem

    fmt = table_format(path)
    problem = path_problem(Path(path).expanduser(), folder=False)
    if problem is not None:
        raise ConfigError(f"cannot write a table to {str(path)!r}: {problem}")
    return fmt


def save_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a leaderboard as ``.csv`` (UTF-8) or ``.md`` (Markdown), chosen by suffix.

    The file is written to a temporary file and renamed into place, so an existing file is
    never left half-written.

    Raises
    ------
    ConfigError
        Any other suffix, or a path that cannot be a file (see :func:`check_table_path`).
    """
    from .utils import atomic_write

    path = Path(path).expanduser()
    text = df.to_csv(index=False) if check_table_path(path) == "csv" else to_markdown(df)
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return path
