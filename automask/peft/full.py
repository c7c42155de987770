"""``full``: every parameter trainable (with random init: the paper's "SAM from scratch")."""
from __future__ import annotations

from torch import nn

from .options import PeftOptions


def apply_full(model: nn.Module, options: PeftOptions) -> None:
    """Make every parameter trainable.

    The parts the prompt-free forward never uses (IoU head, unused hypernetwork MLPs, prompt
    point embeddings and mask downscaling; see ``SamSegmenter.unused_parameter_names``) count
    as trainable, as in the paper's 641.09M, but receive no gradient: distributed training
    needs ``find_unused_parameters=True``.
    """
    model.requires_grad_(True)
