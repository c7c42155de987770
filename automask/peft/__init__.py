"""Parameter-efficient fine-tuning methods for the SAM segmenter."""
from .conv_lora import ConvLoRALinear
from .inject import aux_loss, merge_adapters, unmerge_adapters
from .lora import LoRALinear
from .methods import PEFT_METHODS, apply_peft
from .options import PeftOptions

__all__ = [
    "ConvLoRALinear",
    "LoRALinear",
    "PEFT_METHODS",
    "PeftOptions",
    "apply_peft",
    "aux_loss",
    "merge_adapters",
    "unmerge_adapters",
]
