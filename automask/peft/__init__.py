"""Parameter-efficient fine-tuning methods for the SAM segmenter.

Each method is one module of this package: its options dataclass, ``apply(model,
options)`` and a ``METHOD`` record; :data:`PEFT_METHODS` is the plain dict built from them,
in the order of the paper's table.
"""
from .base import (Adapter, EncoderHook, MethodOptions, PeftMethod, adapters, aux_loss,
                   merge_adapters, unmerge_adapters)
from .conv_lora import ConvLoRALinear, ConvLoRAOptions, set_conv_lora_routing
from .lora import LoRALinear, LoRAOptions
from .registry import PEFT_METHODS, apply_peft, get_method, make_options, option_users

__all__ = [
    "Adapter",
    "ConvLoRALinear",
    "ConvLoRAOptions",
    "EncoderHook",
    "LoRALinear",
    "LoRAOptions",
    "MethodOptions",
    "PEFT_METHODS",
    "PeftMethod",
    "adapters",
    "apply_peft",
    "aux_loss",
    "get_method",
    "make_options",
    "merge_adapters",
    "option_users",
    "set_conv_lora_routing",
    "unmerge_adapters",
]
