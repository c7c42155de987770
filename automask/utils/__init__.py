"""Small helpers shared by several modules: cache folder, hashing, downloads, atomic writes,
safe archive unpacking."""
from .archive import safe_unpack
from .download import (
    atomic_write,
    cache_dir,
    download_file,
    remove_stale_parts,
    sha256_file,
    sha256_fileobj,
    remove_empty_folders,
    top_created,
)

__all__ = [
    "atomic_write",
    "cache_dir",
    "download_file",
    "remove_stale_parts",
    "safe_unpack",
    "sha256_file",
    "sha256_fileobj",
    "remove_empty_folders",
    "top_created",
]
