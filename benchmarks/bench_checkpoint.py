"""A fit's resume checkpoint with its small tensors packed against saved one by one.

After every epoch a fit writes a resume checkpoint: the weights training changes, AdamW's
state, the best epoch's copy, the random generators' states
(:class:`automask.training.module.SegmentationModule`'s hooks). ``torch.save`` pickles
each tensor separately, and a checkpoint holds each trainable tensor about four times;
:mod:`automask.training.packing` packs the small ones into one flat tensor per dtype.
For each configuration the same checkpoint is written to a file (``torch.save``, as
Lightning does) with and without packing, alternating, the order swapped each round, and
read back (``torch.load(weights_only=True)``, then unpacked). Printed: tensors in the
file, MiB, the median seconds of each, their ratio, and whether the values read back are
equal. The packed save's time includes the packing. Run from the repository root::

    python -m benchmarks.bench_checkpoint --rounds 10
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def build(backbone: str, method: str, pretrained: bool) -> dict:
    """The checkpoint dict of a fit after one AdamW step, as Lightning hands it to the
    module's ``on_save_checkpoint``; ``pretrained``: only the trainable weights go in (a
    random backbone's checkpoint keeps every entry)."""
    import torch

    from automask.config import OptimConfig
    from automask.models import build_segmenter
    from automask.peft import apply_peft
    from automask.training import SegmentationModule, build_optimizer

    torch.manual_seed(0)
    model = apply_peft(build_segmenter(backbone, num_classes=1, input_size=64,
                                       checkpoint="random", progress=False), method)
    if pretrained:
        model.checkpoint_info["source"] = "file"  # as if read from a checkpoint
    module = SegmentationModule(model, task="binary", num_classes=2, optim=OptimConfig(),
                                val_metric="iou")
    opt = build_optimizer(model, lr=1e-4, weight_decay=1e-4)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"epoch": 0, "global_step": 1, "module": module,
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_states": [opt.state_dict()],
            "callbacks": {"BestTrainableWeights": {"best_state": best, "best_score": 0.5}}}


def count(value) -> int:
    """Tensors in nested dicts, lists and tuples."""
    return sum(1 for _ in _flat(value))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+",
                    default=["tiny:full:random", "vit_b:conv_lora:pretrained",
                             "vit_b:lora:pretrained"],
                    help="backbone:method:random|pretrained")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)

    import torch

    from automask.training import packing

    folder = tempfile.mkdtemp()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| configuration | tensors in the file (packed / not) | MiB | save, packed | "
          "save, one by one | ratio | load + unpack / load | equal |")
    print("|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        backbone, method, source = config.split(":")
        base = build(backbone, method, source == "pretrained")
        module = base.pop("module")
        module.on_save_checkpoint(base)  # filtered, rng states added, packed
        plain = dict(base)
        packing.unpack_tensors(plain)  # the same checkpoint, one tensor each
        times = {"packed": [], "plain": [], "load packed": [], "load plain": []}
        paths = {k: os.path.join(folder, f"{k}.ckpt") for k in ("packed", "plain")}
        for r in range(args.rounds + 1):
            for kind in ("packed", "plain") if r % 2 else ("plain", "packed"):
                t = time.perf_counter()
                checkpoint = dict(plain)
                if kind == "packed":
                    packing.pack_tensors(checkpoint)  # what the module's hook adds
                torch.save(checkpoint, paths[kind])
                saved = time.perf_counter() - t
                t = time.perf_counter()
                loaded = torch.load(paths[kind], weights_only=True)
                packing.unpack_tensors(loaded)
                read = time.perf_counter() - t
                if r:  # the first round warms up
                    times[kind].append(saved)
                    times["load " + kind].append(read)
        loaded = torch.load(paths["packed"], weights_only=True)
        packing.unpack_tensors(loaded)
        pairs = list(zip(_flat(loaded), _flat(plain)))
        equal = (len(pairs) == count(plain) == count(loaded)
                 and all(a.dtype == b.dtype and torch.equal(a, b) for a, b in pairs))
        mib = os.path.getsize(paths["plain"]) / 2**20
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {config} | {count(torch.load(paths['packed'], weights_only=True))} / "
              f"{count(plain)} | {mib:.1f} | {med['packed'] * 1e3:.1f} ms | "
              f"{med['plain'] * 1e3:.1f} ms | {med['packed'] / med['plain']:.2f} | "
              f"{med['load packed'] * 1e3:.1f} / {med['load plain'] * 1e3:.1f} ms | {equal} |")
    return 0


def _flat(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flat(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flat(v)


if __name__ == "__main__":
    raise SystemExit(main())
