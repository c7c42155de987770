"""Ways to get a DataFrame of image/mask paths: folders, generated data, the paper's
benchmarks, and seeded splits; colour tables of colour-coded masks.

``train_test_split`` loads on first use: its module imports scikit-learn, which scoring
folders of masks (through :mod:`.folders`) does not need.
"""
from .benchmarks import BENCHMARKS, fetch_benchmark
from .color_maps import read_color_map
from .folders import from_folders
from .synthetic import make_synthetic


def __getattr__(name: str):
    if name == "train_test_split":
        from .split import train_test_split

        return train_test_split
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["BENCHMARKS", "fetch_benchmark", "from_folders", "make_synthetic", "read_color_map",
           "train_test_split"]
