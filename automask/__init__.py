"""automask: semantic segmentation with Segment Anything and Conv-LoRA.

>>> from automask import SemanticSegmentor
>>> seg = SemanticSegmentor(path="runs/demo").fit(train_df, presets="tiny")  # doctest: +SKIP
>>> masks = seg.predict(test_df)                                             # doctest: +SKIP

Importing ``automask`` is cheap: torch and Lightning load on first use of
``SemanticSegmentor`` (PEP 562 module ``__getattr__``), so that ``automask --help`` starts
fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names

__version__ = "0.1.0"

# public name -> submodule that defines it, imported on first access
_LAZY = {
    "PRESETS": "presets",
    "list_presets": "presets",
    "SemanticSegmentor": "segmentor",
    "is_main_process": "training.distributed",
}

if TYPE_CHECKING:  # pragma: no cover
    from .presets import PRESETS, list_presets
    from .segmentor import SemanticSegmentor
    from .training.distributed import is_main_process

__all__ = ["PRESETS", "SemanticSegmentor", "__version__", "is_main_process", "list_presets"]


__getattr__ = lazy_names(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
