"""The configuration tree and the one function that merges overrides into it.

A fit is configured by a :class:`Config`: five small dataclasses (``model``, ``peft``,
``optim``, ``data``, ``env``), each validating its own fields. Presets and user
hyperparameters are flat dicts of dotted keys (``{"peft.rank": 4}``); :func:`resolve`
merges them, in that order, over the defaults. A list value asks for one candidate model
per value (``{"peft.method": ["conv_lora", "lora"]}``); several list values give their
cartesian product.

Every key, its default and its meaning are listed by :func:`reference`, which the README's
hyperparameter table is checked against.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
import math
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .errors import ConfigError

log = logging.getLogger("automask.config")

_CHOICES = {
    "model.backbone": ("tiny", "vit_b", "vit_l", "vit_h", "sam2_tiny", "sam2.1_hiera_t",
                       "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l"),
    "model.multiclass_head": ("tokens", "mask_classification"),
    "optim.lr_schedule": ("linear", "cosine", "constant"),
    "optim.loss": ("auto", "structure", "bce", "dice", "balanced_bce", "focal", "ce", "ce_dice"),
    "data.prompts": ("box", "points", "box_or_points"),
    "env.precision": ("auto", "32", "32-true", "bf16-mixed", "16-mixed"),
    "env.accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
    "env.conv_lora_routing": ("auto", "sparse", "batched", "compiled"),
}
# The backbones no weights are published for (built for tests, from random weights only).
UNPUBLISHED_BACKBONES = ("tiny", "sam2_tiny")
LARGE_IMAGE_MODES = ("auto", "crop", "resize")  # data.large_images, see automask.data.crops
_CHOICES["data.large_images"] = LARGE_IMAGE_MODES
RESIZE_MODES = ("longest_side", "square")  # data.resize, see automask.data.transforms
_CHOICES["data.resize"] = RESIZE_MODES
INTERPOLATIONS = ("bilinear", "bicubic")  # data.interpolation, see automask.data.transforms
_CHOICES["data.interpolation"] = INTERPOLATIONS


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"invalid value {value!r} for {key!r}: {why}")


def _check_finite(section: str, obj: Any) -> None:
    """Reject NaN and infinite values in every float field of a config section."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            _fail(f"{section}.{f.name}", value, "must be a finite number")


def check_time_limit(value: Any) -> float | None:
    """Validate ``fit(time_limit=...)``: None (no limit) or a positive, finite number of seconds.

    Returns
    -------
    float or None
        The limit in seconds.

    Raises
    ------
    ConfigError
        Anything else (NaN, infinity, zero, negative, a bool, a non-numeric string), naming
        ``time_limit`` and the value.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        _fail("time_limit", value, "expected a number of seconds or None")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        _fail("time_limit", value, "expected a number of seconds or None")
    if not math.isfinite(seconds) or seconds <= 0:
        _fail("time_limit", value, "must be a positive, finite number of seconds (None: no limit)")
    return seconds


def _check_devices(value: str) -> None:
    """Lightning's devices: ``auto``, a positive count, ``-1`` (all) or comma-separated ids."""
    text = value.strip()
    if text == "auto" or text == "-1" or (text.isdigit() and int(text) > 0):
        return
    ids = [part.strip() for part in text.split(",")]
    if "," in text and all(i.isdigit() for i in ids if i) and any(ids):
        return
    _fail("env.devices", value,
          "expected 'auto', a positive count such as '2', -1 (all) or ids such as '0,1'")


def _strategy_names() -> tuple[str, ...]:
    from lightning.pytorch.strategies import StrategyRegistry

    return ("auto", *StrategyRegistry.available_strategies())


def _check_choice(key: str, value: Any) -> None:
    if key == "peft.method":
        from .peft import PEFT_METHODS

        choices: tuple = tuple(PEFT_METHODS)
    else:
        choices = _CHOICES[key]
    if value not in choices:
        _fail(key, value, f"valid values are {', '.join(map(repr, choices))}"
                          f"{did_you_mean(value, choices)}")


def did_you_mean(value: Any, choices: Sequence[str]) -> str:
    """``"; did you mean 'lora'?"`` for the choice closest to ``value`` (case aside), or ""."""
    lowered = {str(c).lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(lowered), n=1)
    return f"; did you mean {lowered[close[0]]!r}?" if close else ""


@dataclass
class ModelConfig:
    """Which SAM backbone, which weights, which input size."""

    backbone: str = "vit_b"
    """SAM image encoder: ``tiny`` (for tests: no published weights, so
    ``model.checkpoint="random"``, which the ``tiny`` preset sets), ``vit_b``, ``vit_l`` or
    ``vit_h``; with the ``sam2`` extra also ``sam2.1_hiera_t``, ``sam2.1_hiera_s``,
    ``sam2.1_hiera_b+``, ``sam2.1_hiera_l`` and ``sam2_tiny`` (for tests, as ``tiny``)."""
    checkpoint: str | None = None
    """Path to an official SAM ``.pth``; ``"random"`` for random init (training from scratch);
    None to use the cache, then the official download."""
    input_size: int | None = None
    """Side of the square model input, a multiple of 16 (of 32 for SAM 2.1 backbones), at
    least 32; None: 1024 on a GPU, 256 on a CPU."""
    multiclass_head: str = "tokens"
    """Multi-class head: ``tokens`` (a mask token and MLP per class) or
    ``mask_classification`` (the paper's: 7 queries sharing one MLP, a class head, a matched
    loss); unused for binary tasks."""
    num_queries: int | None = None
    """Mask queries of the ``mask_classification`` head; None: the paper's 7, or more when
    one training or tuning mask labels more classes (each class present needs a query)."""

    def __post_init__(self) -> None:
        _check_choice("model.backbone", self.backbone)
        _check_choice("model.multiclass_head", self.multiclass_head)
        if self.num_queries is not None and (
                isinstance(self.num_queries, bool) or not isinstance(self.num_queries, int)
                or self.num_queries < 1):
            _fail("model.num_queries", self.num_queries, "must be an integer >= 1 or None")
        if self.input_size is not None and (self.input_size < 32 or self.input_size % 16):
            _fail("model.input_size", self.input_size, "must be a multiple of 16 and >= 32")
        _check_finite("model", self)


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning method and its options.

    The options are the method's own dataclass (``automask/peft/<method>.py``): the one
    source of truth for its keys, defaults and checks. Each option is set as
    ``peft.<name>``; a key the method does not use raises :class:`ConfigError` naming the
    methods that use it.
    """

    method: str = "conv_lora"
    """PEFT method: ``scratch``, ``decoder_only``, ``bitfit``, ``adapter``, ``vpt``, ``lst``,
    ``sam_adapter``, ``ssf``, ``lora``, ``conv_lora`` or ``full`` (see the README's method
    table)."""
    options: Any = None
    """The method's options dataclass; None: its defaults."""

    def __post_init__(self) -> None:
        from .peft import get_method

        _check_choice("peft.method", self.method)
        spec = get_method(self.method)
        if self.options is None:
            self.options = spec.options()
        elif not isinstance(self.options, spec.options):
            raise ConfigError(f"options of {self.method!r} must be a {spec.options.__name__}")

    def __getattr__(self, name: str) -> Any:
        # cfg.peft.rank reads the method's option (only options the method has).
        options = self.__dict__.get("options")
        if options is not None and not name.startswith("_") and hasattr(options, name):
            return getattr(options, name)
        raise AttributeError(
            f"PEFT method {self.__dict__.get('method')!r} has no option {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """``{"method": ..., <option>: ...}``."""
        return {"method": self.method, **self.options.to_dict()}


CLASS_WEIGHT_RULES = ("balanced", "median_frequency")  # optim.class_weights, or numbers


def parse_class_weights(value: Any) -> str | list[float] | None:
    """``optim.class_weights`` as None, a rule of :data:`CLASS_WEIGHT_RULES`, or the list of
    weights a ``"w0,w1,..."`` string gives (finite, >= 0, one of them > 0).

    Raises
    ------
    ConfigError
        Anything else, naming the key and the value.
    """
    if value is None or value in CLASS_WEIGHT_RULES:
        return value
    why = (f"must be None, {' or '.join(map(repr, CLASS_WEIGHT_RULES))}, or one weight per "
           "class as a string \"w0,w1,...\" (a list would train one candidate per value)")
    if not isinstance(value, str):
        _fail("optim.class_weights", value, why)
    try:
        weights = [float(part) for part in value.split(",")]
    except ValueError:
        close = difflib.get_close_matches(value, CLASS_WEIGHT_RULES, n=1)
        _fail("optim.class_weights", value,
              why + (f"; did you mean {close[0]!r}?" if close else ""))
    if len(weights) < 2 or not all(math.isfinite(w) and w >= 0 for w in weights) \
            or not any(weights):
        _fail("optim.class_weights", value,
              "weights must be two or more finite numbers >= 0, not all 0")
    return weights


@dataclass
class OptimConfig:
    """Optimiser, schedule, loss and stopping."""

    lr: float = 1e-4
    """AdamW learning rate (peak, after warmup)."""
    weight_decay: float = 1e-4
    """AdamW weight decay, applied to weight matrices only (not biases, norms or embeddings)."""
    eps: float = 1e-8
    """AdamW's epsilon, added to the root of the second moment (torch's default; the paper
    presets take the authors' 1e-6, which damps the first steps of parameters with tiny
    gradients such as Conv-LoRA's gates)."""
    max_epochs: int = 30
    """Upper bound on training epochs."""
    batch_size: int = 2
    """Images per device per step (micro-batch)."""
    effective_batch_size: int = 4
    """Images per optimiser step, over all processes of a distributed fit; gradients are
    accumulated to reach it."""
    lr_schedule: str = "linear"
    """Decay after warmup: ``linear`` (to zero), ``cosine`` (to zero) or ``constant``."""
    warmup_ratio: float = 0.0
    """Fraction of the optimiser steps spent warming up linearly from zero."""
    grad_clip: float = 1.0
    """Gradient-norm clipping; 0 disables."""
    loss: str = "auto"
    """Task loss; ``auto``: ``structure`` for binary, ``ce_dice`` for multi-class."""
    patience: int = 0
    """Early stopping after this many validations without improvement (epochs at the
    default ``val_check_interval`` of 1.0; two per epoch at 0.5); 0 disables."""
    val_check_interval: float = 1.0
    """Validate every this fraction of an epoch (1.0: once per epoch)."""
    select_metric: str | None = None
    """Validation metric that selects the best epoch and the best candidate (e.g. ``sm``,
    ``ber``); None: the predictor's ``eval_metric``. The same for every candidate."""
    class_weights: str | None = None
    """Class weights of the multi-class cross-entropy (``ce``, and the CE term of
    ``ce_dice``; with the ``mask_classification`` head, a class's masks count ``w`` times in
    each term of its matched loss): None (equal); ``balanced`` (labelled pixels / (K x the
    class's pixels), scikit-learn's rule); ``median_frequency`` (SegNet's: the median class
    frequency over the class's, a frequency being the class's pixels over all pixels of
    the masks that hold it); or K weights ``"w0,w1,..."``. Counted on the training split's
    masks as stored; a class no training mask holds weighs 0."""

    def __post_init__(self) -> None:
        _check_finite("optim", self)
        parse_class_weights(self.class_weights)
        _check_choice("optim.lr_schedule", self.lr_schedule)
        _check_choice("optim.loss", self.loss)
        if self.lr <= 0:
            _fail("optim.lr", self.lr, "must be > 0")
        if self.eps <= 0:
            _fail("optim.eps", self.eps, "must be > 0")
        if not 0 < self.val_check_interval <= 1:
            # Lightning refuses a fraction above 1 only when the Trainer is built, mid-fit
            _fail("optim.val_check_interval", self.val_check_interval,
                  "must be in (0, 1]: the fraction of an epoch between validations (1.0: once "
                  "per epoch)")
        for key in ("max_epochs", "batch_size", "effective_batch_size"):
            if getattr(self, key) < 1:
                _fail(f"optim.{key}", getattr(self, key), "must be >= 1")
        for key in ("weight_decay", "grad_clip", "patience"):
            if getattr(self, key) < 0:
                _fail(f"optim.{key}", getattr(self, key), "must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            _fail("optim.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        if self.select_metric is not None:
            from .metrics.names import HIGHER_IS_BETTER, suggest_metric  # late: light import

            scalar = [m for m in HIGHER_IS_BETTER if m != "iou_per_class"]
            if self.select_metric not in scalar:
                hint = (suggest_metric(self.select_metric, "binary")  # 'IoU', 'S-alpha'
                        or suggest_metric(self.select_metric, "multiclass")
                        or did_you_mean(self.select_metric, scalar))
                _fail("optim.select_metric", self.select_metric,
                      f"valid values are {', '.join(map(repr, scalar))}{hint}")


@dataclass
class DataConfig:
    """Splitting, augmentation and loading."""

    holdout_frac: float = 0.2
    """Fraction of the training data held out for validation when no tuning data is given."""
    hflip: bool = True
    """Random horizontal flips."""
    vflip: bool = False
    """Random vertical flips."""
    scale_min: float = 1.0
    """Random scale range, lower end (1.0 with scale_max 1.0: no scaling)."""
    scale_max: float = 1.0
    """Random scale range, upper end."""
    rotate_degrees: float = 0.0
    """Random rotation up to this many degrees either way."""
    color_jitter: float = 0.0
    """Strength c of random brightness/contrast/saturation jitter, in [0, 1): factors are drawn
    from [1 - c, 1 + c] (0 disables)."""
    void_label: int | None = None
    """A mask value to ignore in losses and metrics (e.g. 11 for CamVid's void)."""
    num_workers: int | None = None
    """DataLoader workers; None chooses for the machine."""
    cache_memory_mb: int = 1024
    """Decoded samples (resized, or at native scale for crops) kept in memory up to this size
    (MiB; a loader's worker processes share it); the rest go to disk."""
    resize: str = "longest_side"
    """How a whole image becomes the square input: ``longest_side`` scales it to the input's
    side keeping its aspect ratio and zero-pads the rest (SAM's rule); ``square`` stretches it
    to the square input, no padding (the paper's authors' rule). Training, validation and
    prediction all use it; native-scale crops and tiles are never stretched."""
    interpolation: str = "bilinear"
    """How a whole image is resampled to the input (``data.resize``): ``bilinear`` (what
    segment-anything's ``ResizeLongestSide`` does) or ``bicubic`` (what the paper's
    authors' code does); Pillow's filters, antialiased when shrinking. Training,
    validation and prediction all use it; masks are always resized by nearest neighbour,
    and the random scaling of ``data.scale_min`` / ``scale_max`` stays bilinear."""
    large_images: str = "auto"
    """Images larger than the input: ``auto`` trains on native-scale crops when the longer side
    exceeds 1.25 x the input (the rule of ``tiling="auto"``), ``crop`` whenever it exceeds the
    input, ``resize`` never (shrink the image, as the paper does). Predict's ``tiling="auto"``
    follows it."""
    embedding_cache_mb: int = 1024
    """Image embeddings kept in memory up to this size (MiB) while the image encoder is frozen
    (``decoder_only``): the validation images' from the first validation on, and, when the
    augmentation is flips only (no random scaling, rotation or colour jitter), the training
    images' too, random crops of large images excepted; later epochs then run the mask
    decoder alone. Exact (see :mod:`automask.training.embeddings`); 0 disables."""
    prompts: str | None = None
    """Train with prompts drawn from each augmented mask (binary tasks): None (prompt-free),
    ``box`` (the mask's box, each edge jittered by up to 10% of its side), ``points`` (1-3
    points, the first on the mask) or ``box_or_points``; validation stays prompt-free."""
    prompt_rate: float = 0.5
    """Fraction of training samples that get a prompt when ``data.prompts`` is set; the
    others train prompt-free, so the model keeps answering without prompts."""
    image_range: str = "auto"
    """How images stored with more than 8 bits per sample (16-bit, 32-bit, float) become
    0-255: ``auto`` finds one value range for the whole dataset at fit (12-bit data in
    16-bit files: 0-4095; see :func:`automask.data.io.dataset_value_range`) and keeps it for
    prediction; ``per_image``: each file by its own rule (16-bit full scale, floats in
    [0, 1], otherwise its own minimum to maximum); ``"LOW,HIGH"``: that range, e.g.
    ``"0,4095"`` or ``"-1000,400"`` for a CT window. 8-bit images are never rescaled."""

    def __post_init__(self) -> None:
        _check_finite("data", self)
        if self.prompts is not None:
            _check_choice("data.prompts", self.prompts)
        if not 0 < self.prompt_rate <= 1:
            _fail("data.prompt_rate", self.prompt_rate, "must be in (0, 1]")
        if not 0 < self.holdout_frac < 1:
            _fail("data.holdout_frac", self.holdout_frac, "must be in (0, 1)")
        if not 0 < self.scale_min <= self.scale_max:
            _fail("data.scale_min", self.scale_min, f"must be in (0, scale_max={self.scale_max}]")
        if not 0 <= self.rotate_degrees <= 180:
            _fail("data.rotate_degrees", self.rotate_degrees, "must be in [0, 180]")
        if not 0 <= self.color_jitter < 1:
            # torchvision's ColorJitter accepts 1 (a factor of 0: a black, or grey, image);
            # the data pipeline's jitter does not, so 1 would fail at the first batch
            _fail("data.color_jitter", self.color_jitter,
                  "must be in [0, 1): factors are drawn from [1 - c, 1 + c], and 1 - c must "
                  "stay above 0")
        if self.void_label is not None and not 0 <= self.void_label <= 255:
            _fail("data.void_label", self.void_label, "must be a mask value in [0, 255]")
        if self.num_workers is not None and self.num_workers < 0:
            _fail("data.num_workers", self.num_workers, "must be >= 0")
        if self.cache_memory_mb < 0:
            _fail("data.cache_memory_mb", self.cache_memory_mb, "must be >= 0")
        if self.embedding_cache_mb < 0:
            _fail("data.embedding_cache_mb", self.embedding_cache_mb, "must be >= 0")
        _check_choice("data.large_images", self.large_images)
        _check_choice("data.resize", self.resize)
        _check_choice("data.interpolation", self.interpolation)
        parse_image_range(self.image_range)


def parse_image_range(value: str) -> str | tuple[float, float]:
    """``data.image_range`` checked: ``"auto"``, ``"per_image"`` or ``(low, high)``.

    Raises
    ------
    ConfigError
        Anything else, naming the key and the value.
    """
    if value in ("auto", "per_image"):
        return value
    parts = value.split(",") if isinstance(value, str) else []
    try:
        low, high = (float(part) for part in parts)
    except ValueError:  # not two parts, or not numbers
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        _fail("data.image_range", value,
              "expected 'auto', 'per_image' or the string 'LOW,HIGH' with finite numbers "
              "LOW < HIGH, such as '0,4095' (a list of values is a search over candidates)")
    return low, high


def image_value_range(cfg: "Config") -> tuple[float, float] | None:
    """The ``(low, high)`` that images with more than 8 bits per sample are read with.

    None (each file by its own rule) for ``per_image``, and for ``auto`` left unresolved: a
    fit resolves it from its data (:func:`automask.training.plan.plan_fit`); it stays
    ``auto`` when no training image had more than 8 bits, and in predictors saved before
    the option existed.
    """
    parsed = parse_image_range(cfg.data.image_range)
    return parsed if isinstance(parsed, tuple) else None


@dataclass
class EnvConfig:
    """Hardware: accelerator, devices, precision, distributed strategy."""

    accelerator: str = "auto"
    """``auto``, ``cpu``, ``gpu``/``cuda`` or ``mps``."""
    devices: str = "auto"
    """Lightning's devices: ``auto``, a count such as ``2``, or ids such as ``0,1``."""
    num_nodes: int = 1
    """Machines for multi-node DDP."""
    strategy: str = "auto"
    """Lightning strategy; ``auto`` picks DDP for several devices (finding unused
    parameters only for methods that need it)."""
    precision: str = "auto"
    """``auto`` (bf16-mixed where supported, else 16-mixed on GPUs, else 32), ``32``,
    ``bf16-mixed`` or ``16-mixed``."""
    eval_batch_size: int = 4
    """Images per forward pass in predict and evaluate."""
    gradient_checkpointing: bool = False
    """Recompute the encoder blocks' activations in the backward pass: much less memory
    (vit_h at 1024 px on smaller GPUs) for roughly one more encoder forward per step."""
    checkpointing_on_oom: bool = True
    """When a single-process fit runs out of memory in training without gradient
    checkpointing, train that candidate again with it (from its last epoch), with a
    warning. False: raise the out-of-memory error."""
    conv_lora_routing: str = "auto"
    """How Conv-LoRA runs its experts: ``auto`` (on CUDA the gate and all routed experts
    as one ``torch.compile`` graph in training where Triton and a C compiler are found,
    else in one set of kernels (``batched``); elsewhere ``sparse``, each chosen expert on
    its samples), ``sparse``, ``batched`` or ``compiled``. Same results up to float
    rounding."""
    seed: int | None = None
    """Seed of initialisation, augmentation and batch order of this candidate; None: the
    predictor's ``seed``. The train/validation split always uses the predictor's ``seed``, so
    a list of seeds gives repeated runs on the same split."""

    def __post_init__(self) -> None:
        _check_finite("env", self)
        _check_choice("env.accelerator", self.accelerator)
        _check_choice("env.precision", str(self.precision))
        _check_choice("env.conv_lora_routing", self.conv_lora_routing)
        self.devices = str(self.devices)
        _check_devices(self.devices)
        if self.strategy != "auto":
            names = _strategy_names()
            if self.strategy not in names:
                close = difflib.get_close_matches(self.strategy, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                _fail("env.strategy", self.strategy,
                      f"not one of Lightning's strategies ({', '.join(names)}){hint}")
        if self.num_nodes < 1:
            _fail("env.num_nodes", self.num_nodes, "must be >= 1")
        if self.eval_batch_size < 1:
            _fail("env.eval_batch_size", self.eval_batch_size, "must be >= 1")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            _fail("env.seed", self.seed, "must be in [0, 2**32)")


@dataclass
class Config:
    """The whole resolved configuration of one candidate model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of dotted keys, JSON-serialisable (``peft.*``: the method's options)."""
        flat = {}
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if isinstance(value, PeftConfig):
                items = value.to_dict().items()
            else:
                items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
            flat.update({f"{section.name}.{k}": v for k, v in items})
        return flat

    @classmethod
    def from_dict(cls, flat: Mapping[str, Any]) -> "Config":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`.

        The hardware is not checked: a model trained on a GPU loads on any machine.
        """
        configs = resolve(None, dict(flat), presets_table={}, for_fit=False)
        if len(configs) != 1:
            raise ConfigError("a saved configuration must describe exactly one model")
        return configs[0][1]


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _field_types() -> dict[str, Any]:
    out = {}
    for name, section in _sections().items():
        if section is PeftConfig:
            out["peft.method"] = str
            out.update({f"peft.{k}": v for k, v in _peft_option_types().items()})
            continue
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            out[f"{name}.{f.name}"] = hints[f.name]
    return out


def _peft_option_types() -> dict[str, Any]:
    """Every PEFT option of every method -> its type (one type per name across methods)."""
    from .peft import PEFT_METHODS

    types: dict[str, Any] = {}
    for method in PEFT_METHODS.values():
        for key, hint in method.options.field_types().items():
            assert types.setdefault(key, hint) == hint, (key, hint, types[key])
    return types


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Coerce ``value`` (possibly a command-line string) to the field's declared type."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        _fail(key, value, "may not be None")
    # numpy's bool (a value read from an array or a DataFrame) is a bool, not an int
    flag = isinstance(value, (bool, np.bool_))
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            if flag or (isinstance(value, (int, np.integer)) and value in (0, 1)):
                return bool(value)
            raise ValueError
        if base is int:
            # numpy's floats too: int(np.float32(2.5)) would be 2
            if flag or (isinstance(value, (float, np.floating))
                        and not float(value).is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if flag:
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, os.PathLike):  # a checkpoint given as a pathlib.Path
                value = os.fspath(value)
            if isinstance(value, (str, int)) and not flag:
                return str(value)
            if isinstance(value, float) and math.isfinite(value):  # peft.scales=1.5
                return repr(value)
            raise ValueError
    except (TypeError, ValueError):
        _fail(key, value, f"expected {getattr(base, '__name__', base)}")
    raise AssertionError(f"unsupported field type {hint!r} for {key}")


def _check_keys(flat: Mapping[str, Any], known: Mapping[str, Any], origin: str) -> None:
    # Names other libraries use for our keys' last part: suggested before close spellings.
    aliases = {
        "learning_rate": "lr", "base_lr": "lr", "epochs": "max_epochs",
        "num_epochs": "max_epochs", "n_epochs": "max_epochs", "wd": "weight_decay",
        "bs": "batch_size", "train_batch_size": "batch_size", "r": "rank", "lora_r": "rank",
        "lora_rank": "rank", "lora_alpha": "alpha", "experts": "num_experts",
        "n_experts": "num_experts", "image_size": "input_size", "img_size": "input_size",
        "resolution": "input_size", "scheduler": "lr_schedule", "lr_scheduler": "lr_schedule",
        "schedule": "lr_schedule", "warmup": "warmup_ratio", "gradient_clip_val": "grad_clip",
        "clip_grad_norm": "grad_clip", "max_grad_norm": "grad_clip",
        "early_stopping_patience": "patience", "ignore_index": "void_label",
        "workers": "num_workers", "peft": "method", "adapter": "method",
        "accumulate_grad_batches": "effective_batch_size", "gpus": "devices",
    }
    for key in flat:
        if key not in known:
            section, _, leaf = str(key).rpartition(".")
            target = aliases.get(leaf, aliases.get(leaf.lower(), leaf.lower()))  # 'lr' too
            found = sorted((k for k in known if target and k.rpartition(".")[2] == target),
                           key=lambda k: not k.startswith(section + "."))
            close = found[:1] or difflib.get_close_matches(str(key), list(known), n=1,
                                                           cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {origin} key {key!r}{hint}")


def candidate_name(varying: Mapping[str, Any]) -> str:
    """Name of a candidate that says what differs: ``"lr=0.002"``, ``"method=lora,rank=8"``.

    Each varying key appears by its last part (``optim.lr`` -> ``lr``), or in full when two
    varying keys share that last part.
    """
    if not varying:
        return "default"
    leaves = [k.rpartition(".")[2] for k in varying]
    return ",".join(
        f"{leaf if leaves.count(leaf) == 1 else key}={value}"
        for (key, value), leaf in zip(varying.items(), leaves)
    )


def resolve(
    presets: str | None,
    hyperparameters: Mapping[str, Any] | None = None,
    *,
    presets_table: Mapping[str, Mapping[str, Any]] | None = None,
    for_fit: bool = True,
) -> list[tuple[str, Config]]:
    """Merge a preset and user hyperparameters over the defaults.

    A preset's ``model.checkpoint`` applies to the preset's own backbone only: ``tiny``'s
    ``"random"`` does not carry over to a ``model.backbone`` the user sets (that candidate
    gets the default, pretrained weights) unless the user also sets ``model.checkpoint``.
    A real backbone (vit_b/l/h) with random weights is logged as a warning.

    Parameters
    ----------
    presets : str or None
        Name of a preset in ``presets_table`` (default: :data:`automask.presets.PRESETS`).
    hyperparameters : dict, optional
        Flat dotted keys (or the same nested: ``{"optim": {"lr": 1e-4}}``); a list value
        asks for one candidate per value.
    presets_table : mapping, optional
        Table of presets to resolve ``presets`` against.
    for_fit : bool
        Also check that the accelerator and devices asked for exist on this machine (see
        :func:`automask.hardware.check_hardware`) and log random-weight notices; False for a
        configuration read back from a saved model.

    Returns
    -------
    list of (name, Config)
        One entry per candidate, in a stable order; the name distinguishes candidates by the
        values that vary (``"method=lora"``, or ``"method=lora,rank=8"``).

    Raises
    ------
    ConfigError
        Unknown preset, unknown key (the message names the closest valid key), invalid value
        (the message names the key), or an accelerator this machine does not have.
    """
    if presets_table is None:
        from .presets import PRESETS as presets_table
    types = _field_types()
    flat: dict[str, Any] = {}
    preset: Mapping[str, Any] = {}
    if presets is not None and not isinstance(presets, str):
        raise ConfigError(f"presets must be the name of a preset (a str) or None, got "
                          f"{presets!r}; valid presets: {', '.join(presets_table)}")
    if hyperparameters is not None and not isinstance(hyperparameters, Mapping):
        raise ConfigError(
            "hyperparameters must be a dict of dotted keys such as {'optim.lr': 1e-4}, got "
            f"{type(hyperparameters).__name__} {hyperparameters!r}")
    if presets is not None:
        if presets not in presets_table:
            from .presets import suggest_preset

            close = suggest_preset(presets, list(presets_table))
            hint = f"; did you mean {close!r}?" if close else ""
            raise ConfigError(
                f"unknown preset {presets!r}{hint}; valid presets: {', '.join(presets_table)}"
            )
        preset = presets_table[presets]
        _check_keys(preset, types, "preset")
        flat.update(preset)
    user = flat_hyperparameters(hyperparameters or {})
    _check_keys(user, types, "hyperparameter")
    _refuse_repeated_values(user, types)
    flat.update(user)

    grid = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in flat.items()}
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"empty list of candidate values for {key!r}")
    varying = [k for k, v in grid.items() if len(v) > 1]
    candidates = []
    seen: set[str] = set()
    used_user_keys: set[str] = set()
    for combo in itertools.product(*grid.values()):
        chosen = dict(zip(grid, combo))
        if "model.checkpoint" not in user and not _own_backbone(preset, chosen) and not (
                chosen.get("model.checkpoint") == "random"
                and chosen.get("model.backbone") in UNPUBLISHED_BACKBONES):
            # the preset's weights are for its backbone; its 'random' stays with a backbone
            # that has no published weights (tiny -> sam2_tiny): nothing else can build it
            chosen.pop("model.checkpoint", None)
        sections: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
        for key, value in chosen.items():
            section, name = key.split(".", 1)
            sections[section][name] = _coerce(key, value, types[key])
        peft, used = _peft_section(sections["peft"])
        used_user_keys |= {f"peft.{k}" for k in used}
        config = Config(**{name: peft if cls is PeftConfig else cls(**sections[name])
                           for name, cls in _sections().items()})
        fingerprint = repr(sorted(config.to_dict().items()))
        if fingerprint in seen:  # e.g. a rank list crossed with a method without rank
            continue
        seen.add(fingerprint)
        if for_fit:
            _check_for_fit(config)
        effective = {k: chosen[k] for k in varying  # only what this candidate uses
                     if not k.startswith("peft.") or k == "peft.method"
                     or k[5:] in peft.options.to_dict()}
        candidates.append((candidate_name(effective), config))
    unused = sorted(k for k in user if k.startswith("peft.") and k != "peft.method"
                    and k not in used_user_keys)
    if unused:
        from .peft import option_users

        users = option_users()
        methods = sorted({c.peft.method for _, c in candidates})
        raise ConfigError("; ".join(
            f"{key!r} is not used by PEFT method {', '.join(map(repr, methods))}; it is "
            f"used by {', '.join(users[key[5:]])}" for key in unused))
    if for_fit and "model.num_queries" in user and not any(  # a saved config may hold it
            c.model.multiclass_head == "mask_classification" for _, c in candidates):
        raise ConfigError(
            f"'model.num_queries'={user['model.num_queries']!r} is used by the "
            "'mask_classification' multi-class head only; set 'model.multiclass_head': "
            "'mask_classification' too, or leave 'model.num_queries' out")
    names = [n for n, _ in candidates]
    assert len(set(names)) == len(names), names
    return candidates


def _refuse_repeated_values(user: Mapping[str, Any], types: Mapping[str, Any]) -> None:
    """ConfigError naming the key and value when a candidate list gives one value twice
    (``[1e-3, 0.001]``): one candidate would train, not the two the list asks for."""
    for key, values in user.items():
        if not isinstance(values, (list, tuple)):
            continue
        coerced = [_coerce(key, value, types[key]) for value in values]
        for i, value in enumerate(coerced):
            if value in coerced[:i]:
                first = coerced.index(value)
                raise ConfigError(
                    f"hyperparameter {key!r} repeats the value {values[i]!r} (candidates "
                    f"[{first}] and [{i}] of {list(values)!r}): give each candidate's value "
                    "once")


def is_candidate_list(value: Any) -> bool:
    """Whether a hyperparameter's value asks for one candidate per element: a list or tuple,
    any other sequence but a string (Hydra's ``ListConfig``), or a 1-D numpy array
    (``np.logspace(-4, -2, 3)``)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def flat_hyperparameters(hyperparameters: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": 1e-4}`` (no hyperparameter's value is a
    dict); a key given both ways is an error naming it. A candidate list of any sequence
    type (see :func:`is_candidate_list`) becomes a plain ``list``."""
    flat: dict[str, Any] = {}
    for key, value in hyperparameters.items():
        name = f"{prefix}{key}"
        nested = isinstance(value, Mapping)
        if not nested and is_candidate_list(value):  # Hydra's ListConfig, a numpy array
            value = value.tolist() if isinstance(value, np.ndarray) else list(value)
        inner = flat_hyperparameters(value, f"{name}.") if nested else {name: value}
        for k, v in inner.items():
            if k in flat:
                raise ConfigError(f"hyperparameter {k!r} is given twice (as a dotted key and "
                                  "in a nested dict); give it once")
            flat[k] = v
    return flat


def _peft_section(values: dict[str, Any]) -> tuple[PeftConfig, set[str]]:
    """PeftConfig from the peft.* values; keys the method does not use are left out.

    Returns the config and the option names it used.
    """
    from .peft import get_method, make_options

    method = values.get("method", PeftConfig.method)
    _check_choice("peft.method", method)
    fields = set(get_method(method).options.field_types())
    options = {k: v for k, v in values.items() if k != "method" and k in fields}
    return PeftConfig(method, make_options(method, **options)), set(options)


def _own_backbone(preset: Mapping[str, Any], chosen: Mapping[str, Any]) -> bool:
    """Whether the candidate keeps the backbone the preset names (or names none)."""
    if "model.checkpoint" not in preset or "model.backbone" not in preset:
        return True
    own = preset["model.backbone"]
    own = own if isinstance(own, (list, tuple)) else [own]
    return chosen.get("model.backbone") in own


def _check_for_fit(config: Config) -> None:
    from .hardware import check_hardware, distributed_strategy

    check_hardware(config.env.accelerator, config.env.devices)
    distributed_strategy(config)  # several processes: DDP from a script, or ConfigError
    if config.model.checkpoint == "random" and config.model.backbone not in UNPUBLISHED_BACKBONES:
        log.warning(
            "model.checkpoint='random': %s is randomly initialised, without SAM's pretrained "
            "weights (training from scratch)", config.model.backbone,
        )


def reference() -> list[dict[str, Any]]:
    """Every hyperparameter key with its type, default and meaning (from the docstrings).

    ``peft.*`` options come from the methods' own dataclasses; each row says which methods
    use the key (the default is the first such method's).
    """
    rows = []
    for section_name, section in _sections().items():
        if section is PeftConfig:
            rows.extend(_peft_reference())
            continue
        docs = _field_docs(section)
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            hint = hints[f.name]
            rows.append(
                {
                    "key": f"{section_name}.{f.name}",
                    "type": _type_name(hint),
                    "default": default,
                    "meaning": docs.get(f.name, ""),
                }
            )
    return rows


def _peft_reference() -> list[dict[str, Any]]:
    from .peft import PEFT_METHODS, option_users

    rows = [{"key": "peft.method", "type": "str", "default": PeftConfig.method,
             "meaning": _field_docs(PeftConfig)["method"]}]
    users = option_users()
    done: set[str] = set()
    for method in PEFT_METHODS.values():
        docs: dict[str, str] = {}
        for cls in reversed(method.options.__mro__):
            if dataclasses.is_dataclass(cls) and cls.__module__.startswith("automask."):
                docs.update(_field_docs(cls))
        hints = method.options.field_types()
        for f in dataclasses.fields(method.options):
            if f.name in done:
                continue
            done.add(f.name)
            rows.append({"key": f"peft.{f.name}", "type": _type_name(hints[f.name]),
                         "default": f.default,
                         "meaning": f"{docs.get(f.name, '')} Used by: {', '.join(users[f.name])}."})
    return rows


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join("None" if a is type(None) else a.__name__ for a in args)
    return hint.__name__


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
