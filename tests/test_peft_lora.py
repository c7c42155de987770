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
