"""Test-time augmentation by flips: each image is also predicted mirrored, and the class
probabilities, mirrored back, are averaged with the plain prediction's.

A flip mirrors the image itself, not the padded model input: in a batch the image fills
the top-left ``(h, w)`` of its ``S x S`` input (segment-anything's padding is at the bottom
and right), and only that part is mirrored, so that the padding stays where the model
saw it in training. Mirroring the resized image equals resizing the mirrored image (the
resize kernels are symmetric), so each pass predicts exactly what the mirrored file
would give. Sliding-window prediction mirrors the whole image before cutting windows.

``tta=True`` takes the flips the model was trained with (``data.hflip``, ``data.vflip``),
to which it should be indifferent; a model trained with neither takes the horizontal flip.
Each flip is one more forward pass per image: ``"hflip"`` doubles the time of a
prediction, ``("hflip", "vflip")`` triples it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

FLIPS = {"hflip": -1, "vflip": -2}  # flip name -> the image axis it mirrors (C, H, W)


def check_tta(tta: Any, hflip: bool = True, vflip: bool = False) -> tuple[str, ...]:
    """The flips of ``tta``: ``False``/``None`` none; ``True`` those trained with
    (``hflip``, ``vflip``; the horizontal one when neither); a flip name of :data:`FLIPS`,
    or a list of them. ConfigError for anything else, before any work."""
    if isinstance(tta, np.bool_):  # from a numpy or pandas config
        tta = bool(tta)
    if tta is None or tta is False:
        return ()
    if tta is True:
        trained = tuple(name for name, on in (("hflip", hflip), ("vflip", vflip)) if on)
        return trained or ("hflip",)
    names = [tta] if isinstance(tta, str) else tta
    try:  # not a mapping: {"hflip": False} would read as its keys, the flip turned on
        names = None if isinstance(names, Mapping) else list(names)
    except TypeError:
        names = None
    if names is None or not names or any(not isinstance(n, str) or n not in FLIPS
                                         for n in names):
        raise ConfigError(f"tta must be True, False, one of {sorted(FLIPS)} or a list of "
                          f"them, got {tta!r}")
    return tuple(dict.fromkeys(names))  # each flip once, in the order given


def flip_content(images: torch.Tensor, sizes: torch.Tensor, flip: str) -> torch.Tensor:
    """``images`` (B, 3, S, S) with each image's ``(h, w)`` top-left part (``sizes``,
    (B, 2)) mirrored by ``flip``; the padding stays at the bottom and right."""
    out = images.clone()
    axis = FLIPS[flip]
    for b, (h, w) in enumerate(sizes.tolist()):
        out[b, :, :h, :w] = images[b, :, :h, :w].flip(axis)
    return out


def unflip(prob: torch.Tensor, flip: str) -> torch.Tensor:
    """A (C, H, W) map of the mirrored image, mirrored back."""
    return prob.flip(FLIPS[flip])
