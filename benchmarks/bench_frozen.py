"""Frozen linear weights cast once (held in bf16) against cast in every forward, on a CPU.

Two copies of the same vit_b segmenter (random weights, same seed): one as before, whose
frozen ``nn.Linear`` weights autocast casts to bf16 in every forward, and one whose
frozen weights are held in bf16 for the whole run (:mod:`automask.models.frozen`, what
``fit`` with a pretrained backbone and ``predict`` do on a CPU under bf16 autocast).
Steps of the two alternate, the order swapped each round; printed: the median of the
per-round ratios held / per-forward, for a training step (forward, BCE, backward, AdamW)
and a prediction (``inference_mode``), and whether the first step's loss and outputs are
bit for bit equal. Run from the repository root::

    python -m benchmarks.bench_frozen --sizes 256 512 --rounds 10
"""
from __future__ import annotations

import argparse
import statistics
import time


def build(method: str, size: int, hold: bool, train: bool):
    """A step function of a fresh model; ``hold``: its frozen linear weights held."""
    import torch
    import torch.nn.functional as F

    from automask.models import build_segmenter
    from automask.models.frozen import frozen_linears_in_bf16
    from automask.peft import apply_peft, aux_loss

    torch.manual_seed(0)
    model = build_segmenter("vit_b", input_size=size, checkpoint="random", progress=False)
    apply_peft(model, method)
    model.train(train)
    hold_context = frozen_linears_in_bf16(model, enabled=hold)
    hold_context.__enter__()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, size, size, generator=gen)
    target = (torch.rand(1, 1, size, size, generator=gen) > 0.5).float()

    def step() -> torch.Tensor:
        torch.manual_seed(2)  # Conv-LoRA's routing noise: the same in both copies
        if not train:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(images).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images).float()
            loss = F.binary_cross_entropy_with_logits(logits, target) + aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.hold = hold_context  # collecting the context would end the hold
    return step


def compare(method: str, size: int, train: bool, rounds: int) -> tuple[float, list[float], bool]:
    import torch

    before, held = build(method, size, False, train), build(method, size, True, train)
    equal = torch.equal(before(), held())  # the first step of each: bit for bit?
    ratios = []
    for r in range(rounds):
        seconds = {}
        for name, step in (("before", before), ("held", held))[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            step()
            seconds[name] = time.perf_counter() - start
        ratios.append(seconds["held"] / seconds["before"])
    return statistics.median(ratios), ratios, equal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--methods", nargs="+", default=["conv_lora"])
    parser.add_argument("--modes", nargs="+", default=["train", "predict"],
                        choices=["train", "predict"])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    for method in args.methods:
        for size in args.sizes:
            for mode in args.modes:
                med, ratios, equal = compare(method, size, mode == "train", args.rounds)
                print(f"vit_b {method} {size}px {mode}: held / per-forward {med:.3f} "
                      f"(rounds {', '.join(f'{r:.2f}' for r in ratios)}); first step "
                      f"{'bit-identical' if equal else 'DIFFERENT'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
