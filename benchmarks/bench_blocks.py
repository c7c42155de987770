"""The encoder block without its window padding's projections against segment-anything's.

One training forward + backward of vit_b (random weights, batch 1) per PEFT method and
input size, alternating ``automask.models.blocks.block_forward`` with segment-anything's
``block(x)`` in the same process (the order flips every round); prints the median seconds
of each and their ratio per round. ``--compare real-queries`` alternates instead
``block_forward`` with and without ``REAL_QUERIES_ONLY`` (a padded grid's windows attend
with the real tokens' queries only, or with every token's). ``--compare window-groups``
alternates the windows' queries, keys and values split by ``_WindowGroups`` (one gradient
buffer, each value written once) with the same split by tensor slicing, whose backward
autograd computes (a zeroed buffer of the whole windows per group and slice, then summed;
the code before 2026-12-04). ``--block`` times the forward
+ backward of the first (windowed) encoder block alone, on a random token grid of the
size's shape, instead of the whole model.

    python benchmarks/bench_blocks.py [--sizes 256 512] [--methods conv_lora lora]
                                      [--precision bf16|fp32] [--rounds 4]
                                      [--compare segment-anything|real-queries|window-groups]
                                      [--block]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import automask.models.blocks as blocks_module  # noqa: E402
import automask.models.segmenter as segmenter_module  # noqa: E402
from automask.models import build_segmenter  # noqa: E402
from automask.models.blocks import block_forward  # noqa: E402
from automask.peft import apply_peft, aux_loss  # noqa: E402


def stock(block, x):
    return block(x)


def all_queries(block, x):
    blocks_module.REAL_QUERIES_ONLY = False
    try:
        return block_forward(block, x)
    finally:
        blocks_module.REAL_QUERIES_ONLY = True


class _GroupsBySlicing:
    """``_WindowGroups`` as tensor slicing, autograd doing the backward pass."""

    @staticmethod
    def apply(qkv, window, size, heads):
        grid = blocks_module._qkv_grid(qkv, window, size, heads)  # (B, nH, nW, ws, ws, 3, ..)
        out = []
        for _, _, win_rows, row_len, win_cols, col_len in blocks_module._tiles(*size, window):
            part = grid[:, win_rows, win_cols]  # (B, nh, nw, ws, ws, 3, heads, hd)
            q = part[:, :, :, :row_len, :col_len, 0].permute(0, 1, 2, 5, 3, 4, 6)
            q = q.reshape(-1, row_len * col_len, q.shape[-1])
            k, v = part[:, :, :, :, :, 1:].permute(5, 0, 1, 2, 6, 3, 4, 7).reshape(
                2, q.shape[0], window * window, -1).unbind(0)
            out += [q, k, v]
        return tuple(out)


def by_slicing(block, x):
    groups = blocks_module._WindowGroups
    blocks_module._WindowGroups = _GroupsBySlicing
    try:
        return block_forward(block, x)
    finally:
        blocks_module._WindowGroups = groups


def step(seg, images: torch.Tensor, bf16: bool) -> float:
    seg.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = seg(images).float().square().mean() + aux_loss(seg)
    loss.backward()
    return time.perf_counter() - start


def block_step(block, tokens: torch.Tensor, forward, bf16: bool) -> float:
    tokens.grad = None
    block.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = forward(block, tokens)  # (1, H, W, E)
    out.float().square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--methods", nargs="+", default=["conv_lora", "lora"])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--compare",
                        choices=["segment-anything", "real-queries", "window-groups"],
                        default="segment-anything")
    parser.add_argument("--block", action="store_true",
                        help="time the first encoder block alone instead of the model")
    args = parser.parse_args()
    baseline, path = {"segment-anything": ("segment-anything", stock),
                      "real-queries": ("all queries", all_queries),
                      "window-groups": ("by slicing", by_slicing)}[args.compare]
    paths = {baseline: path,
             "automask": block_forward}
    for size in args.sizes:
        for method in args.methods:
            torch.manual_seed(0)
            seg = build_segmenter("vit_b", num_classes=1, input_size=size, checkpoint="random")
            apply_peft(seg, method).train()
            images = torch.randn(1, 3, size, size)
            block = seg.image_encoder.blocks[0]
            assert block.window_size > 0
            tokens = torch.randn(1, size // 16, size // 16, block.norm1.normalized_shape[0],
                                 requires_grad=True)  # (1, H, W, E), vit_b's 16 px patches
            times: dict[str, list[float]] = {name: [] for name in paths}
            for round_ in range(args.rounds + 1):  # round 0 warms up
                order = list(paths) if round_ % 2 else list(paths)[::-1]
                for name in order:
                    bf16 = args.precision == "bf16"
                    if args.block:
                        seconds = block_step(block, tokens, paths[name], bf16)
                    else:
                        segmenter_module.block_forward = paths[name]
                        seconds = step(seg, images, bf16)
                    if round_:
                        times[name].append(seconds)
            ours, theirs = times["automask"], times[baseline]
            ratios = [round(a / b, 3) for a, b in zip(ours, theirs)]
            scope = "block 0" if args.block else "model"
            print(f"{size} px {method:<10} {args.precision} {scope}: {baseline} "
                  f"{statistics.median(theirs):.3f} s, automask {statistics.median(ours):.3f} s,"
                  f" ratio {statistics.median(ratios):.3f} {ratios}", flush=True)
    segmenter_module.block_forward = block_forward


if __name__ == "__main__":
    main()
