"""Lightning DataModule: holdout split, datasets, loaders and the sample cache.

When no tuning data is given, :meth:`SegmentationDataModule.setup` holds out a fraction
of the training rows, stratified on foreground-fraction bins for binary tasks (a plain
seeded split for multi-class). Training batches are shuffled and augmented with a
:class:`EpochSampler`, which passes the epoch along with each position so that the
augmentation of a sample depends only on ``(seed, position, epoch)``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import DataValidationError
from .cache import SampleCache
from .dataset import SegmentationDataset, collate_samples
from .transforms import AugmentConfig
from .validation import DataSpec, warn_training_issues


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
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class EpochSampler(Sampler):
    """Yields ``(position, epoch)`` pairs, shuffled per epoch under a seed.

    Lightning calls :meth:`set_epoch` before every epoch; used on its own the sampler
    moves to the next epoch after each full pass.

    Parameters
    ----------
    n : int
        Number of samples.
    shuffle : bool
        Shuffle with a generator seeded by ``(seed, epoch)``.
    seed : int
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0) -> None:
        self.n = int(n)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        self.epoch = epoch + 1
        for position in order.tolist():
            yield position, epoch


def split_spec(
    spec: DataSpec, holdout_frac: float, seed: int = 0
) -> tuple[DataSpec, DataSpec]:
    """Split a labelled spec into (train, holdout) specs.

    The split is made over distinct image files, so that rows repeating an image (same
    path after resolving links) all land on the same side and no validation image is
    also trained on. Binary tasks are stratified on foreground-fraction bins (see
    :func:`automask.datasets.split.split_positions`; a repeated image counts with its
    rows' mean foreground); multi-class tasks get a plain seeded split. Without repeated
    images the split is the same as a split of the rows.
    """
    from ..datasets.split import split_positions  # late import: datasets imports data

    if not 0.0 < holdout_frac < 1.0:
        raise ValueError(f"holdout_frac must be in (0, 1), got {holdout_frac!r}")
    if len(spec) < 2:
        raise DataValidationError(
            f"cannot hold out a validation split from {len(spec)} row(s); pass tuning data "
            "or more rows"
        )
    groups: dict[str, list[int]] = {}
    for pos, path in enumerate(spec.frame[spec.image_col]):
        groups.setdefault(os.path.normcase(os.path.realpath(str(path))), []).append(pos)
    members = list(groups.values())  # one list of row positions per distinct image
    if len(members) < 2:
        raise DataValidationError(
            f"cannot hold out a validation split: the {len(spec)} row(s) show only one "
            f"image ({spec.frame[spec.image_col].iat[0]}); pass tuning data or more images"
        )
    foreground = None
    if spec.task == "binary" and spec.stats is not None and "foreground" in spec.stats.columns:
        per_row = np.nan_to_num(spec.stats["foreground"].to_numpy(dtype=np.float64), nan=0.0)
        foreground = np.array([per_row[rows].mean() for rows in members])
    train_g, val_g = split_positions(len(members), holdout_frac, seed, foreground)
    train_pos = np.sort(np.concatenate([members[g] for g in train_g])).astype(np.int64)
    val_pos = np.sort(np.concatenate([members[g] for g in val_g])).astype(np.int64)
    return spec.subset(train_pos), spec.subset(val_pos)


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
    """
    if with_labels is None:
        with_labels = spec.label_col is not None
    workers = default_num_workers() if num_workers is None else int(num_workers)
    dataset = SegmentationDataset(
        spec, input_size, augment=None, cache=None, with_labels=with_labels
    )
    return _loader(dataset, int(batch_size), workers)


class SegmentationDataModule(L.LightningDataModule):
    """Splitting, datasets and loaders for one fit.

    Parameters
    ----------
    spec : DataSpec
        Validated training data (with labels).
    input_size : int
        Model input side ``S``.
    batch_size : int
    tuning_spec : DataSpec, optional
        Validation data; when None, ``holdout_frac`` of ``spec`` is held out.
    holdout_frac : float
    seed : int
        Seeds the split, the shuffling and the augmentation.
    augment : AugmentConfig, optional
        Training augmentation (None: none).
    num_workers : int, optional
        Loader processes; default :func:`default_num_workers`.
    cache_dir : path, optional
        Folder for the on-disk part of the sample cache (e.g. under the run directory);
        None keeps the cache in memory only.
    cache_memory_mb : int
        In-memory cache budget in MiB (0 disables the in-memory part).
    prompts : {None, "box", "points", "box_or_points"}
        Prompts drawn from the training masks (``data.prompts``); validation stays
        prompt-free.
    prompt_rate : float
        Fraction of training samples that get a prompt (``data.prompt_rate``).

    Attributes
    ----------
    train_spec, val_spec : DataSpec
        The split, after :meth:`setup`.
    cache : SampleCache
    """

    def __init__(
        self,
        spec: DataSpec,
        *,
        input_size: int,
        batch_size: int,
        tuning_spec: DataSpec | None = None,
        holdout_frac: float = 0.2,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        num_workers: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_memory_mb: int = 1024,
        prompts: str | None = None,
        prompt_rate: float = 1.0,
    ) -> None:
        super().__init__()
        if spec.label_col is None:
            raise DataValidationError("training data needs a label column")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.spec = spec
        self.input_size = int(input_size)
        self.batch_size = int(batch_size)
        self.tuning_spec = tuning_spec
        self.holdout_frac = float(holdout_frac)
        self.seed = int(seed)
        self.augment = augment
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        directory = Path(cache_dir) if cache_dir is not None else None
        self.cache = SampleCache(cache_memory_mb, directory)
        self.prompts, self.prompt_rate = prompts, float(prompt_rate)
        self.train_spec: DataSpec | None = None
        self.val_spec: DataSpec | None = None
        self._train_sampler: EpochSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        """Warn about suspicious training data (see
        :func:`~automask.data.validation.warn_training_issues`), then split (once) into
        ``train_spec`` and ``val_spec``."""
        if self.train_spec is not None:
            return
        warn_training_issues(self.spec, self.tuning_spec)
        if self.tuning_spec is not None:
            self.train_spec, self.val_spec = self.spec, self.tuning_spec
        else:
            self.train_spec, self.val_spec = split_spec(self.spec, self.holdout_frac, self.seed)

    def _require_setup(self) -> None:
        if self.train_spec is None:
            self.setup("fit")

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented batches; the last partial batch is dropped only when the
        training set holds more than one batch."""
        self._require_setup()
        dataset = SegmentationDataset(
            self.train_spec, self.input_size, augment=self.augment, cache=self.cache,
            seed=self.seed, prompts=self.prompts, prompt_rate=self.prompt_rate,
        )
        self._train_sampler = EpochSampler(len(dataset), shuffle=True, seed=self.seed)
        return _loader(
            dataset, self.batch_size, self.num_workers, sampler=self._train_sampler,
            drop_last=len(dataset) > self.batch_size, persistent=True,
        )

    def val_dataloader(self) -> DataLoader:
        """Ordered, un-augmented validation batches (cached like training samples)."""
        self._require_setup()
        dataset = SegmentationDataset(
            self.val_spec, self.input_size, augment=None, cache=self.cache
        )
        return _loader(dataset, self.batch_size, self.num_workers, persistent=True)

    def predict_dataloader_for(
        self, spec: DataSpec, batch_size: int | None = None, num_workers: int | None = None
    ) -> DataLoader:
        """:func:`make_predict_loader` at this module's input size."""
        return make_predict_loader(
            spec, self.input_size, batch_size or self.batch_size,
            self.num_workers if num_workers is None else num_workers,
        )
