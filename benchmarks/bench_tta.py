"""Test-time augmentation on the shared real datasets: scores and time with and without.

Fits a preset on an 80/20 split of ``../shared/data/<name>`` (as ``fit_shared.py``), then
evaluates the test part without flips, with ``tta="hflip"`` and with ``tta=True`` (the
flips the model was trained with), each timed. Without pretrained SAM weights this is the
``tiny`` preset trained from scratch: the figures show what averaging mirrored passes
does to a weak model, not to SAM.

    python benchmarks/bench_tta.py kvasir_seg --time-limit 180
    python benchmarks/bench_tta.py camvid --hp data.void_label=11
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from automask import SemanticSegmentor
from automask.datasets import from_folders, train_test_split

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", help="folder name under ../shared/data")
    parser.add_argument("--presets", default="tiny")
    parser.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--time-limit", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    hp = {}
    for item in args.hp:
        key, raw = item.split("=", 1)
        try:
            hp[key] = json.loads(raw)
        except json.JSONDecodeError:
            hp[key] = raw
    folder = SHARED / args.dataset
    frame = from_folders(folder / "images", folder / "masks")
    train, test = train_test_split(frame, test_size=0.2, seed=args.seed)
    seg = SemanticSegmentor(path=tempfile.mkdtemp(), seed=args.seed, verbosity=0).fit(
        train, presets=args.presets, hyperparameters=hp, time_limit=args.time_limit)
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
