"""Build a candidate's model: the SAM segmenter with its PEFT method applied.

This is the one place that applies PEFT to a freshly built model; fitting and loading a
saved predictor both go through :func:`build_candidate_model`.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import Config

FROM_CONFIG = object()  # checkpoint argument: use cfg.model.checkpoint


def build_candidate_model(cfg: Config, num_outputs: int, checkpoint: Any = FROM_CONFIG,
                          progress: bool = False,
                          sha256: str | None = None) -> tuple[torch.nn.Module, int]:
    """The segmenter of ``cfg`` with its PEFT method applied.

    Parameters
    ----------
    cfg : Config
        The candidate's configuration (backbone, input size, PEFT method and options).
    num_outputs : int
        Output maps: 1 for binary tasks, the class count otherwise.
    checkpoint : optional
        SAM checkpoint argument of :func:`automask.models.build_segmenter` (None: the
        cache, then the official download); ``cfg.model.checkpoint`` by default, and
        always random weights for a method that trains from scratch (``scratch``).
    progress : bool
        Show a progress bar if the checkpoint is downloaded.
    sha256 : str, optional
        The SHA-256 the checkpoint must have (a saved predictor's record), checked before
        the file is deserialised.

    Returns
    -------
    (model, base_params)
        The model, and the parameter count of the SAM model before adapters (kept in
        the candidate's record; the paper's ratio divides by all parameters of the
        adapted model, see :mod:`automask.leaderboard`).
    """
    from ..models import build_segmenter, count_parameters
    from ..peft import apply_peft, get_method, set_conv_lora_routing

    if get_method(cfg.peft.method).random_init:
        checkpoint, sha256 = "random", None
    elif checkpoint is FROM_CONFIG:
        checkpoint = cfg.model.checkpoint
    model = build_segmenter(
        cfg.model.backbone, num_classes=num_outputs, input_size=cfg.model.input_size,
        checkpoint=checkpoint, progress=progress, multiclass_head=cfg.model.multiclass_head,
        sha256=sha256, num_queries=cfg.model.num_queries,
    )
    base_params = count_parameters(model)[1]
    apply_peft(model, **_peft_kwargs(cfg))
    model.gradient_checkpointing = cfg.env.gradient_checkpointing
    set_conv_lora_routing(model, cfg.env.conv_lora_routing)
    return model, base_params


def _peft_kwargs(cfg: Config) -> dict[str, Any]:
    """Arguments of :func:`automask.peft.apply_peft` for a candidate's configuration."""
    return {"method": cfg.peft.method, "options": cfg.peft.options}
