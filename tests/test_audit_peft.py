"""Audit of the PEFT adapters: failed applies leave the model as it was, bad sizes are named,
merging is undone exactly what was merged (tiny backbone, 64 px)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from automask.errors import ConfigError
from automask.models import BACKBONES, build_segmenter
from automask.peft import (ConvLoRALinear, ConvLoRAOptions, LoRALinear, adapters, apply_peft,
                           merge_adapters, unmerge_adapters)
from automask.peft.ssf import ScaleShift

SIZE = 64
WIDTH = BACKBONES["tiny"].embed_dim  # qkv: Linear(WIDTH, 3 * WIDTH)


def _tiny():
    torch.manual_seed(0)
    return build_segmenter("tiny", input_size=SIZE, checkpoint="random")


def _flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["lora", "conv_lora"])
def test_a_target_of_the_wrong_kind_wraps_nothing_and_changes_no_flag(method):
    seg = _tiny()
    before = _flags(seg)
    with pytest.raises(ConfigError, match="patch_embed.proj"):
        apply_peft(seg, method, targets="qkv,patch_embed.proj")
    assert adapters(seg) == []  # the qkv layers matched first are not wrapped
    assert _flags(seg) == before and seg.peft_method is None
    apply_peft(seg, method)  # a corrected call works on the same model
    assert len(adapters(seg)) == BACKBONES["tiny"].depth


@pytest.mark.parametrize("method", ["lora", "conv_lora"])
@pytest.mark.parametrize("rank", [WIDTH + 1, 10**6])
def test_a_rank_above_the_layer_width_is_named_before_any_work(method, rank):
    seg = _tiny()
    before = _flags(seg)
    with pytest.raises(ConfigError, match=rf"{rank}.*peft\.rank.*\[1, {WIDTH}\]"):
        apply_peft(seg, method, rank=rank)
    assert adapters(seg) == [] and _flags(seg) == before
    apply_peft(_tiny(), method, rank=WIDTH)  # the width itself is allowed


@pytest.mark.parametrize("cls", [LoRALinear, ConvLoRALinear])
@pytest.mark.parametrize("rank", [0, -2, 9])
def test_adapter_constructors_name_a_bad_rank(cls, rank):
    with pytest.raises(ValueError, match=rf"invalid value {rank} for 'rank'.*\[1, 8\]"):
        cls(nn.Linear(8, 12), rank=rank)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_experts": 0}, "num_experts must be an integer >= 1, got 0"),
    ({"num_experts": 2, "scales": (1.0, 0.0)}, r"scales must be finite and > 0, got \(1.0, 0.0\)"),
    ({"num_experts": 2, "scales": (1.0, float("inf"))}, "scales must be finite"),
])
def test_conv_lora_constructor_names_bad_experts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvLoRALinear(nn.Linear(8, 12), rank=2, **kwargs)


def test_conv_lora_scales_must_be_finite():
    with pytest.raises(ConfigError, match=r"'1,2,inf' for 'peft.scales'.*finite"):
        ConvLoRAOptions(num_experts=3, scales="1,2,inf")


def test_options_of_another_method_are_refused():
    seg = _tiny()
    with pytest.raises(ConfigError, match="LoRAOptions.*not ConvLoRAOptions"):
        apply_peft(seg, "lora", options=ConvLoRAOptions(num_experts=2))
    assert adapters(seg) == [] and seg.peft_method is None


def _trained_lora() -> LoRALinear:
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(12, 20), rank=3, alpha=6)
    nn.init.normal_(lora.lora_B.weight, std=0.5)
    return lora


def test_lora_unmerge_takes_out_the_update_it_merged():
    lora = _trained_lora()
    original = lora.base_layer.weight.detach().clone()
    lora.merge()
    with torch.no_grad():  # A and B change while merged (a state dict loaded, a step taken)
        lora.lora_A.weight.mul_(0.5)
        lora.lora_B.weight.add_(1.0)
    lora.unmerge()
    torch.testing.assert_close(lora.base_layer.weight, original, atol=1e-6, rtol=0)
    x = torch.randn(5, 12)
    expected = nn.functional.linear(x, original, lora.base_layer.bias) + (
        x @ lora.lora_A.weight.T @ lora.lora_B.weight.T) * lora.scaling
    torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-5)


def test_lora_merge_unmerge_unchanged_factors_is_as_before():
    lora = _trained_lora()
    original = lora.base_layer.weight.detach().clone()
    delta = lora.delta_weight().detach()
    lora.merge()
    lora.merge()  # idempotent
    lora.unmerge()
    lora.unmerge()
    torch.testing.assert_close(lora.base_layer.weight, original + delta - delta, atol=0, rtol=0)


def _scale_shift(layer: nn.Module) -> ScaleShift:
    torch.manual_seed(1)
    return ScaleShift(layer)


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(3, 5, 3)])
def test_ssf_zero_scale_merges_and_unmerges_without_nan(layer):
    ss = _scale_shift(layer)
    with torch.no_grad():
        ss.scale[1] = 0.0
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 7, 7)
    before = ss(x)
    ss.merge()
    torch.testing.assert_close(ss(x), before, atol=1e-6, rtol=1e-5)
    ss.unmerge()
    assert torch.isfinite(layer.weight).all() and torch.isfinite(layer.bias).all()
    torch.testing.assert_close(layer.weight, weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.bias, bias, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ss(x), before, atol=1e-6, rtol=1e-5)


def test_ssf_unmerge_takes_out_the_values_it_merged():
    layer = nn.Linear(6, 5)
    ss = _scale_shift(layer)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    ss.merge()
    with torch.no_grad():
        ss.scale.mul_(3.0)
        ss.shift.add_(1.0)
    ss.unmerge()
    torch.testing.assert_close(layer.weight, weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.bias, bias, atol=1e-6, rtol=1e-6)


def test_a_refused_merge_leaves_the_whole_model_unmerged():
    seg = apply_peft(_tiny(), "ssf").eval()
    last = [m for m in adapters(seg) if m.mergeable][-1]
    with torch.no_grad():
        last.shift[0] = float("inf")
    bases = {n: p.detach().clone() for n, p in seg.named_parameters() if not p.requires_grad}
    with pytest.raises(ValueError, match="NaN/inf"):
        merge_adapters(seg)
    assert not any(m.merged for m in adapters(seg))
    for name, p in seg.named_parameters():
        if name in bases:
            torch.testing.assert_close(p, bases[name], atol=1e-6, rtol=1e-6, msg=name)
    unmerge_adapters(seg)  # nothing merged: a no-op


@pytest.mark.parametrize("method", ["lora", "ssf"])
def test_merging_into_weights_held_in_bf16_is_refused(method):
    from automask.models.frozen import frozen_linears_in_bf16

    seg = apply_peft(_tiny(), method).eval()
    for module in adapters(seg):
        if isinstance(module, LoRALinear):
            nn.init.normal_(module.lora_B.weight, std=0.05)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        before = seg(x)
    with frozen_linears_in_bf16(seg), pytest.raises(ValueError, match="held in bf16"):
        merge_adapters(seg)  # else lost when the float32 originals come back
    assert not any(m.merged for m in adapters(seg))
    merge_adapters(seg)
    with frozen_linears_in_bf16(seg), pytest.raises(ValueError, match="held in bf16"):
        unmerge_adapters(seg)
    assert all(m.merged for m in adapters(seg) if m.mergeable)
    with torch.no_grad():
        torch.testing.assert_close(seg(x), before, atol=1e-5, rtol=1e-4)


def test_ssf_keeps_the_compute_dtype_under_autocast_and_the_same_training_signal():
    """Under bf16 autocast SSF's float32 scale used to turn each Linear's bf16 output, and
    everything after it up to the next product, into float32. Now its output stays bf16;
    loss and gradients stay those of the float32 form within bf16 rounding."""
    seg = apply_peft(_tiny(), "ssf").train()
    with torch.no_grad():  # SSF after training: scales and shifts away from their init
        for module in adapters(seg):
            module.scale.normal_(1.0, 0.3)
            module.shift.normal_(0.0, 0.3)
    dtypes = []
    hooks = [m.register_forward_hook(lambda mod, i, out: dtypes.append(out.dtype))
             for m in adapters(seg) if isinstance(m.base_layer, nn.Linear)]
    x = torch.randn(2, 3, SIZE, SIZE)
    params = [p for p in seg.parameters() if p.requires_grad]

    def loss_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = seg(x).float().square().mean()
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), torch.cat([g.flatten() for g in grads])

    loss, grads = loss_and_grads()
    for h in hooks:
        h.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    old = ScaleShift.forward
    try:  # the float32 form: y * scale + shift with the scale's dtype winning
        ScaleShift.forward = lambda self, v: (self.base_layer(v) * self._view(self.scale)
                                              + self._view(self.shift))
        ref_loss, ref_grads = loss_and_grads()
    finally:
        ScaleShift.forward = old
    assert not torch.equal(loss, ref_loss)  # the two forms really differ in rounding
    torch.testing.assert_close(loss, ref_loss, rtol=3e-2, atol=0)
    cosine = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0)
    assert cosine > 0.99, float(cosine)
