"""Target matching, module replacement, freezing and model-wide adapter helpers."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, NoMatchingModuleError

# Adapters are searched for in this submodule of the segmenter only, so a target such as
# "proj" cannot silently catch mask-decoder layers.
TARGET_ROOT = "image_encoder"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names (relative to ``model``) of image-encoder modules matched by ``targets``.

    A target matches a module whose name (inside the image encoder) equals it or ends with
    ``"." + target``; e.g. ``"qkv"`` matches ``blocks.3.attn.qkv``.

    Raises
    ------
    NoMatchingModuleError
        A target matches no module; the message names it.
    """
    root = getattr(model, TARGET_ROOT)
    names = [name for name, _ in root.named_modules() if name]
    found: list[str] = []
    for target in targets:
        hits = [name for name in names if _matches(name, target)]
        if not hits:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in root.named_modules()
                             if isinstance(m, nn.Linear)})
            raise NoMatchingModuleError(
                f"target pattern {target!r} matched no module of {TARGET_ROOT}; "
                f"Linear layer names there: {linear}"
            )
        found.extend(f"{TARGET_ROOT}.{n}" for n in hits if f"{TARGET_ROOT}.{n}" not in found)
    return found


def wrap_targets(
    model: nn.Module, targets: Sequence[str], make: Callable[[nn.Linear], nn.Module]
) -> list[str]:
    """Replace each matched ``nn.Linear`` by ``make(layer)``; returns the wrapped names."""
    names = find_targets(model, targets)
    for name in names:
        layer = model.get_submodule(name)
        if type(layer) is not nn.Linear:
            raise ConfigError(
                f"target {name!r} is a {type(layer).__name__}, not an nn.Linear; "
                f"adapters wrap Linear layers only"
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(layer))
    return names


def mark_decoder_trainable(model: nn.Module) -> None:
    """Make the mask decoder trainable except the parts the forward never uses.

    Frozen: the IoU prediction head and unused hypernetwork MLPs (see
    ``SamSegmenter.unused_parameter_names``); the prompt encoder stays frozen.
    """
    unused = set(model.unused_parameter_names())
    for name, param in model.mask_decoder.named_parameters():
        param.requires_grad_(f"mask_decoder.{name}" not in unused)


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    """Adapter layers of ``model`` (modules exposing ``merge``/``unmerge``)."""
    from .lora import LoRALinear

    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses the adapters stored in the last forward.

    Each adapter with an auxiliary loss (Conv-LoRA's load balancing) stores it, already
    weighted, as ``module.aux_loss``. Returns a 0-dim zero tensor when there is none.
    """
    total = None
    for module in model.modules():
        loss = getattr(module, "aux_loss", None)
        if torch.is_tensor(loss):
            total = loss if total is None else total + loss
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def merge_adapters(model: nn.Module) -> None:
    """Fold every mergeable adapter (LoRA) into its base weight, for inference.

    Conv-LoRA adapters are not mergeable (their experts are nonlinear) and are left as
    they are, so the model output is unchanged either way.
    """
    for module in adapter_modules(model):
        if module.mergeable:
            module.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters`."""
    for module in adapter_modules(model):
        if module.mergeable:
            module.unmerge()
