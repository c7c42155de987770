"""``decoder_only``: the image encoder stays frozen; only the mask decoder trains."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import MethodOptions, PeftMethod


@dataclass(frozen=True)
class DecoderOnlyOptions(MethodOptions):
    """No options: the used parts of the mask decoder train (3.51M on vit_h)."""


def apply(model: nn.Module, options: DecoderOnlyOptions) -> None:
    """Nothing to add: :func:`~automask.peft.apply_peft` already made the decoder trainable."""


METHOD = PeftMethod("decoder_only", "Decoder-only", DecoderOnlyOptions, apply,
                    source="Kirillov et al. 2023 (SAM): the mask decoder alone is fine-tuned")
