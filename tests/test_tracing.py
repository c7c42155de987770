"""automask.utils.tracing: the fast paths' switch to plain operations."""
import pytest
import torch

from automask.utils.tracing import is_exporting


def _branch(x: torch.Tensor) -> torch.Tensor:
    return x + 1 if is_exporting() else x - 1


def test_eager_is_not_exporting():
    assert is_exporting() is False
    assert _branch(torch.zeros(1)).item() == -1


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_jit_trace_is_exporting():
    # check_trace=False: the trace is meant to differ from the eager function
    traced = torch.jit.trace(_branch, torch.zeros(1), check_trace=False)
    assert traced(torch.zeros(1)).item() == 1  # the traced graph took the exporting branch


def test_compile_is_exporting():
    compiled = torch.compile(_branch, backend="eager", fullgraph=True)
    assert compiled(torch.zeros(1)).item() == 1
    assert is_exporting() is False  # and nothing stays switched afterwards
