"""automask: semantic segmentation with Segment Anything and Conv-LoRA.

>>> from automask import SemanticSegmentor
>>> seg = SemanticSegmentor(path="runs/demo").fit(train_df, presets="tiny")  # doctest: +SKIP
>>> masks = seg.predict(test_df)                                             # doctest: +SKIP
"""
__version__ = "0.1.0"

from .presets import PRESETS, list_presets
from .segmentor import SemanticSegmentor

__all__ = ["PRESETS", "SemanticSegmentor", "__version__", "list_presets"]
