"""The PEFT method registry (a plain dict built from the method modules) and apply_peft."""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..errors import ConfigError
from . import (adapter, bitfit, conv_lora, decoder_only, full, lora, lst, sam_adapter, scratch,
               ssf, vpt)
from .base import MethodOptions, PeftMethod, mark_decoder_trainable


# In the order of the paper's table; `full` (pretrained full fine-tuning) is not in it.
_MODULES = (scratch, decoder_only, bitfit, adapter, vpt, lst, sam_adapter, ssf, lora, conv_lora,
            full)
PEFT_METHODS: dict[str, PeftMethod] = {module.METHOD.name: module.METHOD for module in _MODULES}


def get_method(name: str) -> PeftMethod:
    """The registered method ``name``; :class:`ConfigError` listing the valid ones."""
    try:
        return PEFT_METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown PEFT method {name!r}; valid methods: {list(PEFT_METHODS)}"
        ) from None


def option_users() -> dict[str, list[str]]:
    """Option name -> the methods that use it, in registry order."""
    users: dict[str, list[str]] = {}
    for method in PEFT_METHODS.values():
        for f in dataclasses.fields(method.options):
            users.setdefault(f.name, []).append(method.name)
    return users


def make_options(method: str, **values: Any) -> MethodOptions:
    """Validated options of ``method``; a key it does not use names the methods that do."""
    spec = get_method(method)
    known = {f.name for f in dataclasses.fields(spec.options)}
    unused = sorted(set(values) - known)
    if unused:
        users = option_users()
        detail = "; ".join(
            f"'peft.{key}' is used by {', '.join(users[key])}" if key in users
            else f"'peft.{key}' is no PEFT option" for key in unused
        )
        raise ConfigError(f"PEFT method {method!r} does not use {unused}: {detail}")
    return spec.options(**values)


def apply_peft(model: nn.Module, method: str, options: MethodOptions | None = None,
               **values: Any) -> nn.Module:
    """Apply a PEFT method to a segmenter in place (after its checkpoint is loaded).

    Every parameter is frozen first and the used parts of the mask decoder are made
    trainable (its IoU head, unused hypernetwork MLPs and the prompt encoder stay frozen);
    the method then adds its adapters and marks what else trains.

    Parameters
    ----------
    model : SamSegmenter
        The segmenter (binary or multi-class), with no PEFT method applied yet.
    method : str
        A key of :data:`PEFT_METHODS`.
    options : MethodOptions, optional
        The method's options; built from ``values`` when None.
    **values
        Option values (``rank=4``, ``targets=("qkv",)``...); only keys the method uses.

    Returns
    -------
    SamSegmenter
        ``model`` itself.

    Raises
    ------
    ConfigError
        Unknown method (the valid ones are listed), an invalid option or one the method does
        not use, a model that already has a PEFT method, or a method the model's backbone
        does not support (its ``check_peft_method`` says why), a target of the wrong kind,
        a (Conv-)LoRA rank above a target layer's smaller side. Nothing is changed then: no
        layer is wrapped, every ``requires_grad`` flag is as before.
    NoMatchingModuleError
        A target pattern matched no module (the pattern is named).
    """
    spec = get_method(method)
    if options is None:
        options = make_options(method, **values)
    elif values or type(options) is not spec.options:  # ConvLoRAOptions is a LoRAOptions
        raise ConfigError(f"pass either {spec.options.__name__} or option values for {method!r}, "
                          f"not {type(options).__name__}" + (f" and {sorted(values)}" if values
                                                              else ""))
    current = getattr(model, "peft_method", None)
    if current is not None:
        raise ConfigError(
            f"PEFT method {current!r} is already applied to this model; build a new one "
            f"to apply {method!r}"
        )
    check = getattr(model, "check_peft_method", None)  # a backbone may refuse a method
    if check is not None:
        check(method)
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.requires_grad_(False)
        mark_decoder_trainable(model)
        spec.apply(model, options)  # checks its targets before it replaces any layer
    except BaseException:  # the model stays as it was: a corrected call may follow
        for param, flag in flags:
            param.requires_grad_(flag)
        raise
    model.peft_method = method
    return model
