"""LoRALinear: identity at init, the update it adds, merging and unmerging."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from automask.models import build_segmenter
from automask.peft import ConvLoRALinear, LoRALinear, apply_peft, merge_adapters, unmerge_adapters


def _layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(12, 36)


def test_identity_at_init():
    base = _layer()
    lora = LoRALinear(base, rank=3, alpha=32)
    assert torch.count_nonzero(lora.lora_B.weight) == 0
    assert torch.count_nonzero(lora.lora_A.weight) > 0
    x = torch.randn(2, 5, 5, 12)
    torch.testing.assert_close(lora(x), base(x))
    assert sum(p.numel() for n, p in lora.named_parameters() if "lora" in n) == 3 * (12 + 36)


def test_update_equals_scaled_low_rank_product():
    base = _layer()
    lora = LoRALinear(base, rank=3, alpha=32)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(4, 12)
    weight = base.weight + (32 / 3) * lora.lora_B.weight @ lora.lora_A.weight
    torch.testing.assert_close(lora(x), x @ weight.T + base.bias, atol=1e-5, rtol=1e-5)


def _update_inputs(dtype=torch.float32):
    torch.manual_seed(3)
    out = torch.randn(2, 7, 5, 48, dtype=dtype, requires_grad=True)  # (..., out_features)
    low = torch.randn(2, 7, 5, 3, dtype=dtype, requires_grad=True)  # (..., r)
    weight = torch.randn(48, 3, dtype=dtype, requires_grad=True)  # lora_B's (out, r)
    return out, low, weight


def test_fused_update_values_and_gradients():
    """add_low_rank_update is out + scaling * low @ W^T, gradients included."""
    from automask.peft.lora import add_low_rank_update

    out, low, weight = _update_inputs(torch.float64)
    grad = torch.randn(2, 7, 5, 48, dtype=torch.float64)
    fused = add_low_rank_update(out, low, weight, 32 / 3)
    plain = out + (low @ weight.T) * (32 / 3)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(fused, (out, low, weight), grad)
    want = torch.autograd.grad(plain, (out, low, weight), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[0], grad)  # the output's gradient reaches ``out`` unchanged


def test_fused_update_under_bf16_autocast_is_as_near_as_the_unfused_one():
    """In bf16 the fused product rounds once: at least as near the float64 value as
    ``out + lora_B(a) * scaling``, which rounds three times."""
    from automask.peft.lora import add_low_rank_update

    out, low, weight = _update_inputs()
    exact = out.double() + (low.double() @ weight.double().T) * (32 / 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = add_low_rank_update(out.bfloat16(), low.bfloat16(), weight, 32 / 3)
        plain = out.bfloat16() + nn.functional.linear(low.bfloat16(), weight) * (32 / 3)
    assert fused.dtype == plain.dtype == torch.bfloat16
    err_fused = (fused.double() - exact).abs().mean()
    err_plain = (plain.double() - exact).abs().mean()
    assert err_fused <= err_plain * 1.05, (err_fused, err_plain)


@pytest.mark.parametrize("autocast", [False, True])
def test_update_overwrites_a_temporary_only_without_gradients(autocast):
    """overwrite=True: without gradients the update goes into ``out`` itself, bit for bit
    the new tensor it gives otherwise; with gradients, or without overwrite, ``out`` is
    left as it was."""
    from automask.peft.lora import add_low_rank_update

    out, low, weight = (t.detach() for t in _update_inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if autocast:
            out = out.bfloat16()
        before = out.clone()
        with torch.no_grad():
            kept = add_low_rank_update(out, low, weight, 32 / 3)
            assert torch.equal(out, before) and kept.data_ptr() != out.data_ptr()
        with torch.enable_grad():
            graded = add_low_rank_update(out, low, weight.requires_grad_(True), 32 / 3,
                                         overwrite=True)
            assert torch.equal(out, before) and graded.requires_grad
        weight = weight.detach()
        with torch.inference_mode():
            written = add_low_rank_update(out, low, weight, 32 / 3, overwrite=True)
    assert written is out and not torch.equal(out, before)
    assert torch.equal(written, kept) and torch.equal(written, graded.detach())


@pytest.mark.parametrize("cls", [LoRALinear, ConvLoRALinear])
def test_adapter_adds_its_update_into_the_base_output_in_a_prediction(cls):
    """LoRA and Conv-LoRA without gradients return the base layer's output tensor with the
    update added in place, with the values of a forward pass with gradients."""
    base = _layer()
    adapter = cls(base, rank=3, alpha=32)
    nn.init.normal_(adapter.lora_B.weight)
    outputs = []
    base.register_forward_hook(lambda module, args, out: outputs.append(out))
    x = torch.randn(2, 5, 5, 12)
    torch.manual_seed(0)  # Conv-LoRA's noisy gate (training mode) draws the same noise
    with_grad = adapter(x)
    assert with_grad.requires_grad and with_grad is not outputs[-1]
    torch.manual_seed(0)
    with torch.no_grad():
        predicted = adapter(x)
    assert predicted is outputs[-1]
    assert torch.equal(predicted, with_grad.detach())
    assert not torch.equal(predicted, base(x))  # the update is not zero


def test_merge_and_unmerge():
    base = _layer()
    original = base.weight.detach().clone()
    lora = LoRALinear(base, rank=3, alpha=32)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(3, 4, 4, 12)
    unmerged = lora(x)
    lora.merge()
    assert lora.merged
    assert (base.weight - original).abs().max() > 1e-3  # B != 0: the base weight changed
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-5)
    lora.merge()  # idempotent
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge()
    assert not lora.merged
    torch.testing.assert_close(base.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_refuses_non_finite():
    lora = LoRALinear(_layer(), rank=2, alpha=4)
    with torch.no_grad():
        lora.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lora.merge()


def test_only_linear_layers():
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv2d(3, 3, 1))


def test_merge_adapters_on_a_segmenter():
    torch.manual_seed(0)
    seg = apply_peft(build_segmenter("tiny", input_size=64, checkpoint="random"), "lora").eval()
    for module in seg.modules():
        if isinstance(module, LoRALinear):
            nn.init.normal_(module.lora_B.weight, std=0.05)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = seg(x)
        merge_adapters(seg)
        assert all(m.merged for m in seg.modules() if isinstance(m, LoRALinear))
        torch.testing.assert_close(seg(x), before, atol=1e-5, rtol=1e-5)
        unmerge_adapters(seg)
        torch.testing.assert_close(seg(x), before, atol=1e-5, rtol=1e-5)


def test_conv_lora_is_not_merged():
    torch.manual_seed(0)
    seg = apply_peft(build_segmenter("tiny", input_size=64, checkpoint="random"), "conv_lora")
    merge_adapters(seg)  # leaves Conv-LoRA alone
    assert not any(m.merged for m in seg.modules() if isinstance(m, ConvLoRALinear))
    with pytest.raises(NotImplementedError):
        next(m for m in seg.modules() if isinstance(m, ConvLoRALinear)).merge()
