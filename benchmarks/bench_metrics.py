"""Benchmark: the binary metric set of automask against PySODMetrics on Kvasir-SEG masks.

Computes sm, em, wfm, mae, iou, dice, ber (the default binary set) on the 300 masks of
``../shared/data/kvasir_seg`` at their original sizes, with noisy predictions made from each
mask (Gaussian blur, a shifted copy, Gaussian noise; fixed seed), once with
``automask.metrics.score`` and once with PySODMetrics (``Smeasure``, ``Emeasure``,
``WeightedFmeasure(beta=0.3)``, ``MAE``, and ``FmeasureV2`` with the IoU/Dice handlers
(per image) and the BER handler (pooled over the dataset)). Prints both wall times, their
ratio, and the largest absolute difference between the values.

Run from the repository root::

    python benchmarks/bench_metrics.py [--data PATH] [--limit N] [--repeat R]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, shift

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir_seg"


def make_pairs(data: Path, limit: int | None, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Load the masks and derive one noisy uint8 prediction per mask (fixed seed)."""
    rng = np.random.default_rng(seed)
    masks = sorted((data / "masks").glob("*.png"))[:limit]
    if not masks:
        raise SystemExit(f"no masks under {data / 'masks'}")
    pairs = []
    for path in masks:
        gt = np.array(Image.open(path).convert("L"))  # (H, W) uint8 0/255
        moved = shift(gt.astype(np.float32), rng.integers(-8, 9, size=2), order=0)
        soft = gaussian_filter(moved, sigma=float(rng.uniform(2, 6)))
        noisy = soft + rng.normal(0, 35, gt.shape)
        pairs.append((np.clip(noisy, 0, 255).astype(np.uint8), gt))
    return pairs


def run_pysod(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The same seven numbers with PySODMetrics 1.6.2."""
    import py_sod_metrics as sod

    sm, em, wfm, mae = sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure(beta=0.3), sod.MAE()
    fm = sod.FmeasureV2(
        {
            "iou": sod.IOUHandler(with_dynamic=False, with_adaptive=False, with_binary=True),
            "dice": sod.DICEHandler(with_dynamic=False, with_adaptive=False, with_binary=True),
            "ber": sod.BERHandler(
                with_dynamic=False, with_adaptive=False, with_binary=True, sample_based=False
            ),
        }
    )
    for pred, gt in pairs:
        for metric in (sm, em, wfm, mae, fm):
            metric.step(pred, gt)
    fm_res = fm.get_results()
    return {
        "sm": float(sm.get_results()["sm"]),
        "em": float(em.get_results()["em"]["curve"].mean()),
        "wfm": float(wfm.get_results()["wfm"]),
        "mae": float(mae.get_results()["mae"]),
        "iou": float(fm_res["iou"]["binary"]),
        "dice": float(fm_res["dice"]["binary"]),
        "ber": float(fm_res["ber"]["binary"]),
    }


def run_automask(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """automask's default binary set (its iou/dice give 1.0 to empty/empty; Kvasir has none)."""
    from automask.metrics import score

    preds, gts = zip(*pairs)
    return score(list(preds), list(gts), task="binary")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="kvasir_seg folder")
    parser.add_argument("--limit", type=int, default=None, help="use the first N masks only")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each (best shown)")
    args = parser.parse_args()

    pairs = make_pairs(args.data, args.limit)
    pixels = sum(gt.size for _, gt in pairs)
    print(f"{len(pairs)} images, {pixels / 1e6:.1f} Mpixels (automask's score uses 1 torch thread)")

    times: dict[str, list[float]] = {"automask": [], "pysodmetrics": []}
    values: dict[str, dict[str, float]] = {}
    for _ in range(args.repeat):  # interleaved, so load changes hit both alike
        for name, fn in (("automask", run_automask), ("pysodmetrics", run_pysod)):
            start = time.perf_counter()
            values[name] = fn(pairs)
            times[name].append(time.perf_counter() - start)

    ours, ref = values["automask"], values["pysodmetrics"]
    print(f"{'metric':<6} {'automask':>14} {'pysodmetrics':>14} {'abs diff':>10}")
    for key in ref:
        print(f"{key:<6} {ours[key]:>14.9f} {ref[key]:>14.9f} {abs(ours[key] - ref[key]):>10.2e}")
    t_ours, t_ref = min(times["automask"]), min(times["pysodmetrics"])
    for name, best in (("automask", t_ours), ("pysodmetrics", t_ref)):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:<12} {best:7.2f} s  (runs: {runs})")
    print(f"speed-up     {t_ref / t_ours:7.2f} x")
    print(f"max abs diff {max(abs(ours[k] - ref[k]) for k in ref):.2e}")


if __name__ == "__main__":
    main()
