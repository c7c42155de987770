"""``bitfit``: every bias of the image encoder trains (Ben Zaken et al., 2022).

On vit_h: the biases of every block's norms, ``qkv``, ``proj`` and MLP layers, of the
patch embedding and of the neck's LayerNorms: 452,352 parameters, which with the decoder
gives the paper's 3.96M (0.62%). Starts as the identity: no weight changes at init.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import TARGET_ROOT, MethodOptions, PeftMethod


@dataclass(frozen=True)
class BitFitOptions(MethodOptions):
    """No options: every bias of the image encoder trains."""


def apply(model: nn.Module, options: BitFitOptions) -> None:
    """Unfreeze every parameter named ``bias`` in the image encoder."""
    for name, param in getattr(model, TARGET_ROOT).named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            param.requires_grad_(True)


METHOD = PeftMethod("bitfit", "BitFit", BitFitOptions, apply,
                    source="Ben Zaken et al. 2022, 'BitFit': bias terms only")
