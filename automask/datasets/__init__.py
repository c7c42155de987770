"""Ways to get a DataFrame of image/mask paths: folders, generated data, the paper's
benchmarks, and seeded splits; colour tables of colour-coded masks.

``train_test_split`` loads on first use: its module imports scikit-learn, which scoring
folders of masks (through :mod:`.folders`) does not need.
"""
from .._lazy import lazy_names

from .benchmarks import BENCHMARKS, fetch_benchmark
from .color_maps import read_color_map
from .folders import from_folders
from .synthetic import make_synthetic


_SOURCES = {"train_test_split": "split"}  # loaded on first use (imports scikit-learn)


__getattr__ = lazy_names(__name__, _SOURCES)

__all__ = ["BENCHMARKS", "fetch_benchmark", "from_folders", "make_synthetic", "read_color_map",
           "train_test_split"]
