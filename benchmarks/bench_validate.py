"""Benchmark: validate_frame on the 300 Kvasir-SEG image/mask pairs.

Times :func:`automask.data.validate_frame` over ``../shared/data/kvasir_seg`` (images and
masks paired by name), clearing the in-process mask memo before each run so that every
run reads every file. The files are read once first, so the times exclude the disk.
Prints the median and best wall times (the best is the least disturbed by other load),
the time per row, and the CPU time of all threads (less sensitive to other load).

Run from the repository root::

    python benchmarks/bench_validate.py [--data PATH] [--repeat R]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir_seg"


def main() -> None:
    from automask.data import validate_frame
    from automask.data import validation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    images = sorted((args.data / "images").glob("*.jpg"))
    if not images:
        raise SystemExit(f"no images under {args.data / 'images'}")
    frame = pd.DataFrame({
        "image": [str(p) for p in images],
        "label": [str(args.data / "masks" / f"{p.stem}.png") for p in images],
    })
    for path in list(frame["image"]) + list(frame["label"]):
        Path(path).read_bytes()  # into the page cache
    times, cpu = [], []
    for _ in range(args.repeat):
        validation._memo.clear()
        start, start_cpu = time.perf_counter(), time.process_time()
        validate_frame(frame)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    median = statistics.median(times)
    best = min(times)
    print(f"validate_frame, {len(frame)} rows: median {median:.3f} s, best {best:.3f} s over "
          f"{args.repeat} runs ({1000 * best / len(frame):.2f} ms per row, best); runs: "
          + ", ".join(f"{t:.3f}" for t in times)
          + f"; CPU time (all threads) median {statistics.median(cpu):.3f} s")


if __name__ == "__main__":
    main()
