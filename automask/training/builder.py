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
                          progress: bool = False) -> tuple[torch.nn.Module, int]:
    """The segmenter of ``cfg`` with its PEFT method applied.

    Parameters
    ----------
    cfg : Config
        The candidate's configuration (backbone, input size, PEFT method and options).
    num_outputs : int
        Output maps: 1 for binary tasks, the class count otherwise.
    checkpoint : optional
        SAM checkpoint argument of :func:`automask.models.build_segmenter` (None: the
        cache, then the official download); ``cfg.model.checkpoint`` by default.
    progress : bool
        Show a progress bar if the checkpoint is downloaded.

    Returns
    -------
    (model, base_params)
        The model, and the parameter count of the SAM model before adapters (the
        denominator of the paper's ratio).
    """
    from ..models import build_segmenter, count_parameters
    from ..peft import apply_peft

    model = build_segmenter(
        cfg.model.backbone, num_classes=num_outputs, input_size=cfg.model.input_size,
        checkpoint=cfg.model.checkpoint if checkpoint is FROM_CONFIG else checkpoint,
        progress=progress,
    )
    base_params = count_parameters(model)[1]
    apply_peft(model, **_peft_kwargs(cfg))
    model.gradient_checkpointing = cfg.env.gradient_checkpointing
    return model, base_params


def _peft_kwargs(cfg: Config) -> dict[str, Any]:
    p = cfg.peft
    return {
        "method": p.method, "rank": p.rank, "alpha": p.alpha, "num_experts": p.num_experts,
        "top_k": p.top_k, "targets": p.target_list, "aux_loss_weight": p.aux_loss_weight,
    }
