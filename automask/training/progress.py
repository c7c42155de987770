"""What a fit prints: one line per epoch per candidate, and a summary at the end.

Verbosity (``SemanticSegmentor(verbosity=...)``):

- 0: silent;
- 1: the epoch lines and the end-of-fit summary;
- 2 (default): the same, plus Lightning's progress bar when stdout is a terminal (never in
  a file or a CI log, so that no carriage returns end up there);
- 3: also Lightning's own messages and model summary (debugging).

An epoch line reads::

    [method=lora]  epoch 3/10  train_loss 0.4123  val_iou 0.6120  best 0.6120 (epoch 3)
    elapsed 12s  eta 28s

(on one line).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning as L


def show_bar(verbosity: int) -> bool:
    """Whether Lightning's progress bar is shown: verbosity >= 2 and stdout is a terminal."""
    stream = sys.stdout
    return verbosity >= 2 and stream is not None and hasattr(stream, "isatty") and stream.isatty()


def progress_callbacks(name: str, verbosity: int, monitor: str | None = None) -> list[L.Callback]:
    """Callbacks that print a fit's progress at ``verbosity``.

    At verbosity 0 the epoch lines are kept but not printed: their state (the best score so
    far) is part of every resume checkpoint, so that a fit resumed at another verbosity
    finds the callbacks it was checkpointed with.

    Parameters
    ----------
    name : str
        Candidate name shown at the start of each line.
    verbosity : int
        0 silent; >= 1 one line per epoch.
    monitor : str, optional
        Logged validation metric (e.g. ``"val_iou"``); the first ``val_*`` metric when None.
    """
    return [EpochLines(name, monitor=monitor, silent=verbosity < 1)]


def format_seconds(seconds: float | None) -> str:
    """``"42s"``, ``"3m05s"``, ``"1h02m"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class EpochLines(L.Callback):
    """Print one plain line per training epoch (no carriage returns, flushed at once).

    The line holds the candidate, the epoch out of the maximum, the mean training loss of
    the epoch, the latest validation score, the best score so far and its epoch, the time
    since training started and an estimate of the time left (from the mean epoch time,
    capped by the fit's time limit when there is one).

    Parameters
    ----------
    name : str
        Candidate name.
    monitor : str, optional
        Validation metric to report; the first logged ``val_*`` metric when None.
    higher_is_better : bool, optional
        Direction of ``monitor``; looked up in :data:`automask.metrics.HIGHER_IS_BETTER`
        when None.
    stream : file-like, optional
        Where the lines go; ``sys.stdout`` (looked up at print time) when None.
    silent : bool
        Keep the lines in :attr:`lines` without printing them.
    """

    def __init__(self, name: str, monitor: str | None = None,
                 higher_is_better: bool | None = None, stream: Any = None,
                 silent: bool = False):
        self.name = name
        self.silent = silent
        self.monitor = monitor
        self.higher_is_better = higher_is_better
        self.stream = stream
        self.lines: list[str] = []
        self._start: float | None = None
        self._loss_sum = 0.0
        self._loss_count = 0
        self._best: float | None = None
        self._best_epoch: int | None = None
        self._first_epoch = 0
        self._elapsed_before = 0.0  # seconds trained before a resume
        if not silent:
            from tqdm import tqdm

            # tqdm makes its write lock (a multiprocessing lock: milliseconds) at its first
            # write; a Ctrl-C that landed there left it half made, and tqdm's cleanup then
            # raised AttributeError in place of the KeyboardInterrupt.
            tqdm.get_lock()

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The best score so far, its epoch and the seconds elapsed, kept in resume
        checkpoints, so that a resumed fit's lines go on from them."""
        return {"best": self._best, "best_epoch": self._best_epoch, "elapsed": self._elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._best = state_dict.get("best")
        self._best_epoch = state_dict.get("best_epoch")
        self._elapsed_before = float(state_dict.get("elapsed") or 0.0)

    # ------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self._first_epoch = trainer.current_epoch  # above 0 in a resumed fit

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loss_sum, self._loss_count = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(pl_module, "stopped", None) is not None:
            return  # diverged: the steps after it return a stand-in zero, not a loss
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
            if math.isfinite(value):
                self._loss_sum += value
                self._loss_count += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before the epoch's resume checkpoint is written, which keeps the best so far
        if not trainer.sanity_checking:
            self._note_best(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        line = self._line(trainer)
        self.lines.append(line)
        self._write(line)

    # ---------------------------------------------------------- helpers
    def _score(self, trainer: L.Trainer) -> tuple[str | None, float | None]:
        metrics = trainer.callback_metrics
        key = self.monitor
        if key is None:
            key = next((k for k in metrics if k.startswith("val_")), None)
        if key is None or key not in metrics:
            return key, None
        return key, float(metrics[key])

    def _note_best(self, trainer: L.Trainer) -> None:
        """Take the latest validation score as the best so far when it is better."""
        key, score = self._score(trainer)
        if key is None or score is None or math.isnan(score):
            return
        epoch = trainer.current_epoch + 1  # 1-based, as in the lines
        if self._best is None or (score > self._best if self._higher(key) else
                                  score < self._best):
            self._best, self._best_epoch = score, epoch

    def _elapsed(self) -> float:
        """Seconds trained so far, before a resume included."""
        here = time.monotonic() - self._start if self._start is not None else 0.0
        return self._elapsed_before + here

    def _higher(self, key: str) -> bool:
        if self.higher_is_better is not None:
            return self.higher_is_better
        from ..metrics import HIGHER_IS_BETTER

        return HIGHER_IS_BETTER.get(key.removeprefix("val_"), True)

    def _line(self, trainer: L.Trainer) -> str:
        epoch = trainer.current_epoch + 1  # 1-based for people
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        parts = [f"[{self.name}]", f"epoch {epoch}/{max_epochs or '?'}"]
        if getattr(getattr(trainer, "lightning_module", None), "stopped", None) is not None:
            parts.append("diverged (non-finite loss): stopped, its best epoch kept")
            return "  ".join(parts)  # not the last validation's score, as if this epoch's
        if self._loss_count:
            parts.append(f"train_loss {self._loss_sum / self._loss_count:.4f}")
        key, score = self._score(trainer)
        if key is not None and score is not None and not math.isnan(score):
            self._note_best(trainer)  # normally done at the validation's end already
            parts.append(f"{key} {score:.4f}")
            parts.append(f"best {self._best:.4f} (epoch {self._best_epoch})")
        elif key is not None:
            parts.append(f"{key} -")
        here = time.monotonic() - (self._start or time.monotonic())  # in this process
        eta = None
        if max_epochs is not None:  # from the epochs this process has trained
            eta = here / max(1, epoch - self._first_epoch) * max(0, max_epochs - epoch)
        elapsed = self._elapsed_before + here
        remaining = _time_remaining(trainer)
        if remaining is not None:
            eta = remaining if eta is None else min(eta, remaining)
        parts += [f"elapsed {format_seconds(elapsed)}", f"eta {format_seconds(eta)}"]
        return "  ".join(parts)

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stdout
        if stream is None or self.silent:
            return
        from tqdm import tqdm

        # tqdm.write clears and redraws an active progress bar around the line (terminal
        # only); without a bar it is a plain write.
        try:
            tqdm.write(line, file=stream)
            stream.flush()
        except BrokenPipeError:  # the reader is gone (| head -1): train on, unheard
            self.silent = True


def _time_remaining(trainer: L.Trainer) -> float | None:
    """Seconds left under the trainer's ``max_time``, None without one."""
    from lightning.pytorch.callbacks import Timer

    for callback in trainer.callbacks:
        if isinstance(callback, Timer):
            left = callback.time_remaining("train")
            return None if left is None else max(0.0, float(left))
    return None


def fit_summary(seg) -> dict[str, Any]:
    """What a fit produced, as a dict (see :meth:`SemanticSegmentor.fit_summary`).

    Epochs count from 1, as in the printed lines; times are seconds.
    """
    names = list(seg.models_)
    return {
        "task": seg.task_,
        "num_classes": seg.num_classes_,
        "classes": list(seg.classes_),
        "eval_metric": seg.eval_metric_,
        "candidates": names,
        "best_model": seg.best_model_,
        "val_scores": {n: seg.models_[n].get("val_score") for n in names},
        "best_epochs": {n: _one_based(seg.models_[n].get("best_epoch")) for n in names},
        "epochs": {n: seg.models_[n].get("epochs") for n in names},
        "fit_times": {n: seg.models_[n].get("fit_time") for n in names},
        "stopped": {n: seg.models_[n].get("stopped") for n in names},
        "methods": {n: seg.models_[n]["config"].peft.method for n in names},
        "fit_time": getattr(seg, "fit_time_", None),
        "path": str(seg.path_),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The text printed at the end of a fit, from :func:`fit_summary`'s dict."""
    metric = summary["eval_metric"]
    width = max(len(n) for n in summary["candidates"])
    lines = [
        f"fit done in {format_seconds(summary['fit_time'])}: {len(summary['candidates'])} "
        f"candidate(s), {summary['task']} task with {summary['num_classes']} classes",
    ]
    for name in summary["candidates"]:
        score = summary["val_scores"][name]
        text = "-" if score is None else f"{score:.4f}"
        mark = "  <- best" if name == summary["best_model"] else ""
        lines.append(
            f"  {name:<{width}}  val_{metric} {text}  best epoch "
            f"{summary['best_epochs'][name] or '-'}  fit "
            f"{format_seconds(summary['fit_times'][name])}{mark}"
        )
        stopped = (summary.get("stopped") or {}).get(name)
        if stopped:  # time_limit, patience or a non-finite loss: fewer epochs than asked
            lines.append(f"  {'':<{width}}  stopped: {stopped}")
    lines.append(f"best model: {summary['best_model']}; predictor saved in {summary['path']}")
    return "\n".join(lines)


def _one_based(index: int | None) -> int | None:
    """Epochs are counted from 1 for people (Lightning counts from 0)."""
    return None if index is None else int(index) + 1
