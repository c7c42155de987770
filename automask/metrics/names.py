"""Metric names and what is known of each without building it: its task, its direction,
the conventions a task takes, and the names papers and other libraries use for it.

Kept apart from :mod:`automask.metrics.registry` (which builds ``torchmetrics`` objects) so
that a saved predictor's metric can be checked, and a predictor loaded to predict, without
importing torchmetrics (about a second at every start of ``automask predict``).
"""
from __future__ import annotations

from typing import Any

TASKS = ("binary", "multiclass")

METRIC_TASK: dict[str, str] = {  # every registry name -> its task, in the registry's order
    **dict.fromkeys(("sm", "em", "em_adp", "em_max", "wfm", "fm", "fm_adp", "fm_max", "mae",
                     "iou", "dice", "iou_pooled", "dice_pooled", "ber", "ber_per_image"),
                    "binary"),
    **dict.fromkeys(("acc", "miou", "iou_per_class"), "multiclass"),
}

DEFAULT_METRICS: dict[str, list[str]] = {
    "binary": ["sm", "em", "wfm", "mae", "iou", "dice", "ber"],
    "multiclass": ["acc", "miou", "iou_per_class"],
}

HIGHER_IS_BETTER: dict[str, bool] = {
    name: name not in ("mae", "ber", "ber_per_image") for name in METRIC_TASK
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


_MEAN_CLASS_ACCURACY = {"macc", "meanacc", "meanaccuracy", "mpa", "meanpixelaccuracy",
                        "classaccuracy", "meanclassaccuracy", "balancedaccuracy"}
_MEAN_DICE = {"mdice", "meandice", "mdsc", "meandsc", "mf1", "meanf1"}


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
    if folded in _MEAN_CLASS_ACCURACY:  # not 'acc', a pixel accuracy
        return "; a mean class accuracy is not offered ('acc' is the pixel accuracy)"
    found = ({_fold(n): n for n in valid}.get(folded) or _ALIASES.get(folded)
             or {_fold(n): n for n in METRIC_TASK}.get(folded))  # another task's 'dice'
    if folded in _MEAN_DICE:
        found = "dice"
    if found == "miou" and task == "binary":  # the binary task's IoU is per image
        found = "iou"
    if found == "iou" and task == "multiclass":
        found = "miou"
    if found == "dice" and task == "multiclass":  # not the mean IoU under another name
        return "; a multi-class Dice is not offered (the mean IoU is 'miou')"
    if found is None or METRIC_TASK.get(found) != task:
        close = difflib.get_close_matches(folded, valid, n=1, cutoff=0.6)
        found = close[0] if close else None
    return f"; did you mean {found!r}?" if found and found != name else ""


def check_names(task: str, names: list[str]) -> None:
    """ValueError for an unknown task, or a name that is not a metric of ``task``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    valid = [n for n, t in METRIC_TASK.items() if t == task]
    for name in names:
        if name not in METRIC_TASK:
            raise ValueError(
                f"unknown metric {name!r} for task {task!r}{suggest_metric(name, task)} "
                f"(valid metrics: {', '.join(valid)})"
            )
        if METRIC_TASK[name] != task:
            raise ValueError(
                f"metric {name!r} is a {METRIC_TASK[name]} metric, not {task}; "
                f"valid metrics: {', '.join(valid)}"
            )
