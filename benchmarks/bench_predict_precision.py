"""A bf16-mixed predictor's prediction on this machine: bf16 autocast always (before)
against the precision ``automask.hardware.inference_precision`` picks (float32 on a CPU
without bf16 products, bf16 on one with them).

One forward of a segmenter (random weights, batch 1) in inference mode per call, as
``predict`` runs it; the two alternate after a warm-up of each, median of ``--rounds``.
On a CPU with bf16 products both columns are bf16 autocast and the ratio is about 1.

    python -m benchmarks.bench_predict_precision [--sizes 512] [--rounds 2]
                                                 [--backbone vit_b] [--method conv_lora]
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--method", default="conv_lora")
    args = parser.parse_args(argv)

    import torch

    from automask.hardware import autocast_context, cpu_supports_bf16, inference_precision
    from automask.models import build_segmenter
    from automask.peft import apply_peft
    from benchmarks.bench_ops import _alternated

    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"cpu_supports_bf16() {cpu_supports_bf16()}; a bf16-mixed predictor predicts in "
          f"{inference_precision(cpu, 'bf16-mixed')}")
    print(f"\n| {args.backbone} {args.method}, prediction | bf16 autocast (s) | as shipped (s) "
          "| ratio |\n|---|---|---|---|")
    for size in args.sizes:
        torch.manual_seed(0)
        model = build_segmenter(args.backbone, input_size=size, checkpoint="random",
                                progress=False)
        apply_peft(model, args.method)
        model.eval()
        images = torch.randn(1, 3, size, size)

        def forward(context, model=model, images=images):
            with torch.inference_mode(), context():
                return model(images)

        before, after = _alternated(
            lambda: forward(lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
            lambda: forward(lambda: autocast_context(cpu, "bf16-mixed")), args.rounds)
        print(f"| {size} px | {before:.2f} | {after:.2f} | {after / before:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
