"""apply_peft: registry, freezing, output parity with segment-anything, gradients."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT

from automask.errors import ConfigError, NoMatchingModuleError
from automask.models import BACKBONES, build_segmenter, count_parameters
from automask.peft import PEFT_METHODS, ConvLoRALinear, LoRALinear, apply_peft, aux_loss

METHODS = ["decoder_only", "lora", "conv_lora", "full"]
SIZE = 128


def _tiny(num_classes: int = 1, size: int = SIZE, seed: int = 0):
    torch.manual_seed(seed)
    seg = build_segmenter("tiny", num_classes=num_classes, input_size=size, checkpoint="random")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial weights everywhere (SAM zero-inits position tables)
        for param in seg.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return seg


def _sam_encoder(size: int) -> ImageEncoderViT:
    spec = BACKBONES["tiny"]
    return ImageEncoderViT(
        img_size=size, patch_size=16, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=4, out_chans=spec.prompt_embed_dim,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
        window_size=spec.window_size, global_attn_indexes=spec.global_attn_indexes,
    )


def _loss(logits: torch.Tensor, model) -> torch.Tensor:
    target = (torch.arange(logits.shape[-1]) % 3 == 0).float().expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, target) + aux_loss(model)


def test_registry_names():
    assert list(PEFT_METHODS) == METHODS


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError, match="bitfit.*decoder_only.*lora.*conv_lora.*full"):
        apply_peft(_tiny(), "bitfit")


def test_pattern_matching_nothing_is_named():
    with pytest.raises(NoMatchingModuleError, match="'q_proj'"):
        apply_peft(_tiny(), "lora", targets=("qkv", "q_proj"))


def test_non_linear_target_is_refused():
    with pytest.raises(ConfigError, match="not an nn.Linear"):
        apply_peft(_tiny(), "lora", targets=("attn",))


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"top_k": 9}, {"scales": [1, 2]},
                                    {"alpha": -1}, {"targets": ()}])
def test_invalid_options(kwargs):
    with pytest.raises(ConfigError):
        apply_peft(_tiny(), "conv_lora", **kwargs)


def test_second_method_is_refused():
    seg = apply_peft(_tiny(), "lora")
    with pytest.raises(ConfigError, match="already applied"):
        apply_peft(seg, "conv_lora")


def test_lora_targets_other_layers():
    seg = apply_peft(_tiny(), "lora", targets=("qkv", "attn.proj"))
    wrapped = [n for n, m in seg.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * BACKBONES["tiny"].depth
    assert all(n.startswith("image_encoder.") for n in wrapped)


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_trainable_sets(method, num_classes):
    seg = apply_peft(_tiny(num_classes), method)
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    if method == "full":
        assert trainable == {n for n, _ in seg.named_parameters()}
        return
    unused = set(seg.unused_parameter_names())
    decoder = {n for n, _ in seg.named_parameters() if n.startswith("mask_decoder.")} - unused
    assert {"mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"} <= decoder
    assert not any("iou_prediction_head" in n for n in decoder)
    mlps = {n.split(".")[2] for n in decoder if "output_hypernetworks_mlps" in n}
    assert mlps == {str(i) for i in range(num_classes)}
    adapters = trainable - decoder
    assert not any(n.startswith(("prompt_encoder.", "mask_decoder.")) for n in adapters)
    if method == "decoder_only":
        assert adapters == set()
    else:
        leaves = {n.split("qkv.")[1].split(".")[0] for n in adapters}
        expected = {"lora_A", "lora_B"}
        if method == "conv_lora":
            expected |= {"experts", "w_gate", "w_noise"}
        assert leaves == expected
        assert not any("base_layer" in n for n in adapters)


@pytest.mark.parametrize("method", METHODS)
def test_encoder_parity_at_init_then_divergence(method):
    seg = _tiny()
    reference = _sam_encoder(SIZE).eval()
    reference.load_state_dict(seg.image_encoder.state_dict())  # before any wrapping
    apply_peft(seg, method)
    x = torch.randn(2, 3, SIZE, SIZE)
    for mode in ("eval", "train"):
        getattr(seg, mode)()
        with torch.no_grad():
            torch.testing.assert_close(seg.image_encoder(x), reference(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        seg.eval()
        before = seg(x)
    seg.train()
    optimizer = torch.optim.AdamW([p for p in seg.parameters() if p.requires_grad], lr=1e-3)
    _loss(seg(x), seg).backward()
    optimizer.step()
    seg.eval()
    with torch.no_grad():
        encoder_gap = (seg.image_encoder(x) - reference(x)).abs().max().item()
        logits_gap = (seg(x) - before).abs().max().item()
    assert logits_gap > 1e-4
    if method == "decoder_only":
        assert encoder_gap < 1e-5  # the encoder is frozen
    else:
        assert encoder_gap > 1e-4


def _covered(seg) -> bool:
    return all(all(c > 0 for c in m.seen) for m in seg.modules() if isinstance(m, ConvLoRALinear))


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient(method, num_classes):
    seg = apply_peft(_tiny(num_classes, size=256), method).train()
    with torch.no_grad():  # B != 0 so that A (and the experts) receive non-zero gradients
        for module in seg.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(0, 0.1)
    adapters = [m for m in seg.modules() if isinstance(m, ConvLoRALinear)]
    for module in adapters:
        module.seen = [0] * module.num_experts
    torch.manual_seed(1)
    for _ in range(60):  # conv_lora: until the noisy gate has routed to every expert
        _loss(seg(torch.randn(2, 3, 256, 256)), seg).backward()
        for module in adapters:
            module.seen = [a + b for a, b in zip(module.seen, module.expert_counts)]
        if _covered(seg):
            break
    assert _covered(seg), [m.seen for m in adapters]
    no_grad = {n for n, p in seg.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    if method == "full":
        assert no_grad == set(seg.unused_parameter_names())
    else:
        assert trainable.isdisjoint(no_grad), sorted(trainable & no_grad)
        assert all(p.grad is None for p in seg.parameters() if not p.requires_grad)


def test_aux_loss_collects_conv_lora_layers():
    seg = _tiny()
    assert aux_loss(seg).shape == () and aux_loss(seg).item() == 0.0
    apply_peft(seg, "conv_lora").train()
    seg(torch.randn(2, 3, SIZE, SIZE))
    layers = [m.aux_loss for m in seg.modules() if isinstance(m, ConvLoRALinear)]
    assert len(layers) == BACKBONES["tiny"].depth
    torch.testing.assert_close(aux_loss(seg), torch.stack(layers).sum())


def test_lora_parameter_count_on_tiny():
    seg = _tiny()
    before, _ = count_parameters(apply_peft(_tiny(), "decoder_only"))
    after, _ = count_parameters(apply_peft(seg, "lora", rank=3))
    dim, depth = BACKBONES["tiny"].embed_dim, BACKBONES["tiny"].depth
    assert after - before == depth * 3 * (dim + 3 * dim)
