"""Predictions in a cgroup with a CPU quota (a container's ``docker --cpus``): torch's
threads as a larger host would give them against the count automask sets
(``automask.hardware.threads_within_cpu_quota``).

Makes a child cgroup with ``--quota`` CPUs (cgroup v1's ``cpu`` controller or v2's
``cpu.max``; needs the right to write there, as root in a container), and runs each
variant in a fresh process inside it: vit_b Conv-LoRA, random weights, batch 1, float32,
inference mode; the first forward warms up, the median of the others is printed. The two
variants alternate for ``--rounds`` rounds. Skips with a message where no cgroup can be made.

    python -m benchmarks.bench_cpu_quota [--quota 2] [--threads 8] [--size 512] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _make_cgroup(quota: float) -> tuple[Path, str] | None:
    """A child cgroup limited to ``quota`` CPUs and the file taking a process into it."""
    name = f"automask_bench_{os.getpid()}"
    for parent, v2 in ((Path("/sys/fs/cgroup/cpu"), False), (Path("/sys/fs/cgroup"), True)):
        folder = parent / name
        try:
            folder.mkdir()
        except OSError:
            continue
        try:
            if v2:
                (folder / "cpu.max").write_text(f"{int(quota * 100000)} 100000")
            else:
                (folder / "cpu.cfs_period_us").write_text("100000")
                (folder / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
            return folder, "cgroup.procs"
        except OSError:
            folder.rmdir()
    return None


def one(args: argparse.Namespace) -> None:
    """In a subprocess inside the cgroup: set the threads, time the forwards, print JSON."""
    sys.path.insert(0, str(REPO))
    import torch

    from automask.hardware import cpu_quota, threads_within_cpu_quota
    from automask.models import build_segmenter
    from automask.peft import apply_peft

    if args.variant == "host":
        torch.set_num_threads(args.threads)
    else:
        threads_within_cpu_quota()
    torch.manual_seed(0)
    model = build_segmenter("vit_b", input_size=args.size, checkpoint="random", progress=False)
    apply_peft(model, "conv_lora")
    model.eval()
    images = torch.randn(1, 3, args.size, args.size)
    times = []
    with torch.inference_mode():
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    print(json.dumps({"s": statistics.median(times[1:]), "threads": torch.get_num_threads(),
                      "quota": cpu_quota()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quota", type=float, default=2.0, help="CPUs the cgroup may use")
    parser.add_argument("--threads", type=int, default=8,
                        help="torch's threads on the larger host being imitated")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", choices=["host", "automask"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return one(args)
    made = _make_cgroup(args.quota)
    if made is None:
        print("skipped: no cgroup with a CPU quota can be made here (needs write access to "
              "/sys/fs/cgroup/cpu or a cgroup v2 tree with the cpu controller)")
        return None
    folder, procs = made
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",
                                                               "MKL_NUM_THREADS")}
    results: dict[str, list[dict]] = {"host": [], "automask": []}
    try:
        for round_ in range(args.rounds):
            order = ["host", "automask"] if round_ % 2 == 0 else ["automask", "host"]
            for variant in order:
                cmd = [sys.executable, "-m", "benchmarks.bench_cpu_quota", "--variant",
                       variant, "--threads", str(args.threads), "--size", str(args.size),
                       "--steps", str(args.steps)]
                out = subprocess.run(
                    cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True,
                    preexec_fn=lambda: (folder / procs).write_text(str(os.getpid())))
                results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        folder.rmdir()
    print(f"cgroup quota {args.quota:g} CPUs on a host of {os.cpu_count()} CPUs; vit_b "
          f"conv_lora prediction at {args.size} px, float32, median of {args.steps} forwards "
          f"per process\n\n| torch threads | s per image (per round) |\n|---|---|")
    for variant, label in (("host", "as a larger host gives them"), ("automask", "automask's")):
        runs = results[variant]
        each = ", ".join(f"{r['s']:.2f}" for r in runs)
        print(f"| {runs[0]['threads']} ({label}) "
              f"| {statistics.median(r['s'] for r in runs):.2f} ({each}) |")
    return None


if __name__ == "__main__":
    main()
