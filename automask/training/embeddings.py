"""Image embeddings computed once and reused while the image encoder is frozen.

Under ``decoder_only`` nothing in SAM's image encoder trains, and an image's embedding is
the same every time the image is seen. When the training images also repeat exactly from
epoch to epoch (augmentation by flips only, no random crops of large images: at most four
versions of each image), :class:`EmbeddingCache` keeps each version's embedding and the
later epochs run the mask decoder alone; every validation after the first does too.

Exact by construction: an embedding is found by the SHA-256 of the exact input tensor
(values, shape and dtype), computed on the host before the batch moves to the device, so
a hit is the encoder's output for that very input, under the same precision. Only
embeddings computed in a larger or smaller batch can differ from a recomputation, by the
matrix kernels' rounding for another batch size.

Memory: vit_b's embedding is 256 x 64 x 64 values at 1024 px (2 MiB in bf16, 4 MiB in
float32), a quarter of that at 512 px. Embeddings are kept in host memory up to
``data.embedding_cache_mb`` (first come, kept: later versions are computed every time)
and copied to the device when used.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

Features = torch.Tensor | tuple[torch.Tensor, ...]


def input_key(image: torch.Tensor) -> bytes:
    """The SHA-256 of one input (3, S, S): its bytes, shape and dtype."""
    image = image.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(image.shape)} {image.dtype}".encode())
    digest.update(memoryview(image.view(torch.uint8).numpy()))
    return digest.digest()


def why_not_cached(model: nn.Module, augment, spec, input_size: int,
                   large_images: str) -> str | None:
    """Why a fit cannot reuse image embeddings, or None when it can.

    Parameters
    ----------
    model : SamSegmenter
        The candidate's model, its PEFT method applied and in training mode.
    augment : AugmentConfig or None
        The training augmentation.
    spec : DataSpec
        The training data (its image sizes decide which images are cropped).
    input_size : int
    large_images : {"auto", "crop", "resize"}
        ``data.large_images``.
    """
    from ..data.crops import crops_image

    frozen = getattr(model, "encoder_is_frozen", None)
    if frozen is None or not frozen():
        return "the image encoder trains, or is random in training"
    if augment is not None:
        if tuple(augment.scale_range) != (1.0, 1.0):
            return "random scaling ('data.scale_min', 'data.scale_max')"
        if augment.rotate_degrees > 0:
            return "random rotation ('data.rotate_degrees')"
        if augment.color_jitter > 0:
            return "colour jitter ('data.color_jitter')"
    if large_images != "resize":
        stats = spec.stats
        if stats is None or not {"height", "width"} <= set(stats.columns):
            return "image sizes unknown: some images may be randomly cropped"
        sizes = zip(stats["height"].tolist(), stats["width"].tolist())
        if any(crops_image(size, input_size, large_images) for size in sizes):
            return "random crops of large images ('data.large_images')"
    return None


class EmbeddingCache:
    """Encoder outputs by input key, in host memory up to a budget.

    Parameters
    ----------
    memory_mb : float
        Budget in MiB; an embedding that does not fit is not kept.

    Attributes
    ----------
    hits, misses : int
        Images whose features came from the cache / from the encoder.
    used_bytes : int
    """

    def __init__(self, memory_mb: float) -> None:
        if memory_mb < 0:
            raise ValueError(f"memory_mb must be >= 0, got {memory_mb!r}")
        self.budget = int(memory_mb * 2**20)
        self.used_bytes = 0
        self.hits = self.misses = 0
        self._store: dict[bytes, tuple[torch.Tensor, ...]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def features(self, model: nn.Module, images: torch.Tensor,
                 keys: Sequence[bytes]) -> Features:
        """``model.encode(images)``, with the kept rows taken from the cache.

        images (B, 3, S, S), keys: one :func:`input_key` per image. The rows not kept
        are encoded together (all of them: ``model.encode(images)`` itself) and kept
        while the budget lasts.
        """
        assert len(keys) == images.shape[0], (len(keys), images.shape)
        kept = [self._store.get(k) for k in keys]
        missing = [i for i, rows in enumerate(kept) if rows is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = None
        if missing:
            fresh = model.encode(images if len(missing) == len(keys) else images[missing])
            parts = _parts(fresh)  # each (M, ...)
            for j, i in enumerate(missing):
                self._keep(keys[i], tuple(p[j] for p in parts))
            if len(missing) == len(keys):
                return fresh
        device = images.device
        columns = []
        fresh_parts = _parts(fresh) if fresh is not None else None
        for c in range(len(next(rows for rows in kept if rows is not None))):
            rows, j = [], 0
            for entry in kept:
                if entry is None:
                    rows.append(fresh_parts[c][j])
                    j += 1
                else:
                    rows.append(entry[c].to(device, non_blocking=True))
            columns.append(torch.stack(rows))  # (B, ...)
        return columns[0] if len(columns) == 1 else tuple(columns)

    def _keep(self, key: bytes, rows: tuple[torch.Tensor, ...]) -> None:
        size = sum(r.numel() * r.element_size() for r in rows)
        if key in self._store or self.used_bytes + size > self.budget:
            return
        # a copy on the host (no view keeps the batch's tensor alive), and a normal tensor
        # even when computed in validation's inference mode
        with torch.inference_mode(False):
            self._store[key] = tuple(r.detach().to("cpu", copy=True) for r in rows)
        self.used_bytes += size


def _parts(features: Features) -> tuple[torch.Tensor, ...]:
    return (features,) if isinstance(features, torch.Tensor) else tuple(features)
