"""Segmentation metrics exact to the reference implementations of the literature.

Binary (salient/camouflaged objects, polyps, shadows, lesions): ``sm``, ``em``, ``em_adp``,
``em_max``, ``wfm``, ``fm``, ``fm_adp``, ``fm_max``, ``mae`` (PySODMetrics protocol), ``iou``,
``dice``, ``iou_pooled``,
``dice_pooled``, ``ber``, ``ber_per_image``. Multi-class: ``acc``, ``miou``, ``iou_per_class``.
Every metric is a ``torchmetrics.Metric`` working on the tensors' device; each class docstring
states its convention and how it relates to PySODMetrics and the Conv-LoRA/SAM-Adapter code.

Scores are fractions in [0, 1] (papers often print them x100), except the E-measure,
which can exceed 1 slightly (see the README's metric definitions).

>>> from automask.metrics import score
>>> score([pred_map], [gt_mask])  # doctest: +SKIP
{'sm': ..., 'em': ..., 'wfm': ..., 'mae': ..., 'iou': ..., 'dice': ..., 'ber': ...}
"""
from automask._lazy import lazy_names

from automask.metrics.names import CONVENTIONS, DEFAULT_METRICS, HIGHER_IS_BETTER

# These load torchmetrics (about a second), so on first use: a saved predictor loads and
# predicts without them.
_SOURCES = {"METRICS": "registry", "build_metrics": "registry", "read_map": "folders",
            "score_folders": "folders", "infer_task": "scoring", "score": "scoring"}


__getattr__ = lazy_names(__name__, _SOURCES)

__all__ = [
    "CONVENTIONS",
    "DEFAULT_METRICS",
    "HIGHER_IS_BETTER",
    "METRICS",
    "build_metrics",
    "infer_task",
    "read_map",
    "score",
    "score_folders",
]
