"""When automask's fast paths step aside: under an exporter, a tracer or the compiler, or
for a module a forward hook waits for.

Under the first three a graph is recorded rather than computed: it needs plain operations,
no reads of tensor values on the host and no branches on them, and its shapes may be
symbolic. A fast path that computes a module without calling it would skip the module's
hooks. The fast paths of :mod:`automask.models.blocks` and :mod:`automask.peft.conv_lora`
step aside in both cases.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_hooks


def is_exporting() -> bool:
    """True under ``torch.onnx.export``, ``torch.jit.trace``, ``torch.compile`` or
    ``torch.export`` (a torch without the last two queries answers for the first two)."""
    compiler = torch.compiler
    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
                or getattr(compiler, "is_compiling", lambda: False)()
                or getattr(compiler, "is_exporting", lambda: False)())


def has_forward_hooks(*modules: nn.Module) -> bool:
    """Whether a forward hook, its own or a global one, waits for any of ``modules``."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
