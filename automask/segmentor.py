"""SemanticSegmentor: the three-line fit / predict / evaluate facade.

It follows scikit-learn's estimator contract: the constructor only stores its arguments,
``fit`` returns ``self``, learned state lives in attributes with a trailing underscore, and
a second ``fit`` starts from scratch.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator

from . import prediction, saving
from .data.arrays import as_files, naming, shown
from .errors import AutomaskError, ConfigError, DataValidationError, NotFittedError, SavedModelError
from .utils.signals import sigterm_as_interrupt
from .prediction import metric_conventions
from .tta import check_tta

log = logging.getLogger("automask")
_LOADING = threading.Lock()  # SemanticSegmentor._model: loading and merging a model


def _new_lock_in_forked_child() -> None:
    """A child forked while another thread loaded a model would wait forever for a lock
    that no thread of it holds: it starts with a free one."""
    global _LOADING
    _LOADING = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_forked_child)


class SemanticSegmentor(BaseEstimator):
    """Semantic segmentation with SAM and parameter-efficient fine-tuning.

    Parameters
    ----------
    label : str, default "label"
        DataFrame column holding mask paths.
    image : str, default "image"
        DataFrame column holding image paths.
    path : str or path-like, optional
        Run directory for logs, caches and the saved predictor; a fresh timestamped
        folder under ``./automask_runs/`` when None.
    eval_metric : str, optional
        Validation metric that selects the best epoch and the best candidate; default
        ``iou`` for binary and ``miou`` for multi-class tasks.
    seed : int, default 0
        Seed of splitting, augmentation and initialisation.
    verbosity : int, default 2
        0 silent, 1 a line per epoch and summaries, 2 also a progress bar on a terminal, 3 debug.

    Attributes
    ----------
    task_ : {"binary", "multiclass"}
    classes_ : list of str
        Class names, background first.
    num_classes_ : int
        Classes including background (2 for binary).
    config_ : Config
        Resolved configuration of the best model.
    best_model_ : str
        Name of the candidate used by default in predict and evaluate.
    models_ : dict of str to CandidateRecord
        Per candidate: its configuration, validation score, fit time and parameter counts.
    path_ : Path
        The run directory.
    eval_metric_ : str
        The validation metric that chose the best epoch and model.
    void_label_ : int or None
        The mask value left out of training and scores (``data.void_label``).
    color_map_ : dict or None
        The colour table or value map the masks were read through (pass it to
        :func:`automask.metrics.score_folders` for masks in the dataset's values).
    fit_time_ : float
        Seconds the fit took.

    Examples
    --------
    >>> seg = SemanticSegmentor(path="runs/polyp").fit(train_df, presets="tiny")  # doctest: +SKIP
    >>> masks = seg.predict(test_df)                                               # doctest: +SKIP
    >>> scores = seg.evaluate(test_df)                                             # doctest: +SKIP
    """

    def __init__(
        self,
        label: str = "label",
        image: str = "image",
        path: str | os.PathLike | None = None,
        eval_metric: str | None = None,
        seed: int = 0,
        verbosity: int = 2,
    ):
        self.label = label
        self.image = image
        self.path = path
        self.eval_metric = eval_metric
        self.seed = seed
        self.verbosity = verbosity

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        train_data: pd.DataFrame | str | os.PathLike,
        tuning_data: pd.DataFrame | str | os.PathLike | None = None,
        presets: str | None = "medium_quality",
        hyperparameters: dict[str, Any] | None = None,
        time_limit: float | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        color_map: dict[tuple[int, int, int], int] | dict[int, int] | None = None,
        *,
        overwrite: bool = False,
        resume: bool = False,
    ) -> "SemanticSegmentor":
        """Fit one model per candidate configuration and keep the best.

        Parameters
        ----------
        train_data : DataFrame or CSV path
            One row per image, with the image and label columns: file paths (relative paths
            are resolved against the CSV's folder, or the working directory for a
            DataFrame), or pictures in memory (numpy arrays, torch tensors, PIL images, the
            bytes of image files), which are kept as files in ``path``'s fit state folder
            until the fit completes. Another library's table (polars, pyarrow, a Hugging
            Face ``datasets`` split) is read through its ``to_pandas()``.
        tuning_data : DataFrame or CSV path, optional
            Validation data, as ``train_data``; when None, ``data.holdout_frac`` of
            ``train_data`` is held out.
        presets : str or None, default "medium_quality"
            One of :data:`automask.PRESETS`; None is the default, ``"medium_quality"`` (as
            AutoGluon reads ``presets=None``).
        hyperparameters : dict, optional
            Dotted keys merged over the preset; a list value trains one candidate per value.
        time_limit : float, optional
            Seconds for the whole fit, all candidates included.
        num_classes : int, optional
            Classes including background; inferred from the masks when None.
        class_names : sequence of str, optional
            Names of the classes, background first.
        color_map : dict, optional
            ``{(r, g, b): class_id}`` for masks stored as colour images, or
            ``{value: class_id}`` (a value map) to renumber the values of grey or palette
            masks (ADE20K's void 0 below classes 1..K: ``{0: 255, 1: 0, 2: 1, ...}``; 255
            is always ignored). Every colour or value the masks hold must be listed.
        overwrite : bool, default False
            Replace the predictor (or interrupted fit) already in ``path``; without it such
            a path is refused. The old predictor stays loadable until the new one is
            complete.
        resume : bool, default False
            Continue the interrupted fit in ``path`` (same data and options): finished
            candidates are kept, the running one restarts after its last completed epoch.

        Returns
        -------
        SemanticSegmentor
            ``self``, fitted.

        Raises
        ------
        ConfigError, DataValidationError
            Bad options or data, before anything is written.
        PathInUseError
            Another process is fitting or saving into ``path``.
        TrainingDivergedError
            Every candidate diverged (non-finite loss) before validating; nothing is saved.
        KeyboardInterrupt
            On Ctrl-C; the completed epochs are kept for ``resume=True``.
        """
        from .training.lifecycle import configure_logging

        from .config import check_time_limit

        started = time.monotonic()
        if presets is None:  # not the bare dataclass defaults, which no preset table shows
            presets = "medium_quality"
        self._check_params()
        run_dir = self._run_dir()
        self._check_writable(run_dir, "fit into")
        time_limit = check_time_limit(time_limit)  # NaN, inf or <= 0: ConfigError
        deadline = started + time_limit if time_limit is not None else None
        configure_logging(self.verbosity)
        # Pictures in memory become files named by content: temporary ones to validate, then
        # (once the run folder is ours) kept in the fit's state folder, which a resumed fit
        # reads and which goes when the fit completes.
        written: dict[str, str] = {}
        with as_files(train_data, [self.image, self.label], by_content=True,
                      written=written) as train_data, \
                as_files(tuning_data, [self.image, self.label], by_content=True,
                         written=written) as tuning_data:
            return self._fit(
                train_data, tuning_data, presets, hyperparameters, time_limit, num_classes,
                class_names, color_map, overwrite=overwrite, resume=resume, started=started,
                run_dir=run_dir, deadline=deadline, written=written)

    def _fit(self, train_data, tuning_data, presets, hyperparameters, time_limit,
             num_classes, class_names, color_map, *, overwrite: bool, resume: bool,
             started: float, run_dir: Path, deadline: float | None,
             written: dict[str, str]) -> "SemanticSegmentor":
        """:meth:`fit` once its arguments are checked and its pictures in memory are files
        (``written``: their temporary paths -> names, see :func:`automask.data.arrays.as_files`)."""
        from .training import distributed
        from .training.lifecycle import FitRun
        from .training.plan import plan_fit, relocate, select_best
        from .training.recipe import prune_logs

        plan = plan_fit(self.get_params(), train_data, tuning_data, presets, hyperparameters,
                        time_limit, num_classes, class_names, color_map)
        spec = plan.spec
        if plan.tuning_spec is None:  # a holdout that cannot be made fails now, not mid-fit
            from .data import split_spec

            for frac in sorted({cfg.data.holdout_frac for _, cfg in plan.candidates}):
                split_spec(spec, frac, self.seed)
        writer = distributed.is_writer(plan.world_size)  # rank 0 of a distributed fit
        run = FitRun(run_dir, overwrite=overwrite, resume=resume, writer=writer)
        with run, contextlib.ExitStack() as kept:
            # A fit refused for bad options, data or path leaves a fitted predictor as it
            # was; from here on, the fit starts from scratch.
            self._reset()
            moves = {}
            if writer:  # the other processes of a distributed fit read their own copies
                moves = {tmp: str(run.state.inputs_dir / name) for tmp, name in written.items()}
                plan = relocate(plan, moves)
            if writer and resume:  # in a distributed fit, rank 0 checks and records alone
                run.state.check_plan(plan.record)
            elif writer:
                run.state.start(plan.record, plan.frames)
            if moves:
                run.state.keep_inputs(moves)
                log.info("%d image(s) and mask(s) given in memory are kept as files in %s "
                         "until the fit completes", len(moves), run.state.inputs_dir)
                # warnings name the kept copies as they named the temporary files
                kept.enter_context(naming({new: shown(old) for old, new in moves.items()}))
            self.path_ = run.path
            self.task_ = spec.task
            self.num_classes_ = spec.num_classes
            self.classes_ = list(spec.class_names)
            self.eval_metric_ = plan.metric
            self.void_label_ = plan.void_label
            self.color_map_ = spec.color_map
            self._weights_dir = run.state.models_dir
            self.models_, self._loaded = run.train_candidates(
                plan, seed=self.seed, verbosity=self.verbosity,
                deadline=deadline)
            self.best_model_ = select_best(self.models_, self.eval_metric_)
            self.config_ = self.models_[self.best_model_].config
            self.fit_time_ = time.monotonic() - started
            if writer:
                self._weights_dir = saving.save_predictor(self, self.path_)
                run.committed = True  # from here on an interruption leaves this predictor
                saving.keep_weights_open(self)  # pickles and saves after the folder is gone
                # the replaced fit's other candidates' logs go once this fit is saved
                prune_logs(self.path_, [name for name, _ in plan.candidates])
        if plan.world_size > 1:
            self._follow_writer(writer)
        if self.verbosity >= 1 and writer:
            from .training.progress import format_summary

            with contextlib.suppress(BrokenPipeError):  # the reader is gone; saved anyway
                print(format_summary(self.fit_summary()), flush=True)
        return self

    # -------------------------------------------------------------- predict
    def predict(
        self,
        data: pd.DataFrame | str | os.PathLike | Sequence[str | os.PathLike],
        model: str | None = None,
        save_to: str | os.PathLike | None = None,
        *,
        overwrite: bool = False,
        tiling: str = "auto",
        points: Sequence[Any] | dict[Any, Any] | None = None,
        boxes: Sequence[Any] | dict[Any, Any] | None = None,
        tta: bool | str | Sequence[str] = False,
        values: str = "class_ids",
    ) -> list[np.ndarray] | pd.DataFrame:
        """Predict a mask per image, at each image's original size.

        Parameters
        ----------
        data : DataFrame, path, list of paths or folder, or images in memory
            Images to segment (a DataFrame needs the image column; a CSV or text file of
            paths one per line may leave out its header line). A folder's images come
            in the order of their paths sorted as Python sorts strings (``B.png`` before
            ``a.png``, ``im10.png`` before ``im2.png``); with ``save_to`` the returned
            DataFrame names each image beside its mask. A folder that holds
            only sub-folders (Cityscapes' ``val/<city>/``) gives the images below them; the
            masks of images that share a name keep the sub-folder (``out/a/1.png``). A
            pandas Series, a 1-D array or an iterator of paths
            (``Path("imgs").glob("*.png")``) is read as a list, in its order; a Series
            keeps its index (for prompts keyed by it and the DataFrame returned with
            ``save_to``). Images in memory: a numpy array or torch
            tensor of shape (H, W), (H, W, C) or (C, H, W), a PIL image, a batch
            (N, H, W, C) / (N, C, H, W), or lists and cells holding them; each is read as
            the same picture saved to a file would be (:mod:`automask.data.arrays`), and
            with ``save_to`` its mask is named by its position (``00000.png``).
        model : str, optional
            Candidate name (see :meth:`leaderboard`); the best by default.
        save_to : path-like, optional
            Folder to write lossless PNG masks named after the images (0/255 for binary,
            class indices for multi-class); then a DataFrame of image and mask paths is
            returned and no mask is kept in memory. Every destination is checked before
            anything is written: an input file (image, or mask of the label column) is
            never overwritten, and an existing file only with ``overwrite=True``.
        overwrite : bool, default False
            Replace mask files that already exist in ``save_to``.
        tiling : {"auto", "on", "off"}, default "auto"
            Sliding-window prediction at the original resolution for large images:
            "auto" follows the rule the model was trained with (``data.large_images``:
            by default, when the longer side exceeds 1.25 x the model input; never for a
            model trained on resized images, such as the paper presets'), "on" for every
            image larger than the input, "off" to resize every image to the input (see
            :mod:`automask.tiling`). Prompted images always take the whole-image path,
            so "on" together with prompts raises ConfigError; under "auto" or "off" the
            images without a prompt are predicted exactly as without prompts.
        points : list or dict, optional
            Binary models only. Point prompts per image: a list with one entry per row of
            ``data`` (None: no points), or a dict keyed by the data's index. An entry is
            ``(coords, labels)``: coords (N, 2) ``x, y`` in the image's original pixels
            (``0 <= x < W``, ``0 <= y < H``), labels (N,) of 1 (foreground) / 0
            (background).
        boxes : list or dict, optional
            Binary models only. One box per image, ``(x0, y0, x1, y1)`` in original
            pixels with ``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H``; same list / dict
            forms as ``points``. An image with neither points nor a box is predicted
            prompt-free, exactly as without prompts. See the README section "Prompts with
            a fine-tuned model" for what prompts mean for a model trained without them.
        tta : bool, str or list of str, default False
            Test-time augmentation: each image is also predicted mirrored, and the class
            probabilities, mirrored back, are averaged in before thresholding or argmax.
            True takes the flips the model was trained with (``data.hflip``,
            ``data.vflip``; the horizontal one when neither), or name them: ``"hflip"``,
            ``"vflip"``, ``["hflip", "vflip"]``. Each flip is one more forward pass per
            image. Not with prompts (see :mod:`automask.tta`).
        values : {"class_ids", "dataset"}, default "class_ids"
            What the masks hold. "class_ids": class ids as above. "dataset", for a model
            trained with a ``color_map``: the training masks' own values, the map read
            backwards: an ADE20K-style ``{0: 255, 1: 0, 2: 1, ...}`` gives back 1..K,
            Cityscapes' ``labelIds`` map gives labelIds, a colour map gives ``(H, W, 3)``
            RGB masks in its colours (written as RGB PNGs; grey PNGs otherwise, 16-bit
            for values above 255). Where the map merges several values into one class,
            the first listed stands for it. :func:`automask.data.io.read_mask` with the
            same ``color_map`` reads such masks back as the class ids; ``automask
            score`` takes the default's masks.

        Returns
        -------
        list of ndarray or DataFrame
            (H, W) uint8 masks ({0, 1} for binary, class indices for multi-class; with
            ``values="dataset"`` the dataset's values, uint16 where one exceeds 255, or
            (H, W, 3) uint8 colours for a colour map), or the DataFrame of written files
            when ``save_to`` is given.

        Raises
        ------
        ConfigError
            Prompts given to a multi-class model, or with ``tiling="on"`` or ``tta``; a bad
            ``tiling``, ``tta`` or ``values``; ``values="dataset"`` for a model trained
            without a ``color_map``.
        DataValidationError
            Bad data, or bad prompts (wrong length or shape, coordinates outside the image,
            labels other than 0/1, ``x1 <= x0``): the message names the row and the value.
            Everything is checked before any prediction.
        """
        self._check_fitted()
        check_tta(tta)  # a bad value fails before any image is read
        out = None if save_to is None else prediction.output_folder(
            save_to, overwrite, predictor=self.path_, option="save_to")
        table = prediction.value_table(values, self.task_, self.num_classes_,
                                       self.color_map_)
        frame, root = prediction.as_frame(data, self.image)
        with as_files(frame, [self.image]) as files:  # images in memory, as temporary files
            spec = prediction.images_spec(files, self.image, root)
            prompts = self._prompts(spec, tiling, points, boxes, data)  # checked first
            net, cfg = self._model(model), self._config(model)
            stream = prediction.iter_proba(net, cfg, self.task_, spec, tiling, prompts,
                                           tta=tta)
            with contextlib.closing(stream) as probs:  # stopped early: float32 weights back
                if save_to is None:
                    masks = (prediction.to_mask(p, self.task_, self.num_classes_)
                             for _, p in probs)
                    return [m if table is None else table[m] for m in masks]
                dests = prediction.mask_destinations(spec, out, root=root,
                                                     label_col=self.label, overwrite=overwrite)
                with sigterm_as_interrupt():  # as Ctrl-C: the masks written so far go
                    prediction.write_masks(probs, dests, out, self.task_, self.num_classes_,
                                           self.color_map_, table, overwrite=overwrite)
        return pd.DataFrame({self.image: list(frame[self.image]),
                             self.label: [str(d) for d in dests]}, index=frame.index)

    def predict_proba(
        self,
        data: pd.DataFrame | str | os.PathLike | Sequence[str | os.PathLike],
        model: str | None = None,
        *,
        tiling: str = "auto",
        points: Sequence[Any] | dict[Any, Any] | None = None,
        boxes: Sequence[Any] | dict[Any, Any] | None = None,
        tta: bool | str | Sequence[str] = False,
    ) -> list[np.ndarray]:
        """Class probabilities at each image's original size.

        ``tiling``, ``points``, ``boxes`` and ``tta`` are as in :meth:`predict`.

        Returns
        -------
        list of ndarray
            (H, W) float32 foreground probability for binary tasks; (K, H, W) float32
            class probabilities for multi-class tasks.
        """
        self._check_fitted()
        check_tta(tta)  # a bad value fails before any image is read
        frame, root = prediction.as_frame(data, self.image)
        with as_files(frame, [self.image]) as files:  # images in memory, as temporary files
            spec = prediction.images_spec(files, self.image, root)
            prompts = self._prompts(spec, tiling, points, boxes, data)  # checked first
            net, cfg = self._model(model), self._config(model)
            stream = prediction.iter_proba(net, cfg, self.task_, spec, tiling, prompts,
                                           tta=tta)
            with contextlib.closing(stream) as probs:  # stopped early: float32 weights back
                return [p[0] if self.task_ == "binary" else p for _, p in probs]

    def evaluate(
        self,
        data: pd.DataFrame | str | os.PathLike,
        metrics: Sequence[str] | None = None,
        model: str | None = None,
        *,
        tiling: str = "auto",
        resolution: str = "original",
        tta: bool | str | Sequence[str] = False,
    ) -> dict[str, float | list[float]]:
        """Score predictions against the masks, at each image's original resolution (or
        the model's input resolution, the paper's authors' protocol).

        Parameters
        ----------
        data : DataFrame or CSV path
            Images and masks (same columns as in fit); cells may hold them in memory, as
            in :meth:`predict`.
        metrics : sequence of str, optional
            Names from :data:`automask.metrics.METRICS`; the task's default set when None
            (binary: sm, em, wfm, mae, iou, dice, ber; multi-class: acc, miou,
            iou_per_class).
        model : str, optional
            Candidate name; the best by default.
        tiling : {"auto", "on", "off"}, default "auto"
            As in :meth:`predict`.
        resolution : {"original", "input"}, default "original"
            ``"original"``: each prediction is resized to its mask's size (as
            :meth:`predict` returns it) and scored there. ``"input"``: scored as the model
            sees the image, the mask resized to it by nearest neighbour, as the paper's
            authors score (1024 x 1024 under the ``paper`` presets' stretched input; the
            resized, unpadded ``(h, w)`` under ``data.resize="longest_side"``; a tiled
            image at its original size). Structure metrics (S-alpha, E-phi, weighted
            F-beta) depend on the resolution, so only scores taken at the same resolution
            compare.
        tta : bool, str or list of str, default False
            As in :meth:`predict`: the scores of the averaged, mirrored predictions.

        Returns
        -------
        dict
            Metric name to value (a fraction in [0, 1], but E-phi, which can exceed 1
            slightly, as README "Metrics" says; a list for per-class metrics).
        """
        self._check_fitted()
        check_tta(tta)  # a bad value fails before any image is read
        if isinstance(metrics, str):  # "iou" or "sm,em", as on the command line
            metrics = [m.strip() for m in metrics.split(",") if m.strip()]
        if resolution not in prediction.RESOLUTIONS:
            raise ConfigError(f"resolution must be one of {prediction.RESOLUTIONS}, got "
                              f"{resolution!r}")
        from .metrics import DEFAULT_METRICS, build_metrics  # torchmetrics: seconds to import

        names = list(metrics) if metrics is not None else list(DEFAULT_METRICS[self.task_])
        if not names:  # before any image is predicted
            raise ConfigError("evaluate metrics is empty; give metric names, or None for the "
                              "task's default set")
        try:
            scorers = build_metrics(self.task_, names,
                                    **metric_conventions(self.task_, self.num_classes_))
        except ValueError as exc:  # an unknown name: an automask error, like the others
            if isinstance(exc, AutomaskError):
                raise
            raise ConfigError(f"evaluate metrics {names!r}: {exc}") from exc
        # images and masks in memory, as temporary files
        with as_files(data, [self.image, self.label]) as files:
            spec = prediction.labelled_spec(files, self.image, self.label, self.task_,
                                            self.num_classes_, self.classes_, self.void_label_,
                                            self.color_map_)
            stream = prediction.iter_proba(self._model(model), self._config(model), self.task_,
                                           spec, tiling, resolution=resolution, tta=tta)
            with contextlib.closing(stream) as probs:  # stopped early: float32 weights back
                return prediction.evaluate_probs(probs, spec, self.task_, self.color_map_,
                                                 scorers)

    def leaderboard(
        self,
        data: pd.DataFrame | str | os.PathLike | None = None,
        *,
        extra: dict[str, str | os.PathLike] | None = None,
        style: str | None = None,
        metrics: Sequence[str] | None = None,
        resolution: str = "original",
        tiling: str = "auto",
    ) -> pd.DataFrame:
        """The trained models side by side, as rows or in the Conv-LoRA paper's layout.

        Parameters
        ----------
        data : DataFrame or CSV path, optional
            Labelled test data: adds ``test_<metric>`` columns for every model (cells may
            hold images and masks in memory, as in :meth:`evaluate`).
        extra : dict of str to path, optional
            Row name -> folder of another model's masks or probability maps, scored on
            ``data`` with the same metrics (paired by file stem); rows without parameter
            counts.
        style : {"models", "methods", "paper"}, optional
            ``models``: one row per candidate (model, source, group, variant, method,
            pretrained, backbone, input_size, seed, trainable_params_m, ratio_pct (of all
            parameters of the adapted model, the paper's convention: 4.02M / 641.61M =
            0.63% for Conv-LoRA on vit_h), ``val_<metric>``, fit_time_s,
            predict_images_per_s, stopped, best, ``test_<metric>``),
            sorted best first. ``methods``: runs that differ only by ``env.seed`` merged
            into one row, each metric the mean with its sample std (ddof=1) in
            ``<column>_std``. ``paper``: the ``methods`` rows formatted as the paper's table
            (x100, ``mean ± std``). Default: ``methods`` when some runs differ only by seed,
            else ``models``.
        metrics : sequence of str, optional
            Test metrics; the task's default set when None.
        resolution : {"original", "input"}, default "original"
            Where the models are scored, as in :meth:`evaluate` (``extra`` rows need
            ``"original"``).
        tiling : {"auto", "on", "off"}, default "auto"
            Sliding windows for large images, as in :meth:`evaluate`: a tiled image is
            scored at its own size whatever ``resolution`` says; ``"off"`` resizes every
            image to the input (the paper's protocol with ``resolution="input"``).

        Returns
        -------
        DataFrame
        """
        from .leaderboard import build_leaderboard

        self._check_fitted()
        return build_leaderboard(self, data, extra=extra, style=style, metrics=metrics,
                                 resolution=resolution, tiling=tiling)

    # ---------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
        """Write the predictor: JSON files and the trainable weights of each model.

        The frozen SAM backbone is not written; :meth:`load` rebuilds it from its
        checkpoint (path, cache or official download), verified by SHA-256. The directory
        switches atomically from its previous content to the new predictor.

        Parameters
        ----------
        path : path-like, optional
            The predictor's folder; its own (``path_``) when None. Saved elsewhere, the
            predictor takes its training logs along (for :meth:`plot_history`).
        overwrite : bool
            Replace another predictor that ``path`` holds (with its logs), its own folder
            included when that was fitted or saved again since this predictor was read
            from it. Without it, that is refused: nothing is replaced silently. A copy this
            object saved to ``path``, while no other save replaced it, is not another
            predictor: saving there again needs no ``overwrite``.

        Returns
        -------
        Path
            The folder written.

        Raises
        ------
        ConfigError
            ``path`` holds another predictor (without ``overwrite``) or cannot be a folder.
        """
        from .training.recipe import copy_logs

        self._check_fitted()
        try:  # a path-like naming a folder, not a part of this predictor's own folder
            target = prediction.output_folder(
                self.path_ if path is None else path, overwrite,
                predictor=None if path is None else self.path_, option="path")
        except DataValidationError as exc:
            raise ConfigError(f"cannot save to {str(path)!r}: {exc}") from None
        self._check_writable(target, "save to")
        own = Path(target).resolve() == Path(self.path_).resolve()
        # a copy this object saved there, still the folder's current version, is no other's
        key = str(Path(target).resolve())
        copies = getattr(self, "_copies", {})  # resolved folder -> the version saved there
        ours = key in copies and saving.current_version(Path(target)) == copies[key]
        replacing = (saving.has_predictor(target) and (not own or saving.superseded(self))
                     and not ours)
        if replacing and not overwrite:
            raise ConfigError(f"{str(target)!r} already holds another predictor; pass "
                              "overwrite=True to replace it, or choose another path")
        from .training.state import FitState

        interrupted = not own and FitState(target).exists()
        if interrupted and not overwrite:
            raise ConfigError(
                f"{str(target)!r} holds the state of another fit ('.automask_fit': an "
                "interrupted fit that fit(..., resume=True) continues, or one running); pass "
                "overwrite=True to replace it, or choose another path")
        # replacing an interrupted fit: its state goes with the same hold of the folder's
        # lock (a running fit holds it: PathInUseError), and its logs as a new fit's would
        held = Path(target).expanduser().absolute()
        with saving.run_lock(held, "save") if interrupted else contextlib.nullcontext(), \
                sigterm_as_interrupt():  # as Ctrl-C: a save cut short leaves nothing
            version = saving.save_predictor(self, target)
            if interrupted:
                FitState(target).remove()
        replacing = replacing or interrupted
        if not own:
            self._copies = {**copies, key: version.name}
        copy_logs(self.path_, target, list(self.models_), replace_all=replacing)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike,
             checkpoint: str | os.PathLike | None = None) -> "SemanticSegmentor":
        """Load a predictor written by :meth:`save` (or by :meth:`fit`).

        The loaded object's ``path`` (the constructor's) is None, as a new predictor's:
        its ``path_`` is the folder it came from, and a later :meth:`fit` on it trains
        into a new folder under ``./automask_runs``, leaving that one as it is (pass
        ``SemanticSegmentor(path=...)`` to fit into a chosen folder).

        Parameters
        ----------
        path : path-like
            The predictor's folder (the one holding ``automask.json``).
        checkpoint : path-like, optional
            Where the SAM checkpoint file the models were trained on is now, for a
            predictor whose recorded file was moved or lives on another machine (a
            checkpoint of your own, which no cache or download can find). Its SHA-256 must
            be the one recorded at fit time; it is checked when a model is first built,
            and from then on that model records this file (saved again, the predictor
            loads without ``checkpoint``).

        Raises
        ------
        SavedModelError
            Not a saved predictor, an incomplete or corrupted one, or a ``checkpoint`` that
            is not a file.
        """
        from .data.validation import refuse_url

        refuse_url(path, "the predictor's folder", SavedModelError)
        if isinstance(path, (str, os.PathLike)) and not os.fspath(path).strip():
            # Path("") is the working folder: an unset variable must not load what is there
            raise SavedModelError(f"the predictor's folder is an empty path ({path!r}): pass "
                                  "the folder of a saved automask predictor ('.' for the "
                                  "working folder)")
        seg = saving.load_predictor(cls, Path(path))
        if checkpoint is not None:
            if not isinstance(checkpoint, (str, os.PathLike)):
                raise SavedModelError(f"checkpoint must be a file path, got "
                                      f"{type(checkpoint).__name__} {checkpoint!r}")
            file = Path(checkpoint).expanduser()
            if not file.is_file():
                raise SavedModelError(f"checkpoint {str(file)!r} is not a file: pass the path "
                                      "of the SAM checkpoint the models were trained on")
            seg._checkpoint_file = str(file.absolute())
        return seg

    def __getstate__(self) -> dict[str, Any]:
        """A self-contained copy for pickle, ``copy.deepcopy`` and joblib.

        Each model's weights file travels as bytes: a loaded predictor reads it through an
        open handle, which cannot be pickled, and its folder may be moved or deleted after
        the copy is made. Models built in memory stay behind; the copy rebuilds them from
        those bytes when it first predicts.
        """
        state = dict(super().__getstate__())  # a copy: never edit the live __dict__
        if hasattr(self, "models_"):
            state["_weights_bytes"] = {name: saving.read_weights(self, name)[0]
                                       for name in self.models_}
        state["_weights_files"] = {}
        state["_loaded"] = {}
        return state

    # ------------------------------------------------------------ internals
    def _reset(self) -> None:
        for attr in [a for a in vars(self) if a.endswith("_") and not a.startswith("_")]:
            delattr(self, attr)
        saving.close_weights(self)
        self._checkpoint_file = None  # load(..., checkpoint=): for the loaded models only
        self._loaded = {}
        self._weights_files = {}
        self._weights_bytes = {}

    def _follow_writer(self, writer: bool) -> None:
        """After a distributed fit: every process holds the predictor rank 0 wrote.

        Rank 0 sends its run directory once it has saved (so no process returns from
        ``fit`` before the predictor is complete); the others load it from there, or keep
        their own in-memory result where that folder is not visible (machines without a
        shared filesystem).
        """
        from .training import distributed

        path = Path(distributed.broadcast(str(self.path_)))
        if writer:
            return
        try:
            saving.reload_into(self, path)
        except (OSError, AutomaskError) as exc:
            log.warning("the predictor written by rank 0 in %s is not readable here (%s); "
                        "this process keeps its own copy of the fitted models in memory",
                        path, exc)
            self.path_ = path

    def _check_params(self) -> None:
        """ConfigError naming a constructor argument that fit cannot use, before any work."""
        import numbers

        v = self.verbosity
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ConfigError(f"verbosity must be an integer >= 0 (0 silent ... 3 debug), "
                              f"got {type(v).__name__} {v!r}")
        for arg in ("label", "image"):
            value = getattr(self, arg)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ConfigError(f"{arg} must be a column name of the data, got {value!r}")
        if self.path is not None and not isinstance(self.path, (str, os.PathLike)):
            raise ConfigError(f"path must be a folder path (str or pathlib.Path) or None, got "
                              f"{type(self.path).__name__} {self.path!r}")
        from .data.validation import refuse_url

        refuse_url(self.path, "path", ConfigError, writing=True)  # not a folder 's3:/...'

        if isinstance(self.path, (str, os.PathLike)) and not os.fspath(self.path).strip():
            raise ConfigError(f"path must name the predictor's folder, got {self.path!r} (an "
                              "unset environment variable?); pass None for a new folder "
                              "under ./automask_runs")
        if self.label == self.image:
            raise ConfigError(f"label and image name the same column {self.label!r}; the "
                              "masks and the images need their own columns")

    @staticmethod
    def _check_writable(path: Path, doing: str) -> None:
        """ConfigError naming ``path`` when it cannot become the predictor's folder (a file,
        a file on the way, a folder this process may not write into), before any work."""
        problem = prediction.path_problem(Path(path).expanduser(), folder=True)
        if problem is not None:
            raise ConfigError(f"cannot {doing} {str(path)!r}: {problem}; choose another path")

    def __sklearn_is_fitted__(self) -> bool:
        """Fitted as predict sees it (scikit-learn's ``check_is_fitted``): an interrupted
        first fit sets ``path_`` and ``task_`` but leaves no model to predict with."""
        return hasattr(self, "best_model_")

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(
                "this SemanticSegmentor is not fitted yet: call fit(...) or "
                "SemanticSegmentor.load(path) first"
            )

    def _run_dir(self) -> Path:
        if self.path is not None:
            return Path(self.path)
        stamp = datetime.now().strftime("%Y%m%d_%H%M%S_%f")
        return Path("automask_runs") / stamp

    def _prompts(self, spec, tiling: str, points, boxes, data: Any = None) -> list | None:
        """Checked per-row prompts of a predict call, or None without prompts; ``data``
        as given (a DataFrame or Series has an index of its own, other data is numbered
        by position)."""
        if points is None and boxes is None:
            return None
        from .data.prompts import check_prompts
        from .tiling import check_tiling

        check_tiling(tiling)
        sizes = prediction.image_sizes(spec)
        positional = not isinstance(data, (pd.DataFrame, pd.Series, pd.Index))
        prompts = check_prompts(points, boxes, spec.frame.index, sizes, positional=positional)
        if all(p is None for p in prompts):  # e.g. boxes={}: the prompt-free prediction
            return None
        prediction.check_prompt_request(self.task_, tiling)
        return prompts

    def _config(self, name: str | None):
        name = self.best_model_ if name is None else name
        if name not in self.models_:
            raise ConfigError(f"unknown model {name!r}; trained models: {', '.join(self.models_)}")
        return self.models_[name].config

    def _model(self, name: str | None) -> torch.nn.Module:
        name = self.best_model_ if name is None else name
        if name not in self.models_:
            raise ConfigError(f"unknown model {name!r}; trained models: {', '.join(self.models_)}")
        from .peft import merge_adapters

        # One thread at a time: predictions from several threads (a web server's) would
        # otherwise merge the same model's adapters twice, adding each update twice.
        with _LOADING:
            if name not in self._loaded:
                self._loaded = {name: saving.rebuild_model(self, name)}  # keep one in memory
            model = self._loaded[name]
            # Inference runs merged: LoRA (and SSF where it can) folded into the frozen
            # weights, the same output within float tolerance, less work per forward. The
            # weights files were written before; this model is never saved again.
            merge_adapters(model)
        return model

    # ------------------------------------------------- pictures and summary
    def plot_predictions(self, data, n: int = 4, model: str | None = None,
                         path: str | os.PathLike | None = None):
        """Image | ground truth | prediction overlays of the first ``n`` images of ``data``.

        Binary: true positives, false positives and false negatives in colour-blind-safe
        colours; multi-class: the class palette with a legend of class names. The ground
        truth column needs the label column. Returns the matplotlib Figure; saves a PNG
        when ``path`` is given (see :mod:`automask.plots`).
        """
        from . import plots

        return plots.plot_predictions(self, data, n=n, model=model, path=path)

    def plot_comparison(self, data, models: str | Sequence[str] | None = None, n: int = 4,
                        path: str | os.PathLike | None = None):
        """Image | ground truth | one column per model (a name, a list of names; all by
        default), one row per image."""
        from . import plots

        return plots.plot_comparison(self, data, models=models, n=n, path=path)

    def export(self, path: str | os.PathLike, format: str | None = None,
               model: str | None = None) -> Path:
        """Export a fitted model for inference outside automask (see :mod:`automask.export`).

        Parameters
        ----------
        path : str or os.PathLike
            Destination file, ``.onnx`` or ``.pt2``.
        format : {"onnx", "pt2"}, optional
            ONNX (adapters merged, checked with ONNX Runtime) or a ``torch.export``
            program; default: from the path's suffix.
        model : str, optional
            Candidate name; default the best model.

        Returns
        -------
        Path
            ``path``. The model used by :meth:`predict` is not changed.
        """
        from .export import export_predictor

        with sigterm_as_interrupt():  # as Ctrl-C: the temporary export goes
            return export_predictor(self, path, format=format, model=model)

    def plot_history(self, metric: str | None = None, path: str | os.PathLike | None = None):
        """Training loss and validation metric per epoch and candidate, from the run's logs.

        Where the logs are gone (the folder deleted under a copy of the predictor), or are
        another fit's (the folder fit or saved again since this predictor was read or
        written), the validation scores kept in the predictor's records are drawn instead.
        """
        from . import plots

        self._check_fitted()
        curves = None
        other = saving.superseded(self)
        if other:
            warnings.warn(
                f"{self.path_} holds another predictor now (fit or saved again since this "
                "one was read or written), whose training logs are not this predictor's: "
                "drawing the validation scores kept in this predictor's records",
                stacklevel=2)
        if other or not any((Path(self.path_) / "logs").glob("*/metrics.csv")):
            curves = {name: pd.DataFrame(record.history or {"epoch": []})
                      for name, record in self.models_.items()}
        return plots.plot_history(self.path_, metric=metric or self.eval_metric_, path=path,
                                  curves=curves)

    def fit_summary(self) -> dict[str, Any]:
        """Candidates, best model, validation scores, fit times, why a candidate trained fewer
        epochs than asked (``stopped``) and the predictor's folder."""
        from .training.progress import fit_summary

        self._check_fitted()
        return fit_summary(self)
