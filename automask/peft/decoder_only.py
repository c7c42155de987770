"""``decoder_only``: the image encoder stays frozen; only the mask decoder trains."""
from __future__ import annotations

from torch import nn

from .inject import mark_decoder_trainable
from .options import PeftOptions


def apply_decoder_only(model: nn.Module, options: PeftOptions) -> None:
    """Train the used parts of the mask decoder only (3.51M parameters on vit_h)."""
    mark_decoder_trainable(model)
