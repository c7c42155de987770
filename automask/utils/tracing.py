"""Whether code runs under an exporter, a tracer or the compiler.

There a graph is recorded rather than computed: it needs plain operations, no reads of
tensor values on the host and no branches on them, and its shapes may be symbolic. The
fast paths of :mod:`automask.models.blocks` and :mod:`automask.peft.conv_lora` step aside
then.
"""
from __future__ import annotations

import torch


def is_exporting() -> bool:
    """True under ``torch.onnx.export``, ``torch.jit.trace``, ``torch.compile`` or
    ``torch.export`` (a torch without the last two queries answers for the first two)."""
    compiler = torch.compiler
    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
                or getattr(compiler, "is_compiling", lambda: False)()
                or getattr(compiler, "is_exporting", lambda: False)())
