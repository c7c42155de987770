"""What every PEFT method builds on: the adapter base, the encoder hook, target matching.

Nothing here knows a concrete method. Merging, auxiliary-loss collection and saving find
adapters by structure (:class:`Adapter` subclasses, modules with an ``aux_loss`` tensor,
parameters with ``requires_grad``), so a new method needs no change outside its own module.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..errors import ConfigError, NoMatchingModuleError

# Adapters are searched for in this submodule of the segmenter only, so a target such as
# "proj" cannot silently catch mask-decoder layers.
TARGET_ROOT = "image_encoder"


# --------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base of each method's options dataclass.

    A subclass declares only the keys its method uses, each with a type hint, a default and
    a docstring (the string under the field: it becomes the README's hyperparameter table
    row), and validates them in ``__post_init__`` with :meth:`check`. The configuration
    exposes every field as ``peft.<name>``.
    """

    def check(self, name: str, ok: bool, why: str) -> None:
        """Raise :class:`ConfigError` naming ``peft.<name>`` unless ``ok``."""
        if not ok:
            raise ConfigError(f"invalid value {getattr(self, name)!r} for 'peft.{name}': {why}")

    def check_int(self, name: str, low: int) -> None:
        value = getattr(self, name)
        self.check(name, isinstance(value, int) and not isinstance(value, bool) and value >= low,
                   f"must be an integer >= {low}")

    def check_positive(self, name: str, allow_zero: bool = False) -> None:
        value = getattr(self, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            value >= 0 if allow_zero else value > 0) and value == value and value != float("inf")
        self.check(name, ok, "must be a finite number " + (">= 0" if allow_zero else "> 0"))

    @classmethod
    def field_types(cls) -> dict[str, typing.Any]:
        """Field name -> type hint."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, typing.Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def split_names(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"qkv, proj"`` or ``("qkv", "proj")`` -> ``("qkv", "proj")``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip() for item in items if str(item).strip())


@dataclasses.dataclass(frozen=True)
class PeftMethod:
    """One PEFT method: what its module declares.

    Attributes
    ----------
    name : str
        Registry key (``peft.method``).
    label : str
        Name in the paper's table.
    options : type
        Its :class:`~automask.peft.base.MethodOptions` dataclass (the keys it uses).
    apply : callable
        ``apply(model, options)``: wrap layers, add hooks, mark what trains.
    random_init : bool
        The method trains from random weights whatever ``model.checkpoint`` says
        (``scratch``).
    source : str
        Where the method and its configuration come from.
    unused_parameters : bool
        Some trainable parameters may get no gradient in a step (experts a router did not
        pick, SAM heads a prompt-free forward skips): distributed training must look for
        them (DDP's ``find_unused_parameters``), which costs a graph traversal per step,
        so only such methods pay for it.
    """

    name: str
    label: str
    options: type
    apply: Callable[[nn.Module, Any], None]
    random_init: bool = False
    source: str = ""
    unused_parameters: bool = False



# --------------------------------------------------------------------------- adapters
class Adapter(nn.Module):
    """Base of every layer wrapper: keeps the adapted layer as ``base_layer``.

    A subclass computes its output from ``self.base_layer`` and its own trainable parts and
    keeps the adapted layer's call signature. Class attribute ``mergeable`` says whether
    :meth:`merge` can fold the adapter into the base weights for inference; ``aux_loss``
    holds an auxiliary loss of the last forward (already weighted) or None. ``token_wise``
    says that each output row depends only on the same input row (given a token-wise
    ``base_layer``), so the encoder may skip the rows of window padding
    (:mod:`automask.models.blocks`); leave it False when unsure.
    """

    mergeable: ClassVar[bool] = False
    token_wise: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.aux_loss: torch.Tensor | None = None
        self.merged = False

    def merge(self) -> None:
        """Fold the adapter into ``base_layer`` (mergeable adapters only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base layer")

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base layer")


class EncoderHook(nn.Module):
    """Extension point of the image-encoder forward, for methods that wrap no single layer.

    :meth:`automask.models.SamSegmenter.encode` runs::

        x = patch_embed(images) + pos_embed         # (B, h, w, E)
        x = hook.on_embed(x, images, ctx)
        for i, block in enumerate(blocks):
            x = hook.before_block(i, x, ctx)
            x = block(x)                              # recomputed in backward when
            x = hook.after_block(i, x, ctx)           #   gradient checkpointing is on
        x = hook.on_neck(x, ctx)
        embeddings = neck(x)

    ``ctx`` is a fresh dict per forward for state that flows between the calls (a prompt
    generator's prompts, a side network's activations). Only the block itself is
    checkpointed, so the hook's methods may read and write ``ctx`` freely. The default
    methods are the identity.
    """

    def on_embed(self, x: torch.Tensor, images: torch.Tensor, ctx: dict) -> torch.Tensor:
        return x

    def before_block(self, index: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return x

    def after_block(self, index: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return x

    def on_neck(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return x


def check_not_held(*params: torch.Tensor) -> None:
    """Refuse to fold into (or out of) weights that
    :func:`automask.models.frozen.frozen_linears_in_bf16` holds in bf16: their float32
    originals come back when the hold ends, and the change would be lost while the adapter
    says it is (un)merged."""
    from ..models.frozen import is_held

    if any(is_held(p) for p in params):
        raise ValueError("cannot merge or unmerge while the base layer's frozen weights are "
                         "held in bf16 (frozen_linears_in_bf16); do it before the hold or after")


def adapters(model: nn.Module) -> list[Adapter]:
    """Every :class:`Adapter` inside ``model``."""
    return [m for m in model.modules() if isinstance(m, Adapter)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses that modules stored in the last forward.

    Any module with a tensor attribute ``aux_loss`` (adapters, hooks) contributes; the
    values are already weighted. Returns a 0-dim zero tensor when there is none.
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


def merge_adapters(model: nn.Module) -> int:
    """Fold every mergeable adapter into its base layer, for inference; returns how many.

    Adapters that cannot be merged (Conv-LoRA's experts are nonlinear) are left as they
    are, so the model output is unchanged either way. When one refuses (``ValueError``:
    non-finite values, base weights held in bf16), those this call merged before it are
    unmerged again and the error is raised: no model is left half merged.
    """
    merged = [m for m in adapters(model) if m.mergeable]
    done = []
    try:
        for module in merged:
            if not module.merged:
                module.merge()
                done.append(module)
    except BaseException:  # one refused (non-finite values): undo the others, merge none
        for module in reversed(done):
            module.unmerge()
        raise
    return len(merged)


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters` (all or, when one refuses, none)."""
    done = []
    try:
        for module in adapters(model):
            if module.mergeable and module.merged:
                module.unmerge()
                done.append(module)
    except BaseException:
        for module in reversed(done):
            module.merge()
        raise


# --------------------------------------------------------------------------- targets
def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names (relative to ``model``) of image-encoder modules matched by ``targets``.

    A target matches a module whose name inside the image encoder equals it or ends with
    ``"." + target``; e.g. ``"qkv"`` matches ``blocks.3.attn.qkv``. A model may map SAM's
    names to its own through a ``target_aliases`` dict (SAM 2.1: ``mlp.lin2`` ->
    ``mlp.layers.1``).

    Raises
    ------
    NoMatchingModuleError
        A target matches no module; the message names it.
    """
    root = getattr(model, TARGET_ROOT)
    names = [name for name, _ in root.named_modules() if name]
    aliases = getattr(model, "target_aliases", {})  # SAM's layer names on other encoders
    found: list[str] = []
    for target in (aliases.get(t, t) for t in targets):
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


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def wrap_targets(
    model: nn.Module,
    targets: Sequence[str],
    make: Callable[[nn.Module], nn.Module],
    layer_types: tuple[type, ...] = (nn.Linear,),
) -> list[str]:
    """Replace each matched module by ``make(module)``; returns the wrapped names.

    Raises
    ------
    ConfigError
        A matched module is not one of ``layer_types`` (the method's declared kinds).
    """
    names = find_targets(model, targets)
    layers = [model.get_submodule(name) for name in names]
    for name, layer in zip(names, layers):  # every target checked before any is replaced
        if not isinstance(layer, layer_types) or isinstance(layer, Adapter):
            kinds = " or ".join(t.__name__ for t in layer_types)
            # "proj" also ends patch_embed.proj (a Conv2d): name the wrappable ones closer
            closer = sorted({".".join(n.split(".")[-2:]) for n, m in zip(names, layers)
                             if isinstance(m, layer_types) and not isinstance(m, Adapter)})
            hint = (f"; to wrap only the {kinds} layers, name them more closely: "
                    f"{', '.join(map(repr, closer))}" if closer else "")
            raise ConfigError(
                f"target {name!r} is a {type(layer).__name__}, not a {kinds}; this method "
                f"wraps {kinds} layers only{hint}"
            )
    wrapped = [make(layer) for layer in layers]  # a wrapper that fails replaces nothing
    for name, new in zip(names, wrapped):
        replace_module(model, name, new)
    return names


def mark_decoder_trainable(model: nn.Module) -> None:
    """Make the mask decoder trainable except the parts the forward never uses.

    Frozen: the IoU prediction head and unused hypernetwork MLPs (see
    ``SamSegmenter.unused_parameter_names``); the prompt encoder stays frozen.
    """
    unused = set(model.unused_parameter_names())
    for name, param in model.mask_decoder.named_parameters():
        param.requires_grad_(f"mask_decoder.{name}" not in unused)
