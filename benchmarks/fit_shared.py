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


def parse_args(description: str | None = None) -> argparse.Namespace:
    """The options of a fit on one shared dataset (also ``bench_tta.py``'s)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("dataset", help="folder name under ../shared/data")
    parser.add_argument("--presets", default="tiny")
    parser.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--time-limit", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def fit_split(args: argparse.Namespace):
    """``(predictor, train, test, fit seconds)``: the dataset split 80/20 with the seed,
    the preset fitted on the 80 within the time limit."""
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
    return seg, train, test, time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    seg, train, test, fit_s = fit_split(args)
    board = seg.leaderboard(test)
    with pd.option_context("display.max_columns", None, "display.width", 250):
        print(board.drop(columns=[c for c in board.columns if "[" in c]).to_string(index=False))
    info = seg.models_[seg.best_model_]
    print(f"{args.dataset}: {len(train)} train / {len(test)} test images, task {seg.task_}, "
          f"{seg.num_classes_} classes; fit {fit_s:.0f}s ({info['epochs']} epochs, "
          f"input {seg.config_.model.input_size}px, precision {seg.config_.env.precision})")


if __name__ == "__main__":
    main()
