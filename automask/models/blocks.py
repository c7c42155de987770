"""SAM's image-encoder block, computed without the projections of its window padding.

segment-anything's windowed blocks zero-pad the token grid to a multiple of the window
(14 tokens): a 256 px input (16 x 16 tokens) is padded to 28 x 28, 3.1x the tokens; 512 px
(32 x 32) to 42 x 42, 1.7x; 1024 px (64 x 64) to 70 x 70, 1.2x. The attention's ``qkv`` and
``proj`` projections then run on every padded token, although a padded row of ``qkv`` is
only ever ``qkv(0)`` and the padded rows of ``proj`` are cut away afterwards.

:func:`block_forward` gives the same result as ``block(x)`` with less arithmetic:

- ``qkv`` runs on the real tokens, and the padding is filled with ``qkv`` of one zero
  token, when ``qkv`` acts token by token (:func:`is_token_wise`). A layer whose update
  needs the windows (Conv-LoRA's experts convolve each window's low-rank map) runs its
  token-wise ``base_layer`` on the real tokens and its ``delta`` on the zero-padded
  windows, as before.
- ``proj`` runs after the windows are merged back, on the real tokens, when it acts token
  by token.

Anything else (another attention module, as VPT's; a projection that is neither) takes
segment-anything's own ``block(x)``. The result equals it up to float rounding (the
matrix products see a different number of rows); ``tests/test_blocks.py`` compares the
outputs and gradients for every PEFT method.
"""
from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    add_decomposed_rel_pos,
    window_partition,
    window_unpartition,
)
from torch import nn


def is_token_wise(layer: nn.Module | None) -> bool:
    """True when each output row of ``layer`` depends only on the same input row.

    ``nn.Linear`` itself, or a wrapper that says so with a ``token_wise`` attribute (an
    :class:`automask.peft.Adapter`) around a token-wise ``base_layer``.
    """
    if type(layer) is nn.Linear:
        return True
    return bool(getattr(layer, "token_wise", False)) and is_token_wise(
        getattr(layer, "base_layer", None))


def block_forward(block: Block, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for a segment-anything ``Block``: (B, H, W, E) -> (B, H, W, E)."""
    window = block.window_size
    height, width = x.shape[1], x.shape[2]
    padded = window > 0 and (height % window or width % window)
    if not padded or type(block.attn) is not Attention:
        return block(x)
    attn = block.attn
    y = block.norm1(x)  # (B, H, W, E)
    qkv = _windowed_qkv(attn.qkv, y, window)  # (B * nW, ws, ws, 3E) or None
    if qkv is None:
        return block(x)
    pad_hw = (height + (-height) % window, width + (-width) % window)
    out = _attend(attn, qkv)  # (B * nW, ws, ws, E), before proj
    if is_token_wise(attn.proj):
        out = attn.proj(window_unpartition(out, window, pad_hw, (height, width)))
    else:
        out = window_unpartition(attn.proj(out), window, pad_hw, (height, width))
    x = x + out  # (B, H, W, E)
    return x + block.mlp(block.norm2(x))


def _windowed_qkv(layer: nn.Module, y: torch.Tensor, window: int) -> torch.Tensor | None:
    """``layer(window_partition(y))`` computed on y's real tokens; None when it cannot be."""
    if is_token_wise(layer):
        return _pad_partition(layer(y), layer(y.new_zeros(1, 1, 1, y.shape[-1])), window)
    base, delta = getattr(layer, "base_layer", None), getattr(layer, "delta", None)
    if callable(delta) and is_token_wise(base):
        out = _pad_partition(base(y), base(y.new_zeros(1, 1, 1, y.shape[-1])), window)
        windows, _ = window_partition(y, window)  # (B * nW, ws, ws, E), zero-padded
        return out + delta(windows)
    return None


def _pad_partition(t: torch.Tensor, fill: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, D) padded with the row ``fill`` (1, 1, 1, D), cut into windows."""
    batch, height, width, dim = t.shape
    pad_h, pad_w = (-height) % window, (-width) % window
    if pad_w:
        t = torch.cat([t, fill.expand(batch, height, pad_w, dim).to(t.dtype)], dim=2)
    if pad_h:
        t = torch.cat([t, fill.expand(batch, pad_h, width + pad_w, dim).to(t.dtype)], dim=1)
    windows, _ = window_partition(t, window)  # nothing left to pad
    return windows


def _attend(attn: Attention, qkv: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` between its ``qkv`` and ``proj``.

    (B, H, W, 3E) projected tokens -> (B, H, W, E) attention output.
    """
    batch, height, width, _ = qkv.shape
    heads = attn.num_heads
    qkv = qkv.reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, height * width, -1).unbind(0)  # (B*nH, HW, hd)
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # (B*nH, HW, HW)
    if attn.use_rel_pos:
        scores = add_decomposed_rel_pos(scores, q, attn.rel_pos_h, attn.rel_pos_w,
                                        (height, width), (height, width))
    scores = scores.softmax(dim=-1)
    out = (scores @ v).view(batch, heads, height, width, -1)
    return out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
