"""Training steps with glibc's free memory returned to the OS before each step, and not.

The peer harness (``../shared/peers``, through ``benchmarks/compare_peers.py``) calls
``malloc_trim(0)`` after every step of every worker, outside the timed region, so that idle
workers hold only their model. The next step then finds its heap's free pages gone and
faults them in again, inside the timed region. A fit does not call it: its steps reuse most of the
pages the step before freed. This script measures what that costs automask's step, in one
process: the worker's own step (``benchmarks/peer_worker_automask.py``'s ``build_step``:
the fit's autocast, loss, AdamW and frozen weights held in bf16), alternating a step after
a trim with a step after a step, the order swapped every pair.

Printed per kind of step: median seconds, minor page faults, system CPU seconds and the
step's own peak RSS (the kernel's high-water mark reset before each step through
``/proc/self/clear_refs``), and the median per-pair time ratio::

    python -m benchmarks.bench_trim --size 512 --pairs 10
"""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux 4.0 and later)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return -1


def measure(step, trim, kind: str) -> dict:
    """One step, after ``trim()`` when ``kind`` is ``"trimmed"``: seconds, minor faults,
    system CPU seconds and peak RSS of the step."""
    if kind == "trimmed":
        trim()
    _reset_peak()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"s": seconds, "faults": after.ru_minflt - before.ru_minflt,
            "sys": after.ru_stime - before.ru_stime, "peak": _peak_mib()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peft", default="conv_lora", help="a PEFT method, or 'floor'")
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "default"], default="default")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = lambda: libc.malloc_trim(0)  # noqa: E731
    except OSError:
        print("skipped: no glibc here (malloc_trim)")
        return 0

    from benchmarks.peer_worker_automask import build_step

    worker = argparse.Namespace(peft=args.peft, backbone=args.backbone, size=args.size,
                                batch=1, dtype=args.dtype, infer=False, compile=False,
                                no_hold=False, no_park=False, total_steps=100)
    step, _, _, precision = build_step(worker)
    for _ in range(args.warmup):
        step()
    kinds = ("trimmed", "kept")
    rows: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for i in range(args.pairs):
        for kind in kinds[:: 1 if i % 2 == 0 else -1]:
            rows[kind].append(measure(step, trim, kind))
    print(f"{args.backbone} {args.peft} {args.size}px batch 1 {precision}, {args.pairs} pairs "
          f"(peak RSS per step: {'reset each step' if _reset_peak() else 'process peak'})")
    for kind in kinds:
        r = rows[kind]
        print(f"  after a {'trim' if kind == 'trimmed' else 'step'}: "
              f"{statistics.median(x['s'] for x in r):.3f} s/step, "
              f"{statistics.median(x['faults'] for x in r):.0f} minor faults, "
              f"{statistics.median(x['sys'] for x in r):.3f} s system CPU, "
              f"peak RSS {statistics.median(x['peak'] for x in r):.0f} MiB "
              f"(max {max(x['peak'] for x in r)})")
    ratios = sorted(a["s"] / b["s"] for a, b in zip(rows["trimmed"], rows["kept"]))
    print(f"  trimmed / kept: {statistics.median(ratios):.3f} per pair "
          f"[{ratios[0]:.3f} .. {ratios[-1]:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
