"""End-to-end fit / predict / evaluate on a GPU: throughput and peak memory.

Trains Conv-LoRA on a random-init SAM backbone (no pretrained weights are needed to time
it) on synthetic data at the given input size, through SemanticSegmentor, and prints fit
time, training images/s, prediction images/s and peak GPU memory.

    python benchmarks/gpu_fit.py --backbone vit_b --size 1024 --images 48 --epochs 2
    python benchmarks/gpu_fit.py --routing batched   # Conv-LoRA's routing uncompiled
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from automask import SemanticSegmentor
from automask.datasets import make_synthetic, train_test_split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--method", default="conv_lora")
    parser.add_argument("--routing", default="auto", help="env.conv_lora_routing")
    args = parser.parse_args()

    root = tempfile.mkdtemp()
    frame = make_synthetic(args.images, size=(480, 640), num_classes=2, seed=0, root=root)
    train, test = train_test_split(frame, test_size=0.25, seed=0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    seg = SemanticSegmentor(path=f"{root}/run", verbosity=1).fit(
        train, presets="medium_quality",
        hyperparameters={"model.backbone": args.backbone, "model.checkpoint": "random",
                         "model.input_size": args.size, "peft.method": args.method,
                         "optim.max_epochs": args.epochs, "optim.batch_size": args.batch,
                         "optim.effective_batch_size": args.batch, "optim.patience": 0,
                         "env.conv_lora_routing": args.routing},
    )
    fit_s = time.perf_counter() - t0
    info = seg.models_[seg.best_model_]
    n_train = int(len(train) * (1 - seg.config_.data.holdout_frac))
    t1 = time.perf_counter()
    scores = seg.evaluate(test)
    eval_s = time.perf_counter() - t1
    cuda = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device={device} backbone={args.backbone} size={args.size} method={args.method} "
          f"precision={seg.config_.env.precision} routing={args.routing}")
    print(f"fit_s={fit_s:.1f} train_s={info['train_time']:.1f} epochs={info['epochs']} "
          f"train_images_per_s~={n_train * args.epochs / max(info['train_time'], 1e-9):.1f} "
          f"predict_images_per_s={info['predict_images_per_s']:.1f} "
          f"evaluate_s={eval_s:.1f} ({len(test)} images, 7 metrics) peak_gpu_gib={peak:.2f} "
          f"(reserved {reserved:.2f}) checkpointing={seg.config_.env.gradient_checkpointing}")
    print("scores", {k: round(v, 4) for k, v in scores.items()})


if __name__ == "__main__":
    main()
