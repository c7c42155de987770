"""Ways to get a DataFrame of image/mask paths: folders, generated data, the paper's
benchmarks, and seeded splits."""
from .benchmarks import BENCHMARKS, fetch_benchmark
from .folders import from_folders
from .split import train_test_split
from .synthetic import make_synthetic

__all__ = ["BENCHMARKS", "fetch_benchmark", "from_folders", "make_synthetic", "train_test_split"]
