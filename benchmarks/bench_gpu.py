"""Training steps on a CUDA GPU: Conv-LoRA against LoRA and the floor, and peak memory.

Five parts (``--part``). Each prints one line per configuration and one JSON line, for
records:

``timing``: ``--backbone`` (vit_b) at each ``--sizes``, batch ``--batch``, bf16 autocast,
the fit's optimiser (``automask.training.build_optimizer``: fused AdamW): the floor (frozen
encoder forward + backward), LoRA, Conv-LoRA as it runs on CUDA (``routing="auto"``: the
gate and the batched dispatch as one compiled graph where Triton and a C compiler are
found), Conv-LoRA's batched dispatch uncompiled (``conv_lora_batched``: every routed pair
in one set of kernels, no host synchronisation) and the sparse dispatch it uses on CPUs
(``conv_lora_sparse``: each routed expert on its group, one host synchronisation per
block). One step of each in turn, ``--warmup`` rounds (the first compiles) then
``--steps`` timed rounds; ratios of medians within the run. The ``*_sam_rel_pos`` variants
take segment-anything's ``get_rel_pos`` in the attention (an index copied to the device,
and waited for, in every call) instead of ``automask.models.blocks.rel_pos_table``.
``--variants`` picks some.

``memory``: one configuration at a time in this process (the previous one freed first):
backbone, size, batch, method, gradient checkpointing. Peak ``max_memory_allocated`` and
``max_memory_reserved`` from before the model reaches the GPU (weights, gradients, AdamW
state and activations), seconds per step and images per second. A configuration that runs
out of memory is reported as such.

``syncs``: host synchronisations in one training step of each variant but the floor
(``torch.cuda.set_sync_debug_mode``). ``profile``: kernel launches and device time per
step, and the operations taking most device and host time in three steps of each variant
(``torch.profiler``). ``parity``: one training step's loss and gradients with each
routing, in float32 and bf16, against the sparse dispatch.

    python -m benchmarks.bench_gpu --part timing --sizes 1024 512
    python -m benchmarks.bench_gpu --part timing --backbone vit_h --batch 1 \
        --variants lora conv_lora conv_lora_batched
    python -m benchmarks.bench_gpu --part memory
    python -m benchmarks.bench_gpu --part profile --variants lora conv_lora
    python -m benchmarks.bench_gpu --part syncs      # host synchronisations in one step
    python -m benchmarks.bench_gpu --part parity --sizes 512 --batch 1

Random weights (``checkpoint="random"``): time and memory do not depend on their values.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from benchmarks.bench_step import make_step

# (backbone, size, batch, method, gradient checkpointing, Conv-LoRA routing), in the order run
MEMORY_CONFIGS = [
    ("vit_b", 1024, 2, "conv_lora", False, "auto"),
    ("vit_h", 1024, 1, "conv_lora", False, "auto"),
    ("vit_h", 1024, 1, "conv_lora", True, "auto"),
    ("vit_b", 1024, 2, "conv_lora", True, "auto"),
    ("vit_b", 1024, 2, "conv_lora", False, "sparse"),
    ("vit_h", 1024, 2, "conv_lora", True, "auto"),
    ("vit_b", 1024, 1, "conv_lora", False, "auto"),
    ("vit_l", 1024, 1, "conv_lora", False, "auto"),
]


def _namespace(backbone: str, batch: int, checkpointing: bool) -> argparse.Namespace:
    return argparse.Namespace(device="cuda", backbone=backbone, batch=batch, dtype="bf16",
                              gradient_checkpointing=checkpointing, no_hold=True)


def _build(method: str, size: int, routing: str, ns: argparse.Namespace):
    step, sync, _ = make_step(method, size, ns)
    from automask.peft import ConvLoRALinear

    for module in _model_of(step).modules():
        if isinstance(module, ConvLoRALinear):
            module.routing = routing
    return step, sync


def _model_of(step):
    """The segmenter a ``make_step`` closure trains (found among its free variables)."""
    from automask.models import SamSegmenter

    for cell in step.__closure__ or ():
        if isinstance(cell.cell_contents, SamSegmenter):
            return cell.cell_contents
    raise AssertionError("no model in the step's closure")


def _timed(step, sync) -> float:
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def _emit(row: dict, text: str) -> None:
    print(text, flush=True)
    print("JSON " + json.dumps(row), flush=True)


def _with_sam_rel_pos(step):
    """``step`` with segment-anything's ``get_rel_pos`` in the attention (its index built on
    the CPU and copied to the device in every call) instead of ``rel_pos_table``."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    from automask.models import blocks

    def wrapped() -> None:
        ours = blocks.rel_pos_table
        blocks.rel_pos_table = lambda size, table: get_rel_pos(size, size, table)
        try:
            step()
        finally:
            blocks.rel_pos_table = ours
    return wrapped


# name: (method, Conv-LoRA routing, segment-anything's get_rel_pos)
VARIANTS = {"floor": ("floor", "auto", False), "lora": ("lora", "auto", False),
            "conv_lora": ("conv_lora", "auto", False),
            "conv_lora_batched": ("conv_lora", "batched", False),
            "conv_lora_sparse": ("conv_lora", "sparse", False),
            "lora_sam_rel_pos": ("lora", "auto", True),
            "conv_lora_sam_rel_pos": ("conv_lora", "auto", True)}
RATIOS = [("conv_lora", "lora"), ("conv_lora_batched", "lora"), ("conv_lora_sparse", "lora"),
          ("conv_lora", "floor"), ("lora", "floor"), ("conv_lora", "conv_lora_batched"),
          ("lora_sam_rel_pos", "lora"), ("conv_lora_sam_rel_pos", "conv_lora")]


def run_timing(args: argparse.Namespace) -> None:
    for size in args.sizes:
        ns = _namespace(args.backbone, args.batch, False)
        built = {}
        for name in args.variants:
            method, routing, sam_rel_pos = VARIANTS[name]
            step, sync = _build(method, size, routing, ns)
            built[name] = (_with_sam_rel_pos(step) if sam_rel_pos else step), sync
        names = list(built)
        times: dict[str, list[float]] = {n: [] for n in names}
        for round_ in range(args.warmup + args.steps):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                if name not in times:  # failed in an earlier round
                    continue
                try:
                    seconds = _timed(*built[name])
                except Exception as exc:  # e.g. no compiler for the compiled variant
                    print(f"{name}: failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300]}", flush=True)
                    del times[name]
                    continue
                if round_ < args.warmup:
                    print(f"  warm-up {round_} {name} {seconds:.3f} s", flush=True)
                else:
                    times[name].append(seconds)
        medians = {n: statistics.median(t) for n, t in times.items()}
        label = f"{args.backbone} {size}px bs{args.batch}"
        for name in medians:
            row = {"part": "timing", "device": torch.cuda.get_device_name(), "size": size,
                   "backbone": args.backbone, "batch": args.batch, "method": name,
                   "seconds": medians[name], "min_seconds": min(times[name]),
                   "images_per_s": args.batch / medians[name]}
            _emit(row, f"{label} {name:21s} {medians[name]:.4f} s/step "
                       f"(min {min(times[name]):.4f})  {row['images_per_s']:.1f} img/s")
        ratios = {f"{a}/{b}": medians[a] / medians[b] for a, b in RATIOS
                  if a in medians and b in medians}
        _emit({"part": "ratios", "backbone": args.backbone, "size": size, "batch": args.batch,
               **ratios}, f"{label} ratios: " + ", ".join(f"{k} {v:.2f}"
                                                          for k, v in ratios.items()))
        del built
        gc.collect()
        torch.cuda.empty_cache()


def run_memory(args: argparse.Namespace) -> None:
    for backbone, size, batch, method, checkpointing, routing in MEMORY_CONFIGS:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        label = (f"{backbone} {size}px bs{batch} {method} routing={routing} "
                 f"checkpointing={'on' if checkpointing else 'off'}")
        row = {"part": "memory", "device": torch.cuda.get_device_name(), "backbone": backbone,
               "size": size, "batch": batch, "method": method, "routing": routing,
               "gradient_checkpointing": checkpointing}
        try:
            step, sync = _build(method, size, routing,
                                _namespace(backbone, batch, checkpointing))
            for _ in range(2):
                _timed(step, sync)
            times = [_timed(step, sync) for _ in range(args.memory_steps)]
        except torch.OutOfMemoryError as exc:
            step = None
            _emit({**row, "oom": str(exc).splitlines()[0]}, f"{label}: out of memory")
            continue
        seconds = statistics.median(times)
        row.update(seconds=seconds, images_per_s=batch / seconds,
                   static_gib=torch.cuda.memory_allocated() / 2**30,
                   peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
        _emit(row, f"{label}: {seconds:.4f} s/step, {row['images_per_s']:.1f} img/s, peak "
                   f"allocated {row['peak_allocated_gib']:.2f} GiB, reserved "
                   f"{row['peak_reserved_gib']:.2f} GiB (held between steps "
                   f"{row['static_gib']:.2f} GiB)")
        del step, sync


def _trained_variants(args: argparse.Namespace):
    """``(name, step, sync)`` of each variant in ``args.variants`` but the floor, built one
    at a time at the first of ``args.sizes``."""
    for name in args.variants:
        method, routing, sam_rel_pos = VARIANTS[name]
        if method == "floor":
            continue
        step, sync = _build(method, args.sizes[0], routing, _namespace(args.backbone,
                                                                      args.batch, False))
        yield name, (_with_sam_rel_pos(step) if sam_rel_pos else step), sync
        del step, sync  # before the next variant is built


def run_syncs(args: argparse.Namespace) -> None:
    """Host synchronisations in one training step (``torch.cuda.set_sync_debug_mode``)."""
    import warnings

    for name, step, sync in _trained_variants(args):
        _timed(step, sync)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found = [str(w.message).splitlines()[0] for w in caught
                 if "called a synchronizing" in str(w.message)]  # not the mode's notice
        _emit({"part": "syncs", "method": name, "size": args.sizes[0], "syncs": len(found)},
              f"{name} {args.sizes[0]}px bs{args.batch}: {len(found)} host synchronisations "
              f"in a training step" + (f" (first: {found[0][:120]})" if found else ""))
        del step, sync
        gc.collect()


def run_parity(args: argparse.Namespace) -> None:
    """Conv-LoRA's three routings on the device, one training step's loss and gradients
    each, in float32 and under bf16 autocast: the sparse dispatch is the reference; same
    weights (nonzero, drawn once), inputs and gate noise."""
    import torch.nn.functional as F

    from automask.models import build_segmenter
    from automask.peft import ConvLoRALinear, apply_peft, aux_loss

    size = args.sizes[0]
    images = torch.randn(args.batch, 3, size, size, device="cuda")
    target = (torch.rand(args.batch, 1, size, size, device="cuda") > 0.5).float()
    for bf16 in (False, True):
        results = {}
        for routing in ("sparse", "batched", "compiled"):
            torch.manual_seed(0)
            model = build_segmenter(args.backbone, input_size=size, checkpoint="random")
            apply_peft(model, "conv_lora")
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for param in model.parameters():
                    if param.requires_grad:
                        param.add_(0.05 * torch.randn(param.shape, generator=generator))
            model.cuda().train()
            layers = [m for m in model.modules() if isinstance(m, ConvLoRALinear)]
            for layer in layers:
                layer.routing = routing
            for _ in range(2):  # the first compiles
                model.zero_grad(set_to_none=True)
                torch.manual_seed(2)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(images).float()
                    loss = F.binary_cross_entropy_with_logits(logits, target) + aux_loss(model)
                loss.backward()
            counts = [layer.expert_counts for layer in layers]
            results[routing] = (loss.item(), counts, {
                n: p.grad.float().clone() for n, p in model.named_parameters()
                if p.grad is not None})
            del model, layers
        loss_ref, counts_ref, grads_ref = results["sparse"]
        for routing in ("batched", "compiled"):
            loss, counts, grads = results[routing]
            # a gradient that is zero in exact arithmetic (the key biases of attention) is
            # float noise: differences are taken against at least 1e-4 of the largest
            floor = 1e-4 * max(g.abs().max().item() for g in grads_ref.values())
            rows = sorted((((g - grads[n]).abs().max().item() / max(g.abs().max().item(),
                                                                     floor), n)
                           for n, g in grads_ref.items() if n in grads), reverse=True)
            only = sorted(set(grads_ref) ^ set(grads))
            only_zero = all(n in grads and not grads[n].any() for n in only)
            worst = ", ".join(f"{n} {d:.1e}" for d, n in rows[:3])
            _emit({"part": "parity", "bf16": bf16, "routing": routing, "loss_sparse": loss_ref,
                   "loss": loss, "same_counts": counts == counts_ref, "worst": rows[:3],
                   "one_side_only": len(only), "one_side_only_all_zero": only_zero},
                  f"parity {args.backbone} {size}px bs{args.batch} "
                  f"{'bf16' if bf16 else 'fp32'} {routing} vs sparse: loss {loss:.7f} vs "
                  f"{loss_ref:.7f}; same routing counts {counts == counts_ref}; "
                  f"{len(only)} gradients here only (all zero: {only_zero}, the experts no "
                  f"sample reached); worst relative: {worst}")


def run_profile(args: argparse.Namespace) -> None:
    """The operations taking most device and host time in a few steps of each method."""
    from torch.profiler import ProfilerActivity, profile

    for name, step, sync in _trained_variants(args):
        for _ in range(3):
            _timed(step, sync)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                _timed(step, sync)
        table = prof.key_averages()
        launches = sum(e.count for e in table if "LaunchKernel" in e.key)
        device_us = sum(getattr(e, "self_device_time_total", 0) for e in table)
        print(f"=== {name}: {launches / 3:.0f} kernel launches and {device_us / 3e3:.1f} ms "
              f"of device time per step", flush=True)
        for key in ("self_device_time_total", "self_cpu_time_total"):
            print(f"--- {name} {args.backbone} {args.sizes[0]}px bs{args.batch}, 3 steps, "
                  f"by {key}")
            try:
                text = table.table(sort_by=key, row_limit=args.rows, max_name_column_width=48)
            except (AttributeError, KeyError, ValueError):  # torch before the rename
                text = table.table(sort_by=key.replace("device", "cuda"), row_limit=args.rows,
                                   max_name_column_width=48)
            print(text, flush=True)
        del step, sync
        gc.collect()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["timing", "memory", "profile", "syncs", "parity"],
                        required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backbone", default="vit_b", help="timing and syncs: the backbone")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=list(VARIANTS),
                        help="timing and syncs: the variants, run in turn")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--memory-steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=14, help="profile: rows per table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to measure")
        return 0
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, {props.total_memory / 2**30:.1f} GiB, torch "
          f"{torch.__version__}", flush=True)
    parts = {"timing": run_timing, "memory": run_memory, "profile": run_profile,
             "syncs": run_syncs, "parity": run_parity}
    parts[args.part](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
