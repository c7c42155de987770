"""Test-time augmentation on the shared real datasets: scores and time with and without.

Fits a preset on an 80/20 split of ``../shared/data/<name>`` (as ``fit_shared.py``), then
evaluates the test part without flips, with ``tta="hflip"`` and with ``tta=True`` (the
flips the model was trained with), each timed. Without pretrained SAM weights this is the
``tiny`` preset trained from scratch: the figures show what averaging mirrored passes
does to a weak model, not to SAM.

    python -m benchmarks.bench_tta kvasir_seg --time-limit 150
    python -m benchmarks.bench_tta camvid --hp data.void_label=11
"""
from __future__ import annotations

import platform
import time

from benchmarks.fit_shared import fit_split, parse_args


def main() -> None:
    args = parse_args("fit, then evaluate with and without test-time flips")
    seg, train, test, _ = fit_split(args)
    print(f"{args.dataset}: {len(train)} train / {len(test)} test images, preset "
          f"{args.presets}, {platform.processor() or platform.machine()}")
    print(f"trained flips: hflip={seg.config_.data.hflip} vflip={seg.config_.data.vflip}")
    base = None
    for tta in (False, "hflip", True):
        start = time.perf_counter()
        scores = seg.evaluate(test, tta=tta)
        seconds = time.perf_counter() - start
        base = base or seconds
        shown = {k: round(v, 4) for k, v in scores.items() if not isinstance(v, list)}
        print(f"tta={tta!s:<6} {seconds:7.2f} s ({seconds / base:.2f}x)  {shown}")


if __name__ == "__main__":
    main()
