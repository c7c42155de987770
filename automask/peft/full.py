"""``full``: every parameter of the pretrained model trains (not a PEFT method: the ceiling)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import MethodOptions, PeftMethod


@dataclass(frozen=True)
class FullOptions(MethodOptions):
    """No options: everything trains."""


def apply(model: nn.Module, options: FullOptions) -> None:
    """Make every parameter trainable.

    The parts the prompt-free forward never uses (IoU head, unused hypernetwork MLPs, prompt
    point embeddings and mask downscaling; see ``SamSegmenter.unused_parameter_names``) count
    as trainable, as in the paper's 641.09M, but receive no gradient: distributed training
    needs ``find_unused_parameters=True``.
    """
    model.requires_grad_(True)


METHOD = PeftMethod("full", "Full fine-tuning", FullOptions, apply, unused_parameters=True,
                    source="every weight of the pretrained SAM trains")
