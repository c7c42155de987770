"""``lst``: ladder side tuning (Sung et al., NeurIPS 2022).

A light side network runs beside the frozen encoder and is fed by it through "ladders":
after every ``ladder_every``-th encoder block i, its output is projected down to the side
width ``s = dim / reduction`` and mixed with the side state by a learned gate,
``h_i = mu_i * down_i(b_i) + (1 - mu_i) * side_{i-1}``, ``mu_i = sigmoid(g_i / T)``
(``T = 0.1``, ``g_i = 0`` at init, as in LST); side block i then runs on ``h_i``. The
side network starts from the projected patch embeddings; its last state is projected back
up to the encoder width and added to the encoder output before the neck. Side blocks are
SAM blocks of width ``s`` (windowed where the encoder's are, no relative positions).
Gradients never pass through the frozen encoder, which is what makes LST cheap in memory.

Zhong et al. (2024) do not state the side network's size. One side block per encoder
block with ViT's MLP ratio 4, reduction 10 and a ladder after every 4th block reproduce
their 11.49M (1.77%) on vit_h: ``s = 128``, 8 ladders, 7,985,544 parameters beside the
decoder. LST initialises its side network by pruning the backbone's weights; here it
starts from random weights (SAM's block init), and the up projection from zero, so a
fresh model computes exactly the frozen encoder's output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import TARGET_ROOT, EncoderHook, MethodOptions, PeftMethod

_GATE_TEMPERATURE = 0.1


@dataclass(frozen=True)
class LSTOptions(MethodOptions):
    """Size of the side network."""

    reduction: int = 10
    """LST: the side network's width is the encoder width divided by this."""
    side_mlp_ratio: float = 4.0
    """LST: MLP hidden width of each side block, as a multiple of the side width."""
    ladder_every: int = 4
    """LST: a ladder (gated down-projection) feeds the side network after every this many
    encoder blocks."""

    def __post_init__(self) -> None:
        self.check_int("reduction", 1)
        self.check_positive("side_mlp_ratio")
        self.check_int("ladder_every", 1)


class LadderSideNetwork(EncoderHook):
    """The side network and its ladders, run through the encoder's hook points."""

    def __init__(self, encoder: nn.Module, options: LSTOptions) -> None:
        super().__init__()
        proj = encoder.patch_embed.proj
        dim = proj.out_channels
        side = max(1, dim // options.reduction)
        like = proj.weight
        factory = {"device": like.device, "dtype": like.dtype}
        blocks = list(encoder.blocks)
        heads = max(1, min(b.attn.num_heads for b in blocks))
        while side % heads:
            heads -= 1
        # Block index -> position of its ladder; every `ladder_every`-th block has one.
        self.ladder_at = {i: n for n, i in enumerate(
            range(options.ladder_every - 1, len(blocks), options.ladder_every))}
        self.embed_down = nn.Linear(dim, side, **factory)
        self.ladders = nn.ModuleList(nn.Linear(dim, side, **factory) for _ in self.ladder_at)
        self.gates = nn.Parameter(torch.zeros(len(self.ladder_at), **factory))
        from segment_anything.modeling.image_encoder import Block  # torchvision: seconds

        with torch.device(like.device):
            self.side_blocks = nn.ModuleList(
                Block(side, heads, mlp_ratio=options.side_mlp_ratio, qkv_bias=True,
                      norm_layer=nn.LayerNorm, use_rel_pos=False,
                      window_size=block.window_size).to(like.dtype)
                for block in blocks
            )
        self.up = nn.Linear(side, dim, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def on_embed(self, x: torch.Tensor, images: torch.Tensor, ctx: dict) -> torch.Tensor:
        ctx["lst"] = self.embed_down(x.detach())  # (B, h, w, s)
        return x

    def after_block(self, index: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        side = ctx["lst"]  # (B, h, w, s)
        if index in self.ladder_at:
            n = self.ladder_at[index]
            mix = torch.sigmoid(self.gates[n] / _GATE_TEMPERATURE)
            side = mix * self.ladders[n](x.detach()) + (1 - mix) * side  # no grad into encoder
        ctx["lst"] = self.side_blocks[index](side)
        return x

    def on_neck(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return x + self.up(ctx["lst"])  # (B, h, w, E)


def apply(model: nn.Module, options: LSTOptions) -> None:
    """Attach a :class:`LadderSideNetwork` to the encoder."""
    model.set_encoder_hook(LadderSideNetwork(getattr(model, TARGET_ROOT), options))


METHOD = PeftMethod("lst", "LST", LSTOptions, apply,
                    source="Sung et al. 2022, 'LST: Ladder Side-Tuning'; reduction 10, a ladder "
                           "every 4th block reproduce 11.49M")
