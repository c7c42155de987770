"""Callbacks of a fit: keep the best trainable weights, save each epoch, time the fit, keep
each process's threads within the CPU quota."""
from __future__ import annotations

import io
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..utils import atomic_write


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
        if getattr(pl_module, "stopped", None) is not None:
            return  # a non-finite loss or output stopped training: this score does not count
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

    def state_dict(self) -> dict:
        """Saved in resume checkpoints: a resumed fit keeps the best epoch seen so far."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_state": self.best_state, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score = state_dict["best_score"]
        self.best_epoch = state_dict["best_epoch"]
        self.best_state = state_dict["best_state"]
        self.history = list(state_dict["history"])

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best copy back into ``model`` (no-op when no validation ran)."""
        if self.best_state is None:
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                params[name].copy_(value)


class FitClock(L.Callback):
    """Wall-clock seconds of the fit, from the first to the last training batch; a resumed
    fit adds the seconds up to the checkpoint it resumed from (kept in its state)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.before = 0.0  # seconds trained before a resume
        self.seconds = 0.0

    def state_dict(self) -> dict:
        return {"seconds": self._now()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = float(state_dict.get("seconds") or 0.0)

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = self._now()

    def _now(self) -> float:
        here = time.perf_counter() - self.start if self.start is not None else 0.0
        return self.before + here


class ThreadsWithinQuota(L.Callback):
    """torch's CPU threads within this process's share of a container's CPU quota, in each
    process of a multi-process fit (:func:`automask.hardware.share_cpu_quota`); once
    Lightning's launcher has set them, which it does from the host's cores."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        from ..hardware import share_cpu_quota

        share_cpu_quota(int(getattr(trainer.strategy, "num_processes", 1) or 1))


class RunFolderCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing in the checkpoint's own folder.

    Lightning's ``TorchCheckpointIO`` writes the whole file into the system's temporary
    folder first (``$TMPDIR``: often small on a cluster, whatever room the run folder has)
    and drops a ``PermissionError`` there. Here the checkpoint is serialised in memory, as
    Lightning does, and written by :func:`~automask.utils.atomic_write` beside its path, so
    that an error (a full disk, a folder made read-only) names the checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options is not supported when saving a checkpoint")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_write(path, "wb") as fh:
            fh.write(buffer.getbuffer())


def use_run_folder_io(trainer: L.Trainer) -> None:
    """Give ``trainer``'s strategy :class:`RunFolderCheckpointIO` where it has Lightning's
    default writer (a strategy with a writer of its own keeps it)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = RunFolderCheckpointIO()


class EpochCheckpoint(L.Callback):
    """Write a resume checkpoint at the end of every training epoch, atomically.

    The checkpoint is Lightning's (loops, optimiser, schedule, callbacks' states), with
    the model's frozen weights left out by :meth:`SegmentationModule.on_save_checkpoint`.
    It is written beside ``path`` and renamed onto it, so an interrupted write never
    replaces the previous epoch's checkpoint. In a distributed fit only the global rank
    0 writes it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "stopped", None) is not None:
            return  # the last epoch's checkpoint stays: this one diverged
        if isinstance(trainer.strategy.checkpoint_io, RunFolderCheckpointIO):
            # Collective in a distributed fit (every process enters it); only rank 0
            # writes, atomically, beside the path
            trainer.save_checkpoint(self.path)
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.part")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
