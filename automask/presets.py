"""Presets: named, flat dicts of dotted hyperparameters merged over the defaults.

Every preset changes something (the README's preset table lists what); the user's
``hyperparameters`` are merged over the preset by :func:`automask.config.resolve`.
"""
from __future__ import annotations

from typing import Any

_PAPER: dict[str, Any] = {
    # "Convolution Meets LoRA" (Zhong et al., ICLR 2024), training recipe of the paper's tables.
    "model.backbone": "vit_h",
    "model.input_size": 1024,
    "peft.method": "conv_lora",  # its defaults are the paper's: r=3, alpha=32, M=8, top-1
    "model.multiclass_head": "mask_classification",  # the paper's head (binary tasks: unused)
    "optim.lr": 1e-4,
    "optim.weight_decay": 1e-4,
    "optim.lr_schedule": "linear",
    "optim.warmup_ratio": 0.0,
    "optim.max_epochs": 30,
    "optim.batch_size": 1,
    "optim.effective_batch_size": 4,
    "optim.loss": "auto",
    "optim.grad_clip": 1.0,
    "optim.patience": 0,
    "data.hflip": True,
    "data.vflip": False,
    "data.scale_min": 1.0,
    "data.scale_max": 1.0,
    "data.rotate_degrees": 0.0,
    "data.color_jitter": 0.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "medium_quality": {
        "model.backbone": "vit_b",
        "model.input_size": None,  # 1024 on a GPU, 256 on a CPU
        "peft.method": "conv_lora",
        "optim.max_epochs": 20,
        "optim.patience": 5,
        "optim.warmup_ratio": 0.05,
        "data.vflip": True,
        "data.scale_min": 0.8,
        "data.scale_max": 1.2,
    },
    "high_quality": {
        "model.backbone": "vit_l",
        "model.input_size": 1024,
        "peft.method": "conv_lora",
        "optim.max_epochs": 30,
        "optim.patience": 8,
        "optim.warmup_ratio": 0.05,
        "data.vflip": True,
        "data.scale_min": 0.8,
        "data.scale_max": 1.2,
    },
    "best_quality": {
        "model.backbone": "vit_h",
        "model.input_size": 1024,
        "peft.method": "conv_lora",
        "optim.max_epochs": 30,
        "optim.patience": 10,
        "optim.warmup_ratio": 0.05,
        "data.vflip": True,
        "data.scale_min": 0.8,
        "data.scale_max": 1.2,
    },
    "paper": dict(_PAPER),
    # Every row of the paper's table, in its order ("scratch": SAM trained from random init).
    "paper_table": {**_PAPER, "peft.method": ["scratch", "decoder_only", "bitfit", "adapter",
                                              "vpt", "lst", "sam_adapter", "ssf", "lora",
                                              "conv_lora"]},
    "tiny": {
        "model.backbone": "tiny",
        "model.checkpoint": "random",
        "model.input_size": 128,
        "peft.method": "full",
        "optim.lr": 2e-3,
        "optim.weight_decay": 1e-4,
        "optim.max_epochs": 30,
        "optim.batch_size": 8,
        "optim.effective_batch_size": 8,
        "optim.lr_schedule": "cosine",
        "optim.warmup_ratio": 0.05,
        "optim.patience": 0,
        "data.vflip": True,
        "env.eval_batch_size": 16,
    },
}


def list_presets() -> list[str]:
    """Names of the presets, in the order of the README's table."""
    return list(PRESETS)
