"""Large attention maps computed a few query rows at a time against whole: time and memory.

One training step (forward + backward) or one prediction of a segmenter (random weights,
batch 1, conv_lora) with ``automask.models.blocks`` chunking score maps of at least
``CHUNK_FROM_BYTES`` against ``CHUNK_MIN_KEYS`` keys or more (the defaults: a global
block's map from 512 px on, 12 x 1024 x 1024 values per image there) and with chunking off
(every map whole). Each measurement is its own subprocess, so
that its peak RSS (``ru_maxrss``) is its own; the two variants alternate, the order flipping
every round. Prints per configuration the median seconds per step, the peak RSS and the
ratios chunked / whole.

``--compare buffers`` times, in one process, steps whose chunks share two score buffers
(``REUSE_CHUNK_BUFFERS``, the default) against steps whose chunks allocate their maps anew,
alternating step by step; glibc's free memory goes back to the system before each step, as
the peer harness (``../shared/peers``) does, so that each step starts from the same heap.
Prints the median seconds per step of each and the median of the per-round ratios.
``--compare mlp-buffer`` does the same for the blocks' MLP hidden map in a prediction
(``REUSE_MLP_BUFFER``: one buffer shared by a forward pass's blocks, the default, against
a map of each block's own; see ``automask.models.blocks.mlp_forward``).

``--compare folded`` runs, as the default comparison does (a subprocess each, alternating),
training steps whose windowed blocks' folded attention (bf16) is ``_FoldedAttention`` as
shipped (``FOLDED_FUNCTION``; on a CPU it keeps the probabilities and rebuilds the extended
queries and keys in the backward pass) against steps where autograd records it (keeping
the probabilities and the extended queries and keys); ``--compare folded-recompute`` the
Function recomputing the probabilities too (what it does on accelerators) against autograd.

    python benchmarks/bench_chunks.py [--sizes 1024] [--modes train infer]
                                      [--precision bf16 fp32] [--rounds 2] [--steps 2]
                                      [--backbone vit_b]
                                      [--compare buffers|mlp-buffer|folded|folded-recompute]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _step(args: argparse.Namespace, size: int, mode: str, precision: str):
    """A conv_lora segmenter's training step (forward + backward) or prediction, timed:
    ``step() -> seconds``."""
    sys.path.insert(0, str(REPO))
    import torch

    from automask.models import build_segmenter
    from automask.peft import apply_peft, aux_loss

    torch.manual_seed(0)
    seg = build_segmenter(args.backbone, num_classes=1, input_size=size,
                          checkpoint="random", progress=False)
    apply_peft(seg, "conv_lora")
    bf16 = precision == "bf16"
    images = torch.randn(1, 3, size, size)

    def step() -> float:
        start = time.perf_counter()
        if mode == "train":
            seg.train().zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = seg(images).float().square().mean() + aux_loss(seg)
            loss.backward()
        else:
            with torch.inference_mode(), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                seg.eval()(images)
        return time.perf_counter() - start

    return step


def one(args: argparse.Namespace) -> None:
    """Run in a subprocess: build, warm up, time ``--steps`` steps, print JSON."""
    sys.path.insert(0, str(REPO))
    import automask.models.blocks as blocks

    if args.variant == "whole":
        blocks.CHUNK_FROM_BYTES = 2**62
    blocks.FOLDED_FUNCTION = args.variant != "autograd"
    if args.variant == "recompute":
        blocks.KEEP_FOLDED_PROBS_ON = ()
    step = _step(args, args.size, args.mode, args.precision)
    times = [step() for _ in range(args.steps + 1)]  # the first warms up
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"s": statistics.median(times[1:]), "rss_gib": rss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024])
    parser.add_argument("--modes", nargs="+", default=["train", "infer"],
                        choices=["train", "infer"])
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=["bf16", "fp32"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--compare",
                        choices=["buffers", "mlp-buffer", "folded", "folded-recompute"],
                        help="buffers: chunks sharing their score buffers against maps of "
                             "their own, in one process (--rounds pairs of steps); "
                             "mlp-buffer: the same for the MLP hidden map in a prediction "
                             "(--modes infer); folded "
                             "(-recompute): the windows' attention as a Function keeping less "
                             "(recomputing the probabilities) against autograd")
    parser.add_argument("--variant", choices=["chunked", "whole", "function", "recompute",
                                              "autograd"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        args.precision = args.precision[0]
        one(args)
        return
    if args.compare == "buffers":
        compare_buffers(args, "REUSE_CHUNK_BUFFERS")
        return
    if args.compare == "mlp-buffer":
        args.modes = ["infer"]  # a training step keeps each hidden map for its backward pass
        compare_buffers(args, "REUSE_MLP_BUFFER")
        return
    first, second = {"folded": ("function", "autograd"),
                     "folded-recompute": ("recompute", "autograd")}.get(args.compare,
                                                                       ("chunked", "whole"))
    if args.compare in ("folded", "folded-recompute"):
        args.modes = ["train"]  # a prediction keeps nothing for a backward pass
    for size in args.sizes:
        for mode in args.modes:
            for precision in args.precision:
                runs: dict[str, list[dict]] = {first: [], second: []}
                for round_ in range(args.rounds):
                    order = [first, second] if round_ % 2 == 0 else [second, first]
                    for variant in order:
                        out = subprocess.run(
                            [sys.executable, __file__, "--variant", variant, "--size",
                             str(size), "--mode", mode, "--precision", precision,
                             "--steps", str(args.steps), "--backbone", args.backbone],
                            check=True, capture_output=True, text=True).stdout
                        runs[variant].append(json.loads(out.strip().splitlines()[-1]))
                s = {v: statistics.median(r["s"] for r in runs[v]) for v in runs}
                rss = {v: max(r["rss_gib"] for r in runs[v]) for v in runs}
                rounds = [round(a["s"] / b["s"], 3) for a, b in zip(runs[first], runs[second])]
                print(f"{args.backbone} {size} px {mode} {precision}: "
                      f"{first} {s[first]:.2f} s, {rss[first]:.2f} GiB | "
                      f"{second} {s[second]:.2f} s, {rss[second]:.2f} GiB | "
                      f"time x{s[first] / s[second]:.3f} {rounds}, "
                      f"peak RSS x{rss[first] / rss[second]:.3f}", flush=True)


def compare_buffers(args: argparse.Namespace, flag: str) -> None:
    """``--compare buffers`` / ``mlp-buffer``: shared buffers (``blocks.<flag>`` True) / each
    map its own, step by step."""
    import ctypes

    import automask.models.blocks as blocks

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        def trim(_):
            return None
    for size in args.sizes:
        for mode in args.modes:
            for precision in args.precision:
                step = _step(args, size, mode, precision)
                times: dict[bool, list[float]] = {True: [], False: []}
                for round_ in range(args.rounds + 1):  # the first warms up
                    for shared in (True, False) if round_ % 2 == 0 else (False, True):
                        setattr(blocks, flag, shared)
                        trim(0)
                        seconds = step()
                        if round_:
                            times[shared].append(seconds)
                ratios = [a / b for a, b in zip(times[True], times[False])]
                print(f"{args.backbone} {size} px {mode} {precision}: shared buffers "
                      f"{statistics.median(times[True]):.3f} s | own maps "
                      f"{statistics.median(times[False]):.3f} s | x"
                      f"{statistics.median(ratios):.3f} per round "
                      f"[{min(ratios):.2f}, {max(ratios):.2f}]", flush=True)
                setattr(blocks, flag, True)


if __name__ == "__main__":
    main()
