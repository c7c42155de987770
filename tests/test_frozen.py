"""Frozen linear weights held in bf16 under a CPU's bf16 autocast: the same results, the
float32 originals back afterwards, in fits, predictions and exports."""
from __future__ import annotations

import contextlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import automask.models.frozen as frozen
from automask import SemanticSegmentor
from automask.datasets import make_synthetic
from automask.export import inference_copy
from automask.models import build_segmenter
from automask.models.frozen import frozen_linears_in_bf16
from automask.peft import PEFT_METHODS, apply_peft, aux_loss

SIZE = 64


def _frozen_linear_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if type(m) is nn.Linear
            for p in m.parameters(recurse=False) if not p.requires_grad]


def _step(model: nn.Module, images: torch.Tensor, forward=None):
    """Loss and gradients of one bf16 training step (the routing noise seeded)."""
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = (forward or model)(images)
        out = out[1] if isinstance(out, tuple) else out
        loss = out.float().square().mean() + aux_loss(model)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad],
                                allow_unused=True)
    return loss.detach(), grads


def _assert_same_step(model: nn.Module, images: torch.Tensor, forward=None) -> None:
    originals = [(p, p.data) for p in _frozen_linear_params(model)]
    loss, grads = _step(model, images, forward)
    with frozen_linears_in_bf16(model) as held:
        assert held == len(originals) > 0
        assert all(p.dtype == torch.bfloat16 for p, _ in originals)
        held_loss, held_grads = _step(model, images, forward)
    assert torch.equal(loss, held_loss)
    for a, b in zip(grads, held_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    for p, data in originals:  # the very tensors, not copies rounded through bf16
        assert p.data_ptr() == data.data_ptr() and p.dtype == torch.float32


@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
def test_a_training_step_is_bit_for_bit_the_same(method):
    torch.manual_seed(0)
    # 80 px: 5 x 5 tokens, windows padded (the padding row comes from a held qkv)
    model = build_segmenter("tiny", input_size=80, checkpoint="random")
    apply_peft(model, method).train()
    images = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    if not _frozen_linear_params(model):  # full, scratch: nothing frozen, nothing held
        with frozen_linears_in_bf16(model) as held:
            assert held == 0
        return
    _assert_same_step(model, images)


def test_sam2_and_the_mask_classification_head_are_the_same():
    torch.manual_seed(0)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    sam2 = apply_peft(build_segmenter("sam2_tiny", input_size=SIZE, checkpoint="random"),
                      "conv_lora").train()
    _assert_same_step(sam2, images)
    queries = apply_peft(build_segmenter("tiny", num_classes=3, input_size=SIZE,
                                         checkpoint="random",
                                         multiclass_head="mask_classification"), "lora")
    _assert_same_step(queries, images, forward=queries.forward_queries)


def test_only_frozen_float32_linear_weights_are_held_and_nesting_holds_nothing_twice():
    model = apply_peft(build_segmenter("tiny", input_size=SIZE, checkpoint="random"),
                       "conv_lora")
    expert = model.image_encoder.blocks[0].attn.qkv.experts[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    with frozen_linears_in_bf16(model) as held:
        assert held == len(_frozen_linear_params(model))
        assert expert.weight.dtype == torch.float32  # a convolution run with autocast off
        assert all(p.dtype == torch.float32 for p in trainable)
        assert model.image_encoder.patch_embed.proj.weight.dtype == torch.float32
        with frozen_linears_in_bf16(model) as again:
            assert again == 0
        assert all(p.dtype == torch.bfloat16 for p in _frozen_linear_params(model))
    with frozen_linears_in_bf16(model, enabled=False) as none:
        assert none == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_originals_come_back_after_an_error_and_outside_autocast_it_raises():
    model = apply_peft(build_segmenter("tiny", input_size=SIZE, checkpoint="random"),
                       "lora").eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(RuntimeError):  # a float32 input meets a bf16 weight: loud
        with frozen_linears_in_bf16(model), torch.no_grad():
            model(images)
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, before[name]), name
    assert not frozen._HELD


def test_a_cast_that_fails_half_way_leaves_nothing_held(monkeypatch):
    model = apply_peft(build_segmenter("tiny", input_size=SIZE, checkpoint="random"),
                       "lora")
    real_to, casts = torch.Tensor.to, []

    def failing_to(self, *args, **kwargs):
        if args and args[0] is torch.bfloat16:
            casts.append(1)
            if len(casts) == 3:
                raise RuntimeError("out of memory (simulated)")
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    with pytest.raises(RuntimeError, match="simulated"):
        with frozen_linears_in_bf16(model):
            pass
    monkeypatch.undo()
    assert len(casts) == 3
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not frozen._HELD


def test_an_export_copy_made_while_held_gets_the_float32_originals():
    model = apply_peft(build_segmenter("tiny", input_size=SIZE, checkpoint="random"), "lora")
    expected = inference_copy(model).state_dict()
    with frozen_linears_in_bf16(model) as held:
        assert held
        clone = inference_copy(model)
    for name, value in clone.state_dict().items():
        assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name


def test_parked_originals_come_back_bit_for_bit_and_the_step_is_the_same():
    torch.manual_seed(0)
    model = apply_peft(build_segmenter("tiny", input_size=80, checkpoint="random"),
                       "conv_lora").train()
    images = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    params = _frozen_linear_params(model)
    before = [p.detach().clone() for p in params]
    # values a bf16 round trip would change: the file must give back all 32 bits
    assert any(not torch.equal(b, b.bfloat16().float()) for b in before)
    loss, grads = _step(model, images)
    with frozen_linears_in_bf16(model, park=True) as held:
        assert held == len(params) > 0
        entries = [frozen._HELD[id(p)].original for p in params]
        assert all(isinstance(e, frozen._Parked) for e in entries)  # none kept in memory
        assert len({id(e.file) for e in entries}) == 1  # one file for all of them
        held_loss, held_grads = _step(model, images)
        clone = inference_copy(model)  # an export copy reads them from the file
    assert torch.equal(loss, held_loss)
    for a, b in zip(grads, held_grads, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    for p, b in zip(params, before, strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, b)
    assert not frozen._HELD and entries[0].file.closed
    expected = inference_copy(model).state_dict()
    for name, value in clone.state_dict().items():
        assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name


def test_a_full_disk_keeps_the_originals_in_memory_with_a_warning(monkeypatch):
    model = apply_peft(build_segmenter("tiny", input_size=SIZE, checkpoint="random"), "lora")
    params = _frozen_linear_params(model)
    before = [p.detach().clone() for p in params]
    real_file = frozen.tempfile.TemporaryFile

    class FillsUp:  # a real temporary file that has room for two weights
        def __init__(self, *args, **kwargs):
            self.file, self.writes = real_file(*args, **kwargs), 0

        def write(self, data):
            self.writes += 1
            if self.writes > 2:
                raise OSError(28, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)
    monkeypatch.setattr(frozen.tempfile, "TemporaryFile", FillsUp)
    with pytest.warns(RuntimeWarning, match="No space left.*keeping them in memory"):
        with frozen_linears_in_bf16(model, park=True) as held:
            kinds = [type(frozen._HELD[id(p)].original) for p in params]
            assert held == len(params) > 2
            assert kinds[:2] == [frozen._Parked] * 2
            assert all(k is torch.Tensor for k in kinds[2:])  # no later write tried
            assert all(p.dtype == torch.bfloat16 for p in params)
    for p, b in zip(params, before, strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, b)


def test_a_parked_weight_that_cannot_be_read_back_is_named_and_the_rest_restored():
    model = apply_peft(build_segmenter("tiny", input_size=SIZE, checkpoint="random"), "lora")
    params = _frozen_linear_params(model)
    before = [p.detach().clone() for p in params]
    last = params[-1]
    name = next(n for n, p in model.named_parameters() if p is last)
    with pytest.raises(RuntimeError, match=re.escape(f"weights of {name!r}: they stay in bf16")):
        with frozen_linears_in_bf16(model, park=True):
            entry = frozen._HELD[id(last)].original
            entry.file.truncate(entry.offset + 4)  # the last weight's bytes are lost
    for p, b in zip(params[:-1], before[:-1], strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, b)
    assert last.dtype == torch.bfloat16 and not frozen._HELD


def test_holds_that_end_out_of_order_give_the_originals_back_after_the_last():
    """Two predictions in two threads may end in any order: the weights stay in bf16 while
    one of them still runs, and the first hold's parked originals come back at the end."""
    model = apply_peft(build_segmenter("tiny", input_size=SIZE, checkpoint="random"), "lora")
    params = _frozen_linear_params(model)
    before = [p.detach().clone() for p in params]
    first = frozen_linears_in_bf16(model, park=True)
    assert first.__enter__() == len(params) > 0
    [file] = {id(e.original.file): e.original.file for e in frozen._HELD.values()}.values()
    second = frozen_linears_in_bf16(model)
    assert second.__enter__() == 0  # shares the first's casts
    first.__exit__(None, None, None)  # the first ends while the second still runs
    assert all(p.dtype == torch.bfloat16 for p in params) and not file.closed
    assert all(frozen.is_held(p) for p in params)
    second.__exit__(None, None, None)
    for p, b in zip(params, before, strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, b)  # read back from the file
    assert not frozen._HELD and file.closed


def test_holds_started_and_ended_by_threads_at_once_restore_every_weight(monkeypatch):
    """Threads entering and leaving holds of one model at the same time (each cast made slow
    so that their loops interleave): none fails, and every weight ends as it began."""
    import threading
    import time

    model = apply_peft(build_segmenter("tiny", input_size=SIZE, checkpoint="random"), "lora")
    params = _frozen_linear_params(model)
    before = [p.detach().clone() for p in params]
    real_to = torch.Tensor.to

    def slow_to(self, *args, **kwargs):
        if args and args[0] is torch.bfloat16:
            time.sleep(0.002)
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", slow_to)
    start, errors = threading.Barrier(4), []

    def hold(rounds: int) -> None:
        try:
            start.wait()
            for _ in range(rounds):
                with frozen_linears_in_bf16(model, park=rounds % 2 == 0):
                    time.sleep(0.001)
        except Exception as exc:  # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=hold, args=(n,)) for n in (2, 3, 4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for p, b in zip(params, before, strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, b)
    assert not frozen._HELD


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(12, size=(64, 80), num_classes=2, seed=3,
                          root=tmp_path_factory.mktemp("frozen_data"))


def _spy(monkeypatch, counts: list[int], hold: bool = True,
         parks: list[bool] | None = None) -> None:
    """Record how many parameters each hold takes (and in ``parks`` whether it parks their
    originals); ``hold=False`` takes none."""
    real = frozen.frozen_linears_in_bf16

    @contextlib.contextmanager
    def spy(model, enabled=True, park=False):
        with real(model, enabled=enabled and hold, park=park) as held:
            counts.append(held)
            if parks is not None:
                parks.append(park and held > 0 and all(
                    isinstance(entry.original, frozen._Parked) for entry in frozen._HELD.values()))
            yield held
    monkeypatch.setattr(frozen, "frozen_linears_in_bf16", spy)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with bf16 products, as far as a prediction asks: a bf16-mixed predictor
    predicts in bf16 (and holds) only there, in float32 elsewhere, so the holds of a
    prediction are tested on any CPU (bf16 is emulated where the CPU has none)."""
    import automask.hardware

    monkeypatch.setattr(automask.hardware, "cpu_supports_bf16", lambda: True)


def _file_checkpoint(tmp_path) -> str:
    """A 'pretrained' backbone: a state dict file (its weights are not saved with a model)."""
    path = tmp_path / "tiny_sam.pth"
    torch.save(build_segmenter("tiny", input_size=SIZE, checkpoint="random").state_dict(), path)
    return str(path)


def test_fit_and_predict_hold_them_and_give_the_same_model(data, tmp_path, monkeypatch,
                                                           bf16_cpu):
    ckpt = _file_checkpoint(tmp_path)
    hp = {"model.checkpoint": ckpt, "model.input_size": SIZE, "peft.method": "conv_lora",
          "optim.max_epochs": 1, "optim.batch_size": 4, "optim.effective_batch_size": 4,
          "env.accelerator": "cpu", "env.precision": "bf16-mixed"}
    runs = {}
    parks: list[bool] = []
    for hold in (True, False):
        counts: list[int] = []
        with monkeypatch.context() as patch:
            _spy(patch, counts, hold, parks if hold else None)
            seg = SemanticSegmentor(path=tmp_path / f"run_{hold}", seed=4, verbosity=0)
            seg.fit(data, presets="tiny", hyperparameters=hp)
            probs = seg.predict_proba(data.iloc[:3])
        runs[hold] = (counts, probs, seg)
    counts, probs, seg = runs[True]
    n_frozen = len(_frozen_linear_params(seg._model(None)))
    assert counts[0] == n_frozen > 0  # the fit held them ...
    assert parks[0] and not parks[-1]  # ... with the originals in a file, not in memory
    assert counts[-1] == n_frozen  # ... and so did the prediction (in memory)
    assert runs[False][0] and not any(runs[False][0])
    for a, b in zip(probs, runs[False][1], strict=True):
        np.testing.assert_array_equal(a, b)
    original = torch.load(ckpt, weights_only=True)
    net = seg._model(None)
    compared = 0
    for name, param in net.named_parameters():  # float32 again, the checkpoint's values
        assert param.dtype == torch.float32, name
        key = name.replace(".base_layer.", ".")
        if not param.requires_grad and key in original:
            assert torch.equal(param, original[key]), name
            compared += 1
    assert compared >= n_frozen


def test_a_random_backbone_is_not_held_in_a_fit(data, tmp_path, monkeypatch, bf16_cpu):
    counts: list[int] = []
    _spy(monkeypatch, counts)
    hp = {"model.input_size": SIZE, "peft.method": "lora", "optim.max_epochs": 1,
          "env.accelerator": "cpu", "env.precision": "bf16-mixed"}
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        data, presets="tiny", hyperparameters=hp)
    assert counts and counts[0] == 0  # its frozen weights go into resume checkpoints
    seg.predict_proba(data.iloc[:1])
    assert counts[-1] > 0  # a prediction saves nothing


def test_a_float32_fit_holds_nothing(data, tmp_path, monkeypatch):
    counts: list[int] = []
    _spy(monkeypatch, counts)
    hp = {"model.checkpoint": _file_checkpoint(tmp_path), "model.input_size": SIZE,
          "peft.method": "lora",
          "optim.max_epochs": 1, "env.accelerator": "cpu", "env.precision": "32"}
    SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        data, presets="tiny", hyperparameters=hp).predict_proba(data.iloc[:1])
    assert counts and not any(counts)


def test_a_parked_hold_never_ended_is_no_error_at_interpreter_exit():
    """A script that enters a hold and exits without ending it (the benchmarks' workers
    could): its temporary file may be closed before the hold is collected; nothing is
    reported then, the process is ending."""
    script = (
        "import torch\n"
        "from torch import nn\n"
        "import automask.models.frozen as frozen\n"
        "model = nn.Sequential(nn.Linear(4, 4)).requires_grad_(False)\n"
        "hold = frozen.frozen_linears_in_bf16(model, park=True)\n"
        "hold.__enter__()\n"
        "next(iter(frozen._HELD.values())).original.file.close()\n"
        "print(model[0].weight.dtype)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch.bfloat16"
    assert "Exception ignored" not in done.stderr and "Error" not in done.stderr, done.stderr


FORK_DURING_HOLDS = """
import os, threading
import torch
from torch import nn
import automask.models.frozen as frozen
torch.set_num_threads(1)
memory = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).requires_grad_(False)
parked = nn.Sequential(nn.Linear(8, 8)).requires_grad_(False)
before = {id(p): p.detach().numpy().tobytes() for m in (memory, parked) for p in m.parameters()}
entered, leave = threading.Barrier(2), threading.Event()

def other_thread():  # a prediction and a fit running in another thread at the fork
    with frozen.frozen_linears_in_bf16(memory), frozen.frozen_linears_in_bf16(parked, park=True):
        entered.wait()
        leave.wait()

thread = threading.Thread(target=other_thread)
thread.start()
entered.wait()


def report():
    dtypes = {str(p.dtype) for m in (memory, parked) for p in m.parameters()}
    return len(frozen._HELD), sorted(dtypes)

with frozen.frozen_linears_in_bf16(memory):  # the forking thread's own hold
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        lines = [f"in the child's own hold: {sorted({str(p.dtype) for p in memory.parameters()})}"]
if pid == 0:
    lines.append(f"after it: {report()}")
    with frozen.frozen_linears_in_bf16(parked):  # the child's own hold of the parked model
        pass
    same = all(p.dtype == torch.float32 and p.detach().numpy().tobytes() == before[id(p)]
               for m in (memory, parked) for p in m.parameters())
    lines.append(f"after a hold of the parked model: {report()} same={same}")
    os.write(write, "\\n".join(lines).encode())
    os._exit(0)
os.close(write)
_, status = os.waitpid(pid, 0)
child = os.read(read, 10000).decode()
leave.set()
thread.join()
print(child)
print(f"parent: {len(frozen._HELD)} held, status {status}")
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX only")
def test_a_child_forked_during_other_threads_holds_gets_its_originals_back():
    """A child forked while other threads hold weights (a prediction, a fit parking its
    originals) has only the forking thread: the others' holds end in the child, so its
    frozen weights go back to float32 (the parked ones after its own next hold) instead of
    staying in bf16 beside their originals for the child's life; the forking thread's own
    hold stays until it ends."""
    done = subprocess.run([sys.executable, "-c", FORK_DURING_HOLDS], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "in the child's own hold: ['torch.bfloat16']",
        "after it: (2, ['torch.bfloat16', 'torch.float32'])",  # parked: read back later
        "after a hold of the parked model: (0, ['torch.float32']) same=True",
        "parent: 0 held, status 0",
    ], done.stderr
