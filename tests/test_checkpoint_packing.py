"""Resume checkpoints pack their small tensors into a few flat ones and get them back
bit for bit (automask.training.packing)."""
from __future__ import annotations

import io
from collections import OrderedDict

import pytest
import torch

from automask.training.packing import KEY, SMALL_BYTES, pack_tensors, unpack_tensors


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _saved_and_loaded(checkpoint: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # as Lightning's resume reads it


def _same(a, b) -> None:
    """Same structure, container types, and tensors equal bit for bit in dtype and shape."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def _checkpoint() -> dict:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(SMALL_BYTES // 4 + 1, generator=g)  # one element above the limit
    return {
        "epoch": 3,
        "state_dict": OrderedDict(
            (f"w{i}", torch.randn(7, i + 1, generator=g)) for i in range(20)),
        "optimizer_states": [{"state": {i: {"step": torch.tensor(5.0),
                                            "exp_avg": torch.randn(3, generator=g)}
                                        for i in range(10)},
                              "param_groups": [{"lr": 1e-3, "params": list(range(10))}]}],
        "callbacks": {"Best": {"best_state": {"a": torch.arange(6).view(2, 3).t()}}},  # strided
        "rng": {"torch": torch.get_rng_state(), "keys": torch.arange(4, dtype=torch.int64),
                "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 5),
                "half": torch.randn(4, generator=g).half()},
        "in_a_tuple": (torch.ones(2),),
        "big": big,
        "python": (3, (1, 2), None),
    }


def test_a_packed_checkpoint_comes_back_bit_for_bit_with_few_tensors_in_its_file():
    original = _checkpoint()
    expected = _checkpoint()  # packing must not change the values it was given
    packed = dict(original)
    pack_tensors(packed)
    loaded = _saved_and_loaded(packed)
    assert KEY in loaded
    # in the file: one flat tensor per dtype (float32, float16, uint8, int64, bool), the
    # big one and the one in a tuple; not the 48 of the checkpoint
    assert len(_tensors(expected)) == 48
    assert len(_tensors(loaded)) == 5 + 2
    assert loaded["big"].shape == expected["big"].shape  # saved as it is
    unpack_tensors(loaded)
    assert KEY not in loaded
    _same(loaded, expected)
    _same(original, expected)
    # each is a tensor of its own, not a view of the flat one
    tensors = _tensors(loaded["state_dict"])
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)


def test_packing_leaves_the_owners_of_nested_state_untouched():
    """An optimiser's ``state_dict()`` hands out its own per-parameter dicts; packing the
    checkpoint that holds them must not put references into the optimiser."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=0.1)
    sum(p.sum() for p in params).backward()
    opt.step()
    best = {"w": params[0].detach().clone()}
    checkpoint = {"optimizer_states": [opt.state_dict()], "callbacks": {"Best": {"best": best}}}
    pack_tensors(checkpoint)
    assert checkpoint["optimizer_states"][0]["state"][0]["exp_avg"][0] == "automask.packed_tensor"
    assert all(isinstance(v, torch.Tensor) for s in opt.state.values() for v in s.values())
    assert isinstance(best["w"], torch.Tensor)
    opt.step()  # still a working optimiser
    loaded = _saved_and_loaded(checkpoint)
    unpack_tensors(loaded)
    again = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.1)
    again.load_state_dict(loaded["optimizer_states"][0])
    assert int(again.state_dict()["state"][0]["step"]) == 1


def test_a_checkpoint_without_small_tensors_or_unpacked_is_left_as_it_is():
    plain = {"epoch": 1, "big": torch.zeros(SMALL_BYTES // 4 + 1), "loops": {"x": [1, 2]}}
    pack_tensors(plain)
    assert KEY not in plain and plain["loops"] == {"x": [1, 2]}
    unpack_tensors(plain)  # an older checkpoint, written before packing: read as it is
    assert set(plain) == {"epoch", "big", "loops"}
    with pytest.raises(AssertionError, match="packed twice"):
        packed = {"t": torch.ones(1)}
        pack_tensors(packed)
        pack_tensors(packed)


def test_the_training_module_packs_its_resume_checkpoint_and_restores_it():
    """SegmentationModule's hooks: a real fused AdamW state and the model's trainable
    weights, saved and loaded the way Lightning does, come back equal."""
    from automask.config import OptimConfig
    from automask.models import build_segmenter
    from automask.peft import apply_peft
    from automask.training import SegmentationModule, build_optimizer

    torch.manual_seed(0)
    model = apply_peft(build_segmenter("tiny", num_classes=1, input_size=64,
                                       checkpoint="random"), "conv_lora")
    module = SegmentationModule(model, task="binary", num_classes=2, optim=OptimConfig(),
                                val_metric="iou")
    opt = build_optimizer(model, lr=1e-3, weight_decay=1e-4)
    model(torch.randn(1, 3, 64, 64)).float().mean().backward()
    opt.step()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    checkpoint = {"epoch": 0, "state_dict": dict(state),
                  "optimizer_states": [opt.state_dict()]}
    module.on_save_checkpoint(checkpoint)
    count = len(_tensors(checkpoint["state_dict"])) + len(_tensors(checkpoint["optimizer_states"]))
    assert count == 0 and KEY in checkpoint  # every one of them is in the flat tensors
    loaded = _saved_and_loaded(checkpoint)
    module.on_load_checkpoint(loaded)
    assert set(loaded["state_dict"]) == set(state) and len(state) > 100
    for k, v in loaded["state_dict"].items():
        assert torch.equal(v, state[k]), k
    _same(loaded["optimizer_states"][0], opt.state_dict())
