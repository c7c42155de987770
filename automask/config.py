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
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

_CHOICES = {
    "model.backbone": ("tiny", "vit_b", "vit_l", "vit_h"),
    "peft.method": ("decoder_only", "lora", "conv_lora", "full"),
    "optim.lr_schedule": ("linear", "cosine", "constant"),
    "optim.loss": ("auto", "structure", "bce", "dice", "balanced_bce", "focal", "ce", "ce_dice"),
    "env.precision": ("auto", "32", "32-true", "bf16-mixed", "16-mixed"),
    "env.accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
}


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"invalid value {value!r} for {key!r}: {why}")


def _check_choice(key: str, value: Any) -> None:
    choices = _CHOICES[key]
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        _fail(key, value, f"valid values are {', '.join(map(repr, choices))}{hint}")


@dataclass
class ModelConfig:
    """Which SAM backbone, which weights, which input size."""

    backbone: str = "vit_b"
    """SAM image encoder: ``tiny`` (random init, for tests), ``vit_b``, ``vit_l`` or ``vit_h``."""
    checkpoint: str | None = None
    """Path to an official SAM ``.pth``; ``"random"`` for random init (training from scratch);
    None to use the cache, then the official download."""
    input_size: int | None = None
    """Side of the square model input, a multiple of 16; None: 1024 on a GPU, 256 on a CPU."""

    def __post_init__(self) -> None:
        _check_choice("model.backbone", self.backbone)
        if self.input_size is not None and (self.input_size < 32 or self.input_size % 16):
            _fail("model.input_size", self.input_size, "must be a multiple of 16 and >= 32")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning method and its options."""

    method: str = "conv_lora"
    """``decoder_only``, ``lora``, ``conv_lora`` or ``full`` (everything trainable)."""
    rank: int = 3
    """Rank r of the (Conv-)LoRA low-rank path."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is scaled by alpha / rank."""
    num_experts: int = 8
    """Conv-LoRA: number M of convolution experts; expert i works at scale i."""
    top_k: int = 1
    """Conv-LoRA: experts routed to per sample."""
    aux_loss_weight: float = 0.01
    """Conv-LoRA: weight of each layer's load-balancing loss."""
    targets: str = "qkv"
    """Comma-separated module names (suffix match) that (Conv-)LoRA adapts."""

    def __post_init__(self) -> None:
        _check_choice("peft.method", self.method)
        if self.rank < 1:
            _fail("peft.rank", self.rank, "must be >= 1")
        if self.num_experts < 1:
            _fail("peft.num_experts", self.num_experts, "must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            _fail("peft.top_k", self.top_k, f"must be in [1, num_experts={self.num_experts}]")
        if self.alpha <= 0:
            _fail("peft.alpha", self.alpha, "must be > 0")
        if self.aux_loss_weight < 0:
            _fail("peft.aux_loss_weight", self.aux_loss_weight, "must be >= 0")
        if not self.target_list:
            _fail("peft.targets", self.targets, "name at least one module")

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())


@dataclass
class OptimConfig:
    """Optimiser, schedule, loss and stopping."""

    lr: float = 1e-4
    """AdamW learning rate (peak, after warmup)."""
    weight_decay: float = 1e-4
    """AdamW weight decay, applied to weight matrices only (not biases, norms or embeddings)."""
    max_epochs: int = 30
    """Upper bound on training epochs."""
    batch_size: int = 2
    """Images per device per step (micro-batch)."""
    effective_batch_size: int = 4
    """Images per optimiser step; gradients are accumulated to reach it."""
    lr_schedule: str = "linear"
    """Decay after warmup: ``linear`` (to zero), ``cosine`` (to zero) or ``constant``."""
    warmup_ratio: float = 0.0
    """Fraction of the optimiser steps spent warming up linearly from zero."""
    grad_clip: float = 1.0
    """Gradient-norm clipping; 0 disables."""
    loss: str = "auto"
    """Task loss; ``auto``: ``structure`` for binary, ``ce_dice`` for multi-class."""
    patience: int = 0
    """Early stopping after this many epochs without improvement; 0 disables."""
    val_check_interval: float = 1.0
    """Validate every this fraction of an epoch (1.0: once per epoch)."""
    select_metric: str | None = None
    """Validation metric that selects the best epoch and the best candidate (e.g. ``sm``,
    ``ber``); None: the predictor's ``eval_metric``. The same for every candidate."""

    def __post_init__(self) -> None:
        _check_choice("optim.lr_schedule", self.lr_schedule)
        _check_choice("optim.loss", self.loss)
        for key in ("lr", "val_check_interval"):
            if getattr(self, key) <= 0:
                _fail(f"optim.{key}", getattr(self, key), "must be > 0")
        for key in ("max_epochs", "batch_size", "effective_batch_size"):
            if getattr(self, key) < 1:
                _fail(f"optim.{key}", getattr(self, key), "must be >= 1")
        for key in ("weight_decay", "grad_clip", "patience"):
            if getattr(self, key) < 0:
                _fail(f"optim.{key}", getattr(self, key), "must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            _fail("optim.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        if self.select_metric is not None:
            from .metrics.registry import HIGHER_IS_BETTER  # late: keeps config import light

            scalar = [m for m in HIGHER_IS_BETTER if m != "iou_per_class"]
            if self.select_metric not in scalar:
                close = difflib.get_close_matches(self.select_metric, scalar, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
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
    """Strength of random brightness/contrast/saturation jitter (0 disables)."""
    void_label: int | None = None
    """A mask value to ignore in losses and metrics (e.g. 11 for CamVid's void)."""
    num_workers: int | None = None
    """DataLoader workers; None chooses for the machine."""
    cache_memory_mb: int = 1024
    """Decoded, resized samples kept in memory up to this size; the rest go to disk."""

    def __post_init__(self) -> None:
        if not 0 < self.holdout_frac < 1:
            _fail("data.holdout_frac", self.holdout_frac, "must be in (0, 1)")
        if not 0 < self.scale_min <= self.scale_max:
            _fail("data.scale_min", self.scale_min, f"must be in (0, scale_max={self.scale_max}]")
        if not 0 <= self.rotate_degrees <= 180:
            _fail("data.rotate_degrees", self.rotate_degrees, "must be in [0, 180]")
        if not 0 <= self.color_jitter <= 1:
            _fail("data.color_jitter", self.color_jitter, "must be in [0, 1]")
        if self.void_label is not None and not 0 <= self.void_label <= 255:
            _fail("data.void_label", self.void_label, "must be a mask value in [0, 255]")
        if self.num_workers is not None and self.num_workers < 0:
            _fail("data.num_workers", self.num_workers, "must be >= 0")
        if self.cache_memory_mb < 0:
            _fail("data.cache_memory_mb", self.cache_memory_mb, "must be >= 0")


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
    """Lightning strategy, e.g. ``ddp``; ``auto`` picks DDP for several devices."""
    precision: str = "auto"
    """``auto`` (bf16-mixed where supported, else 16-mixed on GPUs, else 32), ``32``,
    ``bf16-mixed`` or ``16-mixed``."""
    eval_batch_size: int = 4
    """Images per forward pass in predict and evaluate."""
    gradient_checkpointing: bool = False
    """Recompute the encoder blocks' activations in the backward pass: much less memory
    (vit_h at 1024 px on smaller GPUs) for roughly one more encoder forward per step."""
    seed: int | None = None
    """Seed of initialisation, augmentation and batch order of this candidate; None: the
    predictor's ``seed``. The train/validation split always uses the predictor's ``seed``, so
    a list of seeds gives repeated runs on the same split."""

    def __post_init__(self) -> None:
        _check_choice("env.accelerator", self.accelerator)
        _check_choice("env.precision", str(self.precision))
        self.devices = str(self.devices)
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
        """Flat dict of dotted keys, JSON-serialisable."""
        return {
            f"{section.name}.{f.name}": getattr(getattr(self, section.name), f.name)
            for section in dataclasses.fields(self)
            for f in dataclasses.fields(getattr(self, section.name))
        }

    @classmethod
    def from_dict(cls, flat: Mapping[str, Any]) -> "Config":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        configs = resolve(None, dict(flat), presets_table={})
        if len(configs) != 1:
            raise ConfigError("a saved configuration must describe exactly one model")
        return configs[0][1]


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _field_types() -> dict[str, Any]:
    out = {}
    for name, section in _sections().items():
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            out[f"{name}.{f.name}"] = hints[f.name]
    return out


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Coerce ``value`` (possibly a command-line string) to the field's declared type."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        _fail(key, value, "may not be None")
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                return str(value)
            raise ValueError
    except (TypeError, ValueError):
        _fail(key, value, f"expected {getattr(base, '__name__', base)}")
    raise AssertionError(f"unsupported field type {hint!r} for {key}")


def _check_keys(flat: Mapping[str, Any], known: Mapping[str, Any], origin: str) -> None:
    for key in flat:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {origin} key {key!r}{hint}")


def candidate_name(varying: Mapping[str, Any]) -> str:
    """Name of a candidate from the values that vary across candidates."""
    if not varying:
        return "default"
    if len(varying) == 1 and "env.seed" not in varying:
        return str(next(iter(varying.values())))
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in varying.items())


def resolve(
    presets: str | None,
    hyperparameters: Mapping[str, Any] | None = None,
    *,
    presets_table: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[tuple[str, Config]]:
    """Merge a preset and user hyperparameters over the defaults.

    Parameters
    ----------
    presets : str or None
        Name of a preset in ``presets_table`` (default: :data:`automask.presets.PRESETS`).
    hyperparameters : dict, optional
        Flat dotted keys; a list value asks for one candidate per value.
    presets_table : mapping, optional
        Table of presets to resolve ``presets`` against.

    Returns
    -------
    list of (name, Config)
        One entry per candidate, in a stable order; the name distinguishes candidates by the
        values that vary (``"lora"``, or ``"method=lora,rank=8"``).

    Raises
    ------
    ConfigError
        Unknown preset, unknown key (the message names the closest valid key) or invalid
        value (the message names the key).
    """
    if presets_table is None:
        from .presets import PRESETS as presets_table
    types = _field_types()
    flat: dict[str, Any] = {}
    if presets is not None:
        if presets not in presets_table:
            close = difflib.get_close_matches(str(presets), list(presets_table), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown preset {presets!r}{hint}; valid presets: {', '.join(presets_table)}"
            )
        _check_keys(presets_table[presets], types, "preset")
        flat.update(presets_table[presets])
    user = dict(hyperparameters or {})
    _check_keys(user, types, "hyperparameter")
    flat.update(user)

    grid = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in flat.items()}
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"empty list of candidate values for {key!r}")
    varying = [k for k, v in grid.items() if len(v) > 1]
    candidates = []
    for combo in itertools.product(*grid.values()):
        chosen = dict(zip(grid, combo))
        sections: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
        for key, value in chosen.items():
            section, name = key.split(".", 1)
            sections[section][name] = _coerce(key, value, types[key])
        config = Config(**{name: cls(**sections[name]) for name, cls in _sections().items()})
        candidates.append((candidate_name({k: chosen[k] for k in varying}), config))
    names = [n for n, _ in candidates]
    assert len(set(names)) == len(names), names
    return candidates


def reference() -> list[dict[str, Any]]:
    """Every hyperparameter key with its type, default and meaning (from the docstrings)."""
    rows = []
    for section_name, section in _sections().items():
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
