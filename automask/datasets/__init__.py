"""Ways to get a DataFrame of image/mask paths: folders, generated data, the paper's
benchmarks, and seeded splits; colour tables of colour-coded masks.

``train_test_split`` loads on first use: its module imports scikit-learn, which scoring
folders of masks (through :mod:`.folders`) does not need.
"""
import importlib

from .benchmarks import BENCHMARKS, fetch_benchmark
from .color_maps import read_color_map
from .folders import from_folders
from .synthetic import make_synthetic


_SOURCES = {"train_test_split": "split"}  # loaded on first use (imports scikit-learn)


def __getattr__(name: str):
    if name in _SOURCES:
        return getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["BENCHMARKS", "fetch_benchmark", "from_folders", "make_synthetic", "read_color_map",
           "train_test_split"]
