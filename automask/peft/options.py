"""Validated options shared by the PEFT methods."""
from __future__ import annotations

from dataclasses import dataclass
from ..errors import ConfigError


@dataclass(frozen=True)
class PeftOptions:
    """Hyperparameters of the PEFT methods (each method reads the ones it needs).

    Attributes
    ----------
    rank : int
        LoRA / Conv-LoRA rank r.
    alpha : float
        LoRA scale numerator (the update is scaled by alpha / r).
    num_experts : int
        Conv-LoRA mixture size M.
    top_k : int
        Experts routed to per sample (1 <= k <= M).
    scales : tuple of float or None
        Conv-LoRA expert scales; ``None`` means 1, 2, ..., M.
    targets : tuple of str
        Image-encoder module names adapted: exact names or ``.name`` suffixes.
    aux_loss_weight : float
        Weight of each Conv-LoRA layer's load-balancing loss.
    """

    rank: int = 3
    alpha: float = 32.0
    num_experts: int = 8
    top_k: int = 1
    scales: tuple[float, ...] | None = None
    targets: tuple[str, ...] = ("qkv",)
    aux_loss_weight: float = 0.01

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"`{name}` must be an integer >= {low}, got {value!r}")

        integer("rank", 1)
        integer("num_experts", 1)
        integer("top_k", 1)
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"`top_k` must be <= num_experts ({self.num_experts}), got {self.top_k}"
            )
        if not self.alpha > 0:
            raise ConfigError(f"`alpha` must be > 0, got {self.alpha!r}")
        if not self.aux_loss_weight >= 0:
            raise ConfigError(f"`aux_loss_weight` must be >= 0, got {self.aux_loss_weight!r}")
        if isinstance(self.targets, str) or not self.targets or not all(
            isinstance(t, str) and t for t in self.targets
        ):
            raise ConfigError(
                f"`targets` must be a non-empty sequence of module names, got {self.targets!r}"
            )
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.scales is not None:
            scales = tuple(float(s) for s in self.scales)
            if len(scales) != self.num_experts or not all(s > 0 for s in scales):
                raise ConfigError(
                    f"`scales` must hold {self.num_experts} positive numbers (one per expert), "
                    f"got {self.scales!r}"
                )
            object.__setattr__(self, "scales", scales)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "PeftOptions":
        """Build from keyword arguments; unknown keys raise :class:`ConfigError`."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown PEFT option(s) {unknown}; valid: {sorted(known)}")
        if kwargs.get("targets") is not None and not isinstance(kwargs["targets"], str):
            kwargs["targets"] = tuple(kwargs["targets"])
        return cls(**kwargs)

