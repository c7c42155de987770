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

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from ..errors import DataValidationError
from .cache import SampleCache
from .crops import check_large_images
from .dataset import SegmentationDataset
from .loaders import EpochSampler, ShardSampler, _loader, default_num_workers, make_predict_loader
from .transforms import AugmentConfig
from .validation import DataSpec, image_key, warn_training_issues


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
    keep = _only_holders(spec, members) | _unlabelled(spec, members)
    if keep and len(members) - len(keep) >= 2:
        rest = np.array([g for g in range(len(members)) if g not in keep], dtype=np.int64)
        n_test = max(1, int(round(len(members) * holdout_frac)))
        frac = min(n_test, len(rest) - 1) / len(rest)
        rest_train, rest_val = split_positions(
            len(rest), frac, seed, None if foreground is None else foreground[rest])
        train_g = np.sort(np.concatenate([np.array(sorted(keep), dtype=np.int64),
                                          rest[rest_train]]))
        val_g = rest[rest_val]
    else:
        train_g, val_g = split_positions(len(members), holdout_frac, seed, foreground)
    train_pos = np.sort(np.concatenate([members[g] for g in train_g])).astype(np.int64)
    val_pos = np.sort(np.concatenate([members[g] for g in val_g])).astype(np.int64)
    if val_g.size and _unlabelled(spec, [members[g] for g in val_g]) == set(range(len(val_g))):
        shown = [str(p) for p in spec.frame[spec.image_col].iloc[val_pos[:3]]]
        raise DataValidationError(
            f"cannot hold out a validation split with a labelled pixel: the {len(val_pos)} "
            f"held-out row(s) ({', '.join(shown)}{', ...' if len(val_pos) > 3 else ''}) have "
            "masks that are void everywhere, so no epoch could be scored; pass tuning data "
            "or more labelled images")
    return spec.subset(train_pos), spec.subset(val_pos)


def _unlabelled(spec: DataSpec, members: list[list[int]]) -> set[int]:
    """Image groups whose every mask is void everywhere: nothing in them to validate on."""
    if spec.stats is None or "labelled" not in spec.stats.columns:
        return set()
    labelled = spec.stats["labelled"].to_numpy(dtype=np.float64)
    return {g for g, rows in enumerate(members) if (labelled[rows] == 0).all()}


def _only_holders(spec: DataSpec, members: list[list[int]]) -> set[int]:
    """Image groups that alone hold some class: of a multi-class spec (``classes`` stats),
    or the one image with foreground of a binary spec (``foreground`` stats), which held out
    would leave nothing to learn the objects from."""
    if spec.task == "binary" and spec.stats is not None and "foreground" in spec.stats.columns:
        foreground = np.nan_to_num(spec.stats["foreground"].to_numpy(dtype=np.float64))
        holders = {g for g, rows in enumerate(members) if (foreground[rows] > 0).any()}
        return holders if len(holders) == 1 else set()
    if spec.task != "multiclass" or spec.stats is None or "classes" not in spec.stats.columns:
        return set()
    per_row = spec.stats["classes"].tolist()
    holders: dict[int, set[int]] = {}
    for group, rows in enumerate(members):
        for pos in rows:
            for cls in per_row[pos] or ():
                holders.setdefault(int(cls), set()).add(group)
    return {next(iter(groups)) for groups in holders.values() if len(groups) == 1}


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
