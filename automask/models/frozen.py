"""Frozen linear weights held in bf16 while a CPU computes in bf16.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` every ``nn.Linear`` casts its float32
weight and bias to bf16 in each forward. autocast keeps a cast for the rest of its region
only for a parameter that trains; a frozen one is cast again in every forward, and a padded
window block's ``qkv`` twice (its padding row is ``qkv`` of a zero token). For vit_b that
is 86 M values per forward, each cast allocated, written and read. Cast once instead, a
256 px step on 2 CPU cores takes 0.94-0.98x the time in training and 0.90-0.93x in prediction
with Conv-LoRA or LoRA, a 512 px training step 0.97-0.98x (``benchmarks/bench_frozen.py``);
peak memory is unchanged (a training step keeps the casts for its backward pass anyway).

:func:`frozen_linears_in_bf16` casts them once, for a whole fit or prediction, and puts the
float32 originals back when it ends. The results are bit for bit the same: autocast would
round the same values the same way, and a weight already in bf16 is not cast again.
Only an ``nn.Linear`` that is frozen is held: such a layer always runs under autocast
here (the convolutions that run with autocast off, Conv-LoRA's experts, are not linear
layers), and outside autocast a bf16 weight meets a float32 input and raises instead of
computing something else. While they are held, :func:`restore_originals` gives a copy of
the model its float32 weights back (an export copies a model in float32).

Used on CPUs only: on a GPU a step's casts take about a millisecond.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

# id(parameter) -> (parameter, its float32 original), while held
_HELD: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}


@contextlib.contextmanager
def frozen_linears_in_bf16(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Hold the frozen float32 parameters of ``model``'s ``nn.Linear`` layers in bf16.

    Parameters
    ----------
    model : nn.Module
        Used only under a bf16 autocast while held.
    enabled : bool
        False: hold nothing (a float32 or fp16 run, a GPU).

    Yields
    ------
    int
        How many parameters are held (0 when nested in another hold of the same model).
    """
    held = []
    try:
        for module in model.modules() if enabled else ():
            if type(module) is not nn.Linear:  # subclasses may use their weights otherwise
                continue
            for param in module.parameters(recurse=False):
                if param.requires_grad or param.dtype != torch.float32 or id(param) in _HELD:
                    continue
                _HELD[id(param)] = (param, param.data)
                held.append(param)
                param.data = param.data.to(torch.bfloat16)
        yield len(held)
    finally:  # also when a cast above failed (out of memory): nothing stays half held
        for param in held:
            param.data = _HELD.pop(id(param))[1]


def restore_originals(model: nn.Module, copy: nn.Module) -> None:
    """Give ``copy`` (a deep copy of ``model``) the float32 originals of ``model``'s held
    parameters."""
    if not _HELD:
        return
    for source, target in zip(model.parameters(), copy.parameters(), strict=True):
        entry = _HELD.get(id(source))
        if entry is not None and entry[0] is source:
            target.data = entry[1].clone()
