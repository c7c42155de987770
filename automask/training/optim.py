"""AdamW over trainable parameters only, and the warmup-then-decay schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

_NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding)


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            # Biases, norms (SAM's LayerNorm2d included), embeddings/tokens (VPT's prompt
            # tokens included) and position tables (absolute and relative) take no decay.
            if (
                p_name == "bias"
                or "pos" in p_name
                or "prompt" in p_name
                or "token" in p_name
                or isinstance(module, _NO_DECAY_TYPES)
                or type(module).__name__.startswith("LayerNorm")
            ):
                names.add(full)
    return names


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    fused: bool | None = None, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``requires_grad`` parameters; weight decay on matrices and kernels only.

    Parameters with fewer than two dimensions (biases, norm scales), parameters of norm
    layers, embeddings (SAM's output tokens, VPT's prompt tokens) and position tables
    (``pos_embed``, ``rel_pos_h``/``rel_pos_w``) are not decayed; weight matrices,
    convolution kernels and Conv-LoRA's gate matrices are.

    ``fused`` (None: where torch has fused kernels for the parameters' device; False:
    torch's default, foreach or a loop): one kernel set for all parameters, the same update
    up to float rounding and far less host work per step (Conv-LoRA trains 18 small
    tensors per layer): 3.2 ms against 17.6 ms for a vit_b Conv-LoRA step's 336 tensors on
    a 2-core CPU. It unscales gradients inside its step, so it is not for a fit with a
    gradient scaler (16-mixed) that clips gradients. ``eps``: AdamW's epsilon
    (``optim.eps``).
    """
    no_decay = _no_decay_names(model)
    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (plain if name in no_decay or param.ndim < 2 else decay).append(param)
    assert decay or plain, "no trainable parameter"
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    params = decay + plain
    if fused is None:
        fused = _fused_supported(params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=eps,
                             fused=fused or None)


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating point, on one device
    type that has the fused kernels."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # an older torch: CUDA only
        devices = {"cuda"}
    kinds = {p.device.type for p in params}
    return (len(kinds) == 1 and kinds <= devices
            and all(torch.is_floating_point(p) for p in params))


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    """Multiplier of the peak learning rate at each optimiser step.

    Linear warmup from 0 over ``warmup_steps``, then ``linear`` or ``cosine`` decay to zero
    at ``total_steps``, or ``constant``.
    """
    total_steps = max(1, total_steps)

    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn
