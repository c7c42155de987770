"""The structure loss's 31x31 target mean: avg_pool2d against the integral image in use.

Times, on a (2, 1, 512, 512) batch (a disc target, random logits), the pool alone and the
whole loss forward + backward with each pool, interleaved, 25 rounds; prints median and
minimum milliseconds.

    python benchmarks/bench_structure_loss.py [--threads 1]
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
import torch.nn.functional as F  # noqa: E402

import automask.losses as losses  # noqa: E402


def avg_pool(t: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(t[:, None], kernel_size=31, stride=1, padding=15)[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    yy, xx = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    disc = ((yy - 256) ** 2 + (xx - 200) ** 2) < 150**2
    target = disc.long().expand(2, -1, -1).contiguous()  # (2, 512, 512)
    logits = torch.randn(2, 1, 512, 512, generator=torch.Generator().manual_seed(0),
                         requires_grad=True)
    t = disc.float().expand(2, -1, -1).contiguous()
    integral = losses.box_mean

    def loss_step(pool) -> None:
        losses.box_mean = pool
        try:
            losses.structure_loss(logits, target).backward()
        finally:
            losses.box_mean = integral
        logits.grad = None

    cases = {
        "pool avg_pool2d": lambda: avg_pool(t),
        "pool integral image": lambda: integral(t),
        "loss fwd+bwd, avg_pool2d": lambda: loss_step(avg_pool),
        "loss fwd+bwd, integral image": lambda: loss_step(integral),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(3):
        for run in cases.values():
            run()
    for _ in range(args.rounds):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for name, values in times.items():
        print(f"{name:30s} median {statistics.median(values) * 1e3:8.1f} ms"
              f"   min {min(values) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
