"""SemanticSegmentor: the three-line fit / predict / evaluate facade.

It follows scikit-learn's estimator contract: the constructor only stores its arguments,
``fit`` returns ``self``, learned state lives in attributes with a trailing underscore, and
a second ``fit`` starts from scratch.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator

from . import saving
from .config import Config, resolve
from .errors import ConfigError, DataValidationError, NotFittedError
from .hardware import autocast_context, resolve_env
from .losses import build_loss
from .metrics import DEFAULT_METRICS, HIGHER_IS_BETTER, build_metrics
from .training.module import task_loss_name

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
log = logging.getLogger("automask")


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
        0 silent, 1 summaries, 2 progress bars, 3 debug logs.

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
    models_ : dict of str to dict
        Per candidate: its configuration, validation score, fit time and parameter counts.
    path_ : Path
        The run directory.

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
        presets: str = "medium_quality",
        hyperparameters: dict[str, Any] | None = None,
        time_limit: float | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        color_map: dict[tuple[int, int, int], int] | None = None,
    ) -> "SemanticSegmentor":
        """Fit one model per candidate configuration and keep the best.

        Parameters
        ----------
        train_data : DataFrame or CSV path
            One row per image, with the image and label columns (paths; relative paths are
            resolved against the CSV's folder, or the working directory for a DataFrame).
        tuning_data : DataFrame or CSV path, optional
            Validation data; when None, ``data.holdout_frac`` of ``train_data`` is held out.
        presets : str, default "medium_quality"
            One of :data:`automask.PRESETS`.
        hyperparameters : dict, optional
            Dotted keys merged over the preset; a list value trains one candidate per value.
        time_limit : float, optional
            Seconds for the whole fit, all candidates included.
        num_classes : int, optional
            Classes including background; inferred from the masks when None.
        class_names : sequence of str, optional
            Names of the classes, background first.
        color_map : dict, optional
            ``{(r, g, b): class_id}`` for masks stored as colour images.

        Returns
        -------
        SemanticSegmentor
            ``self``, fitted.
        """
        from .data import validate_frame

        started = time.monotonic()
        deadline = started + time_limit if time_limit is not None else None
        if time_limit is not None and time_limit <= 0:
            raise ConfigError(f"time_limit must be positive seconds, got {time_limit!r}")
        self._reset()
        self._configure_logging()
        candidates = resolve(presets, hyperparameters)
        void_labels = {cfg.data.void_label for _, cfg in candidates}
        if len(void_labels) > 1:
            raise ConfigError("'data.void_label' cannot vary across candidates")
        void_label = void_labels.pop()
        spec = validate_frame(
            train_data, image_col=self.image, label_col=self.label, root=_root_of(train_data),
            num_classes=num_classes, class_names=class_names, void_label=void_label,
            color_map=color_map,
        )
        tuning_spec = None
        if tuning_data is not None:
            tuning_spec = validate_frame(
                tuning_data, image_col=self.image, label_col=self.label,
                root=_root_of(tuning_data), num_classes=spec.num_classes,
                class_names=spec.class_names, void_label=void_label, color_map=color_map,
            )
            if tuning_spec.task != spec.task:
                raise DataValidationError(
                    f"tuning data looks {tuning_spec.task} but training data is {spec.task}"
                )
        metric = self._eval_metric_for(spec.task, spec.num_classes)
        for name, cfg in candidates:  # a loss of the other task fails now, not mid-fit
            try:
                build_loss(task_loss_name(cfg.optim.loss, spec.task), spec.task)
            except ValueError as exc:
                raise ConfigError(f"'optim.loss' of candidate {name!r}: {exc}") from exc

        self.path_ = self._run_dir()
        self.path_.mkdir(parents=True, exist_ok=True)
        self.task_ = spec.task
        self.num_classes_ = spec.num_classes
        self.classes_ = list(spec.class_names)
        self.eval_metric_ = metric
        self.void_label_ = void_label
        self.color_map_ = spec.color_map
        self.models_ = {}
        self._loaded = {}
        for i, (name, cfg) in enumerate(candidates):
            budget = None
            if deadline is not None:
                budget = (deadline - time.monotonic()) / (len(candidates) - i)
                if budget <= 0:
                    warnings.warn(f"time_limit reached: candidate {name!r} was not trained",
                                  stacklevel=2)
                    continue
            self._fit_candidate(name, cfg, spec, tuning_spec, budget)
        if not self.models_:
            raise ConfigError("no candidate could be trained within time_limit")
        self.best_model_ = self._select_best()
        self.config_ = self.models_[self.best_model_]["config"]
        self.fit_time_ = time.monotonic() - started
        self.save(self.path_)
        if self.verbosity >= 1:
            log.info("fit done in %.1fs; best model %r", self.fit_time_, self.best_model_)
        return self

    def _fit_candidate(self, name, cfg: Config, spec, tuning_spec, budget: float | None) -> None:
        import lightning as L
        from lightning.pytorch.callbacks import EarlyStopping
        from lightning.pytorch.loggers import CSVLogger

        from .data import AugmentConfig, SegmentationDataModule
        from .models import build_segmenter, count_parameters
        from .peft import apply_peft
        from .training import BestTrainableWeights, SegmentationModule
        from .training.callbacks import FitClock

        started = time.monotonic()
        cfg, env = resolve_env(cfg)
        L.seed_everything(self.seed, workers=True, verbose=False)
        model = build_segmenter(
            cfg.model.backbone, num_classes=spec.num_outputs, input_size=cfg.model.input_size,
            checkpoint=_checkpoint_of(cfg), progress=self.verbosity >= 2,
        )
        base_params = count_parameters(model)[1]  # SAM before adapters
        apply_peft(model, **_peft_kwargs(cfg))
        model.gradient_checkpointing = cfg.env.gradient_checkpointing
        datamodule = SegmentationDataModule(
            spec,
            input_size=cfg.model.input_size,
            batch_size=cfg.optim.batch_size,
            tuning_spec=tuning_spec,
            holdout_frac=cfg.data.holdout_frac,
            seed=self.seed,
            augment=_augment(cfg, AugmentConfig),
            num_workers=cfg.data.num_workers,
            cache_dir=self.path_ / "cache" / f"{cfg.model.input_size}",
            cache_memory_mb=cfg.data.cache_memory_mb,
        )
        module = SegmentationModule(
            model, task=spec.task, num_classes=spec.num_classes, optim=cfg.optim,
            val_metric=self.eval_metric_,
        )
        monitor = f"val_{self.eval_metric_}"
        higher = HIGHER_IS_BETTER[self.eval_metric_]
        best = BestTrainableWeights(monitor, higher_is_better=higher)
        clock = FitClock()
        callbacks: list = [best, clock]
        if cfg.optim.patience:
            callbacks.append(EarlyStopping(monitor, patience=cfg.optim.patience,
                                           mode="max" if higher else "min"))
        max_time = None
        if budget is not None:
            # Keep a share of the budget for what follows training: restoring the best
            # weights, timing predictions and saving.
            spent = time.monotonic() - started
            max_time = timedelta(seconds=max(1.0, 0.93 * budget - spent - 1.0))
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
            logger=CSVLogger(self.path_, name="logs", version=name),
            enable_checkpointing=False,
            enable_progress_bar=self.verbosity >= 2,
            enable_model_summary=self.verbosity >= 3,
            log_every_n_steps=1,
            deterministic=False,
        )
        with warnings.catch_warnings():
            # Lightning 2.6 on torch >= 2.10 warns about its own use of a torch pytree API.
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec")
            trainer.fit(module, datamodule=datamodule)
        best.restore(model)
        model.eval()
        trainable, total = count_parameters(model)
        self.models_[name] = {
            "config": cfg,
            "val_score": best.best_score,
            "best_epoch": best.best_epoch,
            "epochs": trainer.current_epoch,
            "fit_time": time.monotonic() - started,
            "train_time": clock.seconds,
            "trainable_params": trainable,
            "total_params": total,
            "base_params": base_params,
            "checkpoint": dict(model.checkpoint_info),
            "history": best.history,
        }
        self.models_[name].update(saving.write_weights(model, self.path_, name))
        self._loaded = {name: model}
        val_spec = datamodule.val_spec
        self.models_[name]["predict_images_per_s"] = self._throughput(name, val_spec, budget,
                                                                      started)

    def _throughput(self, name, spec, budget, started) -> float | None:
        """Images per second of predict() on (a few) validation images."""
        n = min(len(spec.frame), 16)
        if n == 0 or (budget is not None and time.monotonic() - started > 0.97 * budget):
            return None
        sub = spec.frame.iloc[:n]
        t0 = time.perf_counter()
        count = sum(1 for _ in self._iter_proba(sub, name))
        return count / max(time.perf_counter() - t0, 1e-9)

    def _select_best(self) -> str:
        higher = HIGHER_IS_BETTER[self.eval_metric_]
        scored = {k: v["val_score"] for k, v in self.models_.items() if v["val_score"] is not None}
        if not scored:
            return next(iter(self.models_))
        return (max if higher else min)(scored, key=scored.get)

    # -------------------------------------------------------------- predict
    def predict(
        self,
        data: pd.DataFrame | str | os.PathLike | Sequence[str | os.PathLike],
        model: str | None = None,
        save_to: str | os.PathLike | None = None,
    ) -> list[np.ndarray] | pd.DataFrame:
        """Predict a mask per image, at each image's original size.

        Parameters
        ----------
        data : DataFrame, path, list of paths or folder
            Images to segment (a DataFrame needs the image column).
        model : str, optional
            Candidate name (see :meth:`leaderboard`); the best by default.
        save_to : path-like, optional
            Folder to write lossless PNG masks named after the images (0/255 for binary,
            class indices for multi-class); then a DataFrame of image and mask paths is
            returned and no mask is kept in memory.

        Returns
        -------
        list of ndarray or DataFrame
            (H, W) uint8 masks ({0, 1} for binary, class indices for multi-class), or the
            DataFrame of written files when ``save_to`` is given.
        """
        self._check_fitted()
        frame, root = self._as_frame(data)
        if save_to is None:
            return [self._to_mask(p) for _, p in self._iter_proba(frame, model, root=root)]
        from PIL import Image

        from .utils import atomic_write

        out = Path(save_to)
        out.mkdir(parents=True, exist_ok=True)
        stems = [Path(p).stem for p in frame[self.image]]
        dup = sorted({s for s in stems if stems.count(s) > 1})
        if dup:
            raise DataValidationError(
                f"images share file stems, so their masks would overwrite each other: {dup[:5]}"
            )
        rows = []
        for idx, prob in self._iter_proba(frame, model, root=root):
            mask = self._to_mask(prob)
            if self.task_ == "binary":
                mask = mask * np.uint8(255)
            image_path = frame[self.image].iloc[idx]
            dest = out / f"{Path(image_path).stem}.png"
            with atomic_write(dest) as fh:
                Image.fromarray(mask).save(fh, format="PNG")
            rows.append({self.image: image_path, self.label: str(dest)})
        return pd.DataFrame(rows, index=frame.index)

    def predict_proba(
        self,
        data: pd.DataFrame | str | os.PathLike | Sequence[str | os.PathLike],
        model: str | None = None,
    ) -> list[np.ndarray]:
        """Class probabilities at each image's original size.

        Returns
        -------
        list of ndarray
            (H, W) float32 foreground probability for binary tasks; (K, H, W) float32
            class probabilities for multi-class tasks.
        """
        self._check_fitted()
        frame, root = self._as_frame(data)
        return [p[0] if self.task_ == "binary" else p
                for _, p in self._iter_proba(frame, model, root=root)]

    def evaluate(
        self,
        data: pd.DataFrame | str | os.PathLike,
        metrics: Sequence[str] | None = None,
        model: str | None = None,
    ) -> dict[str, float | list[float]]:
        """Score predictions against the masks, at each image's original resolution.

        Parameters
        ----------
        data : DataFrame or CSV path
            Images and masks (same columns as in fit).
        metrics : sequence of str, optional
            Names from :data:`automask.metrics.METRICS`; the task's default set when None
            (binary: sm, em, wfm, mae, iou, dice, ber; multi-class: acc, miou,
            iou_per_class).
        model : str, optional
            Candidate name; the best by default.

        Returns
        -------
        dict
            Metric name to value (a fraction in [0, 1]; a list for per-class metrics).
        """
        from .data import read_mask, validate_frame

        self._check_fitted()
        names = list(metrics) if metrics is not None else list(DEFAULT_METRICS[self.task_])
        # targets are class indices with 255 = void; binary metrics leave void out (see metrics)
        conventions = {**metric_conventions(self.task_, self.num_classes_), "ignore_index": 255}
        scorers = build_metrics(self.task_, names, **conventions)
        spec = validate_frame(
            data, image_col=self.image, label_col=self.label, root=_root_of(data),
            num_classes=self.num_classes_, class_names=self.classes_,
            void_label=self.void_label_, color_map=self.color_map_,
        )
        if spec.task != self.task_:
            raise DataValidationError(f"data looks {spec.task} but the model is {self.task_}")
        for idx, prob in self._iter_proba(spec.frame, model):
            raw = read_mask(spec.frame[self.label].iloc[idx], color_map=self.color_map_)
            target = torch.from_numpy(spec.target_lut(idx, raw)[raw].astype(np.int64))
            prob_t = torch.from_numpy(prob)
            pred = prob_t[0] if self.task_ == "binary" else prob_t
            for scorer in scorers.values():
                scorer.update(pred, target)
        out = {}
        for key, scorer in scorers.items():
            value = scorer.compute()
            out[key] = value.tolist() if value.ndim else float(value)
        return out

    def leaderboard(self, data: pd.DataFrame | str | os.PathLike | None = None) -> pd.DataFrame:
        """One row per trained model, in the layout of the Conv-LoRA paper's table.

        Columns: model, method, backbone, input_size, trainable_params_m, ratio_pct
        (trainable parameters over all parameters of the adapted model, the paper's
        convention: 4.02M / 641.61M = 0.63% for Conv-LoRA on vit_h),
        ``val_<metric>``, fit_time_s, predict_images_per_s, and, when
        ``data`` is given, every test metric of the task's default set (``test_<name>``).
        Sorted best first by the validation metric.
        """
        self._check_fitted()
        rows = []
        for name, info in self.models_.items():
            cfg = info["config"]
            row = {
                "model": name,
                "method": cfg.peft.method,
                "backbone": cfg.model.backbone,
                "input_size": cfg.model.input_size,
                "trainable_params_m": round(info["trainable_params"] / 1e6, 2),
                "ratio_pct": round(100.0 * info["trainable_params"] / info["total_params"], 2),
                f"val_{self.eval_metric_}": info["val_score"],
                "fit_time_s": round(info["fit_time"], 1),
                "predict_images_per_s": info.get("predict_images_per_s"),
                "best": name == self.best_model_,
            }
            if data is not None:
                for key, value in self.evaluate(data, model=name).items():
                    if isinstance(value, list):
                        for cls, v in zip(self.classes_, value):
                            row[f"test_{key}[{cls}]"] = v
                    else:
                        row[f"test_{key}"] = value
            rows.append(row)
        board = pd.DataFrame(rows)
        higher = HIGHER_IS_BETTER[self.eval_metric_]
        return board.sort_values(f"val_{self.eval_metric_}", ascending=not higher,
                                 na_position="last").reset_index(drop=True)

    # ---------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the predictor: a JSON file and the trainable weights of each model.

        The frozen SAM backbone is not written; :meth:`load` rebuilds it from its
        checkpoint (path, cache or official download), verified by SHA-256.
        """
        self._check_fitted()
        target = Path(path) if path is not None else self.path_
        saving.save_predictor(self, target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SemanticSegmentor":
        """Load a predictor written by :meth:`save` (or by :meth:`fit`)."""
        return saving.load_predictor(cls, Path(path))

    # ------------------------------------------------------------ internals
    def _reset(self) -> None:
        for attr in [a for a in vars(self) if a.endswith("_") and not a.startswith("_")]:
            delattr(self, attr)
        self._loaded = {}

    def _check_fitted(self) -> None:
        if not hasattr(self, "best_model_"):
            raise NotFittedError(
                "this SemanticSegmentor is not fitted yet: call fit(...) or "
                "SemanticSegmentor.load(path) first"
            )

    def _configure_logging(self) -> None:
        level = logging.INFO if self.verbosity >= 1 else logging.WARNING
        log.setLevel(level)
        lightning_level = logging.INFO if self.verbosity >= 3 else logging.WARNING
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(lightning_level)
        if not log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("automask: %(message)s"))
            log.addHandler(handler)

    def _eval_metric_for(self, task: str, num_classes: int) -> str:
        from .metrics import METRICS

        metric = self.eval_metric or ("iou" if task == "binary" else "miou")
        if metric not in METRICS:
            raise ConfigError(f"unknown eval_metric {metric!r}; valid: {', '.join(METRICS)}")
        if metric not in HIGHER_IS_BETTER or metric == "iou_per_class":
            raise ConfigError(f"eval_metric {metric!r} is not a scalar metric")
        # Raises for a metric that does not fit the task.
        build_metrics(task, [metric], **metric_conventions(task, num_classes))
        return metric

    def _run_dir(self) -> Path:
        if self.path is not None:
            return Path(self.path)
        stamp = datetime.now().strftime("%Y%m%d_%H%M%S_%f")
        return Path("automask_runs") / stamp

    def _model(self, name: str | None) -> torch.nn.Module:
        name = self.best_model_ if name is None else name
        if name not in self.models_:
            raise ConfigError(f"unknown model {name!r}; trained models: {', '.join(self.models_)}")
        if name not in self._loaded:
            self._loaded = {name: saving.rebuild_model(self, name)}  # keep one in memory
        return self._loaded[name]

    def _as_frame(self, data) -> tuple[pd.DataFrame, Path | None]:
        """(frame with the image column, folder that relative paths resolve against)."""
        if isinstance(data, pd.DataFrame):
            if self.image not in data.columns:
                raise DataValidationError(
                    f"the DataFrame has no image column {self.image!r} (columns: "
                    f"{list(data.columns)})"
                )
            return data, None
        if isinstance(data, (str, os.PathLike)):
            p = Path(data)
            if p.is_dir():
                files = sorted(f for f in p.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
                if not files:
                    raise DataValidationError(f"no image files in folder {str(p)!r}")
                return pd.DataFrame({self.image: [str(f) for f in files]}), None
            if p.suffix.lower() == ".csv":
                if not p.is_file():
                    raise DataValidationError(f"CSV file not found: {str(p)!r}")
                return pd.read_csv(p), _root_of(p)
            return pd.DataFrame({self.image: [str(p)]}), None
        if isinstance(data, Sequence):
            return pd.DataFrame({self.image: [str(x) for x in data]}), None
        raise DataValidationError(
            f"cannot read images from a {type(data).__name__}; pass a DataFrame, a path, a "
            "list of paths or a folder"
        )

    def _iter_proba(self, frame: pd.DataFrame, model_name: str | None,
                    root: Path | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row position, (C, H, W) float32 probabilities) per image, streaming."""
        from .data import make_predict_loader, restore_batch, validate_frame

        model = self._model(model_name)
        cfg = self.models_[model_name or self.best_model_]["config"]
        spec = validate_frame(frame, image_col=self.image, root=root, require_labels=False)
        device = _inference_device(cfg)
        model.to(device)
        loader = make_predict_loader(spec, input_size=cfg.model.input_size,
                                     batch_size=cfg.env.eval_batch_size,
                                     num_workers=cfg.data.num_workers)
        with torch.inference_mode(), autocast_context(device, cfg.env.precision):
            for batch in loader:
                logits = model(batch["image"].to(device, non_blocking=True)).float()
                probs = torch.sigmoid(logits) if self.task_ == "binary" else logits.softmax(1)
                restored = restore_batch(probs, batch["original_size"], batch["resized_size"])
                for idx, prob in zip(batch["index"].tolist(), restored):
                    yield idx, prob.float().cpu().numpy()

    def _to_mask(self, prob: np.ndarray) -> np.ndarray:
        if self.task_ == "binary":
            return (prob[0] > 0.5).astype(np.uint8)
        return prob.argmax(0).astype(np.uint8 if self.num_classes_ <= 256 else np.int32)

    def export(self, path: str | os.PathLike, format: str = "onnx",
               model: str | None = None) -> Path:
        """Export a fitted model for inference outside automask (see :mod:`automask.export`).

        Parameters
        ----------
        path : str or os.PathLike
            Destination file, ``.onnx`` or ``.pt2``.
        format : {"onnx", "pt2"}
            ONNX (adapters merged, checked with ONNX Runtime) or a ``torch.export``
            program.
        model : str, optional
            Candidate name; default the best model.

        Returns
        -------
        Path
            ``path``. The model used by :meth:`predict` is not changed.
        """
        from .export import export_predictor

        return export_predictor(self, path, format=format, model=model)


def metric_conventions(task: str, num_classes: int) -> dict[str, Any]:
    """Metric arguments that depend on the task: class count and ignore index."""
    return {"num_classes": num_classes, "ignore_index": 255} if task == "multiclass" else {}


def _peft_kwargs(cfg: Config) -> dict[str, Any]:
    """Arguments of :func:`automask.peft.apply_peft` for a candidate's configuration."""
    return {"method": cfg.peft.method, "options": cfg.peft.options}


def _checkpoint_of(cfg: Config) -> str | None:
    """The SAM weights a candidate starts from: random for ``scratch``, else the config's."""
    from .peft import get_method

    return "random" if get_method(cfg.peft.method).random_init else cfg.model.checkpoint


def _augment(cfg: Config, cls):
    d = cfg.data
    return cls(hflip=d.hflip, vflip=d.vflip, scale_range=(d.scale_min, d.scale_max),
               rotate_degrees=d.rotate_degrees, color_jitter=d.color_jitter)


def _root_of(data) -> Path | None:
    """Relative paths in a CSV resolve against the CSV's folder; in a DataFrame, the cwd."""
    if isinstance(data, (str, os.PathLike)) and str(data).lower().endswith(".csv"):
        return Path(data).resolve().parent
    return None


def _inference_device(cfg: Config) -> torch.device:
    if cfg.env.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")

