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
from typing import Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import DataValidationError
from .cache import SampleCache
from .crops import check_large_images
from .dataset import SegmentationDataset, collate_samples
from .transforms import AugmentConfig
from .validation import DataSpec, image_key, warn_training_issues


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


def split_spec(
    spec: DataSpec, holdout_frac: float, seed: int = 0
) -> tuple[DataSpec, DataSpec]:
    """Split a labelled spec into (train, holdout) specs.

    The split is made over distinct image files, so that rows repeating an image (same
    path after resolving links) all land on the same side and no validation image is
    also trained on. Binary tasks are stratified on foreground-fraction bins (see
    :func:`automask.datasets.split.split_positions`; a repeated image counts with its
    rows' mean foreground); multi-class tasks get a seeded split in which an image holding
    a class that no other image holds stays on the training side (held out, that class
    would never be trained on), as long as two or more other images remain to split.
    Without repeated images the split is the same as a split of the rows.
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
        groups.setdefault(image_key(path), []).append(pos)
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
    keep = _only_holders(spec, members)
    if keep and len(members) - len(keep) >= 2:
        rest = np.array([g for g in range(len(members)) if g not in keep], dtype=np.int64)
        n_test = max(1, int(round(len(members) * holdout_frac)))
        frac = min(n_test, len(rest) - 1) / len(rest)
        rest_train, rest_val = split_positions(len(rest), frac, seed)
        train_g = np.sort(np.concatenate([np.array(sorted(keep), dtype=np.int64),
                                          rest[rest_train]]))
        val_g = rest[rest_val]
    else:
        train_g, val_g = split_positions(len(members), holdout_frac, seed, foreground)
    train_pos = np.sort(np.concatenate([members[g] for g in train_g])).astype(np.int64)
    val_pos = np.sort(np.concatenate([members[g] for g in val_g])).astype(np.int64)
    return spec.subset(train_pos), spec.subset(val_pos)


def _only_holders(spec: DataSpec, members: list[list[int]]) -> set[int]:
    """Image groups that alone hold some class (multi-class specs with ``classes`` stats)."""
    if spec.task != "multiclass" or spec.stats is None or "classes" not in spec.stats.columns:
        return set()
    per_row = spec.stats["classes"].tolist()
    holders: dict[int, set[int]] = {}
    for group, rows in enumerate(members):
        for pos in rows:
            for cls in per_row[pos] or ():
                holders.setdefault(int(cls), set()).add(group)
    return {next(iter(groups)) for groups in holders.values() if len(groups) == 1}


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
    large_images : {"auto", "crop", "resize"}
        ``data.large_images``: training on random native-scale crops of images much
        larger than the input, validation on their non-overlapping window grid
        (:mod:`automask.data.crops`); ``"resize"`` resizes every image.
    prompts : {None, "box", "points", "box_or_points"}
        Prompts drawn from the training masks (``data.prompts``); validation stays
        prompt-free.
    prompt_rate : float
        Fraction of training samples that get a prompt (``data.prompt_rate``).
    value_range : tuple of float, optional
        ``(low, high)`` for images with more than 8 bits per sample (``data.image_range``
        resolved); None: each file by its own rule.
    resize : {"longest_side", "square"}
        ``data.resize``: whole images keep their aspect ratio (padded) or are stretched.
    interpolation : {"bilinear", "bicubic"}
        ``data.interpolation``: Pillow's filter for that resize.

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
        large_images: str = "auto",
        prompts: str | None = None,
        prompt_rate: float = 1.0,
        value_range: tuple[float, float] | None = None,
        resize: str = "longest_side",
        interpolation: str = "bilinear",
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
        self.large_images = check_large_images(large_images)
        directory = Path(cache_dir) if cache_dir is not None else None
        self.cache = SampleCache(cache_memory_mb, directory)
        self.prompts, self.prompt_rate = prompts, float(prompt_rate)
        self.value_range = value_range
        self.resize = resize
        self.interpolation = interpolation
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
        """Shuffled, augmented batches: every training sample once per epoch (the last
        batch may be smaller; in a distributed fit see :class:`EpochSampler` for padding)."""
        self._require_setup()
        dataset = SegmentationDataset(
            self.train_spec, self.input_size, augment=self.augment, cache=self.cache,
            seed=self.seed, large_images=self.large_images, crops="random",
            prompts=self.prompts, prompt_rate=self.prompt_rate, value_range=self.value_range,
            resize=self.resize, interpolation=self.interpolation,
        )
        rank, world = self._shard()
        self._train_sampler = EpochSampler(len(dataset), shuffle=True, seed=self.seed,
                                           rank=rank, world=world)
        return _loader(
            dataset, self.batch_size, self.num_workers, sampler=self._train_sampler,
            persistent=True,
        )

    def val_dataloader(self) -> DataLoader:
        """Ordered, un-augmented validation batches (cached like training samples); a
        cropped image gives one item per window of its grid."""
        self._require_setup()
        dataset = SegmentationDataset(
            self.val_spec, self.input_size, augment=None, cache=self.cache,
            large_images=self.large_images, crops="grid", value_range=self.value_range,
            resize=self.resize, interpolation=self.interpolation,
        )
        rank, world = self._shard()
        sampler = (ShardSampler(len(dataset), rank, world, dataset.item_positions())
                   if world > 1 else None)  # an image's windows to one process
        return _loader(dataset, self.batch_size, self.num_workers, sampler=sampler,
                       persistent=True)

    def _shard(self) -> tuple[int, int]:
        """``(rank, world)`` of this process in a distributed fit; ``(0, 1)`` otherwise.

        The loaders shard the data themselves (the Trainer runs with
        ``use_distributed_sampler=False``): training with :class:`EpochSampler`,
        validation with :class:`ShardSampler`.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return 0, 1
        if len(self.val_spec) < trainer.world_size:
            raise DataValidationError(
                f"the validation split holds {len(self.val_spec)} image(s), fewer than the "
                f"{trainer.world_size} processes of this fit; give each process at least one "
                "(more tuning data or a larger 'data.holdout_frac')"
            )
        return trainer.global_rank, trainer.world_size

    def predict_dataloader_for(
        self, spec: DataSpec, batch_size: int | None = None, num_workers: int | None = None
    ) -> DataLoader:
        """:func:`make_predict_loader` at this module's input size."""
        return make_predict_loader(
            spec, self.input_size, batch_size or self.batch_size,
            self.num_workers if num_workers is None else num_workers,
            value_range=self.value_range, resize=self.resize,
            interpolation=self.interpolation,
        )
