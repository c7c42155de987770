"""Operation-level A/B of two kernels automask computes differently from segment-anything.

1. Attention with decomposed relative-position terms on a narrow grid (vit_b heads, hd 64):
   the terms added to the score map (segment-anything's additions, done in place by
   ``automask.models.blocks._add_rel_pos``) against the terms inside the score product
   (``_folded_scores``), forward and forward + backward, per dtype and grid.
2. Conv-LoRA's bicubic resize of a low-rank map (n, 3, 14, 14) by each scale and back:
   ``F.interpolate`` against ``automask.peft.conv_lora.bicubic_resize`` (two matrix
   products), forward + backward, float32.

Both columns of a row are timed one after the other in one process (median of ``--repeat``
after a warm-up each).
Run from the repository root::

    python -m benchmarks.bench_ops [--repeat 9] [--threads 2]
"""
from __future__ import annotations

import argparse

from benchmarks.bench_export import median_time as _timed


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n| attention | dtype | pass | terms added (ms) | terms in the product (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for row in attention_rows(args.repeat):
        print(row, flush=True)
    print("\n| map | scale | F.interpolate up + down, fwd+bwd (ms) | matrix products (ms) "
          "| ratio |")
    print("|---|---|---|---|---|")
    for row in resize_rows(args.repeat):
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
