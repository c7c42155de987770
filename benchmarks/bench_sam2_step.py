"""One training step of SAM 2.1 Hiera-B+ against SAM vit_b, same input size and method.

A step is forward, loss (BCE + the adapters' auxiliary loss), backward and an AdamW step on
random images with random weights (speed does not depend on the weights), under bf16
autocast when the hardware supports it. Each backbone runs in its own subprocess, so that
its peak memory (``ru_maxrss``: the built model included) is its own.

Run from the repository root (needs the ``sam2`` extra)::

    python -m benchmarks.bench_sam2_step                       # 512 px, conv_lora, CPU
    python -m benchmarks.bench_sam2_step --size 1024 --method lora --steps 5
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BACKBONES = ("vit_b", "sam2.1_hiera_b+")


def run_one(args: argparse.Namespace) -> dict:
    """Build ``args.backbone`` and time ``args.steps`` training steps; returns the figures."""
    import torch
    import torch.nn.functional as F

    from automask.hardware import cpu_supports_bf16
    from automask.models import build_segmenter, count_parameters
    from automask.peft import apply_peft, aux_loss

    torch.manual_seed(0)
    model = build_segmenter(args.backbone, input_size=args.size, checkpoint="random")
    apply_peft(model, args.method)
    model.train()
    trainable, total = count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = torch.randn(args.batch, 3, args.size, args.size)
    target = (torch.rand(args.batch, 1, args.size, args.size) > 0.5).float()
    use_bf16 = cpu_supports_bf16()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(images)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target) + aux_loss(model)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"backbone": args.backbone, "method": args.method, "size": args.size,
            "batch": args.batch, "bf16": use_bf16, "trainable": trainable, "total": total,
            "s_per_step": statistics.median(times), "times": times,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    """Run each backbone in a subprocess and print one line per backbone and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--method", default="conv_lora")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--backbone", help=argparse.SUPPRESS)  # set in the subprocess
    args = parser.parse_args(argv)
    if args.backbone:
        print(json.dumps(run_one(args)))
        return
    root = Path(__file__).resolve().parent.parent
    results = []
    for backbone in args.backbones:
        cmd = [sys.executable, "-m", "benchmarks.bench_sam2_step", "--backbone", backbone,
               "--size", str(args.size), "--method", args.method, "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            sys.exit(f"{backbone} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{backbone:>16} {args.method} {args.size}px batch {args.batch} "
              f"bf16={result['bf16']}: {result['s_per_step']:.3f} s/step "
              f"(steps {', '.join(f'{t:.2f}' for t in result['times'])}), "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB, trainable "
              f"{result['trainable'] / 1e6:.2f}M of {result['total'] / 1e6:.2f}M", flush=True)
    if len(results) == 2:
        print(f"ratio {results[1]['backbone']} / {results[0]['backbone']}: "
              f"{results[1]['s_per_step'] / results[0]['s_per_step']:.2f} (time), "
              f"{results[1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.2f} (peak RSS)")


if __name__ == "__main__":
    main()
