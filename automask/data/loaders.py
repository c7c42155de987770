"""Samplers and DataLoaders, without Lightning: what prediction needs and the fit's
:class:`~automask.data.SegmentationDataModule` builds on.

:class:`EpochSampler` shuffles training positions per epoch and passes the epoch along
with each position, so that the augmentation of a sample depends only on
``(seed, position, epoch)``; :class:`ShardSampler` gives each process of a distributed
fit its share of the validation samples; :func:`make_predict_loader` streams images in
order for prediction and evaluation. Kept apart from the DataModule so that loading a
predictor and predicting never imports Lightning (seconds at every start of
``automask predict``).
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..hardware import cpu_quota
from .dataset import SegmentationDataset, collate_samples
from .validation import DataSpec


def default_num_workers() -> int:
    """Loader worker processes for this machine: ``min(4, cpus - 1)``, 0 below 4 CPUs.

    On a machine with few cores the workers compete with the training step for the same
    cores and, with the sample cache, have little left to do after the first epoch; the
    loader benchmark (``benchmarks/bench_loader.py``) measured in-process loading as fast
    or faster on 2 cores.
    """
    cpus = _available_cpus()
    if cpus < 4:
        return 0
    return min(4, cpus - 1)


def _available_cpus() -> int:
    """CPUs this process may run on (its affinity), fewer under a CPU quota (a container's
    limit, :func:`automask.hardware.cpu_quota`)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota()
    return cpus if quota is None else max(1, min(cpus, math.floor(quota)))


class EpochSampler(Sampler):
    """Yields ``(position, epoch)`` pairs, shuffled per epoch under a seed.

    Lightning calls :meth:`set_epoch` before every epoch; used on its own the sampler
    moves to the next epoch after each full pass.

    In a distributed fit every process draws the same permutation (same seed and epoch)
    and keeps every ``world``-th position from its ``rank``: the processes see disjoint
    shares of one epoch. So that every process runs the same number of steps (DDP needs
    it), the permutation is padded with its own first positions up to a multiple of
    ``world``: at most ``world - 1`` samples are seen twice per epoch, none is dropped.

    Parameters
    ----------
    n : int
        Number of samples.
    shuffle : bool
        Shuffle with a generator seeded by ``(seed, epoch)``.
    seed : int
    rank, world : int
        This process's share of ``world`` shares (0 and 1: all samples).
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        assert 0 <= rank < world, (rank, world)
        self.n = int(n)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world = int(rank), int(world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n // self.world)  # ceil: every share has the same length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        self.epoch = epoch + 1
        if self.world > 1:
            padded = len(self) * self.world
            order = np.resize(order, padded)[self.rank::self.world]  # resize repeats from the start
        for position in order.tolist():
            yield position, epoch


class ShardSampler(Sampler):
    """Ordered positions ``rank, rank + world, ...`` of ``n`` samples, without padding.

    Used for validation in a distributed fit: each sample is evaluated by exactly one
    process, so that the metric reduced across processes equals the single-process one
    (padding would count some samples twice). Shares may differ in length by one.
    ``groups`` (one id per sample, a group's samples adjacent: the windows of one image)
    shares whole groups instead, ``rank, rank + world, ...`` of them, so that one process
    sees every window of an image.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1,
                 groups: Sequence[int] | None = None) -> None:
        assert 0 <= rank < world, (rank, world)
        self.n, self.rank, self.world = int(n), int(rank), int(world)
        if groups is None:
            self.items = list(range(self.rank, self.n, self.world))
        else:
            assert len(groups) == self.n, (len(groups), self.n)
            order = list(dict.fromkeys(groups))  # the groups in order of appearance
            mine = set(order[self.rank::self.world])
            self.items = [i for i, group in enumerate(groups) if group in mine]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[int]:
        return iter(self.items)


def _loader(
    dataset: SegmentationDataset,
    batch_size: int,
    num_workers: int,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    persistent: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=persistent and num_workers > 0,
        collate_fn=collate_samples,
    )


def make_predict_loader(
    spec: DataSpec,
    input_size: int,
    batch_size: int,
    num_workers: int | None = None,
    with_labels: bool | None = None,
    value_range: tuple[float, float] | None = None,
    resize: str = "longest_side",
    interpolation: str = "bilinear",
) -> DataLoader:
    """A streaming, ordered loader for prediction or evaluation (no cache, no augment).

    Parameters
    ----------
    spec : DataSpec
    input_size : int
    batch_size : int
    num_workers : int, optional
        Default :func:`default_num_workers`.
    with_labels : bool, optional
        Load targets; default: when ``spec`` has a label column.
    value_range : tuple of float, optional
        ``(low, high)`` for images with more than 8 bits per sample (the model's
        ``data.image_range``); None: each file by its own rule.
    resize : {"longest_side", "square"}
        The model's ``data.resize``.
    interpolation : {"bilinear", "bicubic"}
        The model's ``data.interpolation``.
    """
    if with_labels is None:
        with_labels = spec.label_col is not None
    workers = default_num_workers() if num_workers is None else int(num_workers)
    dataset = SegmentationDataset(
        spec, input_size, augment=None, cache=None, with_labels=with_labels,
        value_range=value_range, resize=resize, interpolation=interpolation,
    )
    return _loader(dataset, int(batch_size), workers)
