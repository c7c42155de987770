"""The encoder block without the window padding's projections equals segment-anything's."""
from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention
from torch import nn

import automask.models.blocks as blocks_module
import automask.models.segmenter as segmenter_module
from automask.models import build_segmenter
from automask.models.blocks import _attend, block_forward, is_token_wise
from automask.peft import PEFT_METHODS, ConvLoRALinear, LoRALinear, apply_peft, aux_loss
from automask.peft.adapter import BottleneckAdapter
from automask.peft.ssf import ScaleShift

# tiny: 16 px patches, windows of 8 tokens. 160 px is a 10 x 10 grid padded to 16 x 16:
# four windows, three of them partly padding.
SIZE = 160


def _model(method: str, seed: int = 0):
    torch.manual_seed(seed)
    seg = build_segmenter("tiny", num_classes=1, input_size=SIZE, checkpoint="random")
    apply_peft(seg, method)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # no zero-initialised adapter: every path carries a signal
        for param in seg.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return seg


def _run(seg, stock: bool, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if stock:
        monkeypatch.setattr(segmenter_module, "block_forward",
                            lambda block, x, scratch=None: block(x))
    else:
        monkeypatch.setattr(segmenter_module, "block_forward", block_forward)
    seg.zero_grad(set_to_none=True)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(11)  # Conv-LoRA's noisy gate draws the same noise both times
    logits = seg(images)
    (logits.square().mean() + aux_loss(seg)).backward()
    grads = {n: p.grad.clone() for n, p in seg.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_same_output_and_gradients_as_segment_anything(method, monkeypatch):
    seg = _model(method).train()
    fast, fast_grads = _run(seg, stock=False, monkeypatch=monkeypatch)
    stock, stock_grads = _run(seg, stock=True, monkeypatch=monkeypatch)
    assert fast_grads.keys() == stock_grads.keys() and fast_grads
    assert fast.abs().max() > 1e-3
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-4)
    for name, grad in stock_grads.items():
        assert grad.abs().sum() > 0 or method in ("full", "scratch"), name
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _qkv_rows(seg) -> list[int]:
    """Rows each windowed block's frozen qkv Linear computed in one forward."""
    rows: list[int] = []
    blocks = [b for b in seg.image_encoder.blocks if b.window_size > 0]
    for block in blocks:
        attn = getattr(block.attn, "base_layer", block.attn)  # VPT wraps the attention
        layer = attn.qkv
        linear = layer if isinstance(layer, nn.Linear) else getattr(layer, "base_layer", None)
        if isinstance(linear, nn.Linear):
            linear.register_forward_hook(
                lambda m, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    with torch.no_grad():
        seg.eval()(torch.randn(2, 3, SIZE, SIZE))
    return rows


@pytest.mark.parametrize("method,skips", [("decoder_only", True), ("lora", True),
                                          ("conv_lora", True), ("ssf", True),
                                          ("vpt", False)])
def test_padding_is_skipped_where_the_layers_allow(method, skips):
    real, padded = 2 * 10 * 10, 2 * 16 * 16
    rows = _qkv_rows(_model(method))
    assert rows, "no windowed block was seen"
    if skips:  # the real tokens plus the one zero token that fills the padding
        assert set(rows) == {real, 1}, rows
    else:  # VPT's attention is its own module (its qkv also projects the prompts):
        assert padded in rows and real not in rows, rows  # segment-anything's order


def test_conv_lora_low_rank_factor_sees_the_real_tokens_only(monkeypatch):
    """Conv-LoRA's lora_A runs on the real tokens of a windowed block (its experts still get
    zero-padded windows, checked by the comparison with segment-anything above)."""
    seg = _model("conv_lora")
    rows, grids = [], []
    for block in seg.image_encoder.blocks:
        if block.window_size > 0:
            layer = block.attn.qkv
            layer.lora_A.register_forward_hook(
                lambda m, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
            mixture = layer.mixture
            monkeypatch.setattr(layer, "mixture",
                                lambda grid, f=mixture: grids.append(grid.shape) or f(grid))
    monkeypatch.setattr(segmenter_module, "block_forward", block_forward)
    with torch.no_grad():
        seg.eval()(torch.randn(2, 3, SIZE, SIZE))
    assert rows and set(rows) == {2 * 10 * 10}, rows
    assert grids and set(grids) == {(2 * 4, 3, 8, 8)}, grids  # 4 windows of 8 x 8 per image


def test_token_wise_layers():
    linear = nn.Linear(4, 12)
    assert is_token_wise(linear)
    assert is_token_wise(LoRALinear(nn.Linear(4, 12)))
    assert is_token_wise(BottleneckAdapter(nn.Linear(4, 12), 2))
    assert is_token_wise(ScaleShift(nn.Linear(4, 12)))
    assert not is_token_wise(ScaleShift(nn.Conv2d(4, 4, 3)))  # mixes neighbours
    assert not is_token_wise(ConvLoRALinear(nn.Linear(4, 12)))  # its experts convolve
    assert not is_token_wise(nn.Sequential(nn.Linear(4, 12)))  # unknown: assume not
    assert not is_token_wise(None)


def test_gradient_checkpointing_recomputes_the_same_block(monkeypatch):
    seg = _model("conv_lora").train()
    plain, plain_grads = _run(seg, stock=True, monkeypatch=monkeypatch)
    seg.gradient_checkpointing = True
    fast, fast_grads = _run(seg, stock=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)
    assert fast_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("keep_probs", [True, False])
def test_gradient_checkpointing_in_bf16_recomputes_the_folded_attention(keep_probs,
                                                                        monkeypatch):
    """In bf16 the windows' attention is a Function (see the tests below); recomputed
    block by block under gradient checkpointing it gives the same output and gradients."""
    monkeypatch.setattr(blocks_module, "KEEP_FOLDED_PROBS_ON", ("cpu",) if keep_probs else ())
    applied = []
    function = blocks_module._FoldedAttention.apply
    monkeypatch.setattr(blocks_module._FoldedAttention, "apply",
                        lambda *args: applied.append(1) or function(*args))
    seg = _model("conv_lora").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = _run(seg, stock=False, monkeypatch=monkeypatch)
        calls = len(applied)
        seg.gradient_checkpointing = True
        again, again_grads = _run(seg, stock=False, monkeypatch=monkeypatch)
    assert calls > 0 and len(applied) == 3 * calls  # forward, then forward and recomputation
    torch.testing.assert_close(again, plain, atol=0, rtol=0)
    assert again_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(again_grads[name], grad, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_attention_core_is_segment_anythings_bit_for_bit(grad, bf16, monkeypatch):
    """The relative-position terms added in place (a Function when gradients flow): the
    same values and gradients as segment-anything's Attention, to the last bit."""
    monkeypatch.setattr(blocks_module, "FOLD_BELOW_WIDTH", 0)  # bf16 would fold them
    torch.manual_seed(0)
    attn = Attention(48, 3, qkv_bias=True, use_rel_pos=True, input_size=(6, 5))  # H != W
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(2, 6, 5, 48)
    results = []
    for forward in (lambda t: attn.proj(_attend(attn, attn.qkv(t))), attn):
        attn.zero_grad(set_to_none=True)
        t = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(t)
        grads = []
        if grad:
            out.float().square().sum().backward()
            grads = [t.grad, attn.rel_pos_h.grad, attn.rel_pos_w.grad, attn.qkv.weight.grad]
        results.append((out, grads))
    (ours, our_grads), (theirs, their_grads) = results
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    for mine, reference in zip(our_grads, their_grads):
        assert reference is not None and reference.abs().sum() > 0
        assert torch.equal(mine, reference)


def test_folded_scores_equal_the_added_terms():
    """The one product of extended queries and keys is ``(q scale) k^T + rel_h + rel_w``
    with each term on its key row and column (float32, H != W)."""
    gen = torch.Generator().manual_seed(0)
    n, height, width, dim = 4, 6, 5, 8
    q, k = (torch.randn(n, height * width, dim, generator=gen) for _ in range(2))
    rel_h = torch.randn(n, height, width, height, generator=gen)
    rel_w = torch.randn(n, height, width, width, generator=gen)
    scores = blocks_module._folded_scores(q, k, rel_h, rel_w, 0.3)
    expected = ((q * 0.3) @ k.transpose(-2, -1)).view(n, height, width, height, width)
    expected = expected + rel_h[..., :, None] + rel_w[..., None, :]
    torch.testing.assert_close(scores, expected.view(n, height * width, -1),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_folded_attention_in_bf16(grad, monkeypatch):
    """In bf16 a narrow grid's terms go into the score product: the output and every
    gradient as near segment-anything's float64 values as its own bf16 computation, the
    output nearer (the scores are rounded once instead of three times)."""
    folds = []
    folded = blocks_module._folded_scores
    monkeypatch.setattr(blocks_module, "_folded_scores",
                        lambda *args: folds.append(1) or folded(*args))
    attn, exact = _attention(), _attention().double()
    x = torch.randn(2, 6, 5, 48, generator=torch.Generator().manual_seed(3))
    results = []
    for module, ours in ((attn, True), (attn, False), (exact, False)):
        module.zero_grad(set_to_none=True)
        t = x.clone().to(module.qkv.weight.dtype).requires_grad_(grad)
        with torch.set_grad_enabled(grad), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=module is attn):
            out = module.proj(_attend(module, module.qkv(t))) if ours else module(t)
        grads = []
        if grad:
            out.double().square().sum().backward()
            grads = [t.grad, module.rel_pos_h.grad, module.rel_pos_w.grad,
                     module.qkv.weight.grad]
        results.append((out.double(), [g.double() for g in grads]))
    assert len(folds) == 1  # automask's bf16 forward folded the terms
    (ours, our_grads), (theirs, their_grads), (exact, exact_grads) = results
    assert (ours - exact).abs().mean() <= (theirs - exact).abs().mean()
    for mine, reference, value in zip([ours, *our_grads], [theirs, *their_grads],
                                      [exact, *exact_grads]):
        assert value.abs().sum() > 0
        # as near the float64 values as segment-anything's own bf16 rounding gets
        assert (mine - value).abs().mean() <= 1.1 * (reference - value).abs().mean()
        assert (mine - value).abs().max() <= 1.5 * (reference - value).abs().max()


def _attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(48, 3, qkv_bias=True, use_rel_pos=True, input_size=(6, 5))  # H != W
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    return attn


def _chunks_counted(monkeypatch, rows: int, bf16: bool = False) -> list[int]:
    """Chunk every score map, ``rows`` query rows at a time; count the chunks computed."""
    monkeypatch.setattr(blocks_module, "CHUNK_FROM_BYTES", 0)
    monkeypatch.setattr(blocks_module, "CHUNK_MIN_KEYS", 0)
    row_bytes = 2 * 3 * 5 * 6 * 5 * (2 if bf16 else 4)  # _attention's map per grid row, batch 2
    monkeypatch.setattr(blocks_module, "CHUNK_BYTES", rows * row_bytes)
    calls = []
    probs = blocks_module._chunk_probs

    def counted(q, k_t, rel_h, rel_w, scale, rows_, scratch=None):
        calls.append(rows_.stop - rows_.start)
        return probs(q, k_t, rel_h, rel_w, scale, rows_, scratch)

    monkeypatch.setattr(blocks_module, "_chunk_probs", counted)
    return calls


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_chunked_attention_is_segment_anythings(grad, bf16, monkeypatch):
    """A score map computed a few query rows at a time: the output and every gradient
    equal segment-anything's up to rounding (the products see fewer rows; the keys' and
    values' gradients are sums over chunks)."""
    attn = _attention()
    x = torch.randn(2, 6, 5, 48)
    results = []
    for chunked in (True, False):
        with monkeypatch.context() as patch:
            calls = _chunks_counted(patch, rows=4, bf16=bf16) if chunked else []
            attn.zero_grad(set_to_none=True)
            t = x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = attn.proj(_attend(attn, attn.qkv(t))) if chunked else attn(t)
            grads = []
            if grad:
                out.float().square().sum().backward()
                grads = [attn.rel_pos_h.grad, attn.rel_pos_w.grad, t.grad, attn.qkv.weight.grad]
        if chunked:  # 6 grid rows in chunks of 4 and 2, again in the backward pass
            assert calls == ([4, 2, 4, 2] if grad else [4, 2])
        results.append((out, grads))
    (ours, our_grads), (theirs, their_grads) = results
    tolerance = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, **tolerance)
    for mine, reference in zip(our_grads, their_grads):
        assert reference is not None and reference.abs().sum() > 0
        torch.testing.assert_close(mine, reference, **tolerance)


@pytest.mark.parametrize("bf16", [False, True])
def test_chunks_sharing_buffers_change_nothing(bf16, monkeypatch):
    """Every chunk's scores, probabilities and their gradients written into two shared
    buffers (softmax and its backward in place): the output and every gradient bit for bit
    those of chunks with maps of their own, and each chunk's probabilities really in the
    one buffer."""
    attn = _attention()
    x = torch.randn(2, 6, 5, 48)
    results, pointers = [], []
    for reuse in (True, False):
        with monkeypatch.context() as patch:
            calls = _chunks_counted(patch, rows=4, bf16=bf16)
            patch.setattr(blocks_module, "REUSE_CHUNK_BUFFERS", reuse)
            probs = blocks_module._chunk_probs  # the counting one

            def recorded(*args, probs=probs, reuse=reuse):
                out = probs(*args)
                pointers.append((reuse, out.data_ptr()))
                return out

            patch.setattr(blocks_module, "_chunk_probs", recorded)
            attn.zero_grad(set_to_none=True)
            t = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = attn.proj(_attend(attn, attn.qkv(t)))
            out.float().square().sum().backward()
        assert calls == [4, 2, 4, 2]  # two chunks, again in the backward pass
        grads = [attn.rel_pos_h.grad, attn.rel_pos_w.grad, t.grad, attn.qkv.weight.grad]
        results.append([out, *grads])
    for shared, own in zip(*results):
        assert own is not None and own.abs().sum() > 0
        assert torch.equal(shared, own)
    shared_pointers = [ptr for reuse, ptr in pointers if reuse]
    assert len(shared_pointers) == 4
    assert shared_pointers[0] == shared_pointers[1]  # the forward's two chunks: one buffer
    assert shared_pointers[2] == shared_pointers[3]  # the backward's


@pytest.mark.parametrize("chunked", [True, False])
def test_chunked_attention_keeps_no_score_map(chunked, monkeypatch):
    """What autograd keeps for the backward pass: the whole (B*nH, HW, HW) probability map
    without chunks, nothing of that size with them."""
    attn = _attention()
    if chunked:
        _chunks_counted(monkeypatch, rows=2)
    else:
        monkeypatch.setattr(blocks_module, "CHUNK_FROM_BYTES", 2**62)
    kept = []

    def pack(tensor):
        kept.append(tuple(tensor.shape))
        return tensor

    x = torch.randn(2, 6, 5, 48, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = attn.proj(_attend(attn, attn.qkv(x)))
    assert ((2 * 3, 30, 30) in kept) != chunked  # (B*nH, HW, HW)
    assert all(shape[-2:] != (30, 30) for shape in kept) == chunked
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0


def test_chunked_global_blocks_in_the_model(monkeypatch):
    """The whole encoder with every score map chunked, one query row at a time, against
    segment-anything's blocks: same logits and gradients up to rounding."""
    seg = _model("conv_lora").train()
    stock, stock_grads = _run(seg, stock=True, monkeypatch=monkeypatch)
    monkeypatch.setattr(blocks_module, "CHUNK_FROM_BYTES", 0)
    monkeypatch.setattr(blocks_module, "CHUNK_MIN_KEYS", 0)
    monkeypatch.setattr(blocks_module, "CHUNK_BYTES", 1)
    calls, apply = [], blocks_module._ChunkedAttention.apply
    monkeypatch.setattr(blocks_module._ChunkedAttention, "apply",
                        lambda *args: calls.append(args[-1]) or apply(*args))
    fast, fast_grads = _run(seg, stock=False, monkeypatch=monkeypatch)
    assert calls and set(calls) == {1}  # every block's map, one grid row at a time
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-4)
    assert fast_grads.keys() == stock_grads.keys()
    for name, grad in stock_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_chunk_sizes():
    """Which maps are chunked, and how many query rows at a time: a global block at 1024 px
    (vit_b, batch 1: 12 x 4096 x 4096) and at 512 px (12 x 1024 x 1024, 24 MiB in bf16) is;
    at 256 px (12 x 256 x 256) it is not, nor are the 14 x 14 windows however many (196
    keys each). On a CPU a chunk stays near CHUNK_BYTES; on an accelerator near the larger
    CHUNK_BYTES_ACCELERATOR."""
    rows = blocks_module._chunk_rows
    row_bytes = 12 * 64 * 4096 * 2  # one grid row of queries, bf16
    for device, budget in (("cpu", blocks_module.CHUNK_BYTES),
                           ("meta", blocks_module.CHUNK_BYTES_ACCELERATOR)):
        q = torch.empty(12, 4096, 64, dtype=torch.bfloat16, device=device)
        assert rows(q, 64, 64) == budget // row_bytes >= 1
        assert rows(q.float(), 64, 64) == budget // (2 * row_bytes)
    global_512 = torch.empty(12, 1024, 64, dtype=torch.bfloat16)
    assert rows(global_512, 32, 32) == blocks_module.CHUNK_BYTES // (12 * 32 * 1024 * 2) < 32
    assert rows(torch.empty(12, 256, 64), 16, 16) == 0  # 3 MiB in float32
    windows = torch.empty(4 * 25 * 12, 196, 64)  # batch 4 at 1024 px: 176 MiB in float32
    assert rows(windows, 14, 14) == 0
    assert blocks_module.CHUNK_BYTES < blocks_module.CHUNK_BYTES_ACCELERATOR


@pytest.mark.parametrize("height,width", [(13, 9), (14, 28), (5, 16), (15, 15), (28, 14)])
def test_windows_written_once_equal_segment_anythings(height, width):
    """_pad_partition / _unpartition (each value copied once) give segment-anything's
    concatenated-and-partitioned windows and its cropped map, values and gradients (the
    fill row's gradient is its sum over the padding), for grids with and without padding
    along either axis."""
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    window = 7 if height in (13, 5) else 14
    torch.manual_seed(0)
    t = torch.randn(2, height, width, 5, dtype=torch.float64, requires_grad=True)
    fill = torch.randn(1, 1, 1, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2 * -(-height // window) * -(-width // window), window, window, 5,
                       dtype=torch.float64)
    pad_h, pad_w = (-height) % window, (-width) % window
    padded = torch.cat([t, fill.expand(2, height, pad_w, 5)], dim=2)
    padded = torch.cat([padded, fill.expand(2, pad_h, width + pad_w, 5)], dim=1)
    want, pad_hw = window_partition(padded, window)
    got = blocks_module._pad_partition(t, fill, window)
    assert torch.equal(got, want)
    got_grads = torch.autograd.grad(got, (t, fill), grad)
    want_grads = torch.autograd.grad(want, (t, fill), grad)
    assert torch.equal(got_grads[0], want_grads[0])
    torch.testing.assert_close(got_grads[1], want_grads[1], rtol=1e-12, atol=1e-12)
    if pad_h or pad_w:
        assert got_grads[1].abs().sum() > 0

    windows = torch.randn_like(grad, requires_grad=True)
    back = blocks_module._unpartition(windows, window, (height, width))
    ref = window_unpartition(windows, window, pad_hw, (height, width))
    assert torch.equal(back, ref) and back.is_contiguous()
    grad_map = torch.randn(2, height, width, 5, dtype=torch.float64)
    (got_w,) = torch.autograd.grad(back, windows, grad_map)
    (want_w,) = torch.autograd.grad(ref, windows, grad_map)
    assert torch.equal(got_w, want_w)


def _queries_counted(monkeypatch) -> list[tuple[tuple[int, int], tuple[int, int], int]]:
    """Record each call of the attention core: (query grid, key grid, query rows)."""
    calls = []
    core = blocks_module._attention

    def counted(attn, q, k, v, q_size, k_size):
        calls.append((tuple(q_size), tuple(k_size), q.shape[0] * q.shape[1] // attn.num_heads))
        return core(attn, q, k, v, q_size, k_size)

    monkeypatch.setattr(blocks_module, "_attention", counted)
    return calls


@pytest.mark.parametrize("real_only", [True, False])
def test_padded_windows_attend_with_the_real_queries_only(real_only, monkeypatch):
    """In a windowed block of a padded grid only the real tokens are queries (10 x 10 of
    the 16 x 16 at 160 px), in four groups of windows; every token is still a key."""
    seg = _model("conv_lora")
    monkeypatch.setattr(segmenter_module, "block_forward", block_forward)
    monkeypatch.setattr(blocks_module, "REAL_QUERIES_ONLY", real_only)
    calls = _queries_counted(monkeypatch)
    with torch.no_grad():
        seg.eval()(torch.randn(2, 3, SIZE, SIZE))
    windowed = [c for c in calls if c[1] == (8, 8)]
    blocks = sum(b.window_size > 0 for b in seg.image_encoder.blocks)
    assert blocks and all(c[1] == (10, 10) for c in calls if c not in windowed)  # global
    if real_only:
        assert len(windowed) == 4 * blocks
        assert {c[0] for c in windowed} == {(8, 8), (8, 2), (2, 8), (2, 2)}
        assert sum(c[2] for c in windowed) == blocks * 2 * 10 * 10
    else:
        assert len(windowed) == blocks and {c[0] for c in windowed} == {(8, 8)}
        assert sum(c[2] for c in windowed) == blocks * 2 * 16 * 16


@pytest.mark.parametrize("mode", ["fp32", "fp32-grad", "chunked-grad", "bf16-grad"])
@pytest.mark.parametrize("height,width", [(10, 12), (14, 9), (5, 5), (14, 14)])
def test_real_queries_equal_every_querys_output(mode, height, width, monkeypatch):
    """_attend_windows against _attend over the whole windows, then cropped: the real
    tokens' outputs and every gradient, on grids padded along either axis, both or
    neither; with the terms added in place, through the autograd Function, chunked, and
    folded into the product in bf16 (there both as near the float64 values)."""
    window, grad = 7, mode.endswith("grad")
    if mode.startswith("chunked"):  # one query row at a time
        monkeypatch.setattr(blocks_module, "CHUNK_FROM_BYTES", 0)
        monkeypatch.setattr(blocks_module, "CHUNK_MIN_KEYS", 0)
        monkeypatch.setattr(blocks_module, "CHUNK_BYTES", 1)
    torch.manual_seed(0)
    attn = Attention(48, 3, qkv_bias=True, use_rel_pos=True, input_size=(window, window))
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    n_windows = 2 * -(-height // window) * -(-width // window)
    qkv = torch.randn(n_windows, window, window, 3 * 48, dtype=torch.float64)
    weight = torch.randn(2, height, width, 48, dtype=torch.float64)
    results = []
    for real_only, dtype in ((True, torch.float32), (False, torch.float32),
                             (False, torch.float64)):
        module = copy.deepcopy(attn).to(dtype)
        t = qkv.to(dtype).requires_grad_(grad)
        bf16 = mode.startswith("bf16") and dtype == torch.float32
        with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            if real_only:
                out = blocks_module._attend_windows(module, t, window, (height, width))
            else:
                out = blocks_module._unpartition(blocks_module._attend(module, t), window,
                                                 (height, width))
        assert out.shape == (2, height, width, 48)
        grads = []
        if grad:
            (out.double() * weight).sum().backward()
            grads = [t.grad, module.rel_pos_h.grad, module.rel_pos_w.grad]
        results.append([v.double() for v in (out, *grads)])
    ours, theirs, exact = results
    for mine, reference, value in zip(ours, theirs, exact):
        assert value.abs().sum() > 0
        if mode.startswith("bf16"):  # as near the float64 values as the whole windows get
            assert (mine - value).abs().mean() <= 1.1 * (reference - value).abs().mean()
        else:
            torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-4)


def test_folded_scores_of_fewer_queries_than_keys():
    """The folded product for the first h x w queries of an (H, W) grid of keys: the rows
    of the whole grid's scores that belong to them."""
    gen = torch.Generator().manual_seed(0)
    n, height, width, dim, rows, cols = 3, 7, 7, 8, 4, 2
    q, k = (torch.randn(n, height * width, dim, generator=gen) for _ in range(2))
    rel_h = torch.randn(n, height, width, height, generator=gen)
    rel_w = torch.randn(n, height, width, width, generator=gen)
    whole = blocks_module._folded_scores(q, k, rel_h, rel_w, 0.3).view(n, height, width, -1)
    sub_q = q.view(n, height, width, dim)[:, :rows, :cols].reshape(n, rows * cols, dim)
    part = blocks_module._folded_scores(sub_q, k, rel_h[:, :rows, :cols].contiguous(),
                                        rel_w[:, :rows, :cols].contiguous(), 0.3)
    assert part.shape == (n, rows * cols, height * width)
    torch.testing.assert_close(part, whole[:, :rows, :cols].reshape(part.shape),
                               atol=1e-5, rtol=1e-5)


def test_a_projection_that_needs_the_windows_keeps_every_query(monkeypatch):
    """A ``proj`` that is not token-wise runs on the whole padded windows, as in
    segment-anything; then every padded token is a query too, and the block is the same."""
    seg = _model("lora").train()
    for block in seg.image_encoder.blocks:
        block.attn.proj = nn.Sequential(block.attn.proj)  # not known to be token-wise
    calls = _queries_counted(monkeypatch)
    fast, fast_grads = _run(seg, stock=False, monkeypatch=monkeypatch)
    stock, stock_grads = _run(seg, stock=True, monkeypatch=monkeypatch)
    assert {c[0] for c in calls if c[1] == (8, 8)} == {(8, 8)}
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-4)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("size,length", [(14, 27), (64, 127), (5, 9), (14, 21)])
def test_rel_pos_table_is_get_rel_pos(size, length):
    """The relative-position gather with a cached index: segment-anything's ``get_rel_pos``
    bit for bit, and its gradient up to the order of the scatter's sums (which depends on
    the thread count); a table of another length, 21 for 14 tokens, goes through its
    interpolation. The index is built once per size and device."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    from automask.models.blocks import _offsets, rel_pos_table

    table = torch.randn(length, 8, generator=torch.Generator().manual_seed(size),
                        requires_grad=True)
    ours = rel_pos_table(size, table)
    reference = get_rel_pos(size, size, table)
    assert ours.shape == (size, size, 8)
    assert torch.equal(ours, reference)
    weights = torch.randn(size, size, 8, generator=torch.Generator().manual_seed(size + 1))
    (grad,) = torch.autograd.grad((ours * weights).sum(), table)
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), table)
    assert reference_grad.abs().sum() > 0
    # each value a float32 sum of up to 64 products of about unit size, in another order
    torch.testing.assert_close(grad, reference_grad, atol=1e-5, rtol=1e-5)
    assert _offsets(size, table.device) is _offsets(size, table.device)


def _saved_bytes(run) -> tuple[torch.Tensor, int]:
    """``run()``'s result and the bytes of the distinct tensors autograd keeps for the
    backward pass meanwhile."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(storages.values())


@pytest.mark.parametrize("keep_probs", [True, False])
@pytest.mark.parametrize("real_only", [True, False])
def test_folded_attention_function_changes_nothing(real_only, keep_probs, monkeypatch):
    """The folded (bf16, narrow) attention as a Function that keeps its inputs (and its
    probabilities, or recomputes them in the backward pass): the output and every gradient
    bit for bit those of autograd keeping the probabilities and extended operands, for
    less kept memory; on windows of a padded grid (real queries only, or every query) in a
    Conv-LoRA block."""
    seg = _model("conv_lora")
    monkeypatch.setattr(segmenter_module, "block_forward", block_forward)
    monkeypatch.setattr(blocks_module, "REAL_QUERIES_ONLY", real_only)
    monkeypatch.setattr(blocks_module, "KEEP_FOLDED_PROBS_ON", ("cpu",) if keep_probs else ())
    block = next(b for b in seg.image_encoder.blocks if b.window_size > 0)
    block.attn.rel_pos_h.requires_grad_(True)  # frozen under Conv-LoRA: their gradients too
    block.attn.rel_pos_w.requires_grad_(True)
    x = torch.randn(2, 10, 10, block.norm1.normalized_shape[0],
                    generator=torch.Generator().manual_seed(5))
    applied = []
    function = blocks_module._FoldedAttention.apply
    monkeypatch.setattr(blocks_module._FoldedAttention, "apply",
                        lambda *args: applied.append(1) or function(*args))
    results = []
    for as_function in (True, False):
        monkeypatch.setattr(blocks_module, "FOLDED_FUNCTION", as_function)
        block.zero_grad(set_to_none=True)
        t = x.clone().requires_grad_(True)
        torch.manual_seed(11)  # Conv-LoRA's noisy gate draws the same noise both times
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, kept = _saved_bytes(lambda t=t: block_forward(block, t))
        (out.float().square().mean() + aux_loss(seg)).backward()
        grads = {n: p.grad for n, p in block.named_parameters() if p.grad is not None}
        results.append((out, t.grad, grads, kept))
    assert len(applied) == (4 if real_only else 1)  # the groups of windows, or all at once
    (ours, our_x, our_grads, our_kept), (theirs, their_x, their_grads, their_kept) = results
    assert {"attn.rel_pos_h", "attn.rel_pos_w"} <= our_grads.keys() == their_grads.keys()
    assert torch.equal(ours, theirs)
    assert their_x.abs().sum() > 0 and torch.equal(our_x, their_x)
    for name, grad in their_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(our_grads[name], grad), name
    assert our_kept < (0.97 if keep_probs else 0.9) * their_kept, (our_kept, their_kept)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_hidden_map_in_a_shared_buffer(approximate):
    """mlp_forward without gradients writes the hidden map into the scratch dict's buffer,
    one for every block of a forward pass, and returns ``mlp(x)`` bit for bit."""
    seg = _model("lora")
    mlps = [block.mlp for block in seg.image_encoder.blocks]
    for mlp in mlps:
        mlp.act.approximate = approximate
    x = torch.randn(2, 10, 10, mlps[0].lin1.in_features)
    scratch: dict = {}
    with torch.no_grad():
        for mlp in mlps:
            expected = mlp(x)
            out = blocks_module.mlp_forward(mlp, x, scratch)
            assert expected.abs().sum() > 0 and torch.equal(out, expected)
            (buffer,) = scratch.values()  # one buffer, (B * H * W, 4E)
            assert buffer.shape == (200, mlp.lin1.out_features)
            if mlp is mlps[0]:
                first = buffer.data_ptr()
            assert buffer.data_ptr() == first
    # the buffer holds the last block's hidden map: it was really written there
    torch.testing.assert_close(buffer, mlps[-1].act(mlps[-1].lin1(x)).reshape(200, -1),
                               atol=0, rtol=0)


def test_mlp_buffer_is_left_alone_where_it_does_not_apply():
    """Gradients, autocast or an adapted MLP: ``mlp(x)`` as it is, and nothing put in the
    scratch dict; float64 weights and input: the buffer, in float64."""
    seg = _model("lora")
    mlp = seg.image_encoder.blocks[0].mlp
    x = torch.randn(1, 4, 4, mlp.lin1.in_features)
    adapted = copy.deepcopy(mlp)
    adapted.lin1 = LoRALinear(adapted.lin1, rank=2, alpha=2)
    nn.init.normal_(adapted.lin1.lora_B.weight)
    assert not torch.equal(adapted(x), mlp(x))  # the adapter changes the MLP
    cases = [
        (mlp, x, torch.enable_grad, False),
        (mlp, x, lambda: torch.autocast("cpu", dtype=torch.bfloat16), False),
        (adapted, x, torch.no_grad, False),
        (copy.deepcopy(mlp).double(), x.double(), torch.no_grad, True),
        (mlp, x, torch.no_grad, True),
    ]
    for layer, t, context, applies in cases:
        scratch: dict = {}
        with context():
            out = blocks_module.mlp_forward(layer, t, scratch)
            assert torch.equal(out, layer(t))
        assert [b.dtype for b in scratch.values()] == ([t.dtype] if applies else [])
    scratch = {}
    with torch.no_grad(), pytest.raises(RuntimeError):  # float64 input, float32 weights
        blocks_module.mlp_forward(mlp, x.double(), scratch)
    assert not scratch


def test_encoder_shares_one_mlp_buffer_in_prediction(monkeypatch):
    """The encoder's forward without gradients hands its blocks one scratch dict (one MLP
    buffer for all of them), and none with gradients; the logits equal those with a map of
    each block's own, bit for bit."""
    seg = _model("conv_lora").eval()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    seen = []
    mlp_forward = blocks_module.mlp_forward

    def recorded(mlp, x, scratch):
        seen.append(scratch)
        return mlp_forward(mlp, x, scratch)

    monkeypatch.setattr(blocks_module, "mlp_forward", recorded)
    results = []
    for reuse in (True, False):
        monkeypatch.setattr(blocks_module, "REUSE_MLP_BUFFER", reuse)
        seen.clear()
        torch.manual_seed(11)
        with torch.inference_mode():
            results.append(seg(images))
        assert len(seen) == len(seg.image_encoder.blocks)
        assert all(scratch is seen[0] for scratch in seen)  # one dict for the forward pass
        assert len(seen[0]) == (1 if reuse else 0)
    assert results[0].abs().sum() > 0 and torch.equal(*results)
    seen.clear()
    seg.train()
    seg(images).square().mean().backward()
    assert seen and all(scratch is None for scratch in seen)


def test_mlp_buffer_steps_aside_for_forward_hooks():
    """A forward hook on the MLP's first Linear, which the buffered path computes without
    calling it, is called in prediction, once per block; the buffer is not used then."""
    seg = _model("lora").eval()
    calls = []
    for block in seg.image_encoder.blocks:
        block.mlp.lin1.register_forward_hook(lambda m, args, out: calls.append(1))
    scratch: dict = {}
    x = torch.randn(1, 4, 4, seg.image_encoder.blocks[0].mlp.lin1.in_features)
    with torch.inference_mode():
        blocks_module.mlp_forward(seg.image_encoder.blocks[0].mlp, x, scratch)
        seg(torch.randn(1, 3, SIZE, SIZE))
    assert len(calls) == 1 + len(seg.image_encoder.blocks) and not scratch
