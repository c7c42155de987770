"""SAM backbones, checkpoint resolution and the prompt-free segmenter."""
from .backbones import BACKBONES, BackboneSpec
from .checkpoint import resolve_checkpoint
from .segmenter import SamSegmenter, build_segmenter
from .summary import count_parameters, parameter_summary

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "SamSegmenter",
    "build_segmenter",
    "count_parameters",
    "parameter_summary",
    "resolve_checkpoint",
]
