"""CandidateRecord: what is kept about one trained candidate model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import Config

# Fields whose type later code relies on (``checkpoint.get``, the weights file name...).
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict, "checkpoint": dict, "history": list, "weights": str,
    "weights_scope": str, "weights_sha256": str,
}
_FIELD_NAMES = {"config": "an object", "checkpoint": "an object", "history": "a list",
                "weights": "a string", "weights_scope": "a string", "weights_sha256": "a string"}


@dataclass
class CandidateRecord:
    """One trained candidate: its configuration, scores, timings and weights file.

    Read access by key (``record["val_score"]``, ``record.get(...)``) is kept for code
    written against the dictionaries of earlier versions.

    Attributes
    ----------
    config : Config
        The candidate's resolved configuration.
    val_score : float or None
        Best validation score (None when no validation ran).
    best_epoch : int or None
        Epoch of ``val_score``; its weights are the ones kept.
    epochs : int
        Epochs trained (the last may be partial when stopped by time or divergence).
    fit_time, train_time : float
        Seconds for the whole candidate, and for its training loop alone; after a resume
        both include the training before the interruption, up to its last checkpoint.
    trainable_params, total_params, base_params : int
        Parameter counts after PEFT, and of the SAM model before adapters.
    checkpoint : dict
        Where the SAM backbone came from (source, path, sha256).
    history : list of dict
        Per validation: epoch, step and the monitored metric.
    weights, weights_scope, weights_sha256 : str
        Plain file name of the weights inside the predictor directory, ``trainable`` or
        ``all``, and the file's SHA-256.
    predict_images_per_s : float or None
        Measured predict() throughput on validation images.
    stopped : str or None
        Why training ended before ``optim.max_epochs`` (a non-finite loss, the candidate's
        share of ``time_limit``, ``optim.patience``), None otherwise.
    """

    config: Config
    val_score: float | None
    best_epoch: int | None
    epochs: int
    fit_time: float
    train_time: float
    trainable_params: int
    total_params: int
    base_params: int
    checkpoint: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    weights: str = ""
    weights_scope: str = "trainable"
    weights_sha256: str = ""
    predict_images_per_s: float | None = None
    stopped: str | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in self.__dataclass_fields__ else default

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the config as its nested dict)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["config"] = self.config.to_dict()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CandidateRecord":
        """Inverse of :meth:`to_json`; raises KeyError/TypeError/ValueError when malformed."""
        if not isinstance(data, dict):
            raise TypeError(f"a model record must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted((required | {"weights", "weights_sha256"}) - set(data))
        if missing:
            raise KeyError(f"model record lacks {', '.join(repr(m) for m in missing)}")
        for key, kind in _FIELD_TYPES.items():  # a hand-edited file fails here, not at use
            if key in data and not isinstance(data[key], kind):
                raise TypeError(f"model record field {key!r} must be "
                                f"{_FIELD_NAMES[key]}, got {data[key]!r:.60}")
        values = {k: v for k, v in data.items() if k in known}
        values["config"] = Config.from_dict(data["config"])
        return cls(**values)
