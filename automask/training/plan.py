"""Everything a fit checks before it creates a folder: options, candidates and data.

:func:`plan_fit` raises ConfigError or DataValidationError naming the key, row or path at
fault; nothing is written until it has returned.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..config import Config, flat_hyperparameters, parse_class_weights, resolve
from ..data.io import color_map_rows
from ..datasets.folders import found_beside
from ..errors import ConfigError, DataValidationError
from ..losses import build_loss, task_loss_name
from ..metrics.names import HIGHER_IS_BETTER, METRIC_TASK, check_names, suggest_metric
from ..prediction import root_of


@dataclass
class FitPlan:
    """A validated fit: candidates, data, the selection metric and the resume record."""

    candidates: list[tuple[str, Config]]
    spec: Any
    tuning_spec: Any
    metric: str
    void_label: int | None
    record: dict[str, Any]  # what a resumed fit must match (see FitState.check_plan)
    frames: dict[str, Any]  # validated data, kept for `automask fit --resume`
    world_size: int = 1  # processes training each candidate (env.devices x env.num_nodes)


def plan_fit(params: dict[str, Any], train_data, tuning_data, presets: str,
             hyperparameters, time_limit, num_classes, class_names, color_map) -> FitPlan:
    """Validate a fit's arguments; ``params`` are the estimator's constructor arguments."""
    from ..data import validate_frame

    image, label = params["image"], params["label"]
    seed = params["seed"]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
            0 <= seed < 2**32):  # numpy's and Lightning's range, checked before any work
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    candidates = resolve(presets, hyperparameters)
    from ..models.sam2 import UNSUPPORTED_METHODS, is_sam2_backbone  # no sam2 import

    for name, cfg in candidates:  # a method Hiera cannot take fails now, not mid-fit
        if cfg.peft.method in UNSUPPORTED_METHODS and is_sam2_backbone(cfg.model.backbone):
            raise ConfigError(
                f"candidate {name!r}: PEFT method {cfg.peft.method!r} is not supported on the "
                f"SAM 2.1 backbone {cfg.model.backbone!r} (it extends SAM's single-width ViT "
                f"encoder); use another method or a SAM backbone (vit_b, vit_l, vit_h)")
    void_labels = {cfg.data.void_label for _, cfg in candidates}
    if len(void_labels) > 1:
        raise ConfigError("'data.void_label' cannot vary across candidates")
    void_label = void_labels.pop()
    from ..saving import weights_filename

    files: dict[str, str] = {}
    for name, _ in candidates:  # 'checkpoint=a/b.pth' and 'checkpoint=a_b.pth': one file
        other = files.setdefault(weights_filename(name), name)
        if other != name:
            raise ConfigError(
                f"candidates {other!r} and {name!r} would save their weights to the same file "
                f"{weights_filename(name)!r}; give values that differ in letters or digits")
    holdouts = {cfg.data.holdout_frac for _, cfg in candidates}
    if tuning_data is None and len(holdouts) > 1:  # validation images differ: scores too
        raise ConfigError(
            f"'data.holdout_frac' cannot vary across candidates ({sorted(holdouts)}): each "
            "would be validated on other images and their scores could not select the best; "
            "give one value, or pass tuning_data")
    given_names = class_names
    class_names, color_map = found_beside(train_data, num_classes, class_names, color_map,
                                          void_label)
    try:
        spec = validate_frame(
            train_data, image_col=image, label_col=label, root=root_of(train_data),
            num_classes=num_classes, class_names=class_names, void_label=void_label,
            color_map=color_map,
        )
    except (DataValidationError, ConfigError) as exc:  # names not given: say whose they are
        source = train_data.attrs.get("class_names_from") if hasattr(train_data, "attrs") \
            else None
        if given_names is None and class_names is not None and source \
                and "class_names" in str(exc):
            raise type(exc)(
                f"{exc}\n(the class names are those of {source}, found beside the masks; "
                "pass class_names=[...] (automask fit: --class-names) to give others)"
            ) from None
        if isinstance(exc, DataValidationError) and tuning_data is not None:
            # two tables given: say whose rows these are, and the tuning data's too, at once
            also = ""
            try:
                validate_frame(tuning_data, image_col=image, label_col=label,
                               root=root_of(tuning_data), num_classes=num_classes,
                               class_names=class_names, void_label=void_label,
                               color_map=color_map)
            except DataValidationError as tuning_exc:
                also = f"\nin the tuning data (tuning_data): {tuning_exc}"
            except (ConfigError, ValueError):
                pass  # the tuning data's own checks run once the training data passes
            raise DataValidationError(
                f"in the training data (train_data): {exc}{also}") from None
        raise
    tuning_spec = None
    if tuning_data is not None:
        try:
            tuning_spec = validate_frame(
                tuning_data, image_col=image, label_col=label, root=root_of(tuning_data),
                num_classes=spec.num_classes, class_names=spec.class_names,
                void_label=void_label, color_map=color_map,
            )
        except DataValidationError as exc:  # its rows are not the training data's rows
            raise DataValidationError(f"in the tuning data (tuning_data): {exc}") from None
        if tuning_spec.task != spec.task:
            raise DataValidationError(
                f"tuning data looks {tuning_spec.task} but training data is {spec.task}"
            )
    selects = {cfg.optim.select_metric for _, cfg in candidates}
    if len(selects) > 1:
        raise ConfigError("'optim.select_metric' cannot vary across candidates")
    metric = choose_eval_metric(params["eval_metric"], spec.task, selects.pop())
    for name, cfg in candidates:  # a head SAM 2.1 lacks fails now, not when the model is built
        if spec.task == "multiclass" and cfg.model.multiclass_head != "tokens" \
                and is_sam2_backbone(cfg.model.backbone):
            raise ConfigError(
                f"candidate {name!r}: 'model.multiclass_head'={cfg.model.multiclass_head!r} is "
                f"not available on the SAM 2.1 backbone {cfg.model.backbone!r}; set "
                "'model.multiclass_head': 'tokens'")
    candidates = _resolve_queries(candidates, spec, tuning_spec)
    candidates = _resolve_image_range(candidates, spec, tuning_spec)
    for name, cfg in candidates:  # prompts select one object: binary tasks only
        if spec.task == "multiclass" and cfg.data.prompts is not None:
            raise ConfigError(
                f"candidate {name!r}: 'data.prompts'={cfg.data.prompts!r} needs a binary task "
                f"(a prompt selects one object) but the data has {spec.num_classes} classes; "
                "leave 'data.prompts' unset (None)")
    for name, cfg in candidates:  # a loss of the other task fails now, not mid-fit
        try:
            build_loss(task_loss_name(cfg.optim.loss, spec.task), spec.task)
        except ValueError as exc:
            raise ConfigError(f"'optim.loss' of candidate {name!r}: {exc}") from exc
        _check_class_weights(name, cfg, spec)

    from ..hardware import fit_world_size

    worlds = {fit_world_size(cfg) for _, cfg in candidates}
    if len(worlds) > 1:  # the same processes train every candidate
        raise ConfigError("'env.devices' and 'env.num_nodes' cannot vary across candidates "
                          f"(they ask for {sorted(worlds)} processes)")
    world = worlds.pop()
    if tuning_spec is not None and len(tuning_spec) < world:
        raise DataValidationError(
            f"the tuning data holds {len(tuning_spec)} image(s), fewer than the {world} "
            "processes of this fit; each process validates at least one")

    def paths(sp):
        return None if sp is None else sp.frame[[image, label]].values.tolist()

    record = {
        "candidates": {name: cfg.to_dict() for name, cfg in candidates},
        "train": paths(spec), "tuning": paths(tuning_spec),
        "task": spec.task, "classes": list(spec.class_names),
        "params": {k: v for k, v in params.items() if k not in ("path", "verbosity")},
        "call": {"presets": presets,
                 "hyperparameters": flat_hyperparameters(hyperparameters or {}),
                 "time_limit": time_limit, "num_classes": spec.num_classes,
                 "class_names": list(spec.class_names),
                 "color_map": color_map_rows(color_map)},
    }
    frames = {"train": spec.frame[[image, label]]}
    if tuning_spec is not None:
        frames["tuning"] = tuning_spec.frame[[image, label]]
    return FitPlan(candidates, spec, tuning_spec, metric, void_label, record, frames, world)


def relocate(plan: FitPlan, moves: dict[str, str]) -> FitPlan:
    """``plan`` with every image and mask path found in ``moves`` replaced by its new path
    (in-memory pictures moved from their temporary files into the fit's state folder)."""
    if not moves:
        return plan

    def moved(sp):
        if sp is None:
            return None
        frame = sp.frame.copy()
        for col in (sp.image_col, sp.label_col):
            if col is not None:
                frame[col] = frame[col].map(lambda p: moves.get(p, p))
        return replace(sp, frame=frame)

    spec, tuning_spec = moved(plan.spec), moved(plan.tuning_spec)
    record = dict(plan.record)
    for key in ("train", "tuning"):
        if record.get(key) is not None:
            record[key] = [[moves.get(p, p) for p in row] for row in record[key]]
    frames = {key: (spec if key == "train" else tuning_spec).frame[list(frame.columns)]
              for key, frame in plan.frames.items()}
    return replace(plan, spec=spec, tuning_spec=tuning_spec, record=record, frames=frames)


def locate_weights(candidates: list[tuple[str, Config]], *, progress: bool = False
                   ) -> dict[str, tuple[str, str]]:
    """Find the pretrained weights of every candidate before the first one trains.

    Each distinct (backbone, ``model.checkpoint``) is resolved as the model build resolves
    it (a file, the cache, else the official download, verified by SHA-256), so that
    weights that cannot be had fail the fit before any training, not after the earlier
    candidates have trained. Methods trained from random weights need none.

    Returns
    -------
    dict
        ``"<backbone> <model.checkpoint>"`` -> (the file found, its SHA-256), for each
        distinct pair a candidate needs (random initialisation: none).

    Raises
    ------
    CheckpointError
        Naming the first candidate whose weights cannot be had, with the ways to provide
        them.
    """
    from ..errors import CheckpointError
    from ..models.checkpoint import locate_checkpoint
    from ..peft import get_method

    found: dict[str, tuple[str, str]] = {}
    for name, cfg in candidates:
        wanted = (cfg.model.backbone, cfg.model.checkpoint)
        key = f"{wanted[0]} {wanted[1]}"
        if get_method(cfg.peft.method).random_init or key in found:
            continue
        try:
            where = locate_checkpoint(*wanted, progress=progress)
        except CheckpointError as exc:
            raise CheckpointError(f"candidate {name!r}: {exc}") from None
        if where.path is not None:  # not model.checkpoint="random"
            found[key] = (str(where.path), str(where.sha256))
    return found


def _check_class_weights(name: str, cfg: Config, spec) -> None:
    """Raise ConfigError when ``optim.class_weights`` cannot weigh this fit's loss."""
    weights = parse_class_weights(cfg.optim.class_weights)
    if weights is None:
        return
    key = f"'optim.class_weights'={cfg.optim.class_weights!r} of candidate {name!r}"
    if spec.task != "multiclass":
        raise ConfigError(
            f"{key} weighs the classes of a multi-class cross-entropy, but the data is a "
            "binary task; for a rare foreground use 'optim.loss': 'balanced_bce' or 'focal'")
    if not isinstance(weights, str) and len(weights) != spec.num_classes:
        raise ConfigError(
            f"{key} gives {len(weights)} weights for the data's {spec.num_classes} classes "
            f"({', '.join(spec.class_names)}); give one per class, background first")


def _resolve_queries(candidates: list[tuple[str, Config]], spec, tuning_spec
                     ) -> list[tuple[str, Config]]:
    """``model.num_queries`` of the ``mask_classification`` candidates of a multi-class fit.

    Each class a mask labels needs a query of its own: None becomes the paper's
    :data:`~automask.models.mask_classification.NUM_QUERIES`, or the most classes (background
    included) one training or tuning mask labels when that is more. A number set below that
    is kept, with a warning.
    """
    if spec.task != "multiclass":
        return candidates
    from ..models.mask_classification import NUM_QUERIES

    most = 0
    for sp in (spec, tuning_spec):
        if sp is not None and sp.stats is not None and "classes" in sp.stats:
            most = max([most, *(len(c) for c in sp.stats["classes"])])
    out = []
    for name, cfg in candidates:
        if cfg.model.multiclass_head == "mask_classification":
            if cfg.model.num_queries is None:
                cfg = replace(cfg, model=replace(cfg.model,
                                                 num_queries=max(NUM_QUERIES, most)))
            elif cfg.model.num_queries < most:
                warnings.warn(
                    f"candidate {name!r}: 'model.num_queries'={cfg.model.num_queries} is less "
                    f"than the {most} classes one mask labels; such an image can show at "
                    f"most {cfg.model.num_queries} of its classes (leave it unset to match "
                    "the data)", stacklevel=4)
        out.append((name, cfg))
    return out


def _resolve_image_range(candidates: list[tuple[str, Config]], spec, tuning_spec
                         ) -> list[tuple[str, Config]]:
    """``data.image_range='auto'`` replaced by one range for the training and tuning images.

    The range comes from the images stored with more than 8 bits per sample
    (:func:`~automask.data.io.dataset_value_range`; 8-bit images are read from their header
    only) and goes into each candidate's saved config, so prediction reads images as the
    fit did. Without such images ``auto`` stays: there is nothing to scale.
    """
    if not any(cfg.data.image_range == "auto" for _, cfg in candidates):
        return candidates
    from ..data.io import dataset_value_range

    paths = [p for sp in (spec, tuning_spec) if sp is not None for p in sp.frame[sp.image_col]]
    found = dataset_value_range(paths)
    if found is None:
        return candidates
    text = ",".join(f"{v:.17g}" for v in found)  # exact: "0,4095", "-1024,3071"
    return [(name, replace(cfg, data=replace(cfg.data, image_range=text)))
            if cfg.data.image_range == "auto" else (name, cfg) for name, cfg in candidates]


def choose_eval_metric(eval_metric: str | None, task: str, select: str | None = None) -> str:
    """The validation metric: ``optim.select_metric``, else the estimator's
    ``eval_metric``, checked against the task; iou / miou by default."""
    for key, value in (("'optim.select_metric'", select), ("eval_metric", eval_metric)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            # "" would fall through to the default without a word
            raise ConfigError(f"{key} must be a metric name, or None for the task's default, "
                              f"got {value!r}")
    metric = select or eval_metric or ("iou" if task == "binary" else "miou")
    if metric not in METRIC_TASK:
        key = "'optim.select_metric'" if select else "eval_metric"
        raise ConfigError(f"unknown {key} {metric!r}{suggest_metric(metric, task)} (valid: "
                          f"{', '.join(METRIC_TASK)})")
    if metric not in HIGHER_IS_BETTER or metric == "iou_per_class":
        raise ConfigError(f"eval_metric {metric!r} is not a scalar metric")
    try:  # raises for a metric of the other task
        check_names(task, [metric])
    except ValueError as exc:
        key = "'optim.select_metric'" if select else "eval_metric"
        raise ConfigError(f"{key} {metric!r}: {exc}") from exc
    return metric


def select_best(records: dict[str, Any], metric: str) -> str:
    """Name of the candidate with the best validation score (the first when none has one)."""
    higher = HIGHER_IS_BETTER[metric]
    scored = {k: v.val_score for k, v in records.items() if v.val_score is not None}
    if not scored:
        first = next(iter(records))
        if len(records) > 1:  # nothing tells them apart: say so rather than pick silently
            warnings.warn(
                f"no candidate has a validation {metric!r} score, so none can be chosen by "
                f"it; keeping the first, {first!r}", UserWarning, stacklevel=2)
        return first
    return (max if higher else min)(scored, key=scored.get)
