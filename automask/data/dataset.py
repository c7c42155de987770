"""A torch Dataset over a validated :class:`~automask.data.validation.DataSpec`.

Each item is one sample in SAM's model space: the image resized (longest side ``S``),
normalised with SAM's pixel mean/std and zero-padded to ``S x S``; the target resized with
nearest neighbour, mapped to class ids (binary: 0/1) and padded with IGNORE_INDEX; plus
the geometry needed to map predictions back to the original size.

Items can be requested by position or by ``(position, epoch)``: augmentation draws come
from a generator seeded with ``(seed, position, epoch)``, so they are the same in every
run, whichever worker process loads the sample.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from ..errors import DataValidationError
from .cache import SampleCache, sample_key
from .io import image_size, read_image, read_mask
from .prompts import PROMPT_MODES, sample_prompt
from .transforms import (
    AugmentConfig,
    augment,
    normalize_pad,
    pad_target,
    resize_image,
    resize_nearest,
    resized_shape,
)
from .validation import DataSpec


def _file_stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


class SegmentationDataset(Dataset):
    """Samples of a DataSpec, ready for SAM.

    Parameters
    ----------
    spec : DataSpec
        Validated data (see :func:`~automask.data.validate_frame`).
    input_size : int
        Side ``S`` of the square model input.
    augment : AugmentConfig, optional
        Training augmentation; None for evaluation and prediction.
    cache : SampleCache, optional
        Store of decoded, resized samples shared across epochs.
    with_labels : bool
        Load and return targets (needs ``spec.label_col``).
    seed : int
        Base seed of the augmentation draws.
    prompts : {None, "box", "points", "box_or_points"}
        Training prompts drawn from each augmented mask (binary targets; see
        :func:`automask.data.prompts.sample_prompt`); None adds nothing.
    prompt_rate : float
        Probability that a sample gets a prompt (when ``prompts`` is set).

    Notes
    -----
    An item is a dict: ``image`` float32 ``(3, S, S)``; ``target`` int64 ``(S, S)``
    (absent without labels); ``original_size`` and ``resized_size`` int64 ``(2,)``;
    ``index`` int64 ``()``, the row position in ``spec.frame``. With augmentation,
    ``resized_size`` is the size of the augmented content (zoom-out shrinks it). With
    ``prompts``: also ``prompt_kind``, ``prompt_box``, ``prompt_points`` and
    ``prompt_labels``, drawn after the augmentation from the same generator.
    """

    def __init__(
        self,
        spec: DataSpec,
        input_size: int,
        augment: AugmentConfig | None = None,
        cache: SampleCache | None = None,
        with_labels: bool = True,
        seed: int = 0,
        prompts: str | None = None,
        prompt_rate: float = 1.0,
    ) -> None:
        if with_labels and spec.label_col is None:
            raise ValueError("with_labels=True but the DataSpec has no label column")
        if int(input_size) < 1:
            raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
        self.spec = spec
        self.input_size = int(input_size)
        self.augment = augment
        self.cache = cache
        self.with_labels = bool(with_labels)
        self.seed = int(seed)
        if prompts is not None and (prompts not in PROMPT_MODES or not self.with_labels):
            raise ValueError(f"prompts must be None or one of {PROMPT_MODES} (with labels), "
                             f"got {prompts!r}")
        self.prompts = prompts
        self.prompt_rate = float(prompt_rate)
        self.images = spec.frame[spec.image_col].tolist()
        self.labels = spec.frame[spec.label_col].tolist() if self.with_labels else None
        stats = spec.stats
        if stats is not None and {"height", "width"} <= set(stats.columns):
            self._sizes = list(zip(stats["height"].tolist(), stats["width"].tolist()))
        else:
            self._sizes = None
        self._cmap_key = None if spec.color_map is None else tuple(sorted(spec.color_map.items()))
        self.decodes = 0  # samples decoded from files by this process

    def __len__(self) -> int:
        return len(self.images)

    def original_size(self, position: int) -> tuple[int, int]:
        """``(H, W)`` of the image at ``position`` (from the spec, else its header)."""
        if self._sizes is not None and self._sizes[position][0] > 0:
            height, width = self._sizes[position]
            return int(height), int(width)
        return image_size(self.images[position])

    def load_resized(self, position: int) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
        """Resized uint8 image ``(h, w, 3)``, raw resized mask ``(h, w)`` and ``(H, W)``.

        Served from the cache when possible; decoded (and cached) otherwise.
        """
        image_path = self.images[position]
        label_path = self.labels[position] if self.with_labels else None
        original = self.original_size(position)
        key = None
        if self.cache is not None:
            key = sample_key(
                image_path, _file_stamp(image_path),
                label_path, _file_stamp(label_path) if label_path else None,
                self.input_size, self._cmap_key,
            )
            hit = self.cache.get(key)
            if hit is not None and (hit[1] is not None or not self.with_labels):
                return hit[0], hit[1], original
        resized = resized_shape(original, self.input_size)
        image = read_image(image_path, min_size=resized)
        self.decodes += 1
        if image.shape[:2] != original and not _is_draft(image.shape[:2], original):
            raise DataValidationError(
                f"row {self.spec.frame.index[position]!r} {image_path}: image is "
                f"{image.shape[0]}x{image.shape[1]} but the DataSpec says "
                f"{original[0]}x{original[1]}"
            )
        image = resize_image(image, resized)
        mask = None
        if label_path is not None:
            raw = read_mask(label_path, color_map=self.spec.color_map)
            if raw.shape != original:
                raise DataValidationError(
                    f"row {self.spec.frame.index[position]!r} {label_path}: mask is "
                    f"{raw.shape[0]}x{raw.shape[1]} but image {image_path} is "
                    f"{original[0]}x{original[1]}"
                )
            mask = resize_nearest(raw, resized).astype(np.uint8, copy=False)
            mask = np.ascontiguousarray(mask)
        if self.cache is not None:
            self.cache.put(key, image, mask)
        return image, mask, original

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        if isinstance(item, (tuple, list)):
            position, epoch = int(item[0]), int(item[1])
        else:
            position, epoch = int(item), 0
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} out of range for {len(self)} samples")
        image, mask, original = self.load_resized(position)
        target = None
        if mask is not None:
            target = self.spec.target_lut(position, mask)[mask]  # (h, w) uint8
        rng = None
        if self.augment is not None or self.prompts is not None:
            rng = np.random.default_rng([self.seed, position, epoch])
        if self.augment is not None:
            image, target = augment(image, target, self.augment, rng)
        out = {
            "image": normalize_pad(image, self.input_size),  # (3, S, S)
            "original_size": torch.tensor(original, dtype=torch.int64),
            "resized_size": torch.tensor(image.shape[:2], dtype=torch.int64),
            "index": torch.tensor(position, dtype=torch.int64),
        }
        if target is not None:
            out["target"] = pad_target(target, self.input_size)  # (S, S)
        if self.prompts is not None:  # from the augmented mask, after the augmentation draws
            out.update(sample_prompt(target, self.prompts, self.prompt_rate, rng))
        return out


def _is_draft(decoded: tuple[int, int], original: tuple[int, int]) -> bool:
    """True when ``decoded`` is a JPEG draft (1/2, 1/4, 1/8 scale) of ``original``."""
    for factor in (2, 4, 8):
        if all(abs(d - (o + factor - 1) // factor) <= 1 for d, o in zip(decoded, original)):
            return True
    return False


def collate_samples(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack dataset items into a batch.

    In a worker process this is torch's ``default_collate`` (which stacks into shared
    memory); in the main process the stacking is done with numpy, on one thread, so that
    it does not compete with the training step's intra-op threads.
    """
    if get_worker_info() is not None:
        return default_collate(items)
    return {
        key: torch.from_numpy(np.stack([item[key].numpy() for item in items]))
        for key in items[0]
    }
