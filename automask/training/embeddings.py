"""Image embeddings computed once and reused while the image encoder is frozen.

Under ``decoder_only`` nothing in SAM's image encoder trains, and an image's embedding is
the same every time the image is seen. :class:`EmbeddingCache` keeps the embeddings of the
images that come again: the validation images (every validation after the first runs the
mask decoder alone) and, when the augmentation is flips only (at most four versions of
each image), the training images, except random crops of large images; then the later
epochs run the mask decoder alone too.

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
import weakref
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


def why_training_varies(augment) -> str | None:
    """What makes the training images new in every epoch (continuous augmentation), or None
    when they repeat (flips only: at most four versions of each)."""
    if augment is None:
        return None
    if tuple(augment.scale_range) != (1.0, 1.0):
        return "random scaling ('data.scale_min', 'data.scale_max')"
    if augment.rotate_degrees > 0:
        return "random rotation ('data.rotate_degrees')"
    if augment.color_jitter > 0:
        return "colour jitter ('data.color_jitter')"
    return None


class EmbeddingCache:
    """Encoder outputs by input key, in host memory up to a budget.

    Parameters
    ----------
    memory_mb : float
        Budget in MiB; an embedding that does not fit is not kept.
    input_size : int
        The model's input side ``S``.
    large_images : {"auto", "crop", "resize"}
        ``data.large_images``: which training images are random crops (never kept).
    training_repeats : bool
        Whether the training images repeat from epoch to epoch (see
        :func:`why_training_varies`); validation images always do.

    Attributes
    ----------
    hits, misses : int
        Images whose features came from the cache / from the encoder.
    used_bytes : int
    """

    def __init__(self, memory_mb: float, input_size: int = 1024, large_images: str = "resize",
                 training_repeats: bool = True) -> None:
        if memory_mb < 0:
            raise ValueError(f"memory_mb must be >= 0, got {memory_mb!r}")
        self.budget = int(memory_mb * 2**20)
        self.input_size = int(input_size)
        self.large_images = large_images
        self.training_repeats = bool(training_repeats)
        self.used_bytes = 0
        self.hits = self.misses = 0
        self._store: dict[bytes, tuple[torch.Tensor, ...]] = {}
        self._state: tuple | None = None  # the encoder weights the kept entries came from
        self._tensors: list[weakref.ref] = []  # ... and the tensor objects that held them

    def keys(self, images: torch.Tensor, original_sizes: torch.Tensor | None,
             training: bool) -> list[bytes | None]:
        """One :func:`input_key` per image (B, 3, S, S), or None for an image that will not
        come again: a training image under continuous augmentation, or a random crop of a
        large image (``original_sizes`` (B, 2), as the data module's batches carry them)."""
        from ..data.crops import crops_image

        keys: list[bytes | None] = []
        for i, image in enumerate(images):
            if training and not self.training_repeats:
                keys.append(None)
            elif (training and self.large_images != "resize" and original_sizes is not None
                  and crops_image(tuple(int(v) for v in original_sizes[i]), self.input_size,
                                  self.large_images)):
                keys.append(None)  # a random crop: another window in every epoch
            else:
                keys.append(input_key(image))
        return keys

    def __len__(self) -> int:
        return len(self._store)

    def features(self, model: nn.Module, images: torch.Tensor,
                 keys: Sequence[bytes | None]) -> Features:
        """``model.encode(images)``, with the kept rows taken from the cache.

        images (B, 3, S, S), keys: one :func:`input_key` (or None: not to be kept) per
        image. The rows not kept are encoded together (all of them:
        ``model.encode(images)`` itself) and kept while the budget lasts. Nothing is reused
        (and everything kept is dropped) once the encoder is no longer frozen or its
        weights change: then this is ``model.encode(images)``.
        """
        assert len(keys) == images.shape[0], (len(keys), images.shape)
        if not self._encoder_unchanged(model):
            # the encoder trains (or its weights were replaced): nothing kept is its output
            self.misses += len(keys)
            return model.encode(images)
        kept = [None if k is None else self._store.get(k) for k in keys]
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

    def _encoder_unchanged(self, model: nn.Module) -> bool:
        """Whether the encoder is frozen and has the weights the kept embeddings came from.

        The weights are recognised by the tensor objects that hold them (a module or
        parameter replaced by a new one of the same shapes, which may well be allocated
        where the old one was, is a change), their storage and version counters (which
        every in-place update, an optimiser step or a ``load_state_dict`` included,
        advances); when they change, or the encoder is not frozen, the kept embeddings are
        dropped.
        """
        frozen = model.encoder_is_frozen()
        tensors = _encoder_tensors(model) if frozen else []
        state = _weights_state(tensors) if frozen else None
        same = (state == self._state and len(tensors) == len(self._tensors)
                and all(ref() is t for ref, t in zip(self._tensors, tensors)))
        if not same:
            self._store.clear()
            self.used_bytes = 0
            self._state = state
            self._tensors = [weakref.ref(t) for t in tensors]
        return frozen

    def _keep(self, key: bytes | None, rows: tuple[torch.Tensor, ...]) -> None:
        size = sum(r.numel() * r.element_size() for r in rows)
        if key is None or key in self._store or self.used_bytes + size > self.budget:
            return
        # a copy on the host (no view keeps the batch's tensor alive), and a normal tensor
        # even when computed in validation's inference mode
        with torch.inference_mode(False):
            self._store[key] = tuple(r.detach().to("cpu", copy=True) for r in rows)
        self.used_bytes += size


def _parts(features: Features) -> tuple[torch.Tensor, ...]:
    return (features,) if isinstance(features, torch.Tensor) else tuple(features)


def _encoder_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor the encoder computes with: the parameters and buffers of its parts."""
    tensors = []
    for part in model.encoder_parts():
        if isinstance(part, torch.Tensor):
            tensors.append(part)
        else:
            tensors.extend(part.parameters())
            tensors.extend(part.buffers())
    return tensors


def _weights_state(tensors: Sequence[torch.Tensor]) -> tuple:
    """Storage and version of every tensor the encoder computes with (cheap: no values)."""
    return tuple((t.data_ptr(), t.device, t.dtype, tuple(t.shape), _version(t)) for t in tensors)


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor: it cannot be changed in place outside
        return -1         # inference mode, and has no version counter
