"""The PEFT contract, tested over the registry: a method is covered once it is registered."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from segment_anything.modeling import ImageEncoderViT

from automask.errors import ConfigError, NoMatchingModuleError
from automask.models import BACKBONES, build_segmenter, count_parameters
from automask.models.summary import parameter_summary
from automask.peft import (PEFT_METHODS, Adapter, ConvLoRALinear, LoRALinear, apply_peft,
                           aux_loss, make_options)

METHODS = list(PEFT_METHODS)
# Methods whose standard initialisation leaves the output unchanged. Not: vpt (its prompts
# join every attention), sam_adapter (trunc-normal prompt generator), ssf (scale ~ N(1, .02)).
IDENTITY_AT_INIT = {"scratch", "decoder_only", "bitfit", "adapter", "lst", "lora", "conv_lora",
                    "full"}
ENCODER_FROZEN = {"decoder_only"}
SIZE = 128

# The paper's #Params (M) and Ratio (%) on vit_h, one class (results_binary.csv).
PAPER_VIT_H = {
    "scratch": (641.09, 100.0), "decoder_only": (3.51, 0.55), "bitfit": (3.96, 0.62),
    "adapter": (3.92, 0.61), "vpt": (4.00, 0.62), "lst": (11.49, 1.77),
    "sam_adapter": (3.98, 0.62), "ssf": (4.42, 0.69), "lora": (4.00, 0.62),
    "conv_lora": (4.02, 0.63),
}


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


def _wake_zero_inits(seg) -> None:
    """Give zero-initialised trainable tensors (LoRA's B, adapters' up...) small values,
    so that every parameter before them receives a non-zero gradient."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in seg.parameters():
            if param.requires_grad and not param.abs().sum() > 0:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def test_registry_is_the_paper_table_plus_full():
    assert METHODS == list(PAPER_VIT_H) + ["full"]
    for name, method in PEFT_METHODS.items():
        assert method.name == name and method.label and method.source


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError, match="bitfits.*decoder_only.*lora.*conv_lora.*full"):
        apply_peft(_tiny(), "bitfits")


def test_option_of_another_method_names_its_users():
    with pytest.raises(ConfigError, match=r"num_experts.*used by conv_lora"):
        apply_peft(_tiny(), "lora", num_experts=4)
    with pytest.raises(ConfigError, match=r"rank.*used by lora, conv_lora"):
        make_options("vpt", rank=2)


def test_pattern_matching_nothing_is_named():
    with pytest.raises(NoMatchingModuleError, match="'q_proj'"):
        apply_peft(_tiny(), "lora", targets=("qkv", "q_proj"))


def test_layer_of_the_wrong_kind_is_refused():
    with pytest.raises(ConfigError, match="not a Linear") as info:
        apply_peft(_tiny(), "lora", targets=("attn",))
    assert "more closely" not in str(info.value)  # no Linear layer is named 'attn'


def test_a_name_that_also_ends_a_convolution_suggests_the_linear_layers_closer():
    # 'proj' ends each block's attn.proj (Linear) and patch_embed.proj (Conv2d)
    with pytest.raises(ConfigError, match="patch_embed.proj.*'attn.proj'"):
        apply_peft(_tiny(), "lora", targets=("proj",))
    model = _tiny()
    apply_peft(model, "lora", targets=("attn.proj",))  # the suggestion works
    assert sum("attn.proj.lora_A" in n for n, _ in model.named_parameters()) > 0


@pytest.mark.parametrize("method,kwargs", [
    ("conv_lora", {"rank": 0}), ("conv_lora", {"top_k": 9}), ("conv_lora", {"scales": [1, 2]}),
    ("conv_lora", {"alpha": -1}), ("lora", {"targets": ()}), ("adapter", {"bottleneck": 0}),
    ("vpt", {"num_prompts": 0}), ("lst", {"reduction": 0}), ("sam_adapter", {"freq_ratio": 1}),
    ("lora", {"alpha": float("nan")}),
])
def test_invalid_options_name_the_key(method, kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"peft.{key}"):
        apply_peft(_tiny(), method, **kwargs)


def test_second_method_is_refused():
    seg = apply_peft(_tiny(), "lora")
    with pytest.raises(ConfigError, match="already applied"):
        apply_peft(seg, "conv_lora")


def test_lora_targets_other_layers():
    seg = apply_peft(_tiny(), "lora", targets=("qkv", "attn.proj"))
    wrapped = [n for n, m in seg.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * BACKBONES["tiny"].depth
    assert all(n.startswith("image_encoder.") for n in wrapped)


def test_vit_h_parameter_counts_are_the_papers():
    """All rows at once, as ``automask params --backbone vit_h`` prints them."""
    table = parameter_summary("vit_h").set_index("method")
    expected = {**PAPER_VIT_H, "full": (641.09, 100.0)}  # full is not in the paper's table
    got = {m: (row.trainable_m, row.ratio_pct) for m, row in table.iterrows()}
    assert got == expected


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_decoder_trains_in_every_method_and_nothing_frozen_leaks(method, num_classes):
    seg = apply_peft(_tiny(num_classes), method)
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    if method in ("full", "scratch"):
        assert trainable == {n for n, _ in seg.named_parameters()}
        return
    unused = set(seg.unused_parameter_names())
    decoder = {n for n, _ in seg.named_parameters() if n.startswith("mask_decoder.")} - unused
    assert decoder <= trainable
    assert not trainable & unused
    mlps = {n.split(".")[2] for n in decoder if "output_hypernetworks_mlps" in n}
    assert mlps == {str(i) for i in range(num_classes)}
    added = trainable - decoder
    assert not any(n.startswith(("prompt_encoder.", "mask_decoder.")) for n in added)
    assert not any(".base_layer." in n for n in added)  # wrapped layers stay frozen
    assert (added == set()) == (method == "decoder_only")


@pytest.mark.parametrize("method", METHODS)
def test_encoder_parity_at_init_then_change_after_a_step(method):
    seg = _tiny()
    reference = _sam_encoder(SIZE).eval()
    reference.load_state_dict(seg.image_encoder.state_dict())  # before any wrapping
    apply_peft(seg, method)
    x = torch.randn(2, 3, SIZE, SIZE)
    seg.eval()
    with torch.no_grad():
        gap = (seg.encode(x) - reference(x)).abs().max().item()
        before = seg(x)
    if method in IDENTITY_AT_INIT:
        assert gap < 1e-5
    else:
        assert gap > 1e-5  # the documented exceptions really are not the identity
    seg.train()
    _wake_zero_inits(seg)  # also makes the zero-init adapters differ from the identity
    optimizer = torch.optim.AdamW([p for p in seg.parameters() if p.requires_grad], lr=1e-3)
    _loss(seg(x), seg).backward()
    optimizer.step()
    seg.eval()
    with torch.no_grad():
        encoder_gap = (seg.encode(x) - reference(x)).abs().max().item()
        logits_gap = (seg(x) - before).abs().max().item()
    assert logits_gap > 1e-4
    assert (encoder_gap < 1e-5) == (method in ENCODER_FROZEN)


def _covered(seg) -> bool:
    return all(all(c > 0 for c in m.seen) for m in seg.modules() if isinstance(m, ConvLoRALinear))


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient(method, num_classes):
    size = 256 if method == "conv_lora" else SIZE  # room for every expert's scale
    seg = apply_peft(_tiny(num_classes, size=size), method).train()
    _wake_zero_inits(seg)
    routed = [m for m in seg.modules() if isinstance(m, ConvLoRALinear)]
    for module in routed:
        module.seen = [0] * module.num_experts
    torch.manual_seed(1)
    for _ in range(60):  # conv_lora: until the noisy gate has routed to every expert
        _loss(seg(torch.randn(2, 3, size, size)), seg).backward()
        for module in routed:
            module.seen = [a + b for a, b in zip(module.seen, module.expert_counts)]
        if _covered(seg):
            break
    assert _covered(seg), [m.seen for m in routed]
    no_grad = {n for n, p in seg.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    if method in ("full", "scratch"):
        assert no_grad == set(seg.unused_parameter_names())
    else:
        assert trainable.isdisjoint(no_grad), sorted(trainable & no_grad)
        assert all(p.grad is None for p in seg.parameters() if not p.requires_grad)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(method):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        seg = apply_peft(_tiny(seed=2), method).train()
        _wake_zero_inits(seg)
        seg.gradient_checkpointing = checkpointing
        torch.manual_seed(5)  # conv_lora's noisy gate draws the same noise both times
        _loss(seg(torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))),
              seg).backward()
        return {n: p.grad.clone() for n, p in seg.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-5, rtol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_and_eval_determinism(method):
    seg = apply_peft(_tiny(seed=0), method)
    _wake_zero_inits(seg)
    x = torch.randn(2, 3, SIZE, SIZE)
    seg.eval()
    with torch.no_grad():
        first, second = seg(x), seg(x)
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # eval mode is deterministic
    scope = "all" if method in ("full", "scratch") else "trainable"
    tensors = ({n: t.contiguous() for n, t in seg.state_dict().items()} if scope == "all" else
               {n: p.detach().contiguous() for n, p in seg.named_parameters() if p.requires_grad})
    blob = save(tensors)
    # The frozen backbone is rebuilt as saved models rebuild it: same weights, then the
    # method; the trainable tensors come from the file.
    other = apply_peft(_tiny(seed=0), method)
    state = dict(other.named_parameters()) | dict(other.named_buffers())
    loaded = load(blob)
    assert set(loaded) <= set(state)
    with torch.no_grad():
        for name, value in loaded.items():
            state[name].copy_(value)
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), first, atol=0, rtol=0)


def test_merging_keeps_outputs_for_every_mergeable_adapter():
    from automask.peft import merge_adapters, unmerge_adapters

    for method in METHODS:
        seg = apply_peft(_tiny(), method)
        _wake_zero_inits(seg)
        seg.eval()
        x = torch.randn(1, 3, SIZE, SIZE)
        with torch.no_grad():
            before = seg(x)
            merged = merge_adapters(seg)
            after = seg(x)
            unmerge_adapters(seg)
            again = seg(x)
        kinds = {type(m).__name__ for m in seg.modules() if isinstance(m, Adapter)
                 and m.mergeable}
        assert (merged > 0) == bool(kinds), method
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4, msg=method)
        torch.testing.assert_close(again, before, atol=1e-4, rtol=1e-4, msg=method)


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


def test_vpt_prompts_attend_in_every_window():
    """Changing one block's prompts changes every window of that block's output."""
    from segment_anything.modeling.image_encoder import window_partition

    seg = apply_peft(_tiny(), "vpt").eval()
    block = seg.image_encoder.blocks[0]
    assert block.window_size > 0
    grid = SIZE // 16
    x = torch.randn(1, grid, grid, BACKBONES["tiny"].embed_dim)
    with torch.no_grad():
        before = block(x)
        # (a constant shift would vanish in norm1: prompts pass the block's LayerNorm)
        block.attn.prompts.add_(torch.randn_like(block.attn.prompts))
        after = block(x)
    changed, _ = window_partition((after - before).abs(), block.window_size)
    assert (changed.flatten(1).amax(1) > 1e-4).all()
