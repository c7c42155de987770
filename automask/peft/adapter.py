"""``adapter``: Houlsby-style bottleneck adapters in every encoder block (Houlsby et al., 2019).

Each block gets two sequential adapters, as in Houlsby et al.: one after the attention's
output projection and one after the MLP, each ``y + up(GELU(down(y)))`` with a bottleneck
of ``peft.bottleneck`` channels, before the residual addition. Zhong et al. (2024) do not
state the bottleneck; 2 channels (biases included) reproduce their 3.92M (0.61%) on vit_h:
``32 blocks x 2 adapters x (1280*2 + 2 + 2*1280 + 1280) = 409,728`` trainable parameters
beside the decoder. The up-projection starts at zero (the near-identity init Houlsby et al.
ask for, made exact), so a fresh adapter computes exactly its layer's output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Adapter, MethodOptions, PeftMethod, split_names, wrap_targets


@dataclass(frozen=True)
class AdapterOptions(MethodOptions):
    """Bottleneck width and where the adapters sit."""

    bottleneck: int = 2
    """Adapter: channels of each adapter's bottleneck."""
    adapter_targets: str = "attn.proj,mlp.lin2"
    """Adapter: comma-separated encoder Linear layers whose output passes through an
    adapter (default: after attention and after the MLP, as in Houlsby et al.)."""

    def __post_init__(self) -> None:
        if not isinstance(self.adapter_targets, str):
            object.__setattr__(self, "adapter_targets", ",".join(split_names(self.adapter_targets)))
        self.check_int("bottleneck", 1)
        self.check("adapter_targets", bool(split_names(self.adapter_targets)),
                   "name at least one module")


class BottleneckAdapter(Adapter):
    """``y + up(GELU(down(y)))`` with ``y = base_layer(x)``; keeps the layer's signature.

    Parameters
    ----------
    base_layer : nn.Linear
        The layer whose output is adapted.
    bottleneck : int
        Hidden channels of the adapter.
    """

    token_wise = True

    def __init__(self, base_layer: nn.Linear, bottleneck: int) -> None:
        super().__init__(base_layer)
        dim = base_layer.out_features
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.down = nn.Linear(dim, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, dim, **factory)
        self.act = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        y = self.base_layer(x)
        return y + self.up(self.act(self.down(y)))


def apply(model: nn.Module, options: AdapterOptions) -> None:
    """Wrap the matched Linear layers of every block in :class:`BottleneckAdapter`."""
    wrap_targets(model, split_names(options.adapter_targets),
                 lambda layer: BottleneckAdapter(layer, options.bottleneck))


METHOD = PeftMethod("adapter", "Adapter", AdapterOptions, apply,
                    source="Houlsby et al. 2019, 'Parameter-Efficient Transfer Learning for NLP': "
                           "two sequential adapters per block; bottleneck 2 reproduces 3.92M")
