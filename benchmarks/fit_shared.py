"""Fit, evaluate and time a preset on one of the shared real datasets.

Splits ``../shared/data/<name>`` 80/20 with a seed, fits within a time limit, prints the
leaderboard with the test metrics. Without pretrained SAM weights this runs the ``tiny``
preset from scratch, which shows the pipeline end to end on real data, not SAM's quality.

    python benchmarks/fit_shared.py kvasir_seg --presets tiny --time-limit 120
    python benchmarks/fit_shared.py camvid --hp data.void_label=11
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from automask import SemanticSegmentor
from automask.datasets import from_folders, train_test_split

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", help="folder name under ../shared/data")
    parser.add_argument("--presets", default="tiny")
    parser.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--time-limit", type=float, default=120.0)
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
    t0 = time.perf_counter()
    seg = SemanticSegmentor(path=tempfile.mkdtemp(), seed=args.seed, verbosity=0).fit(
        train, presets=args.presets, hyperparameters=hp, time_limit=args.time_limit)
    fit_s = time.perf_counter() - t0
    board = seg.leaderboard(test)
    with pd.option_context("display.max_columns", None, "display.width", 250):
        print(board.drop(columns=[c for c in board.columns if "[" in c]).to_string(index=False))
    info = seg.models_[seg.best_model_]
    print(f"{args.dataset}: {len(train)} train / {len(test)} test images, task {seg.task_}, "
          f"{seg.num_classes_} classes; fit {fit_s:.0f}s ({info['epochs']} epochs, "
          f"input {seg.config_.model.input_size}px, precision {seg.config_.env.precision})")


if __name__ == "__main__":
    main()
