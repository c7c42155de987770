"""Small helpers shared by several modules: cache folder, hashing, downloads, atomic writes."""
from .download import atomic_write, cache_dir, download_file, sha256_file

__all__ = ["atomic_write", "cache_dir", "download_file", "sha256_file"]
