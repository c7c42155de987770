"""SAM backbones, checkpoint resolution and the segmenter (prompt-free by default)."""
from .backbones import BACKBONES, BackboneSpec
from .checkpoint import resolve_checkpoint
from .segmenter import Prompt, SamSegmenter, build_segmenter
from .summary import count_parameters, parameter_summary

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "Prompt",
    "SamSegmenter",
    "build_segmenter",
    "count_parameters",
    "parameter_summary",
    "resolve_checkpoint",
]
