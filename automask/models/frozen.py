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
ends, never under a forward still running in another thread. A child process forked
meanwhile ends the holds of the threads it does not have.

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
        if hasattr(os, "preadv"):  # by offset: a forked child shares the file's position
            done = 0
            while done < len(view):
                step = os.preadv(self.file.fileno(), [view[done:]], self.offset + done)
                if not step:
                    break
                done += step
        else:
            self.file.seek(self.offset)
            done = self.file.readinto(view)
        if done != len(view):
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
    of each thread share it."""

    __slots__ = ("param", "original", "name", "holds")

    def __init__(self, param: nn.Parameter, original: torch.Tensor | _Parked, name: str):
        self.param, self.original, self.name = param, original, name
        self.holds = {threading.get_ident(): 1}  # thread -> holds it has on the parameter

    def add(self) -> None:
        me = threading.get_ident()
        self.holds[me] = self.holds.get(me, 0) + 1

    def drop(self) -> bool:
        """End one hold of the calling thread (of any thread when it has none: a hold
        ended elsewhere than it began); True when no hold is left."""
        me = threading.get_ident()
        thread = me if me in self.holds else next(iter(self.holds), None)
        if thread is not None:
            self.holds[thread] -= 1
            if not self.holds[thread]:
                del self.holds[thread]
        return not self.holds


# id(parameter) -> its entry, while held. A hold that finds a parameter already held (a
# nested hold, or a prediction in another thread) shares it; the last one to end gives the
# original back, so no forward still running elsewhere sees its weight swapped.
_HELD: dict[int, _Entry] = {}
_LOCK = threading.Lock()  # guards _HELD and the swaps of ``param.data``


def _after_fork_in_child() -> None:
    """A forked child has only the thread that forked: it starts with a free lock (it would
    wait forever for one another thread held), and the holds of the parent's other threads
    (predictions running at the fork) end. Their float32 originals come back where they are
    in memory (a prediction's); parked ones (a fit's) come back when the child's own next
    hold of them ends, so the fork itself reads no file."""
    global _LOCK
    _LOCK = threading.Lock()
    me = threading.get_ident()
    for key, entry in list(_HELD.items()):
        entry.holds = {me: entry.holds[me]} if me in entry.holds else {}
        if not entry.holds and isinstance(entry.original, torch.Tensor):
            entry.param.data = entry.original
            del _HELD[key]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
                        entry.add()
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
            if not entry.drop():
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
