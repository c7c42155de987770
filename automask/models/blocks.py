"""SAM's image-encoder block with less work and less memory: no projections of its window
padding, the relative-position terms added to the attention scores in place, and a large
score map computed a few query rows at a time.

segment-anything's windowed blocks zero-pad the token grid to a multiple of the window
(14 tokens): a 256 px input (16 x 16 tokens) is padded to 28 x 28, 3.1x the tokens; 512 px
(32 x 32) to 42 x 42, 1.7x; 1024 px (64 x 64) to 70 x 70, 1.2x. The attention's ``qkv`` and
``proj`` projections then run on every padded token, although a padded row of ``qkv`` is
only ever ``qkv(0)`` and the padded rows of ``proj`` are cut away afterwards.

:func:`block_forward` gives the same result as ``block(x)`` with less arithmetic:

- ``qkv`` runs on the real tokens, and the padding is filled with ``qkv`` of one zero
  token, when ``qkv`` acts token by token (:func:`is_token_wise`). A layer whose update
  needs the windows (Conv-LoRA's experts convolve each window's low-rank map) runs its
  token-wise ``base_layer`` on the real tokens and its ``delta`` on the zero-padded
  windows, as before.
- ``proj`` runs after the windows are merged back, on the real tokens, when it acts token
  by token; the attention itself then takes only the real tokens as queries (every token
  stays a key and a value), since a padded token's output is cut away
  (:func:`_attend_windows`). On 2 CPU cores a windowed vit_b Conv-LoRA block's forward +
  backward takes 0.73x its time at 256 px (16 x 16 tokens, two thirds of the query rows
  padding) and 0.91x at 512 and 1024 px in bf16 (a LoRA block's is within noise); a
  conv_lora training step at 512 px 0.95x in fp32, and within noise of 1.0x in bf16,
  where the window attention is a small part of the step
  (``benchmarks/bench_blocks.py --compare real-queries``).
- The decomposed relative-position terms are added to the score map in place (a small
  autograd Function when gradients flow), not through two temporary maps of the size of
  the scores: bit for bit segment-anything's values and gradients. In bf16 or fp16, on a
  grid narrower than 32 tokens (every 14 x 14 window), they go into the score product
  itself instead (:func:`_folded_scores`): rounded once, so nearer the exact values than
  segment-anything's, and 0.43-0.54x the window attention's time in bf16 prediction on a
  CPU. In training it keeps less for the backward pass than autograd would
  (:class:`_FoldedAttention`, the same gradients bit for bit): its inputs and, on a CPU,
  its probabilities, rebuilding the extended operands in the backward pass (12 MiB less
  kept by a vit_b step at 512 px, 31 MiB at 1024 px, in the same time); elsewhere, where
  memory runs out first, it recomputes the probabilities too (48 and 174 MiB less; on a
  CPU that took 1.02-1.03x the time at 512 px and 1.00x at 1024 px,
  ``benchmarks/bench_chunks.py --compare folded-recompute``).
- A score map of at least ``CHUNK_FROM_BYTES`` against at least ``CHUNK_MIN_KEYS`` keys
  (a global block's from 512 px on: 12 x 1024 x 1024 values per image at 512 px, 24 MiB in
  bf16; 12 x 4096 x 4096 at 1024 px, 384 MiB) is computed a few query rows at a time and
  never held whole, in training too (:class:`_ChunkedAttention` recomputes each chunk in
  the backward pass). At 1024 px on 2 CPU cores this takes a vit_b training step's peak
  memory from 6.6 to 4.4 GiB in bf16 (9.2 to 4.6 GiB in fp32) in 1.01x the time, and
  prediction's from 2.1 to 1.4 GiB in 0.93x the time; at 512 px a training step's from
  2.21 to 2.04 GiB in bf16 (1.01-1.04x the time) and from 2.69 to 2.44 GiB in fp32 in
  0.88-0.95x the time (``benchmarks/bench_chunks.py``). The windows (196 keys) stay whole.
  On a CPU one call's chunks write their scores, probabilities and probability gradients
  into two shared buffers rather than maps of their own (:func:`_chunk_scratch`): the same
  values, and fewer pages faulted in (a 512 px bf16 training step 0.96x the time,
  ``bench_chunks.py --compare buffers``).
- In a forward pass without gradients on a CPU (prediction, validation) the blocks' MLPs
  write their hidden map into one buffer they share (:func:`mlp_forward`): the same
  values bit for bit, and a 1024 px vit_b prediction in float32 0.98x the time
  (``bench_chunks.py --compare mlp-buffer``).

Anything else (another attention module, as VPT's; a projection that is neither) takes
segment-anything's own ``block(x)``. The result equals it up to float rounding (the
matrix products see a different number of rows); ``tests/test_blocks.py`` compares the
outputs and gradients for every PEFT method.
"""
from __future__ import annotations

import functools

import torch
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    get_rel_pos,
    window_partition,
    window_unpartition,
)
from torch import nn

from ..utils.tracing import has_forward_hooks, is_exporting


def is_token_wise(layer: nn.Module | None) -> bool:
    """True when each output row of ``layer`` depends only on the same input row.

    ``nn.Linear`` itself, or a wrapper that says so with a ``token_wise`` attribute (an
    :class:`automask.peft.Adapter`) around a token-wise ``base_layer``.
    """
    if type(layer) is nn.Linear:
        return True
    return bool(getattr(layer, "token_wise", False)) and is_token_wise(
        getattr(layer, "base_layer", None))


def block_forward(block: Block, x: torch.Tensor, scratch: dict | None = None) -> torch.Tensor:
    """``block(x)`` for a segment-anything ``Block``: (B, H, W, E) -> (B, H, W, E).

    ``scratch``: a dict that the blocks of one forward pass share for buffers they can
    reuse (see :func:`mlp_forward`); None allocates every map anew.
    """
    if type(block.attn) is not Attention:
        return block(x)  # another attention (VPT's): segment-anything's order
    attn, window = block.attn, block.window_size
    height, width = x.shape[1], x.shape[2]
    if window == 0:  # a global block
        x = x + attn.proj(_attend(attn, attn.qkv(block.norm1(x))))
        return x + mlp_forward(block.mlp, block.norm2(x), scratch)
    pad_hw = (height + (-height) % window, width + (-width) % window)
    padded = pad_hw != (height, width)
    if padded and not _skips_padding(attn.qkv):
        return block(x)
    y = block.norm1(x)  # (B, H, W, E)
    if padded:
        qkv = _windowed_qkv(attn.qkv, y, window)
    else:
        qkv = attn.qkv(window_partition(y, window)[0])  # (B * nW, ws, ws, 3E), no padding
    if padded and is_token_wise(attn.proj) and REAL_QUERIES_ONLY and not is_exporting():
        # the padded tokens' outputs are cut away: only the real ones are queries
        # (an exported graph keeps segment-anything's shapes, symbolic in H and W)
        out = attn.proj(_attend_windows(attn, qkv, window, (height, width)))
    elif is_token_wise(attn.proj):
        out = attn.proj(_unpartition(_attend(attn, qkv), window, (height, width)))
    else:
        out = window_unpartition(attn.proj(_attend(attn, qkv)), window, pad_hw,
                                 (height, width))
    x = x + out  # (B, H, W, E)
    return x + mlp_forward(block.mlp, block.norm2(x), scratch)


# Whether mlp_forward writes the hidden map into the forward pass's shared buffer; False
# allocates it anew in every block (for benchmarks/bench_chunks.py's comparison).
REUSE_MLP_BUFFER = True


def mlp_forward(mlp: nn.Module, x: torch.Tensor, scratch: dict | None) -> torch.Tensor:
    """``mlp(x)``: (B, H, W, E) -> (B, H, W, E), its hidden map written into a buffer of
    ``scratch`` when one is given and nothing needs gradients.

    The hidden map is the largest tensor of a block's forward pass in prediction: (B * H * W,
    4E), 50 MB per 1024 px image for vit_b in float32. Allocated anew in every block, glibc
    maps it afresh (a block of more than 32 MiB) and its first write takes a page fault per
    4 KiB; written into one buffer that the blocks of a forward pass share, the faults come
    once. The same products and GELU, so the same values bit for bit. Applies to
    segment-anything's ``MLPBlock`` of two ``nn.Linear`` and an ``nn.GELU`` in the weights'
    dtype, without autocast, outside an export and without forward hooks on them; anything
    else (an adapted MLP) is ``mlp(x)``.
    """
    if (scratch is None or not REUSE_MLP_BUFFER or torch.is_grad_enabled() or is_exporting()
            or type(mlp) is not MLPBlock or type(mlp.act) is not nn.GELU
            or type(mlp.lin1) is not nn.Linear or type(mlp.lin2) is not nn.Linear
            or mlp.lin1.bias is None or torch.is_autocast_enabled(x.device.type)
            or not x.dtype == mlp.lin1.weight.dtype == mlp.lin1.bias.dtype
            or has_forward_hooks(mlp, mlp.lin1, mlp.act)):
        return mlp(x)
    tokens = x.reshape(-1, x.shape[-1])  # (B * H * W, E)
    shape = (tokens.shape[0], mlp.lin1.out_features)
    key = ("mlp", shape, x.dtype, x.device)
    hidden = scratch.get(key)
    if hidden is None:
        hidden = scratch[key] = x.new_empty(shape)
    torch.addmm(mlp.lin1.bias, tokens, mlp.lin1.weight.t(), out=hidden)  # (B * H * W, 4E)
    torch.ops.aten.gelu_(hidden, approximate=mlp.act.approximate)
    return mlp.lin2(hidden).view(*x.shape[:-1], -1)


def _skips_padding(layer: nn.Module) -> bool:
    """Whether :func:`_windowed_qkv` can compute ``layer`` without the padded rows."""
    return is_token_wise(layer) or (callable(getattr(layer, "delta", None))
                                    and is_token_wise(getattr(layer, "base_layer", None)))


def _windowed_qkv(layer: nn.Module, y: torch.Tensor, window: int) -> torch.Tensor:
    """``layer(window_partition(y))`` computed on y's real tokens (see :func:`_skips_padding`).

    A token-wise layer runs on the real tokens, and the padding gets its output for one
    zero token; otherwise its token-wise ``base_layer`` so, plus its ``delta`` on the
    zero-padded windows. Conv-LoRA's ``delta`` starts with ``lora_A``, token-wise and zero
    at zero: that runs on the real tokens too, and its r-channel output is cut into windows.
    """
    zero = y.new_zeros(1, 1, 1, y.shape[-1])
    if is_token_wise(layer):
        return _pad_partition(layer(y), layer(zero), window)
    base = layer.base_layer
    qkv = _pad_partition(base(y), base(zero), window)  # (B * nW, ws, ws, 3E)
    if callable(getattr(layer, "add_delta", None)):
        assert layer.lora_A.bias is None  # so that a padded token's low-rank row is zero
        low_rank, _ = window_partition(layer.lora_A(y), window)  # (B * nW, ws, ws, r)
        return layer.add_delta(qkv, low_rank)
    windows, _ = window_partition(y, window)  # (B * nW, ws, ws, E), zero-padded
    return qkv + layer.delta(windows)


def _pad_partition(t: torch.Tensor, fill: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, D) padded with the row ``fill`` (1, 1, 1, D), cut into windows: (B * nW, ws,
    ws, D), each value written once (segment-anything pads by concatenation, then copies
    the padded map into windows)."""
    fill = fill.to(t.dtype)
    if is_exporting():  # standard operations for the exported graph
        return _pad_partition_by_cat(t, fill, window)
    return _PadPartition.apply(t, fill, window)


def _unpartition(windows: torch.Tensor, window: int, size: tuple[int, int]) -> torch.Tensor:
    """``window_unpartition``: windows (B * nW, ws, ws, D) -> the real tokens (B, H, W, D),
    each read once (segment-anything joins the padded map, then copies its crop)."""
    if is_exporting():
        height, width = size
        pad_hw = (height + (-height) % window, width + (-width) % window)
        return window_unpartition(windows, window, pad_hw, size)
    return _Unpartition.apply(windows, window, size)


def _pad_partition_by_cat(t: torch.Tensor, fill: torch.Tensor, window: int) -> torch.Tensor:
    batch, height, width, dim = t.shape
    pad_h, pad_w = (-height) % window, (-width) % window
    if pad_w:
        t = torch.cat([t, fill.expand(batch, height, pad_w, dim)], dim=2)
    if pad_h:
        t = torch.cat([t, fill.expand(batch, pad_h, width + pad_w, dim)], dim=1)
    windows, _ = window_partition(t, window)  # nothing left to pad
    return windows


def _window_grid(windows: torch.Tensor, batch: int, height: int, width: int,
                 window: int) -> torch.Tensor:
    """Windows (B * nH * nW, ws, ws, D) of an (H, W) grid as a view (B, nH, ws, nW, ws, D)."""
    rows, cols = -(-height // window), -(-width // window)
    return windows.view(batch, rows, cols, window, window, -1).permute(0, 1, 3, 2, 4, 5)


def _tiles(height: int, width: int, window: int):
    """The real tokens of a padded (H, W) grid as at most four rectangles: for each, the
    token rows and columns of the (B, H, W, D) map and the (B, nH, ws, nW, ws, D) window
    grid's (window rows, rows in each, window columns, columns in each)."""
    def spans(n):
        full, rest = divmod(n, window)
        out = [(slice(0, full), window, slice(0, full * window))] if full else []
        if rest:
            out.append((slice(full, full + 1), rest, slice(full * window, n)))
        return out
    for win_rows, row_len, rows in spans(height):
        for win_cols, col_len, cols in spans(width):
            yield rows, cols, win_rows, row_len, win_cols, col_len


def _copy_tiles(tokens: torch.Tensor, grid: torch.Tensor, window: int, to_grid: bool) -> None:
    """Copy the real tokens between a (B, H, W, D) map and a window grid (see
    :func:`_window_grid`), in the direction ``to_grid``."""
    batch, height, width, dim = tokens.shape
    for rows, cols, win_rows, row_len, win_cols, col_len in _tiles(height, width, window):
        n_rows, n_cols = win_rows.stop - win_rows.start, win_cols.stop - win_cols.start
        part = tokens[:, rows, cols].view(batch, n_rows, row_len, n_cols, col_len, dim)
        cells = grid[:, win_rows, :row_len, win_cols, :col_len]
        (cells if to_grid else part).copy_(part if to_grid else cells)


def _padding(grid: torch.Tensor, height: int, width: int, window: int) -> list[torch.Tensor]:
    """Views of a window grid's padding, each padded cell in exactly one of them."""
    pad_h, pad_w = (-height) % window, (-width) % window
    views = []
    if pad_h:  # the last window row's padded rows, every column
        views.append(grid[:, -1, window - pad_h:])
    if pad_w:  # the last window column's padded columns, in the real rows
        views.append(grid[:, :-1, :, -1, window - pad_w:])
        views.append(grid[:, -1, :window - pad_h, -1, window - pad_w:])
    return views


class _PadPartition(torch.autograd.Function):
    """:func:`_pad_partition` for autograd: the map's gradient is the windows' gradient on
    the real tokens (read once), the fill's its sum over the padding."""

    @staticmethod
    def forward(ctx, t, fill, window):  # noqa: D102
        batch, height, width, dim = t.shape
        rows, cols = -(-height // window), -(-width // window)
        windows = t.new_empty(batch * rows * cols, window, window, dim)
        grid = _window_grid(windows, batch, height, width, window)
        _copy_tiles(t, grid, window, to_grid=True)
        for view in _padding(grid, height, width, window):
            view.copy_(fill.view(dim).expand_as(view))
        ctx.shape, ctx.window = t.shape, window
        return windows

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        batch, height, width, dim = ctx.shape
        grid = _window_grid(grad, batch, height, width, ctx.window)
        grad_t = grad_fill = None
        if ctx.needs_input_grad[0]:
            grad_t = grad.new_empty(ctx.shape)
            _copy_tiles(grad_t, grid, ctx.window, to_grid=False)
        if ctx.needs_input_grad[1]:
            grad_fill = grad.new_zeros(1, 1, 1, dim)
            for view in _padding(grid, height, width, ctx.window):
                grad_fill += view.sum(dim=tuple(range(view.dim() - 1)))
        return grad_t, grad_fill, None


class _Unpartition(torch.autograd.Function):
    """:func:`_unpartition` for autograd: the windows' gradient is the map's on the real
    tokens and zero on the padding."""

    @staticmethod
    def forward(ctx, windows, window, size):  # noqa: D102
        height, width = size
        rows, cols = -(-height // window), -(-width // window)
        batch, dim = windows.shape[0] // (rows * cols), windows.shape[-1]
        out = windows.new_empty(batch, height, width, dim)
        _copy_tiles(out, _window_grid(windows, batch, height, width, window), window,
                    to_grid=False)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        zero = grad.new_zeros(1, 1, 1, grad.shape[-1])
        return _PadPartition.apply(grad, zero, ctx.window), None, None


# A score map of at least CHUNK_FROM_BYTES (a global block's at 512 px: 12 x 1024 x 1024
# values per image, 24 MiB in bf16; at 1024 px 384 MiB) is computed a few query rows at a
# time, about CHUNK_BYTES of it at once on a CPU (where a chunk that stays in cache pays)
# and CHUNK_BYTES_ACCELERATOR elsewhere (fewer, larger kernels), and never held whole (see
# _ChunkedAttention). Maps against fewer than CHUNK_MIN_KEYS keys (every 14 x 14 window
# however many, a global block below 512 px) stay whole: each window's map is small, and
# in bf16 the windows' position terms go into the score product (_folded_scores), which
# the chunks do not do.
CHUNK_FROM_BYTES = 16 * 2**20
CHUNK_MIN_KEYS = 1024
CHUNK_BYTES = 16 * 2**20
CHUNK_BYTES_ACCELERATOR = 256 * 2**20


def _attend(attn: Attention, qkv: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` between its ``qkv`` and ``proj``.

    (B, H, W, 3E) projected tokens -> (B, H, W, E) attention output. The relative-position
    terms are added to the scores in place (the same additions in the same order as
    segment-anything's ``add_decomposed_rel_pos``, without its two temporary score maps) or,
    for a narrow grid in bf16 / fp16, inside the score product (:func:`_folded_scores`),
    and a large score map is computed a few query rows at a time (:class:`_ChunkedAttention`).
    """
    batch, height, width, _ = qkv.shape
    heads = attn.num_heads
    qkv = qkv.reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, height * width, -1).unbind(0)  # (B*nH, HW, hd)
    out = _attention(attn, q, k, v, (height, width), (height, width))  # (B*nH, HW, hd)
    out = out.view(batch, heads, height, width, -1)
    return out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)


# Whether a windowed block whose grid is padded computes attention for the real tokens'
# queries only (see _attend_windows); False computes every window's padded queries too, as
# segment-anything does (for benchmarks/bench_blocks.py's comparison).
REAL_QUERIES_ONLY = True


def _attend_windows(attn: Attention, qkv: torch.Tensor, window: int,
                    size: tuple[int, int]) -> torch.Tensor:
    """``_unpartition(_attend(attn, qkv), window, size)`` with the real tokens as the only
    queries.

    Windows (B * nW, ws, ws, 3E) of a zero-padded (H, W) grid -> the real tokens' attention
    output (B, H, W, E), before ``proj``. A padded token's output is cut away after
    ``proj``, so only its key and value are needed: segment-anything computes its query's
    scores, softmax and output all the same (at 256 px, 16 x 16 tokens padded to 28 x 28,
    two thirds of the windows' query rows; at 512 px 42%, at 1024 px 16%). The windows are
    grouped by how many of their rows and columns are real (at most four groups: whole
    windows, the last column's, the last row's and the corner); each group attends with
    its real rows and columns of queries against all of its keys.
    """
    height, width = size
    heads = attn.num_heads
    batch = _qkv_grid(qkv, window, size, heads).shape[0]
    tiles = list(_tiles(height, width, window))
    split = _WindowGroups.apply(qkv, window, size, heads)  # q, k, v of each group in turn
    bands = []
    for i, (_, _, win_rows, row_len, win_cols, col_len) in enumerate(tiles):
        q, k, v = split[3 * i:3 * i + 3]  # (b*heads, rl*cl, hd), (b*heads, ws*ws, hd) x 2
        n_rows, n_cols = win_rows.stop - win_rows.start, win_cols.stop - win_cols.start
        out = _attention(attn, q, k, v, (row_len, col_len), (window, window))
        out = out.view(batch, n_rows, n_cols, heads, row_len, col_len, -1)
        out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(
            batch, n_rows * row_len, n_cols * col_len, -1)  # (B, rows, columns, E)
        if bands and bands[-1][0] == win_rows:  # the same band of window rows
            bands[-1][1].append(out)
        else:
            bands.append((win_rows, [out]))
    bands = [torch.cat(tiles, dim=2) if len(tiles) > 1 else tiles[0] for _, tiles in bands]
    return torch.cat(bands, dim=1) if len(bands) > 1 else bands[0]


class _WindowGroups(torch.autograd.Function):
    """The queries, keys and values of :func:`_attend_windows`'s groups of windows.

    Windows (B * nW, ws, ws, 3E) of a zero-padded (H, W) grid -> for each group of
    :func:`_tiles` in turn: its real queries (b * heads, rl * cl, hd), its keys and its values
    (b * heads, ws * ws, hd), each a contiguous copy. The backward pass writes each group's
    gradients into one (B * nW, ws, ws, 3E) buffer, each value once, and zeros the padded
    queries' gradients. Autograd's own backward of the slices would zero-fill a buffer of the
    whole windows per group and slice, then add them up (a 512 px bf16 training step takes
    0.92x the time with this Function, ``benchmarks/bench_blocks.py --compare
    window-groups``).
    """

    @staticmethod
    def forward(ctx, qkv, window, size, heads):  # noqa: D102
        grid = _qkv_grid(qkv, window, size, heads)  # (B, nH, nW, ws, ws, 3, heads, hd)
        dim = grid.shape[-1]
        out = []
        for _, _, win_rows, row_len, win_cols, col_len in _tiles(*size, window):
            part = grid[:, win_rows, win_cols]  # (B, nh, nw, ws, ws, 3, heads, hd)
            q = part[:, :, :, :row_len, :col_len, 0].permute(0, 1, 2, 5, 3, 4, 6)
            out.append(q.clone(memory_format=torch.contiguous_format).view(
                -1, row_len * col_len, dim))  # (b*heads, rl*cl, hd)
            for index in (1, 2):  # (b*heads, ws*ws, hd)
                t = part[:, :, :, :, :, index].permute(0, 1, 2, 5, 3, 4, 6)
                out.append(t.clone(memory_format=torch.contiguous_format).view(
                    -1, window * window, dim))
        ctx.shape, ctx.window, ctx.size, ctx.heads = qkv.shape, window, size, heads
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        window, heads = ctx.window, ctx.heads
        grad = grads[0].new_empty(ctx.shape)
        grid = _qkv_grid(grad, window, ctx.size, heads)
        tiles = _tiles(*ctx.size, window)
        for i, (_, _, win_rows, row_len, win_cols, col_len) in enumerate(tiles):
            part = grid[:, win_rows, win_cols]  # (B, nh, nw, ws, ws, 3, heads, hd)
            lead = part.shape[:3]
            for index, (rl, cl) in enumerate(((row_len, col_len), (window, window),
                                              (window, window))):
                g = grads[3 * i + index].view(*lead, heads, rl, cl, -1)
                part[:, :, :, :rl, :cl, index].copy_(g.permute(0, 1, 2, 4, 5, 3, 6))
            part[:, :, :, row_len:, :, 0].zero_()  # padded queries: no gradient
            part[:, :, :, :row_len, col_len:, 0].zero_()
        return grad, None, None, None


def _qkv_grid(qkv: torch.Tensor, window: int, size: tuple[int, int],
              heads: int) -> torch.Tensor:
    """Windows (B * nW, ws, ws, 3E) of a padded (H, W) grid as a view (B, nH, nW, ws, ws,
    3, heads, hd)."""
    rows, cols = -(-size[0] // window), -(-size[1] // window)
    return qkv.view(qkv.shape[0] // (rows * cols), rows, cols, window, window, 3, heads, -1)


def _attention(attn: Attention, q, k, v, q_size: tuple[int, int],
               k_size: tuple[int, int]) -> torch.Tensor:
    """softmax((q scale) k^T + relative-position terms) v, for one head per batch entry.

    k, v (N, kh * kw, hd): a (kh, kw) grid of keys and values. q (N, h * w, hd): the
    queries of its first h rows and w columns (the whole grid but in
    :func:`_attend_windows`). -> (N, h * w, hd).
    """
    (height, width), (k_height, k_width) = q_size, k_size
    rows = _chunk_rows(q, height, width, k_height * k_width) if attn.use_rel_pos else 0
    fold = attn.use_rel_pos and not rows and _folds(q, k_width)
    scores = None if rows or fold else (q * attn.scale) @ k.transpose(-2, -1)  # (N, hw, khkw)
    out = None
    if attn.use_rel_pos:
        q_grid = q.reshape(q.shape[0], height, width, -1)  # a copy when q is strided: once
        rel_h = torch.einsum("bhwc,hkc->bhwk", q_grid, rel_pos_table(
            k_height, attn.rel_pos_h)[:height])  # (N, h, w, kh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", q_grid, rel_pos_table(
            k_width, attn.rel_pos_w)[:width])  # (N, h, w, kw)
        same_dtype = q.dtype == rel_h.dtype == rel_w.dtype
        if rows and same_dtype:
            out = _chunked_attention(q, k, v, rel_h, rel_w, attn.scale, rows)
        elif fold and same_dtype and FOLDED_FUNCTION and _needs_grad(q, k, v, rel_h, rel_w):
            out = _FoldedAttention.apply(q, k, v, rel_h, rel_w, attn.scale)
        elif fold and same_dtype:
            scores = _folded_scores(q, k, rel_h, rel_w, attn.scale)
        else:
            if scores is None:
                scores = (q * attn.scale) @ k.transpose(-2, -1)
            scores = _add_rel_pos(scores, rel_h, rel_w)
    if out is None:
        out = scores.softmax(dim=-1) @ v  # (N, hw, hd)
    return out


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``get_rel_pos(size, size, rel_pos)``: (size, size, C), the
    embedding of each query-key offset along one axis.

    The same gather, with its index built once per size and device (:func:`_offsets`):
    segment-anything builds it on the CPU in every call, so that on a GPU each attention
    copied it to the device and waited for that copy (72 waits in a vit_b training step
    at 1024 px), which kept the host from queueing work ahead. A table whose length does
    not match ``size`` (interpolated) goes to ``get_rel_pos`` itself.
    """
    if rel_pos.shape[0] != 2 * size - 1:
        return get_rel_pos(size, size, rel_pos)
    return rel_pos[_offsets(size, rel_pos.device)]


@functools.lru_cache(maxsize=64)
def _offsets(size: int, device: torch.device) -> torch.Tensor:
    """(size, size) index ``q - k + size - 1`` of each query-key offset, on ``device``.
    Built outside inference mode: a later training step's backward saves the index."""
    with torch.inference_mode(False):
        coords = torch.arange(size)
        return (coords[:, None] - coords[None, :] + (size - 1)).to(device)


# In bf16 or fp16 a grid narrower than FOLD_BELOW_WIDTH tokens (every windowed block's 14 x 14
# window; a global block below 512 px) gets its relative-position terms inside the score
# product (see _folded_scores).
FOLD_BELOW_WIDTH = 32


def _folds(q: torch.Tensor, width: int) -> bool:
    """Whether :func:`_folded_scores` computes the scores against a ``width``-token-wide grid
    of keys."""
    return q.dtype in (torch.bfloat16, torch.float16) and width < FOLD_BELOW_WIDTH


def _folded_scores(q, k, rel_h, rel_w, scale: float) -> torch.Tensor:
    """``(q scale) k^T`` plus the relative-position terms, as one product.

    The queries are extended with their terms, ``[q scale, rel_h, rel_w]`` (N, hw, hd + H + W),
    and the keys (N, HW, hd) of an (H, W) grid with one-hot codes of their grid row and
    column, ``[k, row, col]`` (N, HW, hd + H + W): the
    product of the two adds ``rel_h[.., key row]`` and ``rel_w[.., key column]`` to every
    score inside the matrix product. The two broadcast additions over the whole map (N, H,
    W, H, W) that it replaces have a last dimension of W: below 32 (the 14-token windows)
    they do not vectorise, and in bf16 on a CPU they cost more than the product itself
    (``benchmarks/bench_ops.py``: a window block's attention takes 0.43-0.54x the time in
    prediction, 0.65-0.67x with the backward pass; a 32 x 32 grid 1.01x and 1.14x, so wider
    grids keep the additions). The sum is rounded once instead of three times, so in bf16
    it is closer to the exact scores than segment-anything's; float32 keeps the additions
    (the extended product takes 0.75-1.40x their time there: no consistent gain).
    """
    extended, keys = _folded_operands(q, k, rel_h, rel_w, scale)
    return extended @ keys.transpose(-2, -1)  # (N, hw, HW)


def _folded_operands(q, k, rel_h, rel_w, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The extended queries (N, hw, hd + H + W) and keys (N, HW, hd + H + W) of
    :func:`_folded_scores`."""
    n, rows, cols, height = rel_h.shape  # (N, h, w, H): h x w queries, H key rows
    width = rel_w.shape[-1]
    queries, keys = rows * cols, height * width
    eye_h = torch.eye(height, dtype=k.dtype, device=k.device)
    eye_w = torch.eye(width, dtype=k.dtype, device=k.device)
    key_rows = eye_h.repeat_interleave(width, dim=0).expand(n, keys, height)  # (N, HW, H)
    key_cols = eye_w.repeat(height, 1).expand(n, keys, width)  # (N, HW, W)
    extended = torch.cat([q * scale, rel_h.reshape(n, queries, height),
                          rel_w.reshape(n, queries, width)], dim=-1)  # (N, hw, hd + H + W)
    return extended, torch.cat([k, key_rows, key_cols], dim=-1)  # (N, HW, hd + H + W)


# Whether a folded attention that gradients flow through is a _FoldedAttention (False:
# autograd records its operations, for benchmarks/bench_chunks.py's comparison).
FOLDED_FUNCTION = True
# The device types on which _FoldedAttention keeps its probabilities for the backward pass
# instead of recomputing them (on a CPU the recomputation costs about 2% of a vit_b 512 px
# training step in bf16 for 36 MiB; elsewhere memory is what runs out first).
KEEP_FOLDED_PROBS_ON = ("cpu",)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and not is_exporting() and any(
        t.requires_grad for t in tensors)


class _FoldedAttention(torch.autograd.Function):
    """``softmax(_folded_scores(q, k, rel_h, rel_w, scale)) @ v`` keeping less for the
    backward pass than autograd.

    Autograd keeps, for each windowed block until the backward pass, the probabilities
    (N, hw, HW), v, the extended queries (N, hw, hd + H + W) and the extended keys (N, HW,
    hd + H + W): 13.7 MB per vit_b block at 512 px in bf16. This keeps q, k, v, rel_h and
    rel_w (7.7 MB) and rebuilds the extended operands in the backward pass; on the devices
    of ``KEEP_FOLDED_PROBS_ON`` (a CPU) it keeps the probabilities too (12.5 MB), elsewhere
    it recomputes them from the rebuilt operands. A vit_b conv_lora training step keeps
    332 MiB at 512 px with autograd, 320 MiB keeping the probabilities, 284 MiB recomputing
    them (1255, 1224 and 1082 MiB at 1024 px). Either way the same operations on the same
    values: the probabilities bit for bit the forward's, and then the gradients of
    autograd's own backward of those operations, in its order. On a CPU that is autograd's
    result bit for bit. CUDA's autocast runs a softmax in float32, whose probabilities the
    product with v then rounds to bf16 / fp16; here the softmax takes and gives bf16 / fp16
    (computing in float32 inside), so the two can differ in the last bit of a probability
    and of its gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, scale):  # noqa: D102
        with torch.autocast(q.device.type, enabled=False):
            probs = _folded_scores(q, k, rel_h, rel_w, scale).softmax(dim=-1)  # (N, hw, HW)
            out = probs @ v  # (N, hw, hd)
        keep = q.device.type in KEEP_FOLDED_PROBS_ON
        ctx.save_for_backward(q, k, v, rel_h, rel_w, *((probs,) if keep else ()))
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        q, k, v, rel_h, rel_w, *kept = ctx.saved_tensors
        n, rows, cols, height = rel_h.shape  # (N, h, w, H)
        dim, width = q.shape[-1], rel_w.shape[-1]
        with torch.autocast(q.device.type, enabled=False):
            extended, keys = _folded_operands(q, k, rel_h, rel_w, ctx.scale)
            if kept:
                probs = kept[0]
            else:
                probs = (extended @ keys.transpose(-2, -1)).softmax(dim=-1)  # (N, hw, HW)
            grad_v = probs.transpose(-2, -1) @ grad  # (N, HW, hd)
            grad_probs = grad @ v.transpose(-2, -1)
            del v
            grad_scores = torch.ops.aten._softmax_backward_data(
                grad_probs, probs, -1, probs.dtype)
            del probs, kept, grad_probs
            grad_extended = grad_scores @ keys  # (N, hw, hd + H + W)
            grad_keys = (extended.transpose(-2, -1) @ grad_scores).transpose(-2, -1)
        grad_q = grad_extended[..., :dim] * ctx.scale
        grad_h = grad_extended[..., dim:dim + height].reshape(n, rows, cols, height)
        grad_w = grad_extended[..., dim + height:].reshape(n, rows, cols, width)
        return grad_q, grad_keys[..., :dim], grad_v, grad_h, grad_w, None


def _chunk_rows(q: torch.Tensor, height: int, width: int, keys: int | None = None) -> int:
    """Query rows of the (height, width) grid of queries per chunk of the score map against
    ``keys`` keys (default: the same grid's), or 0 to compute the map whole (a small map;
    exporting, tracing or compiling)."""
    if is_exporting():  # before any arithmetic on a shape that may be symbolic
        return 0
    keys = height * width if keys is None else keys
    row_bytes = q.shape[0] * width * keys * q.element_size()  # one grid row of queries
    if keys < CHUNK_MIN_KEYS or row_bytes * height < CHUNK_FROM_BYTES:
        return 0
    budget = CHUNK_BYTES if q.device.type == "cpu" else CHUNK_BYTES_ACCELERATOR
    return max(1, min(height, budget // row_bytes))


def _chunked_attention(q, k, v, rel_h, rel_w, scale: float, rows: int) -> torch.Tensor:
    """softmax(q k^T scale + rel terms) v, ``rows`` query rows of the grid at a time."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rel_h, rel_w)):
        return _ChunkedAttention.apply(q, k, v, rel_h, rel_w, scale, rows)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])  # (N, HW, hd)
    # contiguous once rather than in every chunk's product
    k_t, v = k.transpose(-2, -1).contiguous(), v.contiguous()  # (N, hd, HW), (N, HW, hd)
    width = rel_h.shape[2]
    scratch = _chunk_scratch(q, k_t, rows * width)
    for rows_ in _row_chunks(rel_h.shape[1], rows):
        # not matmul(out=...): into a strided slice it copies the whole of ``out``
        out[:, rows_.start * width:rows_.stop * width] = (
            _chunk_probs(q, k_t, rel_h, rel_w, scale, rows_, scratch) @ v)
    return out


def _row_chunks(height: int, rows: int) -> list[slice]:
    return [slice(a, min(height, a + rows)) for a in range(0, height, rows)]


# Whether the chunks of one attention share their score buffers (see _chunk_scratch); False
# allocates each chunk's maps anew (for benchmarks/bench_chunks.py's comparison).
REUSE_CHUNK_BUFFERS = True


def _chunk_scratch(a: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor | None:
    """A flat buffer for the products ``a[:, :rows] @ b`` of every chunk: (N * rows * M,).

    A chunk's score map takes several MB. Allocated anew for each chunk, it can land on
    memory the allocator has just mapped (glibc maps a large block fresh unless it reuses
    one freed earlier), and its first write then costs a page fault per 4 KiB: on 2 CPU
    cores a 16.5 MB product into fresh memory took 4.9 ms instead of 1.6 ms. Written into
    one buffer, a call's first chunk pays that at most once and the others not at all.
    None where buffers are not shared (an accelerator, whose allocator caches)."""
    if not REUSE_CHUNK_BUFFERS or a.device.type != "cpu":
        return None
    return a.new_empty(a.shape[0] * min(rows, a.shape[1]) * b.shape[-1],
                       dtype=torch.result_type(a, b))


def _bmm_into(scratch: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (N, m, k) x (N, k, M) -> (N, m, M), written to the front of ``scratch``
    when given."""
    if scratch is None:
        return a @ b
    shape = (a.shape[0], a.shape[1], b.shape[-1])
    return torch.bmm(a, b, out=scratch[:shape[0] * shape[1] * shape[2]].view(shape))


def _chunk_probs(q, k_t, rel_h, rel_w, scale: float, rows: slice,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax rows of the queries in grid rows ``rows``: (N, rows * w, HW), computed as
    segment-anything computes them (q scaled, times k^T (N, hd, HW), row terms, column
    terms, softmax); in ``scratch`` (see :func:`_chunk_scratch`), overwritten, when given."""
    n, _, width, k_height = rel_h.shape  # (N, h, w, H)
    scores = _bmm_into(scratch, q[:, rows.start * width:rows.stop * width] * scale, k_t)
    grid = scores.view(n, rows.stop - rows.start, width, k_height, rel_w.shape[-1])
    grid.add_(rel_h[:, rows, :, :, None]).add_(rel_w[:, rows, :, None, :])
    if scratch is None:
        return scores.softmax(dim=-1)
    return torch.softmax(scores, dim=-1, out=scores)  # in place: the same values on a CPU


class _ChunkedAttention(torch.autograd.Function):
    """Attention with decomposed relative-position terms whose score map is never whole.

    The forward computes it a few query rows at a time and keeps only its inputs; the
    backward recomputes each chunk's probabilities (bit for bit the forward's) and takes
    that chunk's gradients. The output and the queries' and terms' gradients come from
    segment-anything's operations on the same values, only on fewer rows at a time (for a
    1024 px global block they came out bit-identical; in general matrix kernels may round
    differently for other row counts); the keys' and values' gradients are sums over the
    chunks, accumulated in float32. The price is one more product of queries and keys, and
    the softmax, per backward pass.
    """

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, scale, rows):  # noqa: D102
        with torch.autocast(q.device.type, enabled=False):
            out = _chunked_attention(q, k, v, rel_h, rel_w, scale, rows)
        ctx.save_for_backward(q, k, v, rel_h, rel_w)
        ctx.scale, ctx.rows = scale, rows
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        q, k, v, rel_h, rel_w = ctx.saved_tensors
        scale = ctx.scale
        n, height, width, k_height = rel_h.shape  # (N, h, w, H)
        k_width = rel_w.shape[-1]
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        grad_h, grad_w = torch.empty_like(rel_h), torch.empty_like(rel_w)
        with torch.autocast(q.device.type, enabled=False):
            k_t, v_t = k.transpose(-2, -1).contiguous(), v.transpose(-2, -1).contiguous()
            k = k.contiguous()
            # one buffer for every chunk's probabilities, one for their gradients
            scratch = _chunk_scratch(q, k_t, ctx.rows * width)
            scratch_grad = _chunk_scratch(grad, v_t, ctx.rows * width)
            for rows in _row_chunks(height, ctx.rows):
                tokens = slice(rows.start * width, rows.stop * width)
                probs = _chunk_probs(q, k_t, rel_h, rel_w, scale, rows, scratch)
                grad_out = grad[:, tokens]  # (N, rows*W, hd)
                grad_v.add_(probs.transpose(-2, -1) @ grad_out)
                grad_probs = _bmm_into(scratch_grad, grad_out, v_t)  # (N, rows*W, HW)
                if scratch_grad is None:
                    grad_scores = torch.ops.aten._softmax_backward_data(
                        grad_probs, probs, -1, probs.dtype)
                else:  # in place: the same values on a CPU
                    grad_scores = torch.ops.aten._softmax_backward_data.out(
                        grad_probs, probs, -1, probs.dtype, grad_input=grad_probs)
                grid = grad_scores.view(n, rows.stop - rows.start, width, k_height, k_width)
                torch.sum(grid, dim=-1, out=grad_h[:, rows])
                torch.sum(grid, dim=-2, out=grad_w[:, rows])
                torch.mul(grad_scores @ k, scale, out=grad_q[:, tokens])
                grad_k.add_(grad_scores.transpose(-2, -1) @ (q[:, tokens] * scale))
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), grad_h, grad_w, None, None


def _add_rel_pos(scores: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """``scores`` (N, hw, HW) of an (h, w) grid of queries against an (H, W) grid of keys,
    plus rel_h (N, h, w, H) over key rows and rel_w (N, h, w, W) over key columns, added in
    place (no temporary maps)."""
    grid_shape = (*rel_h.shape, rel_w.shape[-1])  # (N, h, w, H, W)
    if is_exporting() or not scores.dtype == rel_h.dtype == rel_w.dtype:  # segment-anything's way
        grid = scores.view(grid_shape) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
        return grid.view(scores.shape)
    if torch.is_grad_enabled() and (scores.requires_grad or rel_h.requires_grad
                                    or rel_w.requires_grad):
        return _AddRelPos.apply(scores, rel_h, rel_w)
    scores.view(grid_shape).add_(rel_h[:, :, :, :, None]).add_(rel_w[:, :, :, None, :])
    return scores


class _AddRelPos(torch.autograd.Function):
    """:func:`_add_rel_pos` for autograd: the scores' gradient passes through, the terms'
    are its sums over key columns and key rows (as broadcasting's backward computes them).
    A Function rather than in-place ops on a view, whose backward would copy the map."""

    @staticmethod
    def forward(ctx, scores, rel_h, rel_w):  # noqa: D102
        ctx.grid = (*rel_h.shape, rel_w.shape[-1])  # (N, h, w, H, W)
        scores.view(ctx.grid).add_(rel_h[:, :, :, :, None]).add_(rel_w[:, :, :, None, :])
        ctx.mark_dirty(scores)
        return scores

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grid = grad.reshape(ctx.grid)  # (N, h, w, H, W)
        return grad, grid.sum(dim=-1), grid.sum(dim=-2)
