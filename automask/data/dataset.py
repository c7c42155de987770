"""A torch Dataset over a validated :class:`~automask.data.validation.DataSpec`.

Each item is one sample in SAM's model space: the image resized (longest side ``S``),
normalised with SAM's pixel mean/std and zero-padded to ``S x S``; the target resized with
nearest neighbour, mapped to class ids (binary: 0/1) and padded with IGNORE_INDEX; plus
the geometry needed to map predictions back to the original size.

Items can be requested by position or by ``(position, epoch)``: augmentation draws come
from a generator seeded with ``(seed, position, epoch)``, so they are the same in every
run, whichever worker process loads the sample.

With ``large_images`` other than ``"resize"``, an image much larger than the input is not
resized: training items are random ``S x S`` crops of it at native scale, validation items
its non-overlapping window grid (see :mod:`automask.data.crops`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from ..config import INTERPOLATIONS, RESIZE_MODES
from ..errors import DataValidationError
from .cache import SampleCache, file_stamp, sample_key
from .crops import check_large_images, crops_image, grid_boxes, random_crop
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
    large_images : {"resize", "auto", "crop"}
        ``"resize"`` (default here): every image is resized to ``S``. ``"auto"`` /
        ``"crop"``: images that :func:`~automask.data.crops.crops_image` selects are
        cropped at native scale instead (``data.large_images``).
    crops : {"random", "grid"}
        How a cropped image becomes items: ``"random"``, one random crop per
        ``(position, epoch)`` (training); ``"grid"``, one item per window of
        :func:`~automask.data.crops.grid_boxes` (validation), so that ``len`` counts
        windows, not rows; each item then has a ``"window"`` entry, its box in the image
        and 1 for the image's last window (zeros for an image taken whole), and
        :meth:`item_positions` gives the row of each item.
    prompts : {None, "box", "points", "box_or_points"}
        Training prompts drawn from each augmented mask (binary targets; see
        :func:`automask.data.prompts.sample_prompt`); None adds nothing.
    prompt_rate : float
        Probability that a sample gets a prompt (when ``prompts`` is set).
    value_range : tuple of float, optional
        ``(low, high)`` mapped to 0-255 for images with more than 8 bits per sample
        (``data.image_range``, see :func:`~automask.data.io.read_image`); None: each file
        by its own rule.
    resize : {"longest_side", "square"}
        ``data.resize``: a whole image keeps its aspect ratio (longest side to ``S``, then
        padded) or is stretched to ``S x S``; crops stay at native scale either way.
    interpolation : {"bilinear", "bicubic"}
        ``data.interpolation``: Pillow's filter for that resize of a whole image.

    Notes
    -----
    An item is a dict: ``image`` float32 ``(3, S, S)``; ``target`` int64 ``(S, S)``
    (absent without labels); ``original_size`` and ``resized_size`` int64 ``(2,)``;
    ``index`` int64 ``()``, the row position in ``spec.frame``. With augmentation,
    ``resized_size`` is the size of the augmented content (zoom-out shrinks it). For a
    crop, ``original_size`` is still the whole image's and ``resized_size`` the crop's. With
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
        large_images: str = "resize",
        crops: str = "random",
        prompts: str | None = None,
        prompt_rate: float = 1.0,
        value_range: tuple[float, float] | None = None,
        resize: str = "longest_side",
        interpolation: str = "bilinear",
    ) -> None:
        if with_labels and spec.label_col is None:
            raise ValueError("with_labels=True but the DataSpec has no label column")
        if int(input_size) < 1:
            raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
        self.spec = spec
        self.input_size = int(input_size)
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got "
                             f"{interpolation!r}")
        self.interpolation = interpolation
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
        self.value_range = None if value_range is None else tuple(map(float, value_range))
        self.decodes = 0  # samples decoded from files by this process
        self.large_images = check_large_images(large_images)
        if crops not in ("random", "grid"):
            raise ValueError(f"crops must be 'random' or 'grid', got {crops!r}")
        self.crops = crops
        self._cropped: dict[int, bool] = {}  # position -> cropped at native scale
        # Augmentation after a crop: the zoom is applied by the crop itself.
        self._augment_after_crop = (
            None if augment is None else dataclasses.replace(augment, scale_range=(1.0, 1.0))
        )
        self._windows: list[tuple[int, tuple[int, int, int, int] | None]] | None = None
        if crops == "grid" and self.large_images != "resize":
            self._windows = []  # (position, box or None) per item
            for pos in range(len(self.images)):
                if self.is_cropped(pos):
                    boxes = grid_boxes(self.original_size(pos), self.input_size,
                                       objects=lambda pos=pos: self._objects(pos))
                    self._windows.extend((pos, box) for box in boxes)
                else:
                    self._windows.append((pos, None))

    def _objects(self, position: int) -> np.ndarray | None:
        """``(H, W)`` bool map of the object pixels of a binary task's mask at ``position``
        (class 1, not void), or None without a mask or in a multi-class task (whose thinned
        grid stays evenly spread: a class it misses is left out of the mean, not scored as
        perfect)."""
        if not self.with_labels or self.spec.task != "binary":
            return None
        mask = read_mask(self.labels[position], color_map=self.spec.color_map)
        if mask.dtype != np.uint8:
            if mask.size and int(mask.max()) > 255:
                return None  # refused with its reason when the sample is loaded
            mask = mask.astype(np.uint8)
        target = self.spec.target_lut(position, mask)[mask]
        return target == 1

    def __len__(self) -> int:
        if self._windows is not None:
            return len(self._windows)
        return len(self.images)

    def item_positions(self) -> list[int]:
        """The row position of each item, in item order (windows of a row are adjacent)."""
        if self._windows is not None:
            return [position for position, _ in self._windows]
        return list(range(len(self.images)))

    def is_cropped(self, position: int) -> bool:
        """Whether the image at ``position`` is used as native-scale crops (not resized)."""
        hit = self._cropped.get(position)
        if hit is None:
            hit = self.large_images != "resize" and crops_image(
                self.original_size(position), self.input_size, self.large_images)
            self._cropped[position] = hit
        return hit

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
        return self._load(position, native=False)

    def load_native(self, position: int) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
        """Full-resolution uint8 image ``(H, W, 3)``, raw mask ``(H, W)`` and ``(H, W)``.

        Served from the cache when possible (an entry on disk is memory-mapped, so a crop
        reads only its rows); decoded (and cached) otherwise. The cache key is not that of
        :meth:`load_resized`: the two kinds of entry never stand in for each other.
        """
        return self._load(position, native=True)

    def _load(self, position: int,
              native: bool) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
        """Image, raw mask (resized to the input, or at native scale) and ``(H, W)``; a file
        deleted since the data was checked is a DataValidationError naming its row."""
        try:
            return self._read_sample(position, native)
        except FileNotFoundError as exc:
            row = self.spec.frame.index[position]
            gone = exc.filename or (self.images[position] if not self.with_labels else
                                    f"{self.images[position]} or {self.labels[position]}")
            raise DataValidationError(
                f"row {row.item() if hasattr(row, 'item') else row!r} {gone}: the file is gone "
                "since the data was checked (deleted or moved meanwhile?)") from None

    def _read_sample(self, position: int,
                     native: bool) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
        image_path = self.images[position]
        label_path = self.labels[position] if self.with_labels else None
        original = self.original_size(position)
        key = None
        if self.cache is not None:
            files = (image_path, file_stamp(image_path),
                     label_path, file_stamp(label_path) if label_path else None)
            key = (sample_key("native", *files, self._cmap_key, self.value_range) if native
                   else sample_key(*files, self.input_size, self._cmap_key, self.value_range,
                                   *(() if self.resize == "longest_side" else (self.resize,)),
                                   *(() if self.interpolation == "bilinear"
                                     else (self.interpolation,))))
            hit = self.cache.get(key, mmap=native)
            if hit is not None and (hit[1] is not None or not self.with_labels):
                return hit[0], hit[1], original
        size = original if native else resized_shape(original, self.input_size, self.resize)
        image = read_image(image_path, min_size=None if native else size,
                           value_range=self.value_range)
        self.decodes += 1
        if image.shape[:2] != original and (native or not _is_draft(image.shape[:2], original)):
            row = self.spec.frame.index[position]
            raise DataValidationError(
                f"row {row.item() if hasattr(row, 'item') else row!r} {image_path}: the "
                f"image is {image.shape[0]}x{image.shape[1]} (H x W) now but was "
                f"{original[0]}x{original[1]} when the data was checked: was the file "
                "replaced meanwhile?"
            )
        if not native:
            image = resize_image(image, size, self.interpolation)
        mask = None
        if label_path is not None:
            raw = read_mask(label_path, color_map=self.spec.color_map)
            if raw.shape != original:
                row = self.spec.frame.index[position]
                raise DataValidationError(
                    f"row {row.item() if hasattr(row, 'item') else row!r} {label_path}: the "
                    f"mask is {raw.shape[0]}x{raw.shape[1]} (H x W) now but image "
                    f"{image_path} is {original[0]}x{original[1]}, as the mask was when the "
                    "data was checked: was the file replaced meanwhile?"
                )
            if raw.dtype != np.uint8 and raw.size and int(raw.max()) > 255:
                # a 16-bit mask edited since it was validated: uint8 would wrap 256 to 0
                row = self.spec.frame.index[position]
                raise DataValidationError(
                    f"row {row.item() if hasattr(row, 'item') else row!r} {label_path}: mask "
                    f"values must lie in 0-255, found {int(raw.min())}..{int(raw.max())}"
                )
            mask = raw if native else resize_nearest(raw, size)
            mask = np.ascontiguousarray(mask.astype(np.uint8, copy=False))
        if self.cache is not None:
            self.cache.put(key, image, mask)
        return image, mask, original

    def _crop_item(self, position: int, epoch: int,
                   box: tuple[int, int, int, int] | None) -> dict[str, torch.Tensor]:
        """A native-scale crop: the ``box`` window (grid), or a random one (training)."""
        image, mask, original = self.load_native(position)
        if box is not None:
            top, left, height, width = box
            image = np.ascontiguousarray(image[top:top + height, left:left + width])
            mask = mask[top:top + height, left:left + width] if mask is not None else None
        else:
            rng = np.random.default_rng([self.seed, position, epoch, 1])  # crop draws
            zoom = rng.uniform(*self.augment.scale_range) if self.augment is not None else 1.0
            image, mask = random_crop(image, mask, self.input_size, zoom, rng)
        return self._item(image, mask, original, position, epoch, self._augment_after_crop)

    def _item(self, image: np.ndarray, mask: np.ndarray | None, original: tuple[int, int],
              position: int, epoch: int,
              augment_cfg: AugmentConfig | None) -> dict[str, torch.Tensor]:
        """The item of a loaded sample: its class targets, augmentation and prompts, drawn
        from one generator seeded by ``(seed, position, epoch)``."""
        target = None
        if mask is not None:
            target = self.spec.target_lut(position, mask)[mask]  # (h, w) uint8
        rng = None
        if augment_cfg is not None or self.prompts is not None:
            rng = np.random.default_rng([self.seed, position, epoch])
        if augment_cfg is not None:
            image, target = augment(image, target, augment_cfg, rng)
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

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        if isinstance(item, (tuple, list)):
            position, epoch = int(item[0]), int(item[1])
        else:
            position, epoch = int(item), 0
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} out of range for {len(self)} samples")
        if self._windows is not None:
            item = position
            position, box = self._windows[item]
            if box is not None:
                out = self._crop_item(position, epoch, box)
            else:
                out = self._item(*self.load_resized(position), position, epoch, self.augment)
            # where the window lies in its image, (top, left, height, width), and 1 for the
            # image's last window; zeros: the whole image, resized (the validation metric
            # scores an image's windows as one image)
            last = item + 1 == len(self._windows) or self._windows[item + 1][0] != position
            out["window"] = torch.tensor((*box, int(last)) if box else (0, 0, 0, 0, 0),
                                         dtype=torch.int64)
            return out
        if self.large_images != "resize" and self.is_cropped(position):
            return self._crop_item(position, epoch, None)
        image, mask, original = self.load_resized(position)
        return self._item(image, mask, original, position, epoch, self.augment)


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
