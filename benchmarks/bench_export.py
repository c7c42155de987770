"""Export time, ONNX Runtime against PyTorch, and merged against unmerged LoRA inference.

Random weights (``checkpoint="random"``: speed does not depend on the weights), one image
per forward (batch 1), median of ``--repeat`` timed runs after one warm-up.

1. For each backbone (``--backbones``, default tiny and vit_b) at ``--size`` (256):
   :func:`automask.export.export_model` of a model for each of ``--methods`` (default
   lora and conv_lora, the presets' method, whose ONNX graph runs every expert), then
   seconds per forward of the ONNX file in ONNX Runtime (CPU provider) and of the PyTorch
   model as ``predict`` runs it (unmerged, routed dispatch) in fp32 and under bf16 autocast.
2. LoRA on vit_b at ``--merge-sizes`` (256, 512) under bf16 autocast: the model as loaded
   against the same model after :func:`automask.peft.merge_adapters` (the update folded
   into ``qkv``: no low-rank path in the forward), with the largest logit difference.

Run from the repository root::

    python -m benchmarks.bench_export
    python -m benchmarks.bench_export --backbones tiny --methods lora --merge-sizes 256
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path


def median_time(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls of ``fn`` after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _model(backbone: str, method: str, size: int):
    import torch

    from automask.models import build_segmenter
    from automask.peft import apply_peft

    torch.manual_seed(0)
    model = build_segmenter(backbone, input_size=size, checkpoint="random", progress=False)
    apply_peft(model, method)
    with torch.no_grad():  # wake zero-initialised adapters (LoRA's B, Conv-LoRA's gate)
        for param in model.parameters():
            if param.requires_grad and not param.abs().sum() > 0:
                param.normal_(0.0, 0.02)
    return model.eval()


def bench_onnx(backbone: str, method: str, size: int, repeat: int, out_dir: Path) -> dict:
    import onnxruntime as ort
    import torch

    from automask.export import export_model

    model = _model(backbone, method, size)
    path = out_dir / f"{backbone}_{method}_{size}.onnx"
    start = time.perf_counter()
    export_model(model, path)
    export_s = time.perf_counter() - start
    x = torch.randn(1, 3, size, size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    row = {"backbone": backbone, "method": method, "size": size, "export_s": export_s,
           "onnx_mb": path.stat().st_size / 1e6}
    row["ort_fp32_s"] = median_time(lambda: session.run(None, feed), repeat)
    with torch.inference_mode():
        row["torch_fp32_s"] = median_time(lambda: model(x), repeat)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            row["torch_bf16_s"] = median_time(lambda: model(x), repeat)
    return row


def bench_merge(size: int, repeat: int) -> dict:
    import torch

    from automask.peft import merge_adapters

    model = _model("vit_b", "lora", size)
    merged = copy.deepcopy(model)
    count = merge_adapters(merged)
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        # alternate so that changes in the machine's load hit both alike
        unmerged_s, merged_s = [], []
        for _ in range(repeat):
            unmerged_s.append(median_time(lambda: model(x), 1))
            merged_s.append(median_time(lambda: merged(x), 1))
    with torch.inference_mode():
        diff = float((model(x) - merged(x)).abs().max())
    return {"size": size, "merged_layers": count, "unmerged_s": statistics.median(unmerged_s),
            "merged_s": statistics.median(merged_s), "fp32_max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="*", default=["tiny", "vit_b"])
    parser.add_argument("--methods", nargs="+", default=["lora", "conv_lora"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--merge-sizes", nargs="*", type=int, default=[256, 512])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for backbone, method in [(b, m) for b in args.backbones for m in args.methods]:
            r = bench_onnx(backbone, method, args.size, args.repeat, Path(tmp))
            print(f"{r['backbone']:>6} {r['method']} {r['size']} px: export {r['export_s']:.1f} s "
                  f"({r['onnx_mb']:.0f} MB); s/image: onnxruntime fp32 {r['ort_fp32_s']:.3f}, "
                  f"torch fp32 {r['torch_fp32_s']:.3f}, torch bf16 {r['torch_bf16_s']:.3f}",
                  flush=True)
    for size in args.merge_sizes:
        r = bench_merge(size, args.repeat)
        print(f" vit_b lora {size} px bf16: unmerged {r['unmerged_s']:.3f} s, merged "
              f"{r['merged_s']:.3f} s ({r['unmerged_s'] / r['merged_s']:.2f}x, "
              f"{r['merged_layers']} layers merged; fp32 max |logit diff| "
              f"{r['fp32_max_abs_diff']:.2e})", flush=True)


if __name__ == "__main__":
    main()
