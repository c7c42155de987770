"""Registry of metric names to their ``torchmetrics`` classes, and ``build_metrics()``; the
names' tasks, directions and aliases are in :mod:`automask.metrics.names`."""
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
from automask.metrics.names import _COMMON, CONVENTIONS, DEFAULT_METRICS, METRIC_TASK, check_names

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

assert list(METRICS) == list(METRIC_TASK), "names.METRIC_TASK lists every metric"


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
    if isinstance(names, str):
        names = [names]  # one name, not its letters
    check_names(task, [] if names is None else list(names))
    names = list(DEFAULT_METRICS[task]) if names is None else list(names)
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
