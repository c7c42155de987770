"""Pictures in memory as files: what ``automask.data.arrays.as_files`` costs per row.

Rows of one image and its mask (random pixels, ``--size`` H W, RGB uint8 and a 0/255
mask), given as numpy arrays, PIL images or the bytes of PNG files. Each form is written
named by position (predict, evaluate) and named by content (fit, which hashes each file
with SHA-256), forms and namings alternating over ``--rounds`` rounds of ``--rows`` rows;
prints the median and minimum milliseconds per row, the temporary folder's removal
included. A fit then copies each file once more into its state folder (not timed here).

    python benchmarks/bench_in_memory.py [--rows 20] [--rounds 5] [--size 1080 1440]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from automask.data.arrays import as_files  # noqa: E402


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=(1080, 1440), metavar=("H", "W"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    h, w = args.size
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(args.rows)]
    masks = [(rng.random((h, w)) > 0.5).astype(np.uint8) * 255 for _ in range(args.rows)]
    forms = {
        "array": (images, masks),
        "PIL image": ([Image.fromarray(a) for a in images], [Image.fromarray(m) for m in masks]),
        "PNG bytes": ([_png(a) for a in images], [_png(m) for m in masks]),
    }
    frames = {name: pd.DataFrame({"image": pd.Series(i, dtype=object),
                                  "label": pd.Series(m, dtype=object)})
              for name, (i, m) in forms.items()}
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.rounds):
        for name, frame in frames.items():
            for by_content in (False, True):
                start = time.perf_counter()
                with as_files(frame, ["image", "label"], by_content=by_content) as files:
                    assert files["image"].map(lambda v: isinstance(v, str)).all()
                ms = (time.perf_counter() - start) / args.rows * 1000
                times.setdefault((name, by_content), []).append(ms)
    print(f"{args.rows} rows of a {h}x{w} RGB image and its mask, {args.rounds} rounds; "
          "ms per row (median, min)")
    for (name, by_content), values in times.items():
        naming = "by content " if by_content else "by position"
        print(f"  {name:10s} {naming}  {statistics.median(values):7.2f}  {min(values):7.2f}")


if __name__ == "__main__":
    main()
