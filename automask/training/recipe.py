"""The Trainer recipe of one candidate: build, train (or resume), keep the best epoch.

:func:`train_candidate` builds the model and the data, trains with Lightning, writes a
resume checkpoint after every epoch, stops on a non-finite loss, and returns the model at
its best validation epoch with its :class:`CandidateRecord`.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import os
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from ..config import Config, image_value_range, parse_class_weights
from ..errors import ConfigError
from ..hardware import resolve_env
from ..metrics import HIGHER_IS_BETTER
from ..saving import candidate_of_log_folder, log_folder_name
from .record import CandidateRecord
from .state import STATE_DIR, FitState

log = logging.getLogger("automask")


@dataclass
class Outcome:
    """A trained candidate (model and record), or why it was dropped."""

    model: torch.nn.Module | None
    record: CandidateRecord | None
    dropped: str = ""
    trained_s: float = 0.0  # seconds this call trained (a resume's earlier part not counted)


def train_candidate(name: str, cfg: Config, *args, **kwargs) -> Outcome:
    """Train candidate ``name`` (:func:`_train_candidate`), falling back on gradient
    checkpointing once when it runs out of memory without it.

    The fallback (``env.checkpointing_on_oom``, on by default) applies to single-process
    fits only: in a distributed fit the other processes would wait for the one that failed.
    The candidate is trained again from its last epoch checkpoint, and its record holds
    ``env.gradient_checkpointing=True``. Out of memory with checkpointing on, or with the
    fallback off, raises the error with a note on what to change.
    """
    import lightning as L

    from ..hardware import fit_world_size

    started = time.monotonic()
    try:
        return _train_candidate(name, cfg, *args, **kwargs)
    except torch.OutOfMemoryError as exc:
        retry = (cfg.env.checkpointing_on_oom and not cfg.env.gradient_checkpointing
                 and fit_world_size(cfg) == 1)
        if not retry:
            less = ("a smaller optim.batch_size (optim.effective_batch_size keeps the batch "
                    "the optimiser sees), model.input_size or model.backbone")
            if not cfg.env.gradient_checkpointing:
                less = "env.gradient_checkpointing=True, " + less
            exc.add_note(f"automask: candidate {name!r} ran out of memory; what needs less "
                         f"of it: {less}")
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # Outside the except block: the failed attempt's frames, and their tensors, are gone.
    _free_memory()
    warnings.warn(f"candidate {name!r} ran out of memory without gradient checkpointing "
                  f"({message}); training it again with env.gradient_checkpointing=True "
                  "(set it yourself to skip the first try)", stacklevel=2)
    cfg = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, gradient_checkpointing=True))
    if kwargs.get("budget") is not None:  # the failed try spent part of the time limit
        kwargs["budget"] = max(1.0, kwargs["budget"] - (time.monotonic() - started))
    L.seed_everything(kwargs["seed"], workers=True, verbose=False)  # as a first try would
    return _train_candidate(name, cfg, *args, **kwargs)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_candidate(
    name: str,
    cfg: Config,
    spec,
    tuning_spec,
    *,
    run_dir: Path,
    state: FitState,
    seed: int,
    eval_metric: str,
    budget: float | None,
    verbosity: int,
    split_seed: int | None = None,
    writer: bool = True,
    resuming: bool = False,
    reserve: float | None = None,
) -> Outcome:
    """Train candidate ``name``; resume from its epoch checkpoint when there is one.

    ``seed`` drives augmentation and batch order (the run's ``env.seed``); the holdout
    split uses ``split_seed`` (the predictor's seed, the same for every run; default
    ``seed``). Raises KeyboardInterrupt when interrupted (Lightning exits on Ctrl-C
    otherwise); the epoch checkpoint written so far stays for a later resume.

    ``writer`` is False in the processes of a distributed fit other than rank 0: they
    train their share of the data and write nothing (no cache files, logs, checkpoints
    or weights; see :mod:`automask.training.distributed`).

    ``budget`` (seconds, None: no limit) is the candidate's share of ``time_limit``, of
    which ``reserve`` is expected to go to everything but training (building, restoring
    the best weights, writing them, timing predictions), as measured on the candidate
    before; None (the first): 5% of the share.
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.loggers import CSVLogger

    from ..data import AugmentConfig, SegmentationDataModule, split_spec
    from ..models import count_parameters
    from ..models.frozen import frozen_linears_in_bf16
    from ..prediction import throughput
    from ..saving import weights_filename, weights_to_save, write_weights
    from .builder import build_candidate_model
    from .callbacks import (BestTrainableWeights, EpochCheckpoint, FitClock, ThreadsWithinQuota,
                            use_run_folder_io)
    from .embeddings import EmbeddingCache, why_training_varies
    from .module import SegmentationModule
    from .progress import progress_callbacks, show_bar

    started = time.monotonic()
    cfg, env = resolve_env(cfg)
    if not writer:
        verbosity = min(verbosity, 0)  # one process reports: the writer
    model, base_params = build_candidate_model(cfg, spec.num_outputs,
                                               progress=verbosity >= 2)
    d = cfg.data
    if tuning_spec is None:  # the split uses the predictor's seed: the same for every run
        spec, tuning_spec = split_spec(spec, d.holdout_frac,
                                       seed if split_seed is None else split_seed)
    datamodule = SegmentationDataModule(
        spec,
        input_size=cfg.model.input_size,
        batch_size=cfg.optim.batch_size,
        tuning_spec=tuning_spec,
        holdout_frac=d.holdout_frac,
        seed=seed,
        augment=AugmentConfig(hflip=d.hflip, vflip=d.vflip, scale_range=(d.scale_min, d.scale_max),
                              rotate_degrees=d.rotate_degrees, color_jitter=d.color_jitter),
        num_workers=d.num_workers,
        # decoded samples beyond the memory budget: with the fit's state, which goes once
        # the predictor is saved (an interrupted fit resumes with them)
        cache_dir=run_dir / STATE_DIR / "cache" / f"{cfg.model.input_size}" if writer else None,
        cache_memory_mb=d.cache_memory_mb,
        large_images=d.large_images,
        prompts=d.prompts, prompt_rate=d.prompt_rate,
        value_range=image_value_range(cfg),
        resize=d.resize, interpolation=d.interpolation,
    )
    embedding_cache = None
    if d.embedding_cache_mb > 0 and model.encoder_is_frozen():
        varies = why_training_varies(datamodule.augment)
        embedding_cache = EmbeddingCache(d.embedding_cache_mb, cfg.model.input_size,
                                         d.large_images, training_repeats=varies is None)
        log.info("%s: the image encoder is frozen; the embeddings of %s are kept and reused "
                 "(up to %d MiB, 'data.embedding_cache_mb')", name,
                 "the validation images" if varies else "the images that repeat",
                 d.embedding_cache_mb)
        if varies:
            log.info("%s: training images change in every epoch (%s): their embeddings are "
                     "computed each time", name, varies)
    module = SegmentationModule(model, task=spec.task, num_classes=spec.num_classes,
                                optim=cfg.optim, val_metric=eval_metric,
                                class_weight=_class_weight(name, cfg, datamodule),
                                embedding_cache=embedding_cache)
    monitor = f"val_{eval_metric}"
    higher = HIGHER_IS_BETTER[eval_metric]
    best = BestTrainableWeights(monitor, higher_is_better=higher)
    clock = FitClock()
    ckpt = state.checkpoint_path(name)
    # Another process reads the writer's checkpoint only in a resumed fit: in a new one it
    # may be an earlier fit's, not yet removed.
    resume_from = ckpt if (writer or resuming) and ckpt.is_file() else None
    callbacks: list = [best, clock, EpochCheckpoint(ckpt), ThreadsWithinQuota(),
                       *progress_callbacks(name, verbosity, monitor)]
    if cfg.optim.patience:
        callbacks.append(EarlyStopping(monitor, patience=cfg.optim.patience,
                                       mode="max" if higher else "min"))
    max_time = None
    if budget is not None:
        # Keep a share of the budget for what follows training: restoring the best
        # weights, timing predictions and saving; at least a second of training.
        seconds = training_seconds(budget, time.monotonic() - started, reserve)
        # timedelta holds at most 999,999,999 days; a longer limit never ends a fit anyway
        max_time = timedelta(seconds=min(seconds, timedelta.max.days * 86400.0))
    try:
        trainer = L.Trainer(
            accelerator=env["accelerator"],
            devices=env["devices"],
            num_nodes=cfg.env.num_nodes,
            strategy=env["strategy"],
            precision=env["precision"],
            max_epochs=cfg.optim.max_epochs,
            max_time=max_time,
            accumulate_grad_batches=env["accumulate"],
            gradient_clip_val=cfg.optim.grad_clip or None,
            val_check_interval=cfg.optim.val_check_interval,
            num_sanity_val_steps=0,
            callbacks=callbacks,
            logger=CSVLogger(run_dir, name="logs",
                             version=_log_version(run_dir, name, resume_from)) if writer else False,
            use_distributed_sampler=False,  # the data module shards (EpochSampler, ShardSampler)
            enable_checkpointing=False,
            enable_progress_bar=show_bar(verbosity),
            enable_model_summary=verbosity >= 3,
            log_every_n_steps=1,
            deterministic=False,
        )
        use_run_folder_io(trainer)  # epoch checkpoints written in the run folder only
    except MisconfigurationException as exc:
        raise ConfigError(f"the 'env.*' options of candidate {name!r} do not fit this "
                          f"machine: {exc}") from exc
    if writer and resume_from is None:
        # a fresh candidate: earlier logs (of the predictor an overwriting fit replaces) wait
        # in the fit's state until the new predictor is saved, and come back if it fails
        state.stash_logs(_log_folders(run_dir, {name}))
    # On a CPU under bf16 autocast the frozen linear weights are cast once for the whole
    # fit, not in every forward; the float32 originals wait in a temporary file and come
    # back when it ends. Not for a random backbone, whose frozen weights go into the resume
    # checkpoints.
    hold = (env["accelerator"] == "cpu" and env["precision"] == "bf16-mixed"
            and model.checkpoint_info.get("source") != "random")
    try:
        frozen_hold = frozen_linears_in_bf16(model, enabled=hold, park=True)
        with warnings.catch_warnings(), frozen_hold:
            # Lightning 2.6 on torch >= 2.10 warns about its own use of a torch pytree API.
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec")
            # The module's hook (the embedding cache's input keys) is the one meant to run.
            warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer`")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into sys.exit(1)
            _restore_sigint()
            raise KeyboardInterrupt from None
        raise
    except Exception as exc:
        if _during_ctrl_c(exc):  # cleanup code that failed under the Ctrl-C: still a Ctrl-C
            _restore_sigint()
            raise KeyboardInterrupt from exc
        raise
    if embedding_cache is not None:
        seen = embedding_cache.hits + embedding_cache.misses
        log.info("%s: %d of %d encoder passes saved by the kept embeddings (%d kept, %.0f MiB)",
                 name, embedding_cache.hits, seen, len(embedding_cache),
                 embedding_cache.used_bytes / 2**20)
    stopped = module.stopped  # a non-finite loss or output, in any process
    if stopped is not None:
        if best.best_state is None:
            reason = f"candidate {name!r} was dropped before any validation: {stopped}"
            warnings.warn(reason, stacklevel=4)
            return Outcome(None, None, dropped=reason)
        warnings.warn(f"candidate {name!r} stopped: {stopped}; keeping its best epoch "
                      f"({best.best_epoch + 1})", stacklevel=4)  # from 1, as printed
    else:
        stopped = _early_end(trainer, cfg)
    best.restore(model)
    model.eval()
    trainable, total = count_parameters(model)
    if writer:
        weights = write_weights(model, state.models_dir, name)
    else:  # the writer's file; this process keeps the model in memory
        weights = {"weights": weights_filename(name), "weights_scope": weights_to_save(model)[0],
                   "weights_sha256": ""}
    record = CandidateRecord(
        config=cfg,
        val_score=best.best_score,
        best_epoch=best.best_epoch,
        epochs=trainer.current_epoch,
        fit_time=time.monotonic() - started + clock.before,  # + training before a resume
        train_time=clock.seconds,
        trainable_params=trainable,
        total_params=total,
        base_params=base_params,
        checkpoint=dict(model.checkpoint_info),
        history=best.history,
        stopped=stopped,
        **weights,
    )
    late = budget is not None and time.monotonic() - started > 0.97 * budget
    if writer and not late:
        record.predict_images_per_s = throughput(model, cfg, spec.task, datamodule.val_spec)
    return Outcome(model, record, trained_s=clock.seconds - clock.before)


def training_seconds(budget: float, spent: float, reserve: float | None) -> float:
    """Seconds of training in a candidate's share ``budget`` of ``time_limit``, ``spent``
    seconds of it gone on building: the rest, less what the candidate will spend after
    training (``reserve``, measured on the candidate before, less ``spent``, both being
    part of it; None: 5% of the share), and at least one second."""
    after = 0.05 * budget if reserve is None else max(0.0, reserve - spent)
    return max(1.0, budget - spent - after)


def _early_end(trainer, cfg: Config) -> str | None:
    """Why a candidate that did not diverge trained fewer than ``optim.max_epochs`` epochs:
    its share of ``time_limit`` ran out, or ``optim.patience`` validations brought no
    improvement; None when it trained them all."""
    from lightning.pytorch.callbacks import EarlyStopping, Timer

    epochs = trainer.current_epoch  # completed epochs (a partial last one not counted)
    if epochs >= cfg.optim.max_epochs:
        return None
    done = f"after {epochs} of {cfg.optim.max_epochs} epochs"
    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping) and callback.wait_count >= callback.patience:
            return (f"no better validation score in {cfg.optim.patience} validation(s) "
                    f"(optim.patience) {done}")
        if isinstance(callback, Timer) and callback.time_remaining() is not None \
                and callback.time_remaining() <= 0:
            return f"its share of time_limit ran out {done}"
    return None


def _log_version(run_dir: Path, name: str, resume_from: Path | None) -> str:
    """``<name>``'s folder name for a fresh candidate; a new folder per resume."""
    folder = log_folder_name(name)
    if resume_from is None:
        return folder
    n = 1
    while (run_dir / "logs" / f"{folder}-resumed-{n}").exists():
        n += 1
    return f"{folder}-resumed-{n}"


def _log_folders(run_dir: Path, names: set[str], others: bool = False) -> list[Path]:
    """The folders under ``<run_dir>/logs`` of the candidates ``names`` (``<name>`` and its
    ``<name>-resumed-N``), or with ``others`` those of every other candidate."""
    logs = run_dir / "logs"
    if not logs.is_dir():
        return []
    folders = []
    for folder in sorted(p for p in logs.iterdir() if p.is_dir()):
        base, sep, n = folder.name.rpartition("-resumed-")
        candidate = candidate_of_log_folder(base if sep and n.isdigit() else folder.name)
        if (candidate in names) != others:
            folders.append(folder)
    return folders


def prune_logs(run_dir: Path, names: list[str]) -> None:
    """Remove the training logs of candidates not in ``names`` (those of the fit a new one
    replaced), so that the history drawn from ``<run_dir>/logs`` is this fit's alone."""
    for folder in _log_folders(run_dir, set(names), others=True):
        shutil.rmtree(folder, ignore_errors=True)


def copy_logs(src_run: Path, dest_run: Path, names: list[str], replace_all: bool) -> None:
    """Give ``<dest_run>/logs`` the training logs of candidates ``names`` from
    ``<src_run>/logs`` (a predictor saved to another folder keeps its history).

    The candidates' old folders there go first; with ``replace_all`` (``dest_run`` held
    another predictor), the other candidates' logs go too, so the history drawn from
    ``dest_run`` is the saved predictor's alone. Each folder is copied under a temporary
    name and renamed into place.
    """
    if Path(src_run).resolve() == Path(dest_run).resolve():
        return
    stale = _log_folders(dest_run, set(names))
    if replace_all:
        stale += _log_folders(dest_run, set(names), others=True)
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    for folder in _log_folders(src_run, set(names)):
        if not (folder / "metrics.csv").is_file():
            continue
        dest = dest_run / "logs" / folder.name
        tmp = dest.with_name(f".{folder.name}.copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        os.replace(tmp, dest)


def _class_weight(name: str, cfg: Config, datamodule) -> torch.Tensor | None:
    """``optim.class_weights`` as a ``(K,)`` tensor, counted on the training split (see
    :func:`automask.losses.class_weights`); None when unset."""
    rule = parse_class_weights(cfg.optim.class_weights)
    if rule is None:
        return None
    from ..data.validation import class_pixels
    from ..losses import class_weights

    datamodule.setup("fit")  # the training split, which the counts are taken on
    spec = datamodule.train_spec
    weight = class_weights(rule, *class_pixels(spec))
    log.info("%s: class weights (%s) %s", name, cfg.optim.class_weights if isinstance(
        rule, str) else "given", ", ".join(f"{c} {w:.3g}" for c, w in zip(spec.class_names,
                                                                           weight.tolist())))
    return weight


def _during_ctrl_c(exc: BaseException) -> bool:
    """True when ``exc`` was raised while a KeyboardInterrupt was being handled (a library's
    ``finally`` block that failed because the interrupt cut its ``try`` short)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _restore_sigint() -> None:
    """Lightning ignores further Ctrl-C while it shuts down; give the default back."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
