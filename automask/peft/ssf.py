"""``ssf``: scale and shift the features after every operation (Lian et al., NeurIPS 2022).

SSF-ADA multiplies each operation's output by a learned per-channel scale and adds a shift.
Here: after every LayerNorm, Linear and Conv2d of the image encoder (each block's
``norm1``, ``qkv``, ``proj``, ``norm2``, ``lin1``, ``lin2``; the patch embedding; the neck's
two convolutions and two LayerNorms), after the position embeddings are added, and on the
last block's output before the neck (where SSF's ViT scales after its final norm). On vit_h
that is 910,848 parameters: with the decoder, the paper's 4.42M (0.69%). The paper does not
list the positions; these are SSF's own rule (every operation) applied to SAM's encoder.

Initialisation follows SSF's code: scale ~ N(1, 0.02), shift ~ N(0, 0.02), so a fresh
model is close to, not exactly, the frozen one. Scale and shift after a layer fold into
that layer (:meth:`ScaleShift.merge`), SSF's re-parameterisation for inference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import (TARGET_ROOT, Adapter, EncoderHook, MethodOptions, PeftMethod, check_not_held,
                   replace_module)

_INIT_STD = 0.02


@dataclass(frozen=True)
class SSFOptions(MethodOptions):
    """No options: every operation of the encoder is scaled and shifted."""


def _scale_shift(channels: int, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    scale = torch.empty(channels, device=like.device, dtype=like.dtype)
    shift = torch.empty(channels, device=like.device, dtype=like.dtype)
    if scale.device.type != "meta":
        nn.init.normal_(scale, mean=1.0, std=_INIT_STD)
        nn.init.normal_(shift, mean=0.0, std=_INIT_STD)
    return nn.Parameter(scale), nn.Parameter(shift)


class ScaleShift(Adapter):
    """``base_layer(x) * scale + shift`` per output channel; keeps the layer's signature.

    Channels are the last dimension for Linear and LayerNorm, dimension 1 for Conv2d and
    LayerNorm2d (their outputs are (B, C, H, W)). Mergeable when the layer has a bias.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.mergeable = getattr(base_layer, "bias", None) is not None  # folds into the bias
        self.channel_dim = 1 if isinstance(base_layer, _channels_first()) else -1
        self.token_wise = self.channel_dim == -1  # per channel of each token
        weight = base_layer.weight
        channels = weight.shape[0]
        self.scale, self.shift = _scale_shift(channels, weight)

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, 1, 1) if self.channel_dim == 1 else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        scale, shift = self._view(self.scale), self._view(self.shift)
        if y.dtype != scale.dtype and y.dtype in (torch.bfloat16, torch.float16):
            # under autocast a Linear's output is bf16/fp16: multiplied by the float32 scale
            # it would become float32, and so would everything up to the next matrix product
            scale, shift = scale.to(y.dtype), shift.to(y.dtype)
        return y * scale + shift

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scale and shift into the base layer's weight and bias."""
        if self.merged:
            return
        base = self.base_layer
        if base.bias is None:
            raise NotImplementedError("SSF merge needs a bias in the base layer")
        check_not_held(base.weight, base.bias)
        if not (torch.isfinite(self.scale).all() and torch.isfinite(self.shift).all()):
            raise ValueError("SSF scale or shift holds NaN/inf values; refusing to merge them")
        # Channels whose scale is 0 lose their weights in the product; kept (a few rows) so
        # that unmerge can put them back instead of dividing by zero.
        zero = (self.scale == 0).nonzero().flatten().to(base.weight.device)
        self._zero_rows = (zero, base.weight[zero].clone(), base.bias[zero].clone())
        # The values merged, so that unmerge takes out these even if scale or shift change
        # while merged (a state dict loaded, a step taken).
        scale, shift = self.scale.detach().clone(), self.shift.detach().clone()
        self._merged_values = (scale, shift)
        shape = (-1,) + (1,) * (base.weight.dim() - 1)
        base.weight.mul_(scale.view(shape).to(base.weight.dtype))
        base.bias.mul_(scale.to(base.bias.dtype)).add_(shift.to(base.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take scale and shift out of the base layer again."""
        if not self.merged:
            return
        base = self.base_layer
        check_not_held(base.weight, base.bias)
        shape = (-1,) + (1,) * (base.weight.dim() - 1)
        merged = getattr(self, "_merged_values", None) or (self.scale, self.shift)  # (see LoRA)
        scale, shift = (t.to(base.weight.device) for t in merged)
        base.bias.sub_(shift.to(base.bias.dtype)).div_(scale.to(base.bias.dtype))
        base.weight.div_(scale.view(shape).to(base.weight.dtype))
        kept = getattr(self, "_zero_rows", None)
        if kept is not None and kept[0].numel():  # divided by zero above: the rows kept
            zero, weight, bias = kept
            zero = zero.to(base.weight.device)
            base.weight[zero] = weight.to(base.weight)
            base.bias[zero] = bias.to(base.bias)
        self._zero_rows = self._merged_values = None
        self.merged = False


class SSFHook(EncoderHook):
    """Scale and shift after the position embeddings and before the neck (channels-last)."""

    def __init__(self, dim: int, like: torch.Tensor) -> None:
        super().__init__()
        self.embed_scale, self.embed_shift = _scale_shift(dim, like)
        self.final_scale, self.final_shift = _scale_shift(dim, like)

    def on_embed(self, x: torch.Tensor, images: torch.Tensor, ctx: dict) -> torch.Tensor:
        return x * self.embed_scale + self.embed_shift  # (B, h, w, E)

    def on_neck(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return x * self.final_scale + self.final_shift  # (B, h, w, E)


def _channels_first() -> tuple[type, ...]:
    # segment-anything imports torchvision (seconds), so not before an encoder exists
    from segment_anything.modeling.common import LayerNorm2d

    return nn.Conv2d, LayerNorm2d


def apply(model: nn.Module, options: SSFOptions) -> None:
    """Wrap every LayerNorm, Linear and Conv2d of the image encoder; add the hook."""
    encoder = getattr(model, TARGET_ROOT)
    kinds = (nn.Linear, nn.LayerNorm, *_channels_first())
    names = [name for name, module in encoder.named_modules() if isinstance(module, kinds)]
    for name in names:
        replace_module(encoder, name, ScaleShift(encoder.get_submodule(name)))
    weight = encoder.patch_embed.proj.base_layer.weight
    model.set_encoder_hook(SSFHook(weight.shape[0], weight))


METHOD = PeftMethod("ssf", "SSF", SSFOptions, apply,
                    source="Lian et al. 2022, 'Scaling & Shifting Your Features': after every "
                           "operation of the encoder")
