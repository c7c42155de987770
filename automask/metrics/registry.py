"""Registry of metric names and ``build_metrics()``."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from torchmetrics import Metric

from automask.metrics.binary import (
    BalancedErrorRate,
    BalancedErrorRatePerImage,
    BinaryDice,
    BinaryIoU,
    EMeasure,
    FMeasure,
    MeanAbsoluteError,
    PooledDice,
    PooledIoU,
    SMeasure,
    WeightedFMeasure,
)
from automask.metrics.multiclass import IoUPerClass, MeanIoU, PixelAccuracy

TASKS = ("binary", "multiclass")

METRICS: dict[str, type | Callable[..., Metric]] = {
    # binary
    "sm": SMeasure,
    "em": partial(EMeasure, variant="mean"),
    "em_adp": partial(EMeasure, variant="adaptive"),
    "em_max": partial(EMeasure, variant="max"),
    "wfm": WeightedFMeasure,
    "fm": partial(FMeasure, variant="mean"),
    "fm_adp": partial(FMeasure, variant="adaptive"),
    "fm_max": partial(FMeasure, variant="max"),
    "mae": MeanAbsoluteError,
    "iou": BinaryIoU,
    "dice": BinaryDice,
    "iou_pooled": PooledIoU,
    "dice_pooled": PooledDice,
    "ber": BalancedErrorRate,
    "ber_per_image": BalancedErrorRatePerImage,
    # multi-class
    "acc": PixelAccuracy,
    "miou": MeanIoU,
    "iou_per_class": IoUPerClass,
}

METRIC_TASK: dict[str, str] = {
    name: ("multiclass" if name in ("acc", "miou", "iou_per_class") else "binary")
    for name in METRICS
}

DEFAULT_METRICS: dict[str, list[str]] = {
    "binary": ["sm", "em", "wfm", "mae", "iou", "dice", "ber"],
    "multiclass": ["acc", "miou", "iou_per_class"],
}

HIGHER_IS_BETTER: dict[str, bool] = {
    name: name not in ("mae", "ber", "ber_per_image") for name in METRICS
}

# Conventions each task understands (a typo raises instead of being ignored).
CONVENTIONS: dict[str, tuple[str, ...]] = {
    "binary": (
        "threshold", "beta2", "empty_score", "gt_threshold", "normalize", "alpha", "ignore_index"
    ),
    "multiclass": ("num_classes", "ignore_index"),
}
_COMMON = {"binary": {"gt_threshold", "ignore_index"}, "multiclass": set()}


# What the papers and other libraries call the metrics, folded by _fold, -> registry name.
_ALIASES: dict[str, str] = {
    **dict.fromkeys(("smeasure", "salpha", "structuremeasure"), "sm"),
    **dict.fromkeys(("emeasure", "ephi", "meanemeasure", "meanephi", "emean", "meane"), "em"),
    **dict.fromkeys(("maxemeasure", "emax", "maxephi", "maxem", "maxe"), "em_max"),
    **dict.fromkeys(("adaptiveemeasure", "eadp", "adpe", "adpem"), "em_adp"),
    **dict.fromkeys(("weightedfmeasure", "wf", "wfbeta", "fbetaw", "wfmeasure", "weightedf"),
                    "wfm"),
    **dict.fromkeys(("fmeasure", "fbeta", "meanf", "meanfm", "meanfmeasure"), "fm"),
    **dict.fromkeys(("maxfmeasure", "maxf", "fmax", "maxfm", "maxfbeta"), "fm_max"),
    **dict.fromkeys(("adaptivefmeasure", "adpf", "fadp", "adpfm"), "fm_adp"),
    **dict.fromkeys(("meanabsoluteerror", "m"), "mae"),
    **dict.fromkeys(("jaccard", "jaccardindex", "intersectionoverunion"), "iou"),
    **dict.fromkeys(("f1", "f1score", "dicescore", "dicecoefficient", "dsc"), "dice"),
    "balancederrorrate": "ber",
    **dict.fromkeys(("accuracy", "pixelaccuracy", "pa", "oa", "pixelacc"), "acc"),
    **dict.fromkeys(("meaniou", "mjaccard", "meanintersectionoverunion"), "miou"),
    **dict.fromkeys(("perclassiou", "classiou", "ious"), "iou_per_class"),
}


def _fold(name: str) -> str:
    """``"S-alpha"``, ``"E_phi"``, ``"mIoU"`` -> ``"salpha"``, ``"ephi"``, ``"miou"``."""
    text = name.lower().replace("α", "alpha").replace("φ", "phi").replace("ξ", "phi")
    text = text.replace("β", "beta").replace("ω", "w")
    return "".join(ch for ch in text if ch.isalnum())


def suggest_metric(name: Any, task: str) -> str:
    """``"; did you mean 'x'?"`` for an unknown metric name of ``task``, or ``""``.

    The name is matched without case and punctuation, under the names papers and other
    libraries use (``S-alpha``, ``mIoU``, ``maxF``, ``Dice``...), then by spelling.
    """
    import difflib

    if not isinstance(name, str):
        return ""
    valid = [n for n, t in METRIC_TASK.items() if t == task]
    folded = _fold(name)
    found = {_fold(n): n for n in valid}.get(folded) or _ALIASES.get(folded)
    if found == "miou" and task == "binary":  # the binary task's IoU is per image
        found = "iou"
    if found in ("iou", "dice") and task == "multiclass":
        found = "miou"
    if found is None or METRIC_TASK.get(found) != task:
        close = difflib.get_close_matches(folded, valid, n=1, cutoff=0.6)
        found = close[0] if close else None
    return f"; did you mean {found!r}?" if found and found != name else ""


def _parameters(factory: Callable[..., Metric]) -> set[str]:
    params = inspect.signature(factory).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named - {"variant"}


def build_metrics(
    task: str, names: list[str] | None = None, **conventions: Any
) -> dict[str, Metric]:
    """Build fresh metric objects by registry name.

    Parameters
    ----------
    task
        ``"binary"`` or ``"multiclass"``.
    names
        Registry names (see ``METRICS``); None means ``DEFAULT_METRICS[task]``.
    **conventions
        Passed to each metric that takes them: binary ``threshold``, ``beta2``, ``empty_score``,
        ``gt_threshold``, ``normalize``, ``alpha``, ``ignore_index`` (void target value, None
        by default); multi-class ``num_classes`` (required) and
        ``ignore_index``.

    Returns
    -------
    dict
        Name -> ``torchmetrics.Metric``, in the order of ``names``.

    Raises
    ------
    ValueError
        An unknown task, metric name (or one of the other task) or convention, or a missing
        ``num_classes`` for a multi-class task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    names = list(DEFAULT_METRICS[task]) if names is None else list(names)
    valid = [n for n, t in METRIC_TASK.items() if t == task]
    for name in names:
        if name not in METRICS:
            raise ValueError(
                f"unknown metric {name!r} for task {task!r}{suggest_metric(name, task)} "
                f"(valid metrics: {', '.join(valid)})"
            )
        if METRIC_TASK[name] != task:
            raise ValueError(
                f"metric {name!r} is a {METRIC_TASK[name]} metric, not {task}; "
                f"valid metrics: {', '.join(valid)}"
            )
    unknown = sorted(set(conventions) - set(CONVENTIONS[task]))
    if unknown:
        raise ValueError(
            f"unknown convention(s) {', '.join(unknown)} for task {task!r}; "
            f"valid conventions: {', '.join(CONVENTIONS[task])}"
        )
    if task == "multiclass" and conventions.get("num_classes") is None:
        raise ValueError(
            "num_classes is required for multiclass metrics (build_metrics(..., num_classes=K))"
        )
    built = {}
    for name in names:
        factory = METRICS[name]
        accepted = _parameters(factory) | _COMMON[task]
        built[name] = factory(**{k: v for k, v in conventions.items() if k in accepted})
    return built
