"""Operation-level A/B of two kernels automask computes differently from segment-anything.

1. Attention with decomposed relative-position terms on a narrow grid (vit_b heads, hd 64):
   the terms added to the score map (segment-anything's additions, done in place by
   ``automask.models.blocks._add_rel_pos``) against the terms inside the score product
   (``_folded_scores``), forward and forward + backward, per dtype and grid.
2. Conv-LoRA's bicubic resize of a low-rank map (n, 3, 14, 14) by each scale and back:
   ``F.interpolate`` against ``automask.peft.conv_lora.bicubic_resize`` (two matrix
   products), forward + backward, float32.
3. LoRA's update on vit_b's qkv layer (768 -> 2304, r = 3), forward + backward:
   ``base(x) + lora_B(lora_A(x)) * scaling`` against
   ``automask.peft.lora.add_low_rank_update`` (scaling and sum inside one ``addmm``).
4. Windows of a padded token grid (window 14), forward + backward, bf16, as vit_b's windowed
   blocks use them: qkv padded and cut into windows by segment-anything's concatenation +
   ``window_partition`` against ``automask.models.blocks._pad_partition``, and the attention
   output joined by ``window_unpartition`` against ``_unpartition`` (each value copied once).
5. Attention in prediction (inference mode), float32 (and bf16 on a CPU with bf16
   products): automask's core (the terms added in place; a global map of at least
   ``CHUNK_FROM_BYTES`` a few query rows at a time, as ``automask.models.blocks._attention``
   does) against torch's fused ``scaled_dot_product_attention`` on the folded operands of
   ``_folded_operands`` (the terms inside the product, no bias tensor; v zero-padded to
   their width).
6. Conv-LoRA's expert convolution (3x3, r = 3 -> 3) on n maps of H x W, forward + backward,
   float32 and bf16: ``F.conv2d`` (oneDNN for n >= 2 or a large map) against ATen's im2col
   kernel (``aten::_slow_conv2d_forward``), which
   ``automask.peft.conv_lora.expert_conv`` uses on CPUs up to ``IM2COL_BUDGET``
   (pixels times threads).
7. Conv-LoRA's expert resize and convolution, (n, 3, H, W) resized by each scale and
   convolved 3x3, forward + backward, float32: ``automask.peft.conv_lora.bicubic_resize``
   then ``expert_conv`` (as ``run_expert`` did for every scale) against the two composed
   into matrix products (``automask.peft.conv_lora.resized_conv``), which ``run_expert``
   uses where ``automask.peft.conv_lora.composes`` says so (the last column).

Both columns of a row are timed in one process, median of ``--repeat`` after a warm-up
each: one after the other in tables 1 and 2, alternately in tables 3 to 7.
Run from the repository root::

    python -m benchmarks.bench_ops [--repeat 9] [--threads 2] [--only expert-conv resized-conv]
"""
from __future__ import annotations

import argparse

from benchmarks.bench_export import median_time as _timed


def _alternated(first, second, repeat: int) -> tuple[float, float]:
    """Median seconds of ``first()`` and ``second()`` called alternately, after a warm-up of
    each: drift of the machine (allocator, caches, other jobs) falls on both."""
    import statistics
    import time

    first(), second()
    times = ([], [])
    for _ in range(repeat):
        for fn, out in zip((first, second), times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def attention_rows(repeat: int) -> list[str]:
    import torch

    from automask.models.blocks import _add_rel_pos, _folded_scores

    def added(q, k, v, rel_h, rel_w):
        scores = _add_rel_pos((q * 0.125) @ k.transpose(-2, -1), rel_h, rel_w)
        return scores.softmax(dim=-1) @ v

    def folded(q, k, v, rel_h, rel_w):
        return _folded_scores(q, k, rel_h, rel_w, 0.125).softmax(dim=-1) @ v

    rows = []
    gen = torch.Generator().manual_seed(0)
    for label, n, side in (("14x14 windows, 512 px (9 windows x 12 heads)", 108, 14),
                           ("14x14 windows, 1024 px (25 x 12)", 300, 14),
                           ("16x16 global, 256 px (12 heads)", 12, 16),
                           ("32x32 global, 512 px (12 heads)", 12, 32)):
        for dtype in (torch.bfloat16, torch.float32):
            inputs = [torch.randn(n, side * side, 64, generator=gen).to(dtype) for _ in range(3)]
            inputs += [torch.randn(n, side, side, side, generator=gen).to(dtype)
                       for _ in range(2)]
            for grad in (False, True):
                def run(fn, grad=grad, inputs=inputs):
                    xs = [t.detach().requires_grad_(grad) for t in inputs]
                    with torch.set_grad_enabled(grad):
                        out = fn(*xs)
                        if grad:
                            out.float().sum().backward()
                a = _timed(lambda: run(added), repeat)
                b = _timed(lambda: run(folded), repeat)
                rows.append(f"| {label} | {str(dtype)[6:]} | {'fwd+bwd' if grad else 'fwd'} "
                            f"| {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f} |")
    return rows


def resize_rows(repeat: int) -> list[str]:
    import torch
    import torch.nn.functional as F

    from automask.peft.conv_lora import bicubic_resize

    def interpolate(x, size):
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)

    rows = []
    gen = torch.Generator().manual_seed(0)
    for n in (1, 4):
        for scale in (2, 4, 8):
            x0 = torch.randn(n, 3, 14, 14, generator=gen)
            big = (14 * scale, 14 * scale)

            def run(fn, x0=x0, big=big):
                x = x0.clone().requires_grad_(True)
                fn(fn(x, big), (14, 14)).sum().backward()
            a = _timed(lambda: run(interpolate), repeat)
            b = _timed(lambda: run(bicubic_resize), repeat)
            rows.append(f"| ({n}, 3, 14, 14) | {scale} | {a * 1e3:.3f} | {b * 1e3:.3f} "
                        f"| {b / a:.2f} |")
    return rows


def lora_rows(repeat: int) -> list[str]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from automask.peft.lora import add_low_rank_update

    torch.manual_seed(0)
    base = nn.Linear(768, 2304).requires_grad_(False)
    lora_a, lora_b = nn.Linear(768, 3, bias=False), nn.Linear(3, 2304, bias=False)
    nn.init.normal_(lora_b.weight)
    scaling = 32 / 3

    def plain(x):
        return base(x) + F.linear(lora_a(x), lora_b.weight) * scaling

    def fused(x):
        return add_low_rank_update(base(x), lora_a(x), lora_b.weight, scaling)

    rows = []
    for side, label in ((32, "512 px"), (64, "1024 px")):
        x0 = torch.randn(1, side, side, 768)
        for bf16 in (True, False):
            def run(fn, x0=x0, bf16=bf16):
                x = x0.clone().requires_grad_(True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = fn(x)
                out.float().sum().backward()
            a, b = _alternated(lambda: run(plain), lambda: run(fused), repeat)
            rows.append(f"| (1, {side}, {side}, 768), {label} | {'bf16' if bf16 else 'fp32'} "
                        f"| {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f} |")
    return rows


def window_rows(repeat: int) -> list[str]:
    import torch
    from segment_anything.modeling.image_encoder import window_unpartition

    from automask.models.blocks import _pad_partition, _pad_partition_by_cat, _unpartition

    def unpartition_sam(windows, size):
        pad = (size[0] + (-size[0]) % 14, size[1] + (-size[1]) % 14)
        return window_unpartition(windows, 14, pad, size)

    rows = []
    gen = torch.Generator().manual_seed(0)
    for side, label in ((32, "512 px"), (64, "1024 px")):
        count = (-(-side // 14)) ** 2  # windows
        t0 = torch.randn(1, side, side, 2304, generator=gen).bfloat16()  # qkv of real tokens
        fill0 = torch.randn(1, 1, 1, 2304, generator=gen).bfloat16()  # qkv of a zero token
        w0 = torch.randn(count, 14, 14, 768, generator=gen).bfloat16()  # attention output

        def pad(fn, t0=t0, fill0=fill0):
            t, fill = t0.clone().requires_grad_(True), fill0.clone().requires_grad_(True)
            fn(t, fill, 14).float().sum().backward()

        def unpart(fn, w0=w0, side=side):
            w = w0.clone().requires_grad_(True)
            fn(w, (side, side)).float().sum().backward()
        a, b = _alternated(lambda: pad(_pad_partition_by_cat), lambda: pad(_pad_partition),
                           repeat)
        rows.append(f"| pad + partition of qkv (1, {side}, {side}, 2304), {label} "
                    f"| {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f} |")
        a, b = _alternated(lambda: unpart(unpartition_sam),
                           lambda: unpart(lambda w, size: _unpartition(w, 14, size)), repeat)
        rows.append(f"| unpartition of the attention output ({count}, 14, 14, 768), {label} "
                    f"| {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f} |")
    return rows


def sdpa_rows(repeat: int) -> list[str]:
    import torch
    import torch.nn.functional as F

    from automask.models.blocks import (
        _add_rel_pos,
        _chunk_rows,
        _chunked_attention,
        _folded_operands,
    )
    from automask.hardware import cpu_supports_bf16

    def core(q, k, v, rel_h, rel_w):  # (N, hw, hd) -> (N, hw, hd)
        rows = _chunk_rows(q, rel_h.shape[1], rel_h.shape[2], k.shape[1])
        if rows:
            return _chunked_attention(q, k, v, rel_h, rel_w, 0.125, rows)
        return _add_rel_pos((q * 0.125) @ k.transpose(-2, -1), rel_h, rel_w).softmax(-1) @ v

    def fused(q, k, v, rel_h, rel_w):
        extended, keys = _folded_operands(q, k, rel_h, rel_w, 0.125)
        padded = F.pad(v, (0, extended.shape[-1] - v.shape[-1]))
        return F.scaled_dot_product_attention(extended, keys, padded, scale=1.0)[..., :64]

    rows = []
    gen = torch.Generator().manual_seed(0)
    for label, n, side in (("14x14 windows, 1024 px (25 x 12)", 300, 14),
                           ("32x32 global, 512 px (12 heads)", 12, 32),
                           ("64x64 global, 1024 px (12 heads)", 12, 64)):
        # bf16 where the CPU has its products (emulated, the core takes minutes at 1024 px)
        for dtype in (torch.float32, torch.bfloat16)[:2 if cpu_supports_bf16() else 1]:
            inputs = [torch.randn(n, side * side, 64, generator=gen).to(dtype) for _ in range(3)]
            inputs += [torch.randn(n, side, side, side, generator=gen).to(dtype)
                       for _ in range(2)]

            def run(fn, inputs=inputs):
                with torch.inference_mode():
                    return fn(*inputs)
            diff = (run(core).float() - run(fused).float()).abs().max().item()
            a, b = _alternated(lambda: run(core), lambda: run(fused), repeat)
            rows.append(f"| {label} | {str(dtype)[6:]} | {a * 1e3:.1f} | {b * 1e3:.1f} "
                        f"| {b / a:.2f} | {diff:.1e} |")
    return rows


def expert_conv_rows(repeat: int) -> list[str]:
    import torch
    import torch.nn.functional as F

    from automask.peft.conv_lora import _IM2COL_CONV, IM2COL_BUDGET

    rows = []
    gen = torch.Generator().manual_seed(0)
    shapes = [(n, side) for side in (14, 42, 84, 112) for n in (1, 3, 5)]
    shapes += [(1, side) for side in (128, 192, 256)]
    for dtype in (torch.float32, torch.bfloat16):
        weight = (torch.randn(3, 3, 3, 3, generator=gen) * 0.2).to(dtype).requires_grad_()
        bias = torch.zeros(3, dtype=dtype, requires_grad=True)
        for n, side in shapes:
            x = torch.randn(n, 3, side, side, generator=gen).to(dtype).requires_grad_()
            grad = torch.randn(n, 3, side, side, generator=gen).to(dtype)

            def onednn(x=x, grad=grad, weight=weight, bias=bias):
                F.conv2d(x, weight, bias, padding=1).backward(grad)

            def im2col(x=x, grad=grad, weight=weight, bias=bias):
                _IM2COL_CONV(x, weight, (3, 3), bias, (1, 1), (1, 1)).backward(grad)
            a, b = _alternated(onednn, im2col, repeat)
            threads = torch.get_num_threads()
            used = "im2col" if n * side * side * threads <= IM2COL_BUDGET else "F.conv2d"
            rows.append(f"| {n} x {side} x {side} | {str(dtype)[6:]} | {a * 1e6:.0f} "
                        f"| {b * 1e6:.0f} | {b / a:.2f} | {used} |")
    return rows


def resized_conv_rows(repeat: int) -> list[str]:
    import torch
    from torch import nn

    from automask.peft.conv_lora import (bicubic_resize, composes, expert_conv, expert_size,
                                         resized_conv)

    rows = []
    gen = torch.Generator().manual_seed(0)
    expert = nn.Conv2d(3, 3, 3, padding=1)
    for n, side in [(1, 14), (3, 14), (9, 14), (1, 32), (1, 64), (1, 128)]:
        for scale in (2, 3, 4, 6, 8) if side <= 64 else (3, 4, 8):
            size = expert_size((side, side), scale)
            x = torch.randn(n, 3, side, side, generator=gen).requires_grad_()
            grad = torch.randn(n, 3, *size, generator=gen)

            def apart(x=x, grad=grad, size=size):
                expert_conv(expert, bicubic_resize(x, size)).backward(grad)

            def together(x=x, grad=grad, size=size):
                resized_conv(x, expert.weight, expert.bias, size).backward(grad)
            a, b = _alternated(apart, together, repeat)
            used = "composed" if composes(expert, x, size) else "apart"
            rows.append(f"| {n} x {side} x {side} | {scale} | {a * 1e6:.0f} | {b * 1e6:.0f} "
                        f"| {b / a:.2f} | {used} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="+",
                        choices=["attention", "resize", "lora", "windows", "sdpa",
                                 "expert-conv", "resized-conv"],
                        help="run only these tables (default: all)")
    args = parser.parse_args(argv)
    only = set(args.only or ["attention", "resize", "lora", "windows", "sdpa",
                             "expert-conv", "resized-conv"])
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tables = (
        ("attention", "| attention | dtype | pass | terms added (ms) | terms in the product (ms) "
                      "| ratio |\n|---|---|---|---|---|---|", attention_rows),
        ("resize", "| map | scale | F.interpolate up + down, fwd+bwd (ms) | matrix products (ms) "
                   "| ratio |\n|---|---|---|---|---|", resize_rows),
        ("lora", "| qkv input | dtype | update by * and + (ms) | inside addmm (ms) | ratio |"
                 "\n|---|---|---|---|---|", lora_rows),
        ("windows", "| operation, bf16, fwd+bwd | segment-anything (ms) | each value once (ms) "
                    "| ratio |\n|---|---|---|---|", window_rows),
        ("sdpa", "| attention, prediction | dtype | terms added, chunked (ms) "
                 "| SDPA on the folded operands (ms) | ratio | max difference |"
                 "\n|---|---|---|---|---|---|", sdpa_rows),
        ("expert-conv", "| maps (n x H x W) | dtype | F.conv2d fwd+bwd (us) | im2col fwd+bwd (us) "
                        "| ratio | expert_conv uses |\n|---|---|---|---|---|---|",
         expert_conv_rows),
        ("resized-conv", "| maps (n x H x W) | scale | resize, then conv, fwd+bwd (us) "
                         "| composed (us) | ratio | run_expert uses |\n|---|---|---|---|---|---|",
         resized_conv_rows),
    )
    for name, header, rows in tables:
        if name in only:
            print("\n" + header)
            for row in rows(args.repeat):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
