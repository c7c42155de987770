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

With ``park=True`` (what a fit asks for) the float32 originals wait in one temporary file
(in ``tempfile.gettempdir()``, deleted when the hold ends or the process dies) instead of in
memory, and are read back bit for bit at the end: the process holds only the bf16 copies,
0.17 GB for vit_b's frozen linear weights instead of 0.51 GB, 1.3 GB for vit_h's instead of
3.8 GB. For vit_b the write added 0.03-1.6 s to the start of a hold (under 0.11 s in four
runs of five) and the read 0.05-0.15 s to its end, once per fit. When the file cannot be
written (a full disk) the rest stay in memory, with a warning.

Holds nest and may run in several threads at once (predictions served concurrently): a
parameter already held is shared, and its original comes back when the last hold sharing it
ends, never under a forward still running in another thread.

Used on CPUs only: on a GPU a step's casts take about a millisecond.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import warnings
from typing import Iterator

import torch
from torch import nn


class _Parked:
    """A float32 tensor's values in a :class:`_ParkingFile`."""

    __slots__ = ("file", "offset", "shape")

    def __init__(self, file, offset: int, shape: torch.Size):
        self.file, self.offset, self.shape = file, offset, shape

    def load(self) -> torch.Tensor:
        """A new float32 tensor with the parked values."""
        out = torch.empty(self.shape, dtype=torch.float32)
        view = memoryview(out.numpy()).cast("B")
        self.file.seek(self.offset)
        if self.file.readinto(view) != len(view):
            raise OSError(f"the temporary file of held float32 weights ended early "
                          f"(offset {self.offset}, {len(view)} bytes)")
        return out


class _ParkingFile:
    """An anonymous temporary file that float32 originals are written to, one after the
    other."""

    def __init__(self):
        self.file = None
        self.failed = False

    def put(self, tensor: torch.Tensor) -> torch.Tensor | _Parked:
        """Write ``tensor`` (contiguous float32 on a CPU) to the file; returns where, or the
        tensor itself when it cannot be written."""
        if self.failed or not tensor.is_contiguous() or tensor.device.type != "cpu":
            return tensor
        try:
            if self.file is None:
                self.file = tempfile.TemporaryFile(prefix="automask-frozen-")
            offset = self.file.seek(0, 2)
            self.file.write(memoryview(tensor.numpy()).cast("B"))
            self.file.flush()  # a full disk fails here, not when reading back
        except OSError as exc:
            self.failed = True
            warnings.warn(f"could not write frozen float32 weights to a temporary file in "
                          f"{tempfile.gettempdir()!r} ({exc}); keeping them in memory",
                          RuntimeWarning, stacklevel=4)
            return tensor
        return _Parked(self.file, offset, tensor.shape)


class _Entry:
    """A held parameter: its float32 original (or where it is parked) and how many holds
    share it."""

    __slots__ = ("param", "original", "name", "holders")

    def __init__(self, param: nn.Parameter, original: torch.Tensor | _Parked, name: str):
        self.param, self.original, self.name, self.holders = param, original, name, 1


# id(parameter) -> its entry, while held. A hold that finds a parameter already held (a
# nested hold, or a prediction in another thread) shares it; the last one to end gives the
# original back, so no forward still running elsewhere sees its weight swapped.
_HELD: dict[int, _Entry] = {}
_LOCK = threading.Lock()  # guards _HELD and the swaps of ``param.data``


def _new_lock_in_forked_child() -> None:
    """A child forked while another thread held the lock starts with a free one (it would
    wait forever otherwise). Holds inherited from the parent's running predictions stay
    counted, so their bf16 copies stay: the same numbers, a little more memory."""
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_forked_child)


def is_held(param: torch.Tensor) -> bool:
    """True while :func:`frozen_linears_in_bf16` holds ``param`` in bf16 (its float32
    original comes back when the hold ends, so changes made to it meanwhile are lost)."""
    entry = _HELD.get(id(param))
    return entry is not None and entry.param is param


@contextlib.contextmanager
def frozen_linears_in_bf16(model: nn.Module, enabled: bool = True,
                           park: bool = False) -> Iterator[int]:
    """Hold the frozen float32 parameters of ``model``'s ``nn.Linear`` layers in bf16.

    Holds may nest and may run in several threads at once (predictions served
    concurrently): a parameter already held is shared, and goes back to float32 when the
    last hold sharing it ends.

    Parameters
    ----------
    model : nn.Module
        Used only under a bf16 autocast while held.
    enabled : bool
        False: hold nothing (a float32 or fp16 run, a GPU).
    park : bool
        Keep the float32 originals in a temporary file rather than in memory while held
        (a long run such as a fit: less memory, a write and a read of them once).

    Yields
    ------
    int
        How many parameters this hold cast (0 when another hold of the same model is on).
    """
    entries: list[_Entry] = []
    cast_here = 0
    parking = _ParkingFile() if enabled and park else None
    try:
        with _LOCK:
            for prefix, module in model.named_modules() if enabled else ():
                if type(module) is not nn.Linear:  # subclasses may use their weights otherwise
                    continue
                for name, param in module.named_parameters(recurse=False):
                    entry = _HELD.get(id(param))
                    if entry is not None and entry.param is param:  # held by another hold
                        entry.holders += 1
                        entries.append(entry)
                        continue
                    if param.requires_grad or param.dtype != torch.float32:
                        continue
                    cast = param.data.to(torch.bfloat16)
                    original = param.data if parking is None else parking.put(param.data)
                    entry = _HELD[id(param)] = _Entry(param, original, f"{prefix}.{name}")
                    entries.append(entry)
                    param.data = cast
                    cast_here += 1
        yield cast_here
    finally:  # also when a cast above failed (out of memory): nothing stays half held
        if not sys.is_finalizing():  # (a hold never ended, the interpreter is: nothing to do)
            _release(entries, parking)


def _release(entries: list[_Entry], parking: _ParkingFile | None) -> None:
    """End one hold of ``entries``: the float32 originals of those no other hold shares go
    back; a parking file no held parameter uses any more is closed."""
    failure = None
    files = {parking.file} if parking is not None and parking.file is not None else set()
    with _LOCK:
        for entry in entries:
            entry.holders -= 1
            if entry.holders:
                continue
            del _HELD[id(entry.param)]
            original = entry.original
            try:
                if isinstance(original, _Parked):
                    files.add(original.file)
                    original = original.load()
                entry.param.data = original
            except (OSError, ValueError, RuntimeError) as exc:  # the others first
                failure = failure or RuntimeError(
                    f"could not read back the frozen float32 weights of {entry.name!r}: "
                    f"they stay in bf16 ({exc})")
        in_use = {e.original.file for e in _HELD.values() if isinstance(e.original, _Parked)}
        for file in files - in_use:
            file.close()
    if failure is not None:
        raise failure


def restore_originals(model: nn.Module, copy: nn.Module) -> None:
    """Give ``copy`` (a deep copy of ``model``) the float32 originals of ``model``'s held
    parameters."""
    with _LOCK:  # another thread's hold may end meanwhile
        for source, target in zip(model.parameters(), copy.parameters(), strict=True):
            entry = _HELD.get(id(source))
            if entry is not None and entry.param is source:
                original = entry.original
                target.data = (original.clone() if isinstance(original, torch.Tensor)
                               else original.load())
