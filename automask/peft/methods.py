"""The PEFT method registry and :func:`apply_peft`."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from ..errors import ConfigError
from .conv_lora import apply_conv_lora
from .decoder_only import apply_decoder_only
from .full import apply_full
from .lora import apply_lora
from .options import PeftOptions

# name -> apply(model, options); each method is one small module of this package.
PEFT_METHODS: dict[str, Callable[[nn.Module, PeftOptions], None]] = {
    "decoder_only": apply_decoder_only,
    "lora": apply_lora,
    "conv_lora": apply_conv_lora,
    "full": apply_full,
}


def apply_peft(
    model: nn.Module,
    method: str,
    *,
    rank: int = 3,
    alpha: float = 32,
    num_experts: int = 8,
    top_k: int = 1,
    scales: Sequence[float] | None = None,
    targets: Sequence[str] = ("qkv",),
    aux_loss_weight: float = 0.01,
) -> nn.Module:
    """Apply a PEFT method to a segmenter in place (after its checkpoint is loaded).

    Every parameter is frozen first; the method then injects its adapters and marks what
    trains. In every method the mask decoder trains, except its IoU head and unused
    hypernetwork MLPs; the prompt encoder stays frozen (``full`` unfreezes everything).

    Parameters
    ----------
    model : SamSegmenter
        The segmenter (binary or multi-class), with no PEFT method applied yet.
    method : str
        A key of :data:`PEFT_METHODS`.
    rank, alpha : int, float
        LoRA / Conv-LoRA rank and scale (update scaled by alpha / rank).
    num_experts, top_k, scales : int, int, sequence of float
        Conv-LoRA mixture size, experts per sample and expert scales (default 1..M).
    targets : sequence of str
        Image-encoder Linear layers adapted, by exact name or ``.name`` suffix.
    aux_loss_weight : float
        Weight of each Conv-LoRA layer's load-balancing loss.

    Returns
    -------
    SamSegmenter
        ``model`` itself.

    Raises
    ------
    ConfigError
        Unknown method (the valid ones are listed), invalid option, or a model that
        already has a PEFT method.
    NoMatchingModuleError
        A target pattern matched no module (the pattern is named).
    """
    if method not in PEFT_METHODS:
        raise ConfigError(f"unknown PEFT method {method!r}; valid methods: {list(PEFT_METHODS)}")
    options = PeftOptions.from_kwargs(
        rank=rank, alpha=alpha, num_experts=num_experts, top_k=top_k,
        scales=None if scales is None else tuple(scales),
        targets=targets, aux_loss_weight=aux_loss_weight,
    )
    current = getattr(model, "peft_method", None)
    if current is not None:
        raise ConfigError(
            f"PEFT method {current!r} is already applied to this model; build a new one "
            f"to apply {method!r}"
        )
    model.requires_grad_(False)
    PEFT_METHODS[method](model, options)
    model.peft_method = method
    return model
