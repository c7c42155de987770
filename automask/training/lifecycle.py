"""The run directory during a fit: lock, overwrite and resume rules, cleanup on failure.

:class:`FitRun` is entered after every argument and data row has been validated. It
creates the run directory, takes its lock, refuses to replace an existing predictor unless
asked to, and on failure removes what this fit created, except the resumable state of an
interrupted fit, and gives back the training logs of the predictor it was to replace.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import lightning as L

from ..errors import ConfigError, TrainingDivergedError
from ..saving import has_predictor, run_lock
from ..utils import remove_empty_folders
from .state import FitState

log = logging.getLogger("automask")

_SEED_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")  # set by lightning.seed_everything


@contextlib.contextmanager
def _seed_env_restored():
    """Put Lightning's seed variables back as they were: a fit leaves no seed behind for the
    caller's later Lightning runs and subprocesses (its own DDP processes inherit it)."""
    before = {key: os.environ.get(key) for key in _SEED_ENV}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class FitRun(contextlib.AbstractContextManager):
    """Context of one fit into ``path``.

    Parameters
    ----------
    path : Path
        The run directory (also the predictor directory); kept as an absolute path, with
        ``~`` expanded.
    overwrite : bool
        Replace an existing predictor or interrupted fit in ``path``. The old predictor
        stays complete and loadable until the new one replaces it.
    resume : bool
        Continue the interrupted fit in ``path``.
    writer : bool, default True
        False in the processes of a distributed fit other than the global rank 0 (see
        :mod:`automask.training.distributed`): they write nothing into ``path``, check
        nothing there (the writer does), and read the interrupted fit's state only to
        resume.
    """

    def __init__(self, path: Path, *, overwrite: bool, resume: bool, writer: bool = True):
        self.writer = writer
        path = Path(path).expanduser().absolute()  # valid after a change of directory
        if overwrite and resume:
            raise ConfigError("pass either overwrite=True or resume=True, not both")
        if writer and path.exists() and not path.is_dir():
            raise ConfigError(f"run path {str(path)!r} exists and is not a folder")
        if writer and resume and not FitState(path).exists():
            what = ("holds a completed predictor" if has_predictor(path)
                    else "holds no interrupted fit")
            raise ConfigError(f"nothing to resume: {str(path)!r} {what}")
        self.path = path
        self.overwrite = overwrite
        self.resume = resume
        self.state = FitState(path)
        self._created_top: Path | None = None
        self._before: set[str] = set()
        self._before_logs: set[str] = set()
        self._lock = None
        self._trained = False  # whether this call got as far as training
        # set by the fit once its predictor is committed (the folder's pointer names it):
        # an interruption after that leaves a finished fit, not one to resume
        self.committed = False

    def __enter__(self) -> "FitRun":
        if not self.writer:
            return self
        for p in [self.path, *self.path.parents]:
            if p.exists():
                break
            self._created_top = p
        self.path.mkdir(parents=True, exist_ok=True)
        self._before = {e.name for e in self.path.iterdir()}
        logs = self.path / "logs"
        self._before_logs = {e.name for e in logs.iterdir()} if logs.is_dir() else set()
        self._lock = run_lock(self.path, "fit")
        try:
            self._lock.__enter__()
        except BaseException:
            self._lock = None  # the holder owns the folder now: remove nothing
            raise
        try:
            self._check()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _check(self) -> None:
        if self.resume:
            if not self.state.exists():  # it finished while we waited for the lock
                raise ConfigError(f"nothing to resume: {str(self.path)!r} holds no "
                                  "interrupted fit")
            self._unpark_logs()
            return
        if self.overwrite:
            return
        if has_predictor(self.path):
            raise ConfigError(
                f"{str(self.path)!r} already holds a predictor; pass overwrite=True "
                "(--overwrite) to replace it, or choose another path"
            )
        if self.state.exists():
            raise ConfigError(
                f"{str(self.path)!r} holds an interrupted fit; pass resume=True (--resume) to "
                "continue it or overwrite=True (--overwrite) to start again"
            )

    def train_candidates(self, plan, *, seed: int, verbosity: int,
                         deadline: float | None) -> tuple[dict, dict]:
        """Train every unfinished candidate of ``plan``; finished ones are read back.

        Returns ``(records, loaded)``: the record of each trained candidate, and the last
        trained model by name. Raises TrainingDivergedError when every candidate was
        dropped, ConfigError when ``deadline`` left no time for any.
        """
        from ..hardware import ready_cpu_threads

        ready_cpu_threads()
        with _seed_env_restored():
            return self._train_candidates(plan, seed=seed, verbosity=verbosity,
                                          deadline=deadline)

    def _train_candidates(self, plan, *, seed: int, verbosity: int,
                          deadline: float | None) -> tuple[dict, dict]:
        from .plan import locate_weights
        from .recipe import train_candidate

        from . import distributed

        records, loaded, dropped = {}, {}, []
        reserve = None  # seconds a candidate spent on all but training, once measured
        # Outside a resumed fit, another process's state is never read: in a new fit the
        # writer may not have cleared an earlier fit's files yet.
        finished = {name: self.state.finished(name) if self.writer or self.resume else None
                    for name, _ in plan.candidates}
        if self.resume:  # a damaged epoch checkpoint is named before any training
            for name, _ in plan.candidates:
                if finished[name] is None:
                    self.state.check_checkpoint(name)
        weights = locate_weights([(n, c) for n, c in plan.candidates if finished[n] is None],
                                 progress=verbosity >= 2)
        if self.writer and self.resume:  # it trains on the weights its first part did
            self.state.check_weights(weights)
        elif self.writer:
            self.state.record_weights(weights)
        # from here on it trains: a failure keeps its epochs for a resume, and says so (a
        # resume refused above for a damaged checkpoint or other weights has nothing to add)
        self._trained = True
        for i, (name, cfg) in enumerate(plan.candidates):
            done = finished[name]
            if done is not None:  # finished before an interruption
                if isinstance(done, str):
                    dropped.append(done)
                else:
                    records[name] = done
                continue
            budget = None
            if deadline is not None:
                budget = (deadline - time.monotonic()) / (len(plan.candidates) - i)
                budget = distributed.broadcast(budget)  # every process follows rank 0's clock
                if budget <= 0:
                    warnings.warn(f"time_limit reached: candidate {name!r} was not trained",
                                  stacklevel=3)
                    continue
            run_seed = seed if cfg.env.seed is None else cfg.env.seed
            L.seed_everything(run_seed, workers=True, verbose=False)
            began = time.monotonic()
            outcome = train_candidate(
                name, cfg, plan.spec, plan.tuning_spec, run_dir=self.path, state=self.state,
                seed=run_seed, split_seed=seed, eval_metric=plan.metric,
                budget=budget, verbosity=verbosity, writer=self.writer,
                resuming=self.resume, reserve=reserve,
            )
            if outcome.record is not None:  # what the next share keeps for all but training
                reserve = max(0.0, time.monotonic() - began - outcome.trained_s)
            if self.writer:
                self.state.finish(name, outcome.record, outcome.dropped)
            if outcome.record is None:
                dropped.append(outcome.dropped)
                continue
            records[name] = outcome.record
            loaded = {name: outcome.model}
        if not records:
            if dropped:
                raise TrainingDivergedError(
                    "no candidate trained; nothing was saved: " + "; ".join(dropped))
            raise ConfigError("no candidate could be trained within time_limit")
        return records, loaded

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.writer:
            return
        keep = exc_type is not None and not self.committed and self.state.has_progress()
        try:
            if exc_type is None or self.committed:  # the stashed logs were the replaced fit's
                self.state.remove()
            elif keep:
                with contextlib.suppress(OSError):  # never in place of the fit's own error
                    self._park_logs()
                if self._trained:  # not for a resume refused before it trained
                    log.warning("the completed epochs are kept in %s; fit(..., resume=True) "
                                "(automask fit --resume) continues the fit", self.path)
            else:
                self._restore_logs()
                self._remove_created()
        finally:
            if self._lock is not None:
                self._lock.__exit__(None, None, None)
                self._lock = None
        if exc_type is not None and not keep and not self.committed \
                and self._created_top is not None:
            # the run folder is this fit's (it held the lock); the folders above it go
            # only while empty: another fit of a sweep may have saved beside it
            shutil.rmtree(self.path, ignore_errors=True)
            remove_empty_folders(self.path.parent, self._created_top)

    def _park_logs(self) -> None:
        """An interrupted fit that replaces a predictor: its own logs wait in the fit's
        state, and the predictor's come back (:meth:`FitState.park_logs`), so that its
        history, and a copy saved elsewhere, are its own until the fit resumes."""
        logs, replaced = self.path / "logs", self.state.replaced_logs_dir
        if not replaced.is_dir() or not logs.is_dir():
            return  # no predictor's logs were set aside
        ours = [f.name for f in logs.iterdir()
                if f.name not in self._before_logs or (replaced / f.name).exists()]
        self.state.park_logs(logs, ours)

    def _unpark_logs(self) -> None:
        """A resumed fit takes its parked logs back (:meth:`FitState.unpark_logs`); the
        predictor's logs of those candidates are set aside again."""
        from .recipe import _log_folders

        parked = self.state.parked_logs_dir
        if not parked.is_dir():
            return
        names = set()
        for folder in parked.iterdir():
            base, sep, n = folder.name.rpartition("-resumed-")
            names.add(base if sep and n.isdigit() else folder.name)
        self.state.unpark_logs(self.path / "logs", _log_folders(self.path, names))

    def _restore_logs(self) -> None:
        """The training logs as before this failed fit: the folders it created go, and
        those of the predictor it was to replace come back (see
        :meth:`FitState.stash_logs`)."""
        logs = self.path / "logs"
        if self._created_top is not None or "logs" not in self._before or not logs.is_dir():
            return  # created by this fit: removed whole with the rest
        for folder in logs.iterdir():
            if folder.name not in self._before_logs:
                shutil.rmtree(folder, ignore_errors=True)
        self.state.restore_logs(logs)

    def _remove_created(self) -> None:
        """Remove the entries of the run directory that this fit created."""
        if self._created_top is not None or not self.path.is_dir():
            return  # the whole folder goes once the lock is released
        for entry in self.path.iterdir():
            if entry.name not in self._before and not entry.name.startswith(".automask.lock"):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def configure_logging(verbosity: int) -> None:
    """automask's messages at INFO from verbosity 1; Lightning's only from verbosity 3."""
    log.setLevel(logging.INFO if verbosity >= 1 else logging.WARNING)
    lightning_level = logging.INFO if verbosity >= 3 else logging.WARNING
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(lightning_level)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("automask: %(message)s"))
        log.addHandler(handler)
