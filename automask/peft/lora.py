"""``lora``: a trainable low-rank update ``B @ A`` beside frozen Linear layers (Hu et al., 2022)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..utils.tracing import is_exporting
from .base import (Adapter, MethodOptions, PeftMethod, check_not_held, split_names,
                   wrap_targets)


@dataclass(frozen=True)
class LoRAOptions(MethodOptions):
    """Options of LoRA (and of Conv-LoRA, which extends them)."""

    rank: int = 3
    """Rank r of the (Conv-)LoRA low-rank path."""
    alpha: float = 32.0
    """(Conv-)LoRA scaling numerator: the update is scaled by alpha / rank."""
    targets: str = "qkv"
    """Comma-separated image-encoder module names (exact or ``.name`` suffix) that
    (Conv-)LoRA adapts."""

    def __post_init__(self) -> None:
        if not isinstance(self.targets, str):  # a sequence of names from Python callers
            object.__setattr__(self, "targets", ",".join(split_names(self.targets)))
        self.check_int("rank", 1)
        self.check_positive("alpha")
        self.check("targets", bool(self.target_list), "name at least one module")

    @property
    def target_list(self) -> tuple[str, ...]:
        return split_names(self.targets)


class LoRALinear(Adapter):
    """``base_layer(x) + B(A(x)) * alpha / rank``, wrapping an ``nn.Linear``.

    Parameters
    ----------
    base_layer : nn.Linear
        The layer adapted; kept as ``base_layer`` (frozen).
    rank : int
        Rank r of the update.
    alpha : float
        Scale numerator; the update is multiplied by ``alpha / rank``.

    Notes
    -----
    ``lora_A`` is initialised Kaiming-uniform and ``lora_B`` with zeros, so a fresh adapter
    computes exactly ``base_layer(x)``. :meth:`merge` folds the update into the base weight
    for inference; :meth:`unmerge` takes it out again.
    """

    mergeable = True
    token_wise = True

    def __init__(self, base_layer: nn.Linear, rank: int = 3, alpha: float = 32.0) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRA wraps nn.Linear, got {type(base_layer).__name__}")
        check_rank(rank, base_layer, ValueError, "rank")
        super().__init__(base_layer)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, **factory)
        self.reset_adapter()
        self._merged_factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_adapter(self) -> None:
        """A Kaiming-uniform, B zeros: the adapter starts as the identity update."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B @ A`` of shape (out_features, in_features)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        out = self.base_layer(x)
        if self.merged:
            return out
        return add_low_rank_update(out, self.lora_A(x), self.lora_B.weight, self.scaling,
                                   overwrite=True)  # out: base_layer's fresh output

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to ``base_layer.weight``; the forward then skips the adapter."""
        if self.merged:
            return
        check_not_held(self.base_layer.weight)
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError("LoRA update holds NaN/inf values; refusing to merge it")
        self.base_layer.weight.add_(delta.to(self.base_layer.weight.dtype))
        # The factors merged (r x (in + out) values), so that unmerge subtracts this very
        # update even if A or B change while merged (a state dict loaded, a step taken).
        self._merged_factors = (self.lora_A.weight.detach().clone(),
                                self.lora_B.weight.detach().clone())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update merged by :meth:`merge` from ``base_layer.weight`` again."""
        if not self.merged:
            return
        check_not_held(self.base_layer.weight)
        # (a module pickled by an older automask holds no factors: its current ones)
        a, b = getattr(self, "_merged_factors", None) or (self.lora_A.weight, self.lora_B.weight)
        delta = (b @ a) * self.scaling  # the same product as delta_weight() at merge time
        self.base_layer.weight.sub_(delta.to(self.base_layer.weight))  # its device and dtype
        self._merged_factors = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def add_low_rank_update(out: torch.Tensor, low_rank: torch.Tensor, weight: torch.Tensor,
                        scaling: float, *, overwrite: bool = False) -> torch.Tensor:
    """``out + scaling * low_rank @ weight^T``, the update added inside one matrix product.

    (..., out_features), (..., r) and ``lora_B``'s weight (out_features, r) -> (...,
    out_features), in ``out``'s dtype. ``torch.addmm(out, low_rank, weight^T,
    alpha=scaling)`` scales and adds in the product's own accumulation: no separate passes
    of ``* scaling`` and ``+`` over the full-width output (and no ``* scaling`` over its
    gradient), and one rounding instead of three under autocast. The gradient reaching
    ``out`` is the output's, unchanged.

    ``overwrite``: ``out`` is a temporary that nothing else reads (the base layer's fresh
    output). Where nothing needs gradients (a prediction) the update is then added into it
    in place: the same product and the same values bit for bit, without a new tensor of
    ``out``'s size and the copy of ``out`` into it (45 MB per windowed vit_b block at
    1024 px in float32).
    """
    width = out.shape[-1]
    low_rank = low_rank.reshape(-1, low_rank.shape[-1]).to(out.dtype)  # (tokens, r)
    # B^T as a contiguous (r, out_features) copy (r * out_features values): the product's
    # backward then takes B's gradient as low_rank^T @ grad, 1.9-4.6x faster on a CPU than the
    # grad^T @ low_rank it uses for a transposed view (an (out_features, r) result).
    weight_t = weight.to(out.dtype).t().contiguous()
    if overwrite and not torch.is_grad_enabled() and out.is_contiguous() \
            and not is_exporting():
        out.view(-1, width).addmm_(low_rank, weight_t, alpha=scaling)
        return out
    fused = torch.addmm(out.reshape(-1, width), low_rank, weight_t,
                        alpha=scaling)  # (tokens, out)
    return fused.view(out.shape)


def check_rank(rank: int, layer: nn.Linear, error: type = ConfigError,
               name: str = "peft.rank") -> None:
    """Raise ``error`` naming ``rank`` unless ``1 <= rank <= min(in, out)`` of ``layer``:
    a larger rank adds parameters that cannot raise the rank of the update."""
    limit = min(layer.in_features, layer.out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise error(f"invalid value {rank!r} for {name!r}: must be an integer in [1, {limit}], "
                    f"the smaller side of the adapted Linear({layer.in_features}, "
                    f"{layer.out_features})")


def apply(model: nn.Module, options: LoRAOptions) -> None:
    """Wrap every image-encoder Linear matching ``options.targets`` in :class:`LoRALinear`."""
    def make(layer: nn.Module) -> LoRALinear:
        check_rank(options.rank, layer)
        return LoRALinear(layer, rank=options.rank, alpha=options.alpha)

    wrap_targets(model, options.target_list, make)


METHOD = PeftMethod("lora", "LoRA", LoRAOptions, apply,
                    source="Hu et al. 2022, 'LoRA'; r=3, alpha=32 on the fused qkv as in "
                           "Zhong et al. 2024")
