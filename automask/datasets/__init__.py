"""Ways to get a DataFrame of image/mask paths: folders, generated data, the paper's
benchmarks, and seeded splits; colour tables of colour-coded masks."""
from .benchmarks import BENCHMARKS, fetch_benchmark
from .color_maps import read_color_map
from .folders import from_folders
from .split import train_test_split
from .synthetic import make_synthetic

__all__ = ["BENCHMARKS", "fetch_benchmark", "from_folders", "make_synthetic", "read_color_map",
           "train_test_split"]
