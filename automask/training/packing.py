"""Resume checkpoints with their many small tensors packed into a few flat ones.

``torch.save`` pickles a tensor as a score of small objects, each through a Python call,
so a checkpoint's time goes with its number of tensors more than its bytes. A resume
checkpoint holds five tensors for each trainable one (the weights, AdamW's two moments and
its step, the best epoch's copy): about 1,700 for vit_b with Conv-LoRA, 1,000 for the
``tiny`` preset, written after every epoch. Packed here into one flat tensor per dtype
and device, each replaced by a reference into it, and unpacked when the checkpoint is
loaded, before Lightning restores anything from it: the same values, bit for bit.

Only tensors of at most 1 MiB held in dicts and lists are packed, and only plain dense
ones; anything else (a large tensor, a tensor in a tuple, a tensor subclass, a sparse or
quantised tensor) is saved as it is.
The references are ``(MARKER, index)`` tuples, which ``torch.load(weights_only=True)``
reads.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

KEY = "automask_packed_tensors"  # the checkpoint entry: {"flat": [...], "tensors": [...]}
MARKER = "automask.packed_tensor"


def pack_tensors(checkpoint: dict) -> None:
    """Pack the small tensors of ``checkpoint`` (nested dicts and lists).

    Each packed tensor is replaced by ``(MARKER, i)``, and ``checkpoint[KEY]`` holds the
    flat tensors, one per (dtype, device), and for each packed tensor its flat tensor,
    offset and shape. Only the top-level dict changes: the nested dicts and lists are new
    ones, because a checkpoint shares them with their owners (an optimiser's
    ``state_dict()`` hands out its own per-parameter dicts). Tensors above ``SMALL_BYTES``
    stay as they are: for them the bytes, not the pickling, take the time, and packing
    them would copy them.
    """
    assert KEY not in checkpoint, "packed twice"
    found: list[torch.Tensor] = []
    for key, value in list(checkpoint.items()):
        checkpoint[key] = _replace(value, found)
    if not found:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(found):
        groups.setdefault((t.dtype, t.device), []).append(i)
    flat, where = [], [None] * len(found)
    with torch.no_grad():
        for members in groups.values():
            offset = 0
            for i in members:
                where[i] = (len(flat), offset, tuple(found[i].shape))
                offset += found[i].numel()
            flat.append(torch.cat([found[i].reshape(-1) for i in members]))  # (sum numel,)
    checkpoint[KEY] = {"flat": flat, "tensors": where}


def unpack_tensors(checkpoint: dict) -> None:
    """Undo :func:`pack_tensors` in place: each reference becomes a tensor of its own
    again (a copy, so that none keeps the whole flat tensor alive). A checkpoint that
    was not packed is left as it is."""
    packed = checkpoint.pop(KEY, None)
    if packed is None:
        return
    flat, where = packed["flat"], packed["tensors"]
    tensors = []
    for index, offset, shape in where:
        numel = math.prod(shape)
        tensors.append(flat[index][offset:offset + numel].view(shape).clone())
    del flat, packed
    for key, value in list(checkpoint.items()):
        checkpoint[key] = _restore(value, tensors)


# Larger tensors are saved as they are: their bytes, not their pickling, take the time,
# and packing would copy them.
SMALL_BYTES = 2**20


def _packable(value: object) -> bool:
    return (type(value) is torch.Tensor and value.layout == torch.strided
            and not value.is_quantized and value.device.type != "meta"
            and value.numel() * value.element_size() <= SMALL_BYTES)


def _replace(value: object, found: list[torch.Tensor]) -> object:
    """``value`` with its packable tensors replaced by references (appended to ``found``);
    dicts, OrderedDicts and lists are rebuilt, anything else is returned as it is."""
    if _packable(value):
        found.append(value.detach())
        return (MARKER, len(found) - 1)
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _replace(v, found)) for k, v in value.items())
    if type(value) is list:
        return [_replace(v, found) for v in value]
    return value


def _restore(value: object, tensors: list[torch.Tensor]) -> object:
    if (type(value) is tuple and len(value) == 2 and isinstance(value[0], str)
            and value[0] == MARKER):
        return tensors[value[1]]
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _restore(v, tensors)) for k, v in value.items())
    if type(value) is list:
        return [_restore(v, tensors) for v in value]
    return value
