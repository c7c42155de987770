"""Callbacks of a fit: keep the best trainable weights in memory, and time each epoch."""
from __future__ import annotations

import math
import time

import lightning as L
import torch


class BestTrainableWeights(L.Callback):
    """Keep a CPU copy of the trainable parameters at the best validation score.

    Lightning's ModelCheckpoint writes the whole model (gigabytes for vit_h) at every
    improvement; only the trainable parameters change during a PEFT fit, so a copy of
    those (megabytes) is all that needs keeping.

    Parameters
    ----------
    monitor : str
        Logged validation metric, e.g. ``"val_iou"``.
    higher_is_better : bool
        Direction of improvement.
    """

    def __init__(self, monitor: str, higher_is_better: bool = True):
        self.monitor = monitor
        self.higher_is_better = higher_is_better
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []

    def _better(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if self.best_score is None:
            return True
        return score > self.best_score if self.higher_is_better else score < self.best_score

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                             self.monitor: score})
        if self._better(score):
            self.best_score = score
            self.best_epoch = trainer.current_epoch
            self.best_state = {
                name: p.detach().to("cpu", copy=True)
                for name, p in pl_module.model.named_parameters()
                if p.requires_grad
            }

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best copy back into ``model`` (no-op when no validation ran)."""
        if self.best_state is None:
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                params[name].copy_(value)


class FitClock(L.Callback):
    """Wall-clock seconds of the fit, from the first to the last training batch."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.start is not None:
            self.seconds = time.perf_counter() - self.start
