"""``scratch``: the paper's "SAM trained from scratch" row: random weights, everything trains.

It is :mod:`~automask.peft.full` on a randomly initialised model, under its own name so
that a table cannot confuse it with pretrained full fine-tuning: the model is built with
random weights whatever ``model.checkpoint`` says (641.09M trainable on vit_h, 100%).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import MethodOptions, PeftMethod


@dataclass(frozen=True)
class ScratchOptions(MethodOptions):
    """No options: everything trains, from random initialisation."""


def apply(model: nn.Module, options: ScratchOptions) -> None:
    """Make every parameter trainable (the builder has already used random weights)."""
    model.requires_grad_(True)


METHOD = PeftMethod("scratch", "SAM (from scratch)", ScratchOptions, apply, random_init=True,
                    unused_parameters=True,
                    source="Zhong et al. 2024, Table 1: SAM's architecture trained from random "
                           "initialisation")
