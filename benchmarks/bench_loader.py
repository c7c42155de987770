"""Loader throughput: images per second from files to model-space batches.

For each input size it runs two epochs over the same rows through the DataModule's
training loader (shuffled, no augmentation): the first decodes every JPEG/PNG and
resizes it ("cold"), the second is served by the sample cache ("cached"); then one pass of
the validation loader over the same rows ("val", cached; an image trained on as crops is
its window grid there). One line is printed per (input size, workers) setting.
``--large-images`` is ``data.large_images``: with ``auto`` (the default) images more than
1.25 x the input size are native-scale crops, ``resize`` is the resize-only path.

    python benchmarks/bench_loader.py                       # kvasir_seg, 64 images
    python benchmarks/bench_loader.py --workers 0 2 --sizes 1024 512
    python benchmarks/bench_loader.py --data ../shared/data/aerial_roads --sizes 256 \
        --large-images resize
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from automask.data import SegmentationDataModule, validate_frame  # noqa: E402
from automask.datasets import from_folders  # noqa: E402


def _epoch(loader) -> tuple[int, float]:
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += int(batch["image"].shape[0])
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "kvasir_seg"),
                        help="folder with images/ and masks/")
    parser.add_argument("--n", type=int, default=64, help="rows to load")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--large-images", default="auto", choices=["auto", "crop", "resize"])
    args = parser.parse_args()

    data = Path(args.data)
    df = from_folders(data / "images", data / "masks").iloc[: args.n]
    start = time.perf_counter()
    spec = validate_frame(df)
    print(f"{data.name}: validated {len(df)} rows in {time.perf_counter() - start:.2f} s "
          f"(task={spec.task}, classes={spec.num_classes})")
    print(f"torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}, "
          f"batch_size={args.batch_size}")
    for size in args.sizes:
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as cache_dir:
                dm = SegmentationDataModule(
                    spec, input_size=size, batch_size=args.batch_size, tuning_spec=spec,
                    num_workers=workers, cache_dir=cache_dir if workers else None,
                    cache_memory_mb=4096, large_images=args.large_images,
                )
                loader = dm.train_dataloader()
                n_cold, t_cold = _epoch(loader)
                n_warm, t_warm = _epoch(loader)
                del loader
                n_val, t_val = _epoch(dm.val_dataloader())
            print(f"{data.name} n={len(df)} S={size} workers={workers} "
                  f"large_images={args.large_images}: "
                  f"cold {n_cold / t_cold:6.1f} img/s, cached {n_warm / t_warm:6.1f} img/s, "
                  f"val {n_val} items {n_val / t_val:6.1f} items/s")


if __name__ == "__main__":
    main()
