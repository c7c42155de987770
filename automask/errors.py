"""Exceptions raised for user errors.

Every exception automask raises on bad input derives from :class:`AutomaskError`, so the
command line can print a one-line message instead of a traceback. Internal invariants
use ``assert``.
"""
from __future__ import annotations


class AutomaskError(Exception):
    """Base class of every user-facing automask error."""


class ConfigError(AutomaskError, ValueError):
    """An unknown hyperparameter key, an invalid value or an unknown preset."""


class DataValidationError(AutomaskError, ValueError):
    """A DataFrame, file or mask that cannot be used; the message names every row at fault."""


class CheckpointError(AutomaskError, RuntimeError):
    """SAM weights that cannot be found, downloaded, verified or loaded."""


class DownloadError(AutomaskError, RuntimeError):
    """A download that failed or whose SHA-256 does not match the pinned value."""


class NotFittedError(AutomaskError, ValueError, AttributeError):
    """A predictor used before :meth:`fit` (same contract as scikit-learn's)."""


class SavedModelError(AutomaskError, RuntimeError):
    """A saved predictor directory that is incomplete, corrupted or incompatible."""


class NoMatchingModuleError(AutomaskError, ValueError):
    """A PEFT method whose target pattern matched no module of the model."""


class PathInUseError(AutomaskError, RuntimeError):
    """A run directory that another process is fitting or saving into (its lock is held)."""


class TrainingDivergedError(AutomaskError, RuntimeError):
    """Every candidate's loss became NaN or infinite before it produced a usable model."""
