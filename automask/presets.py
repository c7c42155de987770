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
    "optim.eps": 1e-6,  # the authors' AdamW epsilon
    "optim.lr_schedule": "linear",
    "optim.warmup_ratio": 0.0,
    "optim.max_epochs": 30,
    "optim.batch_size": 1,
    "optim.effective_batch_size": 4,
    "optim.loss": "auto",
    "optim.grad_clip": 1.0,
    # The authors' runs stop after 10 validations (one per epoch) without improvement:
    # AutoGluon's semantic-segmentation preset, which their script keeps.
    "optim.patience": 10,
    "data.hflip": True,
    "data.vflip": False,
    "data.scale_min": 1.0,
    "data.scale_max": 1.0,
    "data.rotate_degrees": 0.0,
    "data.color_jitter": 0.0,
    # The authors stretch every image whole to the square input, however large (a 1500 px
    # road tile, a 6000 px ISIC photo) and whatever its aspect ratio; predict's default
    # tiling follows (no windows).
    "data.large_images": "resize",
    "data.resize": "square",
    # ... by torchvision's Resize with BICUBIC on a PIL image: Pillow's bicubic filter
    "data.interpolation": "bicubic",
}

#: The rows of the paper's tables, as PEFT registry names, in the paper's order.
PAPER_TABLE_METHODS: tuple[str, ...] = (
    "scratch", "decoder_only", "bitfit", "adapter", "vpt", "lst", "sam_adapter", "ssf", "lora",
    "conv_lora",
)

#: The authors' per-dataset settings over the paper's recipe, from their training script
#: (AutoGluon, ``examples/automm/Conv-LoRA/run_semantic_segmentation.py``,
#: ``get_default_training_setting``): the validation metric that selects the checkpoint,
#: the loss, the epochs and the learning rate. Keys are the preset suffixes; the comment
#: names the dataset (:func:`automask.datasets.fetch_benchmark` name).
PAPER_DATASETS: dict[str, dict[str, Any]] = {
    "polyp": {  # polyp (Kvasir + CVC-ClinicDB train; Kvasir, CVC-612 test)
        "optim.select_metric": "sm", "optim.loss": "structure",
    },
    "isic2017": {  # isic2017: the script's defaults
        "optim.select_metric": "iou", "optim.loss": "structure",
    },
    "camo": {  # camo_sem_seg
        "optim.select_metric": "sm", "optim.loss": "structure", "optim.max_epochs": 20,
    },
    "sbu": {  # SBU-shadow; their "ber" is AutoGluon's per-image mean (ber_per_image here)
        "optim.select_metric": "ber_per_image", "optim.loss": "balanced_bce",
        "optim.max_epochs": 10,
    },
    "leaf": {  # leaf_disease_segmentation
        "optim.select_metric": "iou", "optim.loss": "structure", "optim.lr": 3e-4,
    },
    "road": {  # road_segmentation
        "optim.select_metric": "iou", "optim.loss": "structure", "optim.max_epochs": 20,
        "optim.lr": 3e-4,
    },
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
    "paper_table": {**_PAPER, "peft.method": list(PAPER_TABLE_METHODS)},
    **{f"paper_{name}": {**_PAPER, **recipe} for name, recipe in PAPER_DATASETS.items()},
    **{f"paper_table_{name}": {**_PAPER, **recipe, "peft.method": list(PAPER_TABLE_METHODS)}
       for name, recipe in PAPER_DATASETS.items()},
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


# Words of a dataset's or a task's name -> the PAPER_DATASETS recipe made for its kind.
_DATASET_WORDS: dict[str, str] = {
    **dict.fromkeys(("polyp", "kvasir", "cvc", "clinicdb", "colondb", "etis"), "polyp"),
    **dict.fromkeys(("isic", "skin", "lesion", "ph2", "derm"), "isic2017"),
    **dict.fromkeys(("camo", "cod", "camouflage", "camouflaged", "chameleon", "nc4k"), "camo"),
    **dict.fromkeys(("sbu", "shadow", "istd", "ucf"), "sbu"),
    **dict.fromkeys(("leaf", "plant", "disease"), "leaf"),
    **dict.fromkeys(("road", "roads", "massachusetts", "deepglobe"), "road"),
}


def suggest_preset(name: object, valid: list[str]) -> str | None:
    """The preset a mistyped ``name`` most likely means, or None.

    Tried in turn: the same name in other case; a dataset's or task's name, or one word
    away (``"paper_kvasir"``, ``"shadow"`` -> ``paper_polyp``, ``paper_sbu``; ``paper_table_``
    kept when asked); the start of a name (``"best"`` -> ``best_quality``); the closest
    spelling.
    """
    import difflib
    import re

    text = str(name).strip().lower()
    folded = {v.lower(): v for v in valid}
    if text in folded:
        return folded[text]
    words = re.findall(r"[a-z]+", text)
    for word in words:
        stems = [stem for stem in _DATASET_WORDS
                 if word.startswith(stem) or (len(word) >= 4 and stem.startswith(word))]
        stems = stems or difflib.get_close_matches(word, list(_DATASET_WORDS), n=1, cutoff=0.8)
        if stems:  # "kvasir", "kvasr", "cod10k", "shadows"
            recipe = _DATASET_WORDS[stems[0]]
            preset = f"paper_table_{recipe}" if "table" in words else f"paper_{recipe}"
            if preset in valid:
                return preset
    starts = [v for v in valid if text and v.startswith(text)]
    if len(starts) == 1:
        return starts[0]
    close = difflib.get_close_matches(text, valid, n=1)
    return close[0] if close else None


def list_presets() -> list[str]:
    """Names of the presets, in the order of the README's table."""
    return list(PRESETS)
