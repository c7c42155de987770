"""``vpt``: deep visual prompt tuning (Jia et al., ECCV 2022).

Every encoder block gets ``peft.num_prompts`` learnable tokens, inserted before the block
and dropped after it (VPT-deep). SAM's blocks attend within 14x14 windows except a few
global blocks, so the rule for where prompts attend is stated here: in every block, every
attention window (or the whole grid in a global block) attends to the block's prompts in
addition to its own tokens, and the prompts pass the block's ``norm1`` first like any
token. Prompts carry no position, so they get no relative-position bias. Because the
prompts' own outputs are dropped after the block, only their keys and values matter, and
the block's MLP never runs on them.

12 prompts per block reproduce the paper's 4.00M (0.62%) on vit_h: 32 x 12 x 1280 =
491,520 parameters beside the decoder. Prompts are initialised uniformly in
``[-v, v]``, ``v = sqrt(6 / (3 * 16 * 16 + dim))`` as in VPT's code, so a fresh model is
not the frozen one: extra keys change every attention distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import TARGET_ROOT, Adapter, MethodOptions, PeftMethod, replace_module

if TYPE_CHECKING:  # segment-anything imports torchvision (seconds): not to resolve a config
    from segment_anything.modeling.image_encoder import Attention


@dataclass(frozen=True)
class VPTOptions(MethodOptions):
    """Number of prompt tokens per block."""

    num_prompts: int = 12
    """VPT: learnable prompt tokens prepended in every encoder block."""

    def __post_init__(self) -> None:
        self.check_int("num_prompts", 1)


class PromptedAttention(Adapter):
    """SAM's ``Attention`` whose keys and values also include learnable prompt tokens.

    Parameters
    ----------
    base_layer : segment_anything Attention
        The block's attention (frozen); input and output (B, H, W, C) as before.
    norm : nn.LayerNorm
        The block's ``norm1``, applied to the prompts (not registered here: it belongs to
        the block).
    num_prompts : int
        Prompt tokens P.
    patch_size : int
        Patch side, for VPT's initialisation range.
    """

    def __init__(self, base_layer: Attention, norm: nn.Module, num_prompts: int,
                 patch_size: int = 16) -> None:
        super().__init__(base_layer)
        weight = base_layer.qkv.weight
        dim = weight.shape[1]
        self.prompts = nn.Parameter(torch.empty(num_prompts, dim, device=weight.device,
                                                dtype=weight.dtype))
        if weight.device.type != "meta":
            bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))
            nn.init.uniform_(self.prompts, -bound, bound)
        self._norm = (norm,)  # a tuple: not a submodule of this wrapper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), B counting windows in windowed blocks."""
        attn = self.base_layer
        batch, height, width, dim = x.shape
        heads = attn.num_heads
        tokens = height * width
        qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * heads, tokens, -1).unbind(0)  # (B*nH, HW, hd)
        prompts = self._norm[0](self.prompts.to(x.dtype))  # (P, C)
        pkv = attn.qkv(prompts).reshape(-1, 3, heads, dim // heads)[:, 1:]  # (P, 2, nH, hd)
        pk, pv = pkv.permute(1, 2, 0, 3).unbind(0)  # (nH, P, hd) each
        pk = pk.repeat(batch, 1, 1)  # (B*nH, P, hd)
        pv = pv.repeat(batch, 1, 1)
        scaled = q * attn.scale
        scores = scaled @ k.transpose(-2, -1)  # (B*nH, HW, HW)
        if attn.use_rel_pos:
            from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

            scores = add_decomposed_rel_pos(scores, q, attn.rel_pos_h, attn.rel_pos_w,
                                            (height, width), (height, width))
        scores = torch.cat([scores, scaled @ pk.transpose(-2, -1)], dim=-1)  # (B*nH, HW, HW+P)
        weights = scores.softmax(dim=-1)
        out = weights[..., :tokens] @ v + weights[..., tokens:] @ pv  # (B*nH, HW, hd)
        out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return attn.proj(out.reshape(batch, height, width, -1))


def apply(model: nn.Module, options: VPTOptions) -> None:
    """Replace every block's attention by :class:`PromptedAttention`."""
    encoder = getattr(model, TARGET_ROOT)
    patch = encoder.patch_embed.proj.kernel_size[0]
    for index, block in enumerate(encoder.blocks):
        replace_module(encoder, f"blocks.{index}.attn",
                       PromptedAttention(block.attn, block.norm1, options.num_prompts, patch))


METHOD = PeftMethod("vpt", "VPT", VPTOptions, apply,
                    source="Jia et al. 2022, 'Visual Prompt Tuning' (deep); 12 prompts per block "
                           "reproduce 4.00M")
