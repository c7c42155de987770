#!/usr/bin/env python3
"""Persistent automask worker for step-interleaved timing against a peer library.

Speaks the stdin protocol of the peer harness's workers (``../shared/peers/ag_worker.py``):
it builds its model, prints ``{"ready": true, "build_s": ...}``, then answers every
``step`` line with one JSON line ``{"dt": s, "cpu": s, "v": value}`` and ``quit`` with the
final figures (peak RSS, parameters, precision). After each step glibc's free memory is
returned to the OS (``malloc_trim``, outside the timed region) so that idle workers hold
only their model; not with ``PEER_NO_TRIM=1`` (``compare_peers.py --no-trim``).

A training step is what :meth:`automask.SemanticSegmentor.fit` runs per batch on a CPU:
autocast (bf16 where the CPU has native bf16, the library's default; ``--dtype`` forces
fp32 or bf16) around ``SamSegmenter.forward`` -> structure loss (the binary default of
``automask.losses``) + the adapters' auxiliary loss -> backward -> gradient clipping at 1.0
-> the fit's AdamW (``automask.training.optim.build_optimizer``: torch's fused kernels,
weight decay on matrices and kernels) -> linear learning-rate decay. ``--infer``: eval
mode, ``torch.inference_mode`` and the same autocast, as ``predict`` runs. Under bf16 the
frozen linear weights are held in bf16 (cast once, ``automask.models.frozen``), as
``predict`` and a fit with a pretrained backbone do (a training worker, as a fit, keeps their
float32 originals in a temporary file meanwhile; ``--no-park`` in memory); ``--no-hold``
casts them in every forward.
``--peft floor``: the frozen encoder's forward and a backward through all of it (the
floor of ``benchmarks/bench_step.py``). Weights are random (``checkpoint="random"``):
speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import time
import warnings

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the driver starts workers from its own folder
    sys.path.insert(0, _ROOT)


def _malloc_trim() -> None:
    if os.environ.get("PEER_NO_TRIM") == "1":  # compare_peers --no-trim: step as a fit does
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def build_step(args: argparse.Namespace):
    """Build the model; returns ``(step, model, trainable parameters, precision)``."""
    import torch
    import torch.nn.functional as F

    from automask.hardware import auto_precision
    from automask.losses import structure_loss
    from automask.models import build_segmenter
    from automask.peft import apply_peft, aux_loss
    from automask.training.optim import build_optimizer

    torch.manual_seed(0)
    if args.dtype == "default":
        precision = auto_precision("cpu")
    else:
        precision = "bf16-mixed" if args.dtype == "bf16" else "32-true"
    bf16 = precision == "bf16-mixed"
    floor = args.peft == "floor"
    model = build_segmenter(args.backbone, input_size=args.size, checkpoint="random",
                            progress=False)
    apply_peft(model, "decoder_only" if floor else args.peft)
    if floor:
        model.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = sched = None
    if params and not args.infer:
        opt = build_optimizer(model, lr=1e-4, weight_decay=1e-4)  # the fit's: fused AdamW
        total = max(1, args.total_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / total))
    # fit (with a pretrained backbone) and predict cast the frozen linear weights once, not
    # in every forward (automask.models.frozen), held as long as ``step`` lives; a fit keeps
    # the float32 originals in a temporary file meanwhile, a prediction in memory
    from automask.models.frozen import frozen_linears_in_bf16

    hold = frozen_linears_in_bf16(model, enabled=bf16 and not args.no_hold,
                                  park=not args.infer and not args.no_park)
    hold.__enter__()
    fwd = torch.compile(model) if args.compile else model

    s = args.size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, s, s, generator=g)  # (B, 3, S, S)
    coarse = torch.randn(args.batch, 1, s // 32, s // 32, generator=g)
    target = (F.interpolate(coarse, size=(s, s), mode="bilinear")[:, 0] > 0).long()  # (B, S, S)
    if floor:
        images.requires_grad_(True)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    if args.infer:
        model.eval()

        def step() -> float:
            with torch.inference_mode(), autocast():
                return float(torch.sigmoid(fwd(images).float()).sum())
    else:
        model.train()

        def step() -> float:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            with autocast():
                if floor:
                    loss = model.encode(images).float().mean()
                else:
                    loss = structure_loss(fwd(images).float(), target) + aux_loss(model)
            loss.backward()
            if opt is not None:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
            images.grad = None
            return float(loss.detach())

    step.hold = hold  # collecting the context would end the hold
    return step, model, params, precision


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peft", default="conv_lora", help="a PEFT method, or 'floor'")
    ap.add_argument("--backbone", default="vit_b")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "default"], default="default",
                    help="default: automask's own choice (bf16 autocast on bf16-capable CPUs)")
    ap.add_argument("--infer", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the segmenter")
    ap.add_argument("--no-hold", action="store_true",
                    help="cast frozen linear weights in every forward instead of once")
    ap.add_argument("--no-park", action="store_true",
                    help="training: keep the float32 originals of held weights in memory")
    ap.add_argument("--total-steps", type=int, default=100, help="for the LR schedule only")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    step, model, params, precision = build_step(args)
    build_s = time.perf_counter() - t0
    _malloc_trim()
    print(json.dumps({"ready": True, "build_s": round(build_s, 2)}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t, c = time.perf_counter(), time.process_time()
            v = step()
            dt, cpu = time.perf_counter() - t, time.process_time() - c
            _malloc_trim()
            print(json.dumps({"dt": dt, "v": v, "cpu": cpu}), flush=True)
        elif cmd == "quit":
            break
    step.hold.__exit__(None, None, None)  # the float32 originals back, the temporary file gone
    print(json.dumps({
        "lib": "automask", "torch": torch.__version__, "peft": args.peft, "size": args.size,
        "mode": "infer" if args.infer else "train", "precision": precision,
        "dtype": "bf16-autocast" if precision == "bf16-mixed" else "fp32",
        "compile": args.compile, "batch": args.batch,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in params), "build_s": round(build_s, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
