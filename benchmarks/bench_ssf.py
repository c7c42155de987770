"""SSF under bf16 autocast: scale and shift in the Linear output's dtype (what
``automask.peft.ssf.ScaleShift`` does) against in float32 (before: the output, and every
activation up to the next product, turned float32). One vit_b training step, batch 2, two
copies of the same model alternating in one process; median of the per-round ratios.

    python -m benchmarks.bench_ssf [--sizes 256 512] [--rounds 8]
"""
from __future__ import annotations

import argparse
import statistics
import time


def _float32_forward(self, x):
    """ScaleShift's forward before the change: the float32 scale wins the type promotion."""
    y = self.base_layer(x)
    if self.merged:
        return y
    return y * self._view(self.scale) + self._view(self.shift)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)

    from automask.peft import ssf

    from .bench_step import make_step

    step_args = argparse.Namespace(backbone="vit_b", device="cpu", batch=2, dtype="bf16",
                                   gradient_checkpointing=False, no_hold=False)
    forms = {"compute dtype": ssf.ScaleShift.forward, "float32": _float32_forward}
    for size in args.sizes:
        steps = {name: make_step("ssf", size, step_args)[0] for name in forms}
        times: dict[str, list[float]] = {name: [] for name in forms}
        for r in range(args.rounds + 1):  # round 0 warms up
            order = list(forms) if r % 2 == 0 else list(forms)[::-1]
            for name in order:
                ssf.ScaleShift.forward = forms[name]
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
        ssf.ScaleShift.forward = forms["compute dtype"]
        ratios = [a / b for a, b in zip(times["compute dtype"][1:], times["float32"][1:])]
        print(f"{size} px: compute dtype {statistics.median(times['compute dtype'][1:]):.3f} "
              f"s/step, float32 {statistics.median(times['float32'][1:]):.3f} s/step, ratio "
              f"{statistics.median(ratios):.3f} (per round "
              f"{', '.join(f'{x:.2f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
