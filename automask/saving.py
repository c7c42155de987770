"""Saving and loading a fitted predictor: one JSON file and the trainable weights.

Layout of a predictor directory::

    automask.json              # format version, versions, task, classes, models and configs
    models/<model>.safetensors # trainable weights of each model (adapters + decoder)

The frozen SAM backbone is never written: loading rebuilds it through the checkpoint
resolver and checks the SHA-256 recorded at fit time. A model trained from random
initialisation has no checkpoint to rebuild from, so all its weights are written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .errors import AutomaskError, CheckpointError, SavedModelError
from .utils import atomic_write, sha256_file
from .utils.download import copy_atomic

FORMAT = "automask-predictor"
FORMAT_VERSION = 1
META_FILE = "automask.json"

_STATE_ATTRS = ("task_", "num_classes_", "classes_", "eval_metric_", "void_label_",
                "best_model_", "fit_time_")


def weights_filename(name: str) -> str:
    """File name of a model's weights; candidate names may hold ',' and '='."""
    return "models/" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".safetensors"


def weights_to_save(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """(scope, tensors): trainable parameters, or the whole state for random-init models."""
    if model.checkpoint_info.get("source") == "random":
        state = model.state_dict()
        return "all", {k: v.detach().cpu().contiguous() for k, v in state.items()}
    params = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
              if p.requires_grad}
    return "trainable", params


def write_weights(model: torch.nn.Module, run_dir: Path, name: str) -> dict[str, Any]:
    """Write a model's weights under ``run_dir``; returns the JSON record of the file."""
    from safetensors.torch import save

    scope, tensors = weights_to_save(model)
    rel = weights_filename(name)
    dest = run_dir / rel
    with atomic_write(dest) as fh:
        fh.write(save(tensors))
    return {"weights": rel, "weights_scope": scope, "weights_sha256": sha256_file(dest)}


def save_predictor(seg, path: Path) -> None:
    """Write ``seg``'s JSON and make sure every model's weights are in ``path``."""
    import automask

    path.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, info in seg.models_.items():
        record = {k: v for k, v in info.items() if k != "config"}
        record["config"] = info["config"].to_dict()
        src = Path(seg.path_) / info["weights"]
        dest = path / info["weights"]
        if src.resolve() != dest.resolve():
            copy_atomic(src, dest)
        models[name] = record
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "automask_version": automask.__version__,
        "torch_version": torch.__version__,
        "params": seg.get_params(),
        "color_map": [[*k, v] for k, v in (seg.color_map_ or {}).items()],
        **{attr: getattr(seg, attr) for attr in _STATE_ATTRS},
        "models": models,
    }
    meta["params"]["path"] = None  # a loaded predictor lives where it is loaded from
    with atomic_write(path / META_FILE, "w") as fh:
        json.dump(meta, fh, indent=2, default=str)


def load_predictor(cls, path: Path):
    """Inverse of :func:`save_predictor`; raises SavedModelError on any inconsistency."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise SavedModelError(f"{str(path)!r} is not a saved automask predictor: no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SavedModelError(f"{str(meta_path)!r} is corrupted: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SavedModelError(f"{str(meta_path)!r} is not an automask predictor file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SavedModelError(
            f"{str(path)!r} was saved in format version {meta.get('format_version')!r} by "
            f"automask {meta.get('automask_version')}; this automask reads version "
            f"{FORMAT_VERSION}"
        )
    try:
        seg = cls(**meta["params"])
        for attr in _STATE_ATTRS:
            setattr(seg, attr, meta[attr])
        seg.color_map_ = {tuple(row[:3]): row[3] for row in meta["color_map"]} or None
        seg.path_ = path
        seg.models_ = {}
        for name, record in meta["models"].items():
            info = dict(record)
            info["config"] = Config.from_dict(record["config"])
            if not (path / info["weights"]).is_file():
                raise SavedModelError(f"missing weights file {info['weights']!r} in {str(path)!r}")
            seg.models_[name] = info
        seg.config_ = seg.models_[seg.best_model_]["config"]
    except SavedModelError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AutomaskError) as exc:
        raise SavedModelError(f"{str(meta_path)!r} is incomplete or invalid: {exc!r}") from exc
    seg._loaded = {}
    return seg


def rebuild_model(seg, name: str) -> torch.nn.Module:
    """Build model ``name`` of a fitted or loaded predictor and load its saved weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import build_segmenter
    from .peft import apply_peft
    from .segmentor import _peft_kwargs

    info = seg.models_[name]
    cfg: Config = info["config"]
    weights = Path(seg.path_) / info["weights"]
    if sha256_file(weights) != info["weights_sha256"]:
        raise SavedModelError(f"weights file {str(weights)!r} is corrupted (SHA-256 mismatch)")
    checkpoint = _checkpoint_for(info["checkpoint"])
    recorded = info["checkpoint"].get("sha256")
    try:
        model = build_segmenter(cfg.model.backbone, num_classes=1 if seg.task_ == "binary"
                                else seg.num_classes_, input_size=cfg.model.input_size,
                                checkpoint=checkpoint, progress=seg.verbosity >= 2,
                                multiclass_head=cfg.model.multiclass_head)
    except CheckpointError as exc:
        raise SavedModelError(
            f"model {name!r} was trained on the SAM checkpoint {info['checkpoint'].get('path')}"
            f" (SHA-256 {recorded}), which is no longer there, and no other copy was found: "
            f"{exc}"
        ) from exc
    if recorded and model.checkpoint_info.get("sha256") != recorded:
        raise SavedModelError(
            f"the SAM checkpoint found for model {name!r} ({model.checkpoint_info.get('path')}) "
            f"has SHA-256 {model.checkpoint_info.get('sha256')}, but the model was trained on "
            f"{recorded}"
        )
    apply_peft(model, **_peft_kwargs(cfg))
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise SavedModelError(f"cannot read weights {str(weights)!r}: {exc}") from exc
    _, expected = weights_to_save(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SavedModelError(
            f"weights {str(weights)!r} do not fit model {name!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    with torch.no_grad():
        for key, value in tensors.items():
            if state[key].shape != value.shape:
                raise SavedModelError(f"weights {key!r}: shape {tuple(value.shape)} in the file, "
                                      f"{tuple(state[key].shape)} in the model")
            state[key].copy_(value)
    return model.eval()


def _checkpoint_for(record: dict[str, Any]):
    """The checkpoint argument that rebuilds the same backbone: random, file, or resolver."""
    if record.get("source") == "random":
        return "random"
    recorded_path = record.get("path")
    if recorded_path and Path(recorded_path).is_file():
        return recorded_path
    return None  # cache, then official download; the SHA-256 check follows
