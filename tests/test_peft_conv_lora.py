"""ConvLoRALinear: experts, gating, load balancing, dispatch and modes."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automask.models import BACKBONES, build_segmenter
from automask.peft import ConvLoRALinear, apply_peft
from automask.peft.conv_lora import bicubic_resize


def _adapter(rank=3, experts=8, top_k=1, seed=0, **kwargs) -> ConvLoRALinear:
    torch.manual_seed(seed)
    return ConvLoRALinear(nn.Linear(16, 48), rank=rank, alpha=32, num_experts=experts,
                          top_k=top_k, **kwargs)


def _record_conv_inputs(module: ConvLoRALinear) -> dict[int, list]:
    shapes: dict[int, list] = {}
    for i, conv in enumerate(module.experts):
        conv.register_forward_pre_hook(
            lambda mod, args, i=i: shapes.setdefault(i, []).append(tuple(args[0].shape)))
    return shapes


def test_parameters_and_options():
    adapter = _adapter()
    extra = sum(p.numel() for n, p in adapter.named_parameters()
                if not n.startswith(("base_layer", "lora_")))
    assert extra == 8 * (9 * 3 * 3 + 3) + 2 * 3 * 8 == 720
    assert (adapter.rank, adapter.num_experts, adapter.top_k) == (3, 8, 1)
    assert adapter.scales == tuple(float(i) for i in range(1, 9))
    assert torch.count_nonzero(adapter.w_gate) == 0 and torch.count_nonzero(adapter.w_noise) == 0
    custom = _adapter(experts=3, scales=(0.5, 1, 2))
    assert custom.scales == (0.5, 1.0, 2.0)


def test_expert_biases_start_at_zero_and_learn():
    """As in the authors' code, each 3x3 expert starts without a constant offset (its kernel
    random); a training step moves the routed experts' biases off zero."""
    adapter = _adapter()
    for expert in adapter.experts:
        assert torch.count_nonzero(expert.bias) == 0 and torch.count_nonzero(expert.weight) > 0
    nn.init.normal_(adapter.lora_B.weight)
    adapter.train()
    adapter(torch.randn(2, 6, 6, 16)).square().sum().backward()
    torch.optim.SGD(adapter.parameters(), lr=0.1).step()
    moved = [i for i, e in enumerate(adapter.experts) if torch.count_nonzero(e.bias) > 0]
    assert moved and all(adapter.expert_counts[i] > 0 for i in moved), adapter.expert_counts


@pytest.mark.parametrize("index", range(8))
def test_expert_scales_and_shapes(index):
    adapter = _adapter()
    shapes = _record_conv_inputs(adapter)
    grid = torch.randn(2, 3, 7, 7)
    out = adapter.run_expert(index, grid)
    scale = index + 1
    assert out.shape == grid.shape
    assert shapes[index] == [(2, 3, 7 * scale, 7 * scale)]
    # reference: interpolate by s, conv, GELU, interpolate back (no resize for s = 1)
    x = grid if scale == 1 else F.interpolate(grid, scale_factor=scale, mode="bicubic")
    x = F.gelu(F.conv2d(x, adapter.experts[index].weight, adapter.experts[index].bias, padding=1))
    if scale != 1:
        x = F.interpolate(x, size=(7, 7), mode="bicubic")
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def _routed_training_step(dtype, experts):
    """A Conv-LoRA training step (top-2 of ``experts`` experts at scales 1, 2, ..., 6 windows
    of 7 x 7, biases and gate not zero): output, load-balancing loss, input gradient, the
    parameters' gradients and the expert counts."""
    adapter = _adapter(experts=experts, top_k=2).to(dtype).train()
    with torch.no_grad():
        nn.init.normal_(adapter.lora_B.weight)
        adapter.w_gate.normal_()
        for expert in adapter.experts:
            expert.bias.normal_(std=0.1)
    x = torch.randn(6, 7, 7, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    x.requires_grad_()
    torch.manual_seed(2)  # the gate's noise
    out = adapter(x)
    (out.float().square().mean() + adapter.aux_loss).backward()
    grads = {n: p.grad for n, p in adapter.named_parameters() if p.grad is not None}
    return out, adapter.aux_loss, x.grad, grads, adapter.expert_counts


def _assert_same_step(got, expected, dtype):
    """Two :func:`_routed_training_step` results agree: float32 within 1e-5, bf16 within a
    few of its units of rounding at each tensor's scale; the same parameters got gradients,
    the experts among them."""
    def close(a, b):
        rtol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())

    for a, b in zip(got[:3], expected[:3]):
        close(a, b)
    assert got[3].keys() == expected[3].keys()
    assert any(n.startswith("experts.") for n in got[3])
    for name in expected[3]:
        close(got[3][name], expected[3][name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_im2col_expert_convolution_equals_the_module_with_gradients(monkeypatch, dtype):
    """On a CPU the experts convolve small maps with ATen's im2col kernel
    (conv_lora.expert_conv) instead of calling the Conv2d: the same output, gradients and
    load-balancing loss in training mode as with every map through the module (float32
    within 1e-5; bf16, a model cast to it, within its rounding). A map over
    IM2COL_BUDGET (pixels times threads), and any expert with a hook, goes through the
    module."""
    from automask.peft import conv_lora

    calls = []
    kernel = conv_lora._IM2COL_CONV
    assert kernel is not None  # the torch pinned here has it
    monkeypatch.setattr(conv_lora, "COMPOSE_FROM", float("inf"))  # every map convolved
    monkeypatch.setattr(conv_lora, "_IM2COL_CONV",
                        lambda x, *args: calls.append(tuple(x.shape)) or kernel(x, *args))

    def step(budget):
        monkeypatch.setattr(conv_lora, "IM2COL_BUDGET", budget)
        return _routed_training_step(dtype, experts=4)

    threads = torch.get_num_threads()
    module = step(0)  # no map is small enough: every expert called
    assert calls == []
    # n * H * W of each routed expert's maps (6 windows of 7 x 7, expert i at scale i + 1)
    sizes = sorted(count * (7 * (i + 1)) ** 2 for i, count in enumerate(module[4]) if count)
    assert len(sizes) >= 2, module[4]
    im2col = step(sizes[-1] * threads)  # every map within the budget
    assert sorted(n * h * w for n, _, h, w in calls) == sizes
    assert im2col[4] == module[4]  # routed the same way

    _assert_same_step(im2col, module, dtype)

    # the budget counts pixels times threads: the largest map is one pixel too many
    for count in (1, 2):
        torch.set_num_threads(count)
        try:
            calls.clear()
            step(sizes[-1] * count - 1)
            assert sorted(n * h * w for n, _, h, w in calls) == sizes[:-1], count
        finally:
            torch.set_num_threads(threads)
    calls.clear()
    adapter = _adapter(experts=4)
    shapes = _record_conv_inputs(adapter)  # a hook: the module is called
    adapter.run_expert(1, torch.randn(2, 3, 7, 7))
    assert calls == [] and shapes == {1: [(2, 3, 14, 14)]}


@pytest.mark.parametrize("size_in,size_out", [((7, 7), (56, 56)), ((14, 14), (28, 28)),
                                               ((6, 5), (9, 3)), ((7, 7), (4, 4)),
                                               ((5, 8), (5, 16))])
def test_bicubic_resize_is_interpolate(size_in, size_out):
    """The experts' resize by two matrix products: F.interpolate's values and gradients
    (bicubic, align_corners=False), up and down, by integer and other factors."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, *size_in, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, *size_out, generator=gen, dtype=torch.float64)
    ours = bicubic_resize(x, size_out)
    (grad,) = torch.autograd.grad((ours * weight).sum(), x)
    reference = F.interpolate(x, size=size_out, mode="bicubic", align_corners=False)
    (reference_grad,) = torch.autograd.grad((reference * weight).sum(), x)
    assert ours.shape == reference.shape == (3, 2, *size_out)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, reference_grad, atol=1e-12, rtol=1e-12)
    assert bicubic_resize(x, size_in) is x


@pytest.mark.parametrize("size_in,size_out", [((7, 7), (56, 56)), ((14, 14), (42, 42)),
                                               ((6, 5), (9, 3)), ((5, 8), (20, 16)),
                                               ((7, 7), (7, 7)), ((3, 4), (12, 25))])
@pytest.mark.parametrize("bias", [True, False])
def test_resized_conv_is_the_resize_then_the_convolution(size_in, size_out, bias):
    """conv_lora.resized_conv, the expert's resize and 3x3 convolution composed into matrix
    products: the values and the gradients (map, kernel, bias) of F.conv2d(padding=1) on
    the bicubic resize, in float64 to 1e-12, up and down, square or not, with the zero
    padding at every border."""
    from automask.peft.conv_lora import resized_conv

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size_in, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    probe = torch.randn(2, 4, *size_out, generator=gen, dtype=torch.float64)
    inputs = [t for t in (x, weight, b) if t is not None]
    ours = resized_conv(x, weight, b, size_out)
    reference = F.conv2d(bicubic_resize(x, size_out), weight, b, padding=1)
    assert ours.shape == reference.shape == (2, 4, *size_out)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)
    for g, r in zip(torch.autograd.grad((ours * probe).sum(), inputs),
                    torch.autograd.grad((reference * probe).sum(), inputs)):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)
    # the border taps read the padding's zeros: a map of ones, resized, stays ones inside
    # but the output's edge lacks a third of the kernel's rows or columns
    ones = resized_conv(torch.ones(1, 3, *size_in, dtype=torch.float64),
                        torch.ones(1, 3, 3, 3, dtype=torch.float64), None, size_out)
    if min(size_out) >= 3:
        assert torch.allclose(ones[0, 0, 1:-1, 1:-1], torch.full_like(ones[0, 0, 1:-1, 1:-1], 27))
        assert torch.allclose(ones[0, 0, 0, 1:-1], torch.full_like(ones[0, 0, 0, 1:-1], 18))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_from_scale_four_compose_resize_and_convolution(monkeypatch, dtype):
    """On a CPU an expert whose map is COMPOSE_FROM (16) times its input's area or more runs
    conv_lora.resized_conv; the training step's output, gradients, load-balancing loss and
    routing equal those with every expert resizing and then convolving (float32 within
    1e-5; bf16, a model cast to it, within its rounding). Not for an expert with a hook,
    under a tracer or on another device."""
    from automask.peft import conv_lora

    calls = []
    composed = conv_lora.resized_conv
    monkeypatch.setattr(conv_lora, "resized_conv",
                        lambda x, w, b, size: calls.append((x.shape[0], size)) or composed(
                            x, w, b, size))

    def step(compose_from):
        monkeypatch.setattr(conv_lora, "COMPOSE_FROM", compose_from)
        return _routed_training_step(dtype, experts=5)

    apart = step(float("inf"))
    assert calls == []
    together = step(16)
    counts = apart[4]
    assert together[4] == counts  # routed the same way
    # experts 4 and 5 (scales 4 and 5: 16 and 25 times the area), each on its routed maps
    expected = [(counts[i], (7 * (i + 1),) * 2) for i in (3, 4) if counts[i]]
    assert calls == expected and len(expected) == 2, counts

    _assert_same_step(together, apart, dtype)
    calls.clear()
    step(25)  # from scale 5 only: the bound is inclusive
    assert calls == expected[1:]
    calls.clear()
    step(26)
    assert calls == []
    monkeypatch.setattr(conv_lora, "COMPOSE_FROM", 16)
    adapter = _adapter(experts=5)
    shapes = _record_conv_inputs(adapter)  # a hook: the module is called
    adapter.run_expert(4, torch.randn(2, 3, 7, 7))
    assert calls == [] and shapes == {4: [(2, 3, 35, 35)]}
    expert = _adapter(experts=5).experts[4]  # unhooked
    traced = []  # under a tracer: never (the exported graph keeps the standard operations)
    torch.jit.trace(lambda t: traced.append(conv_lora.composes(expert, t, (35, 35))) or t * 2,
                    torch.empty(2, 3, 7, 7), check_trace=False)
    assert traced == [False] and conv_lora.composes(expert, torch.empty(2, 3, 7, 7), (35, 35))
    # on another device (measured on CPUs only): resize, then convolve
    assert not conv_lora.composes(expert, torch.empty(2, 3, 7, 7, device="meta"), (35, 35))


def test_windowed_and_global_blocks_see_their_grids():
    spec = BACKBONES["tiny"]  # 256 px -> 16x16 tokens; windows of 8 -> 4 windows per image
    torch.manual_seed(0)
    seg = apply_peft(build_segmenter("tiny", input_size=256, checkpoint="random"), "conv_lora")
    seg.train()
    recorded = {}
    for b, block in enumerate(seg.image_encoder.blocks):
        recorded[b] = _record_conv_inputs(block.attn.qkv)
    seg(torch.randn(2, 3, 256, 256))
    for b, shapes in recorded.items():
        side, samples = (16, 2) if b in spec.global_attn_indexes else (8, 2 * 4)
        flat = [(i, s) for i, calls in shapes.items() for s in calls]
        assert sum(s[0] for _, s in flat) == samples  # top-1: each sample to one expert
        for i, shape in flat:
            scale = i + 1
            assert shape[1:] == (3, side * scale, side * scale)
        assert sum(seg.image_encoder.blocks[b].attn.qkv.expert_counts) == samples


def _routing_adapter(experts=4, top_k=1, weight=0.01):
    """rank == experts and w_gate = 10 * I: a sample whose pooled features are e_j goes to j."""
    adapter = _adapter(rank=experts, experts=experts, top_k=top_k, aux_loss_weight=weight)
    with torch.no_grad():
        adapter.w_gate.copy_(10 * torch.eye(experts))
    return adapter.eval()


def test_top_k_selection():
    adapter = _routing_adapter(top_k=1)
    pooled = torch.tensor([[0.0, 1.0, 0.2, 0.0], [0.3, 0.0, 0.0, 0.9]])
    gates, _ = adapter.gate(pooled)
    assert gates.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    adapter2 = _routing_adapter(top_k=2)
    gates2, _ = adapter2.gate(pooled)
    logits = pooled @ adapter2.w_gate
    top = torch.softmax(torch.tensor([[10.0, 2.0], [9.0, 3.0]]), dim=1)
    expected = torch.zeros(2, 4)
    expected[0, 1], expected[0, 2] = top[0]
    expected[1, 3], expected[1, 0] = top[1]
    torch.testing.assert_close(gates2, expected)
    assert logits.argmax(1).tolist() == [1, 3]


def test_only_routed_experts_run():
    adapter = _routing_adapter()
    shapes = _record_conv_inputs(adapter)
    grid = torch.zeros(3, 4, 5, 5)
    grid[:, 2] = 1.0  # pooled features e_2 -> all samples to expert 2
    adapter.mixture(grid)
    assert list(shapes) == [2] and shapes[2] == [(3, 4, 15, 15)]
    assert adapter.expert_counts == [0, 0, 3, 0]


def test_load_balancing_loss():
    adapter = _routing_adapter(weight=0.01)
    _, balanced = adapter.gate(torch.eye(4))  # one sample per expert
    assert balanced.item() == pytest.approx(0.0, abs=1e-9)
    _, skewed = adapter.gate(torch.eye(4)[[0, 0, 0, 0]])  # everything to expert 0
    # importance = load = [4, 0, 0, 0]: mean 1, unbiased variance 4 -> cv^2 = 4 each
    assert skewed.item() == pytest.approx(0.01 * (4 + 4), rel=1e-5)
    _, partly = adapter.gate(torch.eye(4)[[0, 1, 1, 2]])
    assert 0 < partly.item() < skewed.item()


def test_noise_only_in_training():
    adapter = _adapter()  # zero gates: all logits tie without noise
    pooled = torch.randn(256, 3)
    adapter.eval()
    first, _ = adapter.gate(pooled)
    second, _ = adapter.gate(pooled)
    assert torch.equal(first, second)
    assert (first > 0).sum(0).count_nonzero() == 1  # no noise: everyone to the same expert
    adapter.train()
    torch.manual_seed(0)
    noisy1, _ = adapter.gate(pooled)
    noisy2, _ = adapter.gate(pooled)
    assert not torch.equal(noisy1, noisy2)
    assert (noisy1 > 0).sum(0).count_nonzero() == 8  # noise spreads 256 samples over all 8


def test_training_load_is_differentiable():
    adapter = _adapter().train()
    torch.manual_seed(0)
    _, loss = adapter.gate(torch.randn(64, 3))
    loss.backward()
    assert adapter.w_gate.grad.abs().sum() > 0 and adapter.w_noise.grad.abs().sum() > 0


def test_deterministic_eval_and_identity_at_init():
    adapter = _adapter()
    x = torch.randn(2, 6, 6, 16)
    adapter.train()
    torch.testing.assert_close(adapter(x), adapter.base_layer(x))  # B = 0
    nn.init.normal_(adapter.lora_B.weight)
    with torch.no_grad():
        adapter.w_noise.fill_(1.0)
    adapter.eval()
    torch.testing.assert_close(adapter(x), adapter(x), atol=0, rtol=0)
    assert (adapter(x) - adapter.base_layer(x)).abs().max() > 1e-3


def test_forward_is_base_plus_delta_with_gradients():
    """The fused forward (lora_B, scaling and the sum in one addmm) equals
    ``base_layer(x) + delta(x)``, values and every gradient, once B has changed."""
    adapter = _adapter().double().eval()  # eval: no gating noise, the same routing twice
    nn.init.normal_(adapter.lora_B.weight)
    x = torch.randn(2, 6, 6, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 6, 6, 48, dtype=torch.float64)
    params = [x, adapter.lora_A.weight, adapter.lora_B.weight, adapter.w_gate,
              *adapter.experts.parameters()]
    fused = adapter(x)
    plain = adapter.base_layer(x) + adapter.delta(x)
    assert (fused - adapter.base_layer(x)).abs().max() > 1e-3
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(fused, params, grad, allow_unused=True)
    want = torch.autograd.grad(plain, params, grad, allow_unused=True)
    assert sum(g is not None for g in got) >= 4
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_rejects_flat_tokens():
    with pytest.raises(ValueError, match="token grid"):
        _adapter()(torch.randn(2, 10, 16))


def test_bf16_autocast_on_cpu():
    adapter = _adapter().train()
    nn.init.normal_(adapter.lora_B.weight)
    x = torch.randn(2, 6, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert adapter.aux_loss.dtype == torch.float32
    out.float().sum().backward()
    used = [e for e, c in zip(adapter.experts, adapter.expert_counts) if c]
    assert used and all(e.weight.grad is not None for e in used)


# ---------------------------------------------------------------- dispatch equivalence
def _previous_mixture(self, grid):
    """The dispatch as it was before the float32 experts: experts, weights and sums in the
    grid's dtype under the ambient autocast (the reference the current one must match)."""
    with torch.autocast(device_type=grid.device.type, enabled=False):
        gates, self.aux_loss = self.gate(grid.float().mean(dim=(2, 3)))
    weight, expert = gates.topk(self.top_k, dim=1)
    sample = torch.arange(grid.shape[0]).repeat_interleave(self.top_k)
    expert, weight = expert.reshape(-1), weight.reshape(-1)
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=self.num_experts).tolist()
    out, start = torch.zeros_like(grid), 0
    for index, count in enumerate(counts):
        if count == 0:
            continue
        chosen = order[start:start + count]
        start += count
        rows = sample[chosen]
        x = grid.index_select(0, rows)
        size = x.shape[-2:]
        scale = self.scales[index]
        if scale != 1.0:
            x = F.interpolate(x, size=(round(size[0] * scale), round(size[1] * scale)),
                              mode="bicubic", align_corners=False)
        x = F.gelu(self.experts[index](x))
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False)
        y = x * weight[chosen].to(x.dtype).view(-1, 1, 1, 1)
        out = out.index_add(0, rows, y.to(out.dtype))
    return out


def _run(adapter, x, mode, bf16, seed=0):
    """Output, aux loss and every gradient (None as zeros) of one forward + backward."""
    adapter.train(mode == "train")
    adapter.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same gate noise for both dispatches
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = adapter(x)
    loss = out.float().square().mean() + adapter.aux_loss
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in adapter.named_parameters() if p.requires_grad}
    return out.float().detach(), loss.detach(), x.grad, grads


def _routed_adapter(top_k):
    adapter = _adapter(rank=3, experts=4, top_k=top_k, seed=1, scales=(1, 2, 3, 0.5))
    adapter.base_layer.requires_grad_(False)
    with torch.no_grad():
        nn.init.normal_(adapter.lora_B.weight, std=0.5)
        nn.init.normal_(adapter.w_gate, std=2.0)
        nn.init.normal_(adapter.w_noise, std=1.0)
    return adapter


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("bf16", [False, True])
def test_dispatch_matches_previous_dispatch(mode, top_k, bf16):
    """Float32 experts resizing by matrix products give the previous dispatch's output, loss
    and gradients (that one resized with ``F.interpolate`` in autocast's dtype).

    fp32: the same operations except the resizes, which equal ``F.interpolate`` to float
    rounding (tolerance 1e-5). bf16 autocast: the previous dispatch rounded expert maps,
    weights and sums to bf16, the current one keeps the experts in float32, so they agree to
    bf16 rounding (2e-2 relative to the largest value; the current one is the more precise).
    """
    x = torch.randn(6, 5, 5, 16, generator=torch.Generator().manual_seed(0))
    adapter = _routed_adapter(top_k)
    new = _run(adapter, x, mode, bf16)
    counts = list(adapter.expert_counts)
    assert sum(c > 0 for c in counts) >= 2  # several experts routed
    adapter.mixture = _previous_mixture.__get__(adapter)
    old = _run(adapter, x, mode, bf16)
    tol = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-5}
    for a, b in zip(new[:3], old[:3]):
        scale = max(1.0, b.abs().max().item()) if bf16 else 1.0
        torch.testing.assert_close(a / scale, b / scale, **tol)
    for name in new[3]:
        scale = max(1e-3, old[3][name].abs().max().item()) if bf16 else 1.0
        torch.testing.assert_close(new[3][name] / scale, old[3][name] / scale, **tol,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_dense_routing_matches_dispatch_with_gradients(mode, top_k):
    """The static (dense) mixture: same output, loss and gradients as the dispatch (fp32).

    Experts no sample was routed to get zero gradients from the dense mixture and none
    (compared as zeros) from the dispatch. Tolerance 1e-5: the convolutions run on batches
    of another size, so their kernels may sum in another order.
    """
    x = torch.randn(6, 5, 5, 16, generator=torch.Generator().manual_seed(0))
    adapter = _routed_adapter(top_k)
    sparse = _run(adapter, x, mode, False)
    adapter.dense_routing = True
    dense = _run(adapter, x, mode, False)
    for a, b in zip(dense[:3], sparse[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name in dense[3]:
        torch.testing.assert_close(dense[3][name], sparse[3][name], atol=1e-5, rtol=1e-5)




@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shape", [(6, 5, 5, 16), (4, 7, 3, 16)])
def test_batched_dispatch_matches_sparse_with_gradients(mode, top_k, shape):
    """The batched dispatch (every routed pair at the largest expert's size, zero-padded
    resize matrices, one grouped convolution): the sparse dispatch's output, loss, input and
    parameter gradients and expert counts, in float32 to 1e-5 (the padded products add
    exact zeros, but their kernels may sum in another order). Scales 1, 2, 3 and 0.5
    cover the identity, up-sizing and down-sizing; a non-square grid the two axes apart.
    Experts no sample was routed to: zero gradients from the batched dispatch, none
    (compared as zeros) from the sparse one.
    """
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    adapter = _routed_adapter(top_k)
    adapter.routing = "sparse"
    sparse = _run(adapter, x, mode, False)
    sparse_counts = adapter.expert_counts
    assert sum(c > 0 for c in sparse_counts) >= 2  # several experts routed
    adapter.routing = "batched"
    shapes = _record_conv_inputs(adapter)
    batched = _run(adapter, x, mode, False)
    assert shapes == {}  # no expert module ran on its own
    assert adapter.expert_counts == sparse_counts
    assert sum(sparse_counts) == shape[0] * top_k
    for a, b in zip(batched[:3], sparse[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert batched[3].keys() == sparse[3].keys()
    for name in batched[3]:
        torch.testing.assert_close(batched[3][name], sparse[3][name], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_batched_dispatch_default_scales_in_a_segmenter():
    """A tiny segmenter whose Conv-LoRA layers all run batched (scales 1..8, windows and
    the global block) predicts what the sparse dispatch predicts, in eval mode, after the
    experts and gates have been moved away from their zero start."""
    torch.manual_seed(0)
    seg = apply_peft(build_segmenter("tiny", input_size=128, checkpoint="random"), "conv_lora")
    layers = [m for m in seg.modules() if isinstance(m, ConvLoRALinear)]
    with torch.no_grad():
        for layer in layers:
            nn.init.normal_(layer.lora_B.weight, std=0.5)
            nn.init.normal_(layer.w_gate, std=2.0)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    seg.eval()
    with torch.no_grad():
        sparse = seg(images)
        counts = [layer.expert_counts for layer in layers]
        for layer in layers:
            layer.routing = "batched"
        batched = seg(images)
    assert [layer.expert_counts for layer in layers] == counts
    assert sum(sum(c > 0 for c in layer_counts) >= 2 for layer_counts in counts) >= 1
    torch.testing.assert_close(batched, sparse, atol=1e-4, rtol=1e-4)


def test_routing_choice(monkeypatch):
    """``auto``: sparse off CUDA; on CUDA compiled in passes with gradients where compiling
    is supported and has not failed, batched otherwise. ``compiled`` runs batched without
    gradients; ``dense_routing`` wins; a name not known is refused."""
    from automask.peft import conv_lora

    adapter = _adapter()
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert adapter.routing == "auto"
    assert adapter.path(cpu) == "sparse"
    monkeypatch.setattr(conv_lora, "compile_supported", lambda: True)
    assert adapter.path(cuda) == "compiled"
    with torch.no_grad():
        assert adapter.path(cuda) == "batched"
    monkeypatch.setattr(conv_lora, "_COMPILE_FAILED", True)
    assert adapter.path(cuda) == "batched"
    monkeypatch.setattr(conv_lora, "_COMPILE_FAILED", False)
    monkeypatch.setattr(conv_lora, "compile_supported", lambda: False)
    assert adapter.path(cuda) == "batched"
    for routing in ("sparse", "batched", "compiled"):
        adapter.routing = routing
        assert adapter.path(cpu) == adapter.path(cuda) == routing
    with torch.no_grad():
        assert adapter.path(cpu) == "batched"
    adapter.dense_routing = True
    assert adapter.path(cpu) == "dense"
    adapter.dense_routing = False
    adapter.routing = "dense"
    with pytest.raises(ValueError, match="routing must be one of 'auto', 'sparse'"):
        adapter.mixture(torch.randn(2, 3, 4, 4))


def _compile_with(monkeypatch, backend):
    """Make ``routing="compiled"`` use ``backend`` (the tests' CPU has no GPU compiler to
    prove; ``aot_eager`` traces the same one graph and its autograd, without codegen)."""
    from automask.peft import conv_lora

    torch._dynamo.reset()
    compiled = conv_lora.compiled_routed_mixture(backend)
    monkeypatch.setattr(conv_lora, "compiled_routed_mixture", lambda: compiled)


@pytest.mark.parametrize("top_k", [1, 2])
def test_compiled_routing_matches_sparse_with_gradients(monkeypatch, top_k):
    """``routing="compiled"``: the gate and the batched dispatch traced as one graph (the
    count of graphs rises by one: no break, no host synchronisation) give the sparse
    dispatch's output, loss, input and parameter gradients and expert counts in training,
    to 1e-5 in float32; the graph is compiled once and reused by a second layer of the
    same shapes."""
    from torch._dynamo.utils import counters

    _compile_with(monkeypatch, "aot_eager")
    x = torch.randn(6, 5, 5, 16, generator=torch.Generator().manual_seed(0))
    adapter = _routed_adapter(top_k)
    adapter.routing = "sparse"
    sparse = _run(adapter, x, "train", False)
    sparse_counts = adapter.expert_counts
    assert sum(c > 0 for c in sparse_counts) >= 2
    adapter.routing = "compiled"
    shapes = _record_conv_inputs(adapter)
    graphs = counters["stats"]["unique_graphs"]
    compiled = _run(adapter, x, "train", False)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert shapes == {}  # no expert module ran on its own
    assert adapter.expert_counts == sparse_counts
    for a, b in zip(compiled[:3], sparse[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name in compiled[3]:
        torch.testing.assert_close(compiled[3][name], sparse[3][name], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")
    other = _routed_adapter(top_k)  # another layer, same shapes: the same graph
    other.routing = "compiled"
    _run(other, x, "train", False, seed=3)
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_compiled_routing_past_the_recompile_limit_runs_uncompiled(monkeypatch):
    """Shapes beyond dynamo's recompile limit (many candidates in one process) run
    uncompiled with the same results, instead of failing."""
    _compile_with(monkeypatch, "aot_eager")
    limit = ("recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit")
             else "cache_size_limit")  # its name before torch 2.6
    adapter = _routed_adapter(1)
    for samples in (4, 5, 6, 7):  # a new batch shape each time; limit 2
        x = torch.randn(samples, 5, 5, 16, generator=torch.Generator().manual_seed(samples))
        adapter.routing = "batched"
        batched = _run(adapter, x, "train", False)
        adapter.routing = "compiled"
        with torch._dynamo.config.patch(**{limit: 2}), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dynamo's note on the limit
            compiled = _run(adapter, x, "train", False)
        for a, b in zip(compiled[:3], batched[:3]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_failed_compile_falls_back_under_auto_and_raises_when_asked(monkeypatch):
    """Compiling that fails under ``auto`` warns once and runs the same arithmetic
    uncompiled (the batched dispatch's result), and later forwards skip compiling; under
    an explicit ``compiled`` the error reaches the user."""
    from torch._dynamo.exc import BackendCompilerFailed

    from automask.peft import conv_lora

    class NoCompiler(BackendCompilerFailed):
        def __init__(self):
            Exception.__init__(self, "no C compiler found")

    def broken():
        def run(*args):
            raise NoCompiler()
        return run

    monkeypatch.setattr(conv_lora, "compiled_routed_mixture", broken)
    monkeypatch.setattr(conv_lora, "compile_supported", lambda: True)
    monkeypatch.setattr(conv_lora, "_COMPILE_FAILED", False)
    x = torch.randn(6, 5, 5, 16, generator=torch.Generator().manual_seed(0))
    adapter = _routed_adapter(2)
    adapter.routing = "batched"
    batched = _run(adapter, x, "train", False)
    adapter.routing = "compiled"
    with pytest.raises(NoCompiler):
        _run(adapter, x, "train", False)
    assert not conv_lora._COMPILE_FAILED
    adapter.routing = "auto"
    monkeypatch.setattr(adapter, "path", lambda device: "compiled")  # as on a CUDA device
    with pytest.warns(RuntimeWarning, match="compiling the routing failed.*no C compiler"):
        fallback = _run(adapter, x, "train", False)
    assert conv_lora._COMPILE_FAILED
    for a, b in zip(fallback[:3], batched[:3]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for name in fallback[3]:
        torch.testing.assert_close(fallback[3][name], batched[3][name], atol=1e-6, rtol=1e-6)
    monkeypatch.undo()
    assert not conv_lora._COMPILE_FAILED


def test_fit_configuration_sets_the_routing():
    """``env.conv_lora_routing`` reaches every Conv-LoRA layer of a built candidate; a
    value not known is refused by the configuration, naming the key."""
    from automask.config import ConfigError, resolve
    from automask.training.builder import build_candidate_model

    [(_, cfg)] = resolve("medium_quality", {
        "model.backbone": "tiny", "model.checkpoint": "random", "model.input_size": 64,
        "peft.method": "conv_lora", "env.conv_lora_routing": "batched"})
    model, _ = build_candidate_model(cfg, num_outputs=1)
    layers = [m for m in model.modules() if isinstance(m, ConvLoRALinear)]
    assert layers and {layer.routing for layer in layers} == {"batched"}
    with pytest.raises(ConfigError, match="env.conv_lora_routing"):
        resolve("medium_quality", {"env.conv_lora_routing": "fast"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_routing_on_cuda_matches_batched():
    """On a GPU, ``auto`` compiles the routing with the default backend (Triton kernels):
    output, loss and gradients of the batched dispatch, to 1e-4 in float32."""
    from automask.peft import conv_lora

    if not conv_lora.compile_supported():
        pytest.skip("torch.compile cannot build GPU kernels here (no Triton or C compiler)")
    x = torch.randn(6, 5, 5, 16, generator=torch.Generator().manual_seed(0)).cuda()
    adapter = _routed_adapter(1).cuda()
    adapter.routing = "batched"
    batched = _run(adapter, x, "train", False)
    adapter.routing = "auto"
    assert adapter.path(x.device) == "compiled"
    compiled = _run(adapter, x, "train", False)
    for a, b in zip(compiled[:3], batched[:3]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for name in compiled[3]:
        torch.testing.assert_close(compiled[3][name], batched[3][name], atol=1e-4, rtol=1e-4)


def _previous_gate(self, pooled):
    """The gate before its load took one CDF per expert and its two cv^2 one reduction."""
    from automask.peft.conv_lora import _NOISE_EPS, cv_squared

    pooled = pooled.float()
    clean = pooled @ self.w_gate.float()
    noise_std = F.softplus(pooled @ self.w_noise.float()) + _NOISE_EPS
    logits = clean + torch.randn_like(clean) * noise_std
    top_values, top_indices = logits.topk(min(self.top_k + 1, self.num_experts), dim=1)
    weights = torch.softmax(top_values[:, : self.top_k], dim=1)
    gates = torch.zeros_like(logits).scatter(1, top_indices[:, : self.top_k], weights)
    threshold_in = top_values[:, self.top_k : self.top_k + 1]
    threshold_out = top_values[:, self.top_k - 1 : self.top_k]
    prob_in = torch.special.ndtr((clean - threshold_in) / noise_std)
    prob_out = torch.special.ndtr((clean - threshold_out) / noise_std)
    load = torch.where(logits > threshold_in, prob_in, prob_out).sum(0)
    return gates, self.aux_loss_weight * (cv_squared(gates.sum(0)) + cv_squared(load))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_noisy_gate_equals_the_previous_gate_with_gradients(top_k):
    """Training mode (the gate computes in float32): the same gates, loss and gradients of
    w_gate, w_noise and the pooled features as the two-CDF, two-reduction gate, to float32
    rounding (1e-6: the two variances are now taken in one reduction)."""
    adapter = _adapter(experts=5, top_k=top_k).train()
    with torch.no_grad():
        nn.init.normal_(adapter.w_gate, std=1.0)
        nn.init.normal_(adapter.w_noise, std=1.0)
    pooled = torch.randn(40, 3, requires_grad=True)
    weights = torch.randn(40, 5)
    results = []
    for gate in (adapter.gate, _previous_gate.__get__(adapter)):
        torch.manual_seed(3)
        gates, loss = gate(pooled)
        total = loss + (gates * weights).sum()
        results.append((gates, loss, *torch.autograd.grad(
            total, [pooled, adapter.w_gate, adapter.w_noise])))
    assert results[0][1] > 0 and results[0][3].abs().sum() > 0 and results[0][4].abs().sum() > 0
    for ours, previous in zip(*results):
        torch.testing.assert_close(ours, previous, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_padded_resize_matrices(dtype):
    """Each expert's resize matrices sit in the top-left corner of the padded ones, cast
    once from float64 (bit-equal to ``resize_matrix`` in that dtype), zeros elsewhere."""
    from automask.peft.conv_lora import padded_resize_matrices, resize_matrix

    scales = (1.0, 3.0, 0.5)
    up_h, up_w, down_h, down_w = padded_resize_matrices(6, 5, scales, dtype)
    assert (up_h.shape, up_w.shape, down_h.shape, down_w.shape) == (
        (3, 18, 6), (3, 15, 5), (3, 6, 18), (3, 5, 15))
    for i, (h, w) in enumerate([(6, 5), (18, 15), (3, 2)]):  # round(2.5) = 2
        assert torch.equal(up_h[i, :h], resize_matrix(6, h, dtype))
        assert torch.equal(up_w[i, :w], resize_matrix(5, w, dtype))
        assert torch.equal(down_h[i, :, :h], resize_matrix(h, 6, dtype))
        assert torch.equal(down_w[i, :, :w], resize_matrix(w, 5, dtype))
        assert not up_h[i, h:].any() and not up_w[i, w:].any()
        assert not down_h[i, :, h:].any() and not down_w[i, :, w:].any()
    assert torch.equal(up_h[0, :6], torch.eye(6, dtype=dtype))  # scale 1: the identity


def _segmenter_with_moved_adapters(size=64):
    torch.manual_seed(0)
    seg = apply_peft(build_segmenter("tiny", input_size=size, checkpoint="random"), "conv_lora")
    layers = [m for m in seg.modules() if isinstance(m, ConvLoRALinear)]
    with torch.no_grad():
        for layer in layers:
            nn.init.normal_(layer.lora_B.weight, std=0.5)
            nn.init.normal_(layer.w_gate, std=2.0)
    return seg, layers


def _expert_grads(seg, layers, routing, images):
    from automask.peft.conv_lora import drop_unreached_expert_gradients

    for layer in layers:
        layer.routing = routing
    seg.train()
    seg.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same gate noise for both dispatches
    seg(images).float().square().mean().backward()
    dropped = drop_unreached_expert_gradients(seg)
    grads = [[(e.weight.grad, e.bias.grad) for e in layer.experts] for layer in layers]
    return dropped, grads, [layer.expert_counts for layer in layers]


def test_unreached_experts_get_no_gradient_after_the_batched_dispatch():
    """After the batched dispatch and ``drop_unreached_expert_gradients``, exactly the
    experts the sparse dispatch left without a gradient (those no window or image reached)
    have none, and the others have the sparse dispatch's gradients (1e-5). After the
    sparse dispatch the function changes nothing (it returns 0)."""
    seg, layers = _segmenter_with_moved_adapters()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    dropped_sparse, sparse, counts = _expert_grads(seg, layers, "sparse", images)
    assert dropped_sparse == 0
    dropped, batched, batched_counts = _expert_grads(seg, layers, "batched", images)
    assert batched_counts == counts
    unreached = sum(c == 0 for layer_counts in counts for c in layer_counts)
    assert unreached > 0 and dropped == unreached
    for layer_sparse, layer_batched, layer_counts in zip(sparse, batched, counts):
        for (sw, sb), (bw, bb), count in zip(layer_sparse, layer_batched, layer_counts):
            assert (bw is None) == (bb is None) == (sw is None) == (count == 0)
            if count:
                torch.testing.assert_close(bw, sw, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(bb, sb, atol=1e-5, rtol=1e-5)


def test_a_fit_step_leaves_unreached_experts_untouched():
    """Through a Lightning step with the batched dispatch: the experts no sample reached
    keep their weights bit for bit (without the drop, AdamW's weight decay would move them),
    the others move."""
    import warnings

    import lightning as L

    from automask.config import OptimConfig
    from automask.training.module import SegmentationModule

    seg, layers = _segmenter_with_moved_adapters()
    for layer in layers:
        layer.routing = "batched"
    module = SegmentationModule(seg, task="binary", num_classes=2,
                                optim=OptimConfig(lr=1e-2, weight_decay=0.5, grad_clip=0.0),
                                val_metric="iou")
    reached: list[bool] = []

    class Reached(L.Callback):  # runs before the module's own hook
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            reached.extend(bool(e.weight.grad.abs().max() > 0) for layer in layers
                           for e in layer.experts)

    before = [e.weight.detach().clone() for layer in layers for e in layer.experts]
    gen = torch.Generator().manual_seed(3)
    data = [{"image": torch.randn(3, 64, 64, generator=gen),
             "target": (torch.rand(64, 64, generator=gen) > 0.5).long(),
             "resized_size": torch.tensor([64, 64])}]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Reached()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on workers and logging
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))
    after = [e.weight.detach() for layer in layers for e in layer.experts]
    assert 0 < sum(reached) < len(reached)
    for was, now, moved in zip(before, after, reached):
        assert torch.equal(was, now) != moved


@pytest.mark.parametrize("routing", ["sparse", "batched"])
def test_training_after_inference_mode_at_new_sizes(routing):
    """A prediction or validation pass under ``torch.inference_mode`` at sizes no step has
    seen, then training steps at those sizes: the cached resize matrices and position
    indices built during the prediction are normal tensors, so the backward pass works and
    gives the gradients of a fresh process (1e-6). Before, the second Conv-LoRA fit in one
    process (a list of seeds, a fit after predict) failed with "Inference tensors cannot be
    saved for backward"."""
    from automask.models.blocks import _offsets
    from automask.peft.conv_lora import padded_resize_matrices, resize_matrix

    size = 96  # a map size no other test uses: the caches are empty for it
    for cache in (resize_matrix, padded_resize_matrices, _offsets):
        cache.cache_clear()
    seg, layers = _segmenter_with_moved_adapters(size)
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(4))
    _, fresh, _ = _expert_grads(seg, layers, routing, images)
    for cache in (resize_matrix, padded_resize_matrices, _offsets):
        cache.cache_clear()
    seg.eval()
    with torch.inference_mode():
        seg(images)
    assert resize_matrix.cache_info().currsize > 0 and _offsets.cache_info().currsize > 0
    _, after, _ = _expert_grads(seg, layers, routing, images)
    assert sum(w is not None for layer in after for w, _ in layer) > 0
    for layer_fresh, layer_after in zip(fresh, after):
        for (fw, fb), (aw, ab) in zip(layer_fresh, layer_after):
            assert (fw is None) == (aw is None)
            if fw is not None:
                torch.testing.assert_close(aw, fw, atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(ab, fb, atol=1e-6, rtol=1e-6)


def test_cached_tensors_made_in_inference_mode_are_normal_tensors():
    from automask.models.blocks import _offsets
    from automask.peft.conv_lora import padded_resize_matrices, resize_matrix

    with torch.inference_mode():
        made = [resize_matrix(5, 13), *padded_resize_matrices(5, 7, (1.0, 2.5)),
                _offsets(11, torch.device("cpu"))]
    assert not any(t.is_inference() for t in made)
