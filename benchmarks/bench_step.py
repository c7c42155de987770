"""Time one training step of the SAM segmenter per PEFT method.

A step is forward, loss (BCE + the adapters' auxiliary loss), backward and an AdamW step,
on random images with random weights (``checkpoint="random"``: speed does not depend on
the weights). Each configuration runs in its own subprocess so that its peak memory can be
read on its own.

The *floor* is the cost no encoder-adapting method can avoid: the same frozen image encoder's
forward and a backward pass through all of it. The backward is forced through the encoder
by making the input images require a gradient (no parameter of the encoder trains; the
extra work over a real step is the input gradient of the patch embedding, which is small).
No decoder, no loss beyond a mean, no optimizer step. ``decoder_only`` does not backpropagate
through the encoder at all, so it is usually below the floor.

Run from the repository root::

    python -m benchmarks.bench_step                      # CPU, bf16 autocast when supported
    python -m benchmarks.bench_step --device cuda --steps 10 --warmup 3

Roofline (``--roofline``): the FLOPs of one step of each method are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention,
forward and backward), and this machine's matrix rate in the step's precision is measured
in the same run (a 4096 x 4096 x 4096 product, best of a few, taken between the timed
steps); printed: achieved FLOP/s of the step over that rate::

    python -m benchmarks.bench_step --roofline --methods conv_lora --sizes 512 1024 --batch 1

Conv-LoRA's expert convolutions (``--im2col-ab``): one conv_lora model per size stepping
with ``automask.peft.conv_lora.expert_conv``'s im2col kernel and with oneDNN for every
expert that convolves its resized map (``IM2COL_BUDGET = 0``; since ``--compose-ab``'s
change, experts of scale 3 and below), alternately step by step, the order swapped every
pair; printed: both medians and the per-pair ratios::

    python -m benchmarks.bench_step --im2col-ab --sizes 512 --batch 1 --steps 20

``--compose-ab`` alternates the same way between the experts' resize and convolution
composed into matrix products (``automask.peft.conv_lora.resized_conv``, from
``COMPOSE_FROM``) and the resize followed by the convolution (``COMPOSE_FROM = inf``).

Output: one line per configuration (seconds per step, images per second, peak memory:
``ru_maxrss`` of the subprocess on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), then
the ratios conv_lora / lora and lora / floor per input size (targets: both <= 1.3).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("floor", "decoder_only", "lora", "conv_lora")


def _bf16_supported(device: str) -> bool:
    import torch

    from automask.hardware import cpu_supports_bf16

    return torch.cuda.is_bf16_supported() if device == "cuda" else cpu_supports_bf16()


def make_step(method: str, size: int, args: argparse.Namespace):
    """Build one configuration; returns ``(step, sync, uses_bf16)``."""
    import torch
    import torch.nn.functional as F

    from automask.config import OptimConfig
    from automask.models import build_segmenter
    from automask.peft import apply_peft, aux_loss
    from automask.training import build_optimizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_segmenter(args.backbone, input_size=size, checkpoint="random")
    apply_peft(model, "decoder_only" if method == "floor" else method)
    model.gradient_checkpointing = args.gradient_checkpointing
    if method == "floor":
        model.requires_grad_(False)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # the fit's optimiser: AdamW, fused where torch has the kernels for the device
    optimizer = (build_optimizer(model, lr=1e-4, weight_decay=OptimConfig().weight_decay)
                 if params else None)
    images = torch.randn(args.batch, 3, size, size, device=device)
    target = (torch.rand(args.batch, 1, size, size, device=device) > 0.5).float()
    if method == "floor":
        images.requires_grad_(True)
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and _bf16_supported(args.device))
    # as a fit with a pretrained backbone does: frozen linear weights cast once
    # (automask.models.frozen), held as long as ``step`` lives
    from automask.models.frozen import frozen_linears_in_bf16

    hold = frozen_linears_in_bf16(model, enabled=use_bf16 and device.type == "cpu"
                                  and not args.no_hold)
    hold.__enter__()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if method == "floor":
                loss = model.encode(images).float().mean()
            else:
                logits = model(images).float()
                loss = F.binary_cross_entropy_with_logits(logits, target) + aux_loss(model)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        images.grad = None

    step.hold = hold  # collecting the context would end the hold
    return step, sync, use_bf16


def count_flops(step) -> int:
    """FLOPs of one call of ``step`` (forward and backward), by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def matmul_rate(bf16: bool, n: int = 4096, repeat: int = 3) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) product in bf16 (or fp32) on this CPU."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (oneDNN primitive creation)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def run_roofline(args: argparse.Namespace, size: int) -> list[dict]:
    """Time each method interleaved with matrix-rate probes; FLOPs counted on one step."""
    import torch

    built = {m: make_step(m, size, args) for m in args.methods}
    flops = {m: count_flops(step) for m, (step, _, _) in built.items()}  # also a warm-up
    for _ in range(max(0, args.warmup - 1)):
        for step, _, _ in built.values():
            step()
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    rates: list[float] = []
    uses_bf16 = any(b for _, _, b in built.values())
    for _ in range(args.steps):
        rates.append(matmul_rate(uses_bf16))
        for method, (step, sync, _) in built.items():
            times[method].append(_timed(step, sync))
    peak = max(rates)
    rows = []
    for m in args.methods:
        seconds = statistics.median(times[m])
        rows.append({"method": m, "size": size, "batch": args.batch,
                     "dtype": "bf16" if built[m][2] else "fp32",
                     "threads": torch.get_num_threads(), "seconds": seconds,
                     "step_times": times[m], "tflop": flops[m] / 1e12,
                     "achieved_tflops": flops[m] / seconds / 1e12,
                     "peak_tflops": peak / 1e12, "peak_probes_tflops": [r / 1e12 for r in rates],
                     "fraction": flops[m] / seconds / peak})
    return rows


def _timed(step, sync) -> float:
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def _peak(args: argparse.Namespace) -> tuple[float, str]:
    import torch

    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "max_rss"


def _row(method, size, args, times, use_bf16, peak, peak_kind, base) -> dict:
    import torch

    seconds = statistics.median(times)
    return {
        "method": method, "size": size, "batch": args.batch,
        "dtype": "bf16" if use_bf16 else "fp32",
        "device": args.device, "threads": torch.get_num_threads(), "seconds": seconds,
        "min_seconds": min(times), "images_per_s": args.batch / seconds, "peak_mib": peak,
        "peak_over_build_mib": peak - base, "peak_kind": peak_kind,
    }


def run_one(args: argparse.Namespace) -> dict:
    """Time one configuration in this (fresh) process; returns its figures."""
    import torch

    step, sync, use_bf16 = make_step(args.one, args.size, args)
    base, _ = _peak(args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = 0.0
    for _ in range(args.warmup):
        step()
    sync()
    times = [_timed(step, sync) for _ in range(args.steps)]
    peak, kind = _peak(args)
    return _row(args.one, args.size, args, times, use_bf16, peak, kind, base)


def run_interleaved(args: argparse.Namespace, size: int) -> list[dict]:
    """Time all methods in one process, one step of each in turn (robust to load drift).

    Peak memory is then that of the whole process (all models), so it is not per method.
    """
    built = {m: make_step(m, size, args) for m in args.methods}
    for _ in range(args.warmup):
        for step, sync, _ in built.values():
            step()
            sync()
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for _ in range(args.steps):
        for method, (step, sync, _) in built.items():
            times[method].append(_timed(step, sync))
    peak, kind = _peak(args)
    return [_row(m, size, args, times[m], built[m][2], peak, kind + "_all_models", peak)
            for m in args.methods]


# --im2col-ab and --compose-ab: a conv_lora setting, the two values compared (the library's
# default first) and the option's help
AB_SETTINGS = {
    "im2col": ("IM2COL_BUDGET", {"im2col": None, "oneDNN": 0},
               "conv_lora steps with the experts' im2col convolutions and with oneDNN, "
               "alternating step by step in one process"),
    "compose": ("COMPOSE_FROM", {"composed": None, "resize+conv": float("inf")},
                "conv_lora steps with the experts' resize and convolution composed "
                "(conv_lora.resized_conv) and apart, alternating"),
}


def run_ab(args: argparse.Namespace, size: int, setting: str) -> dict:
    """conv_lora steps with a setting of ``automask.peft.conv_lora`` at its default and at
    the other value of :data:`AB_SETTINGS`, alternating step by step in one process."""
    from automask.peft import conv_lora

    attr, values, _ = AB_SETTINGS[setting]
    default = getattr(conv_lora, attr)
    values = {name: default if value is None else value for name, value in values.items()}
    step, sync, use_bf16 = make_step("conv_lora", size, args)
    times: dict[str, list[float]] = {name: [] for name in values}
    try:
        for _ in range(args.warmup):
            for value in values.values():
                setattr(conv_lora, attr, value)
                step()
        for i in range(args.steps):
            for name in list(values)[:: 1 if i % 2 == 0 else -1]:
                setattr(conv_lora, attr, values[name])
                times[name].append(_timed(step, sync))
    finally:
        setattr(conv_lora, attr, default)
    first, second = values
    ratios = sorted(a / b for a, b in zip(times[first], times[second]))
    return {"size": size, "dtype": "bf16" if use_bf16 else "fp32", "names": (first, second),
            "medians": (statistics.median(times[first]), statistics.median(times[second])),
            "ratio": statistics.median(ratios), "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every configuration in a subprocess and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute encoder blocks in the backward pass")
    parser.add_argument("--interleave", action="store_true",
                        help="time all methods in one process, step by step in turn (ratios "
                             "robust to a busy machine; memory then not per method)")
    parser.add_argument("--roofline", action="store_true",
                        help="count each step's FLOPs and print achieved / measured peak "
                             "matrix rate (CPU; methods interleaved in this process)")
    for name, (_, _, text) in AB_SETTINGS.items():
        parser.add_argument(f"--{name}-ab", action="store_true", help=text)
    parser.add_argument("--no-hold", action="store_true",
                        help="cast frozen linear weights in every forward (as before "
                             "automask.models.frozen) instead of once")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return 0

    root = Path(__file__).resolve().parents[1]
    rows = []
    def report(row: dict) -> None:
        rows.append(row)
        print(f"{args.backbone} {row['size']:4d}px bs{row['batch']} {row['device']} {row['dtype']} "
              f"{row['method']:12s} {row['seconds']:7.3f} s/step  "
              f"{row['images_per_s']:6.2f} img/s  "
              f"peak {row['peak_mib']:7.0f} MiB ({row['peak_kind']}; "
              f"+{row['peak_over_build_mib']:.0f} over build)", flush=True)

    if args.roofline:
        for size in args.sizes:
            for row in run_roofline(args, size):
                print(f"{args.backbone} {size:4d}px bs{row['batch']} {row['dtype']} "
                      f"{row['method']:12s} {row['seconds']:7.3f} s/step (median of "
                      f"{len(row['step_times'])}), {row['tflop']:.3f} TFLOP/step, "
                      f"{row['achieved_tflops']:.3f} TFLOP/s achieved, matrix peak "
                      f"{row['peak_tflops']:.3f} TFLOP/s (probes "
                      f"{', '.join(f'{r:.2f}' for r in row['peak_probes_tflops'])}): "
                      f"{100 * row['fraction']:.1f}% of peak", flush=True)
        return 0
    alternations = [name for name in AB_SETTINGS if getattr(args, f"{name}_ab")]
    for setting in alternations:
        for size in args.sizes:
            row = run_ab(args, size, setting)
            (a, b), (ta, tb) = row["names"], row["medians"]
            print(f"{args.backbone} {size:4d}px bs{args.batch} {row['dtype']} conv_lora: "
                  f"{a} {ta:.3f} s/step, {b} {tb:.3f} s/step (medians of {args.steps}); "
                  f"{a} / {b} per pair {row['ratio']:.3f} "
                  f"[{row['ratios'][0]:.3f}-{row['ratios'][-1]:.3f}]", flush=True)
    if alternations:
        return 0
    for size in args.sizes:
        if args.interleave:
            for row in run_interleaved(args, size):
                report(row)
            continue
        for method in args.methods:
            cmd = [sys.executable, "-m", "benchmarks.bench_step", "--one", method, "--size",
                   str(size), "--backbone", args.backbone, "--device", args.device, "--batch",
                   str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--dtype", args.dtype]
            if args.gradient_checkpointing:
                cmd.append("--gradient-checkpointing")
            if args.no_hold:
                cmd.append("--no-hold")
            done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=os.environ)
            if done.returncode != 0:
                print(f"{method} @ {size}px failed:\n{done.stderr}", file=sys.stderr)
                return 1
            report(json.loads(done.stdout.strip().splitlines()[-1]))
    by = {(r["method"], r["size"]): r["seconds"] for r in rows}
    for size in args.sizes:
        parts = []
        if ("conv_lora", size) in by and ("lora", size) in by:
            parts.append(f"conv_lora/lora = {by['conv_lora', size] / by['lora', size]:.2f}")
        if ("lora", size) in by and ("floor", size) in by:
            parts.append(f"lora/floor = {by['lora', size] / by['floor', size]:.2f}")
        if parts:
            print(f"{size}px: " + ", ".join(parts) + "  (targets <= 1.30)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
