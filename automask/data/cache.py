"""A cache of decoded, resized samples, so that epochs after the first decode nothing.

Decoding a JPEG and resizing it to 1024 pixels costs far more than a small model's step
on it. :class:`SampleCache` keeps the resized uint8 image and raw mask of each sample (or,
for an image trained on as native-scale crops, the decoded image at native scale) in
memory until a byte budget is reached and puts the rest on disk as ``.npy`` files (when
given a folder). Entries are never evicted: with a cyclic access pattern (one pass per
epoch) an evicting cache would miss on every access once the data outgrows it.

Inside DataLoader worker processes every entry is also written to disk, because each
worker holds its own copy of the in-memory part and a later epoch may hand the sample to
another worker.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

Sample = tuple[np.ndarray, "np.ndarray | None"]


def sample_key(*parts: object) -> str:
    """A stable hex key from the parts that define a cached sample."""
    digest = hashlib.sha1(repr(parts).encode("utf-8"))
    return digest.hexdigest()


def file_stamp(path: str | os.PathLike) -> tuple:
    """What tells one version of a file from another, for a cache key.

    The absolute path, device and inode (another file moved or copied in under the same
    name, or the same relative name read from another folder), size, modification time
    and status-change time. ``st_ctime_ns`` is set by the kernel on every write, rename
    or replacement and cannot be set back by ``os.utime``, ``cp -p``, ``rsync -t`` or
    ``tar``, so a file edited or replaced with its old size and modification time (or
    within one tick of the file system's clock) still gets a new stamp.
    """
    stat = os.stat(path)
    return (os.path.abspath(os.fspath(path)), stat.st_dev, stat.st_ino, stat.st_size,
            stat.st_mtime_ns, stat.st_ctime_ns)


def _in_worker() -> bool:
    try:
        from torch.utils.data import get_worker_info
    except ImportError:  # pragma: no cover
        return False
    return get_worker_info() is not None


class SampleCache:
    """In-memory (up to ``memory_mb``) then on-disk store of resized samples.

    Parameters
    ----------
    memory_mb : float
        Budget of the in-memory part in MiB; 0 keeps nothing in memory.
    directory : path, optional
        Folder for the on-disk part (created on first write). None: memory only.

    Attributes
    ----------
    hits_memory, hits_disk, misses : int
        Counters of :meth:`get` outcomes in this process.
    """

    def __init__(self, memory_mb: float = 1024, directory: str | os.PathLike | None = None) -> None:
        if memory_mb < 0:
            raise ValueError(f"memory_mb must be >= 0, got {memory_mb!r}")
        self.memory_bytes = int(memory_mb * 1024 * 1024)
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, Sample] = {}
        self._used = 0
        self.hits_memory = 0
        self.hits_disk = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._memory)

    @property
    def used_bytes(self) -> int:
        """Bytes held in memory."""
        return self._used

    def _paths(self, key: str) -> tuple[Path, Path]:
        assert self.directory is not None
        return self.directory / f"{key}.image.npy", self.directory / f"{key}.mask.npy"

    def get(self, key: str, mmap: bool = False) -> Sample | None:
        """The cached ``(image, mask)`` for ``key``, or None.

        With ``mmap``, an entry on disk comes back as read-only memory maps, so that a
        caller taking a crop of a large image reads only the rows it needs.
        """
        hit = self._memory.get(key)
        if hit is not None:
            self.hits_memory += 1
            return hit
        if self.directory is not None:
            image_path, mask_path = self._paths(key)
            if image_path.exists():
                mode = "r" if mmap else None
                try:
                    image = np.load(image_path, mmap_mode=mode)
                    mask = np.load(mask_path, mmap_mode=mode) if mask_path.exists() else None
                except (OSError, ValueError):
                    self.misses += 1
                    return None
                self.hits_disk += 1
                return image, mask
        self.misses += 1
        return None

    def put(self, key: str, image: np.ndarray, mask: np.ndarray | None) -> None:
        """Store a sample: in memory while the budget allows, else (or also, in a
        DataLoader worker) on disk."""
        size = image.nbytes + (mask.nbytes if mask is not None else 0)
        in_memory = False
        if key not in self._memory and self._used + size <= self.memory_bytes:
            self._memory[key] = (image, mask)
            self._used += size
            in_memory = True
        if self.directory is not None and (not in_memory or _in_worker()):
            self._write(key, image, mask)

    def _write(self, key: str, image: np.ndarray, mask: np.ndarray | None) -> None:
        image_path, mask_path = self._paths(key)
        if image_path.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # The mask goes first: an image file present means the entry is complete.
        if mask is not None:
            _save_atomic(mask_path, mask)
        _save_atomic(image_path, image)

    def clear(self) -> None:
        """Drop the in-memory part (files on disk stay)."""
        self._memory.clear()
        self._used = 0


def _save_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
