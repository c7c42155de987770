"""A cache of decoded, resized samples, so that epochs after the first decode nothing.

Decoding a JPEG and resizing it to 1024 pixels costs far more than a small model's step
on it. :class:`SampleCache` keeps the resized uint8 image and raw mask of each sample (or,
for an image trained on as native-scale crops, the decoded image at native scale) in
memory until a byte budget is reached and puts the rest on disk as ``.npy`` files (when
given a folder). Entries are never evicted: with a cyclic access pattern (one pass per
epoch) an evicting cache would miss on every access once the data outgrows it.

Inside DataLoader worker processes every entry is also written to disk, because each
worker holds its own copy of the in-memory part and a later epoch may hand the sample to
another worker; the workers of a loader share the memory budget (each keeps up to
``memory_mb / num_workers``), so that a loader's workers together stay within it.

The cache never breaks a fit: an entry on disk that does not read back as a sample (a
file left empty or cut short by a crash or a full disk, or anything else that is not an
uint8 image with a matching mask) is a miss, and its files are removed so that the sample
is decoded and written again; a folder that cannot be written (read-only, full, a file in
its way) is warned about once, and the samples beyond the memory budget are then decoded
every time. Entries are read-only arrays, so that no caller can change them for the next.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

Sample = tuple[np.ndarray, "np.ndarray | None"]

# Part of every key: raise it when the decoding or resizing of a cached sample changes, so
# that a run folder's cache written by an earlier version is not read as this one's.
CACHE_FORMAT = 3  # 3: 16-bit colour, float64 and WhiteIsZero TIFF masks by stored values


def sample_key(*parts: object) -> str:
    """A stable hex key from the parts that define a cached sample (and the cache's
    format, :data:`CACHE_FORMAT`)."""
    digest = hashlib.sha1(repr((CACHE_FORMAT, *parts)).encode("utf-8"))
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


def _workers() -> int:
    """The number of worker processes of the DataLoader this process is a worker of, or
    0 outside workers."""
    try:
        from torch.utils.data import get_worker_info
    except ImportError:  # pragma: no cover
        return 0
    info = get_worker_info()
    return 0 if info is None else max(int(info.num_workers), 1)


class SampleCache:
    """In-memory (up to ``memory_mb``) then on-disk store of resized samples.

    Parameters
    ----------
    memory_mb : float
        Budget of the in-memory part in MiB; 0 keeps nothing in memory. In a DataLoader
        worker, its share: ``memory_mb / num_workers``.
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
        self._disk_error: str | None = None  # why the folder cannot be written, once known
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
                    image = np.load(image_path, mmap_mode=mode, allow_pickle=False)
                    mask = (np.load(mask_path, mmap_mode=mode, allow_pickle=False)
                            if mask_path.exists() else None)
                    ok = _is_sample(image, mask)
                except (OSError, ValueError, EOFError):  # empty, cut short, not a .npy
                    ok = False
                if ok:
                    self.hits_disk += 1
                    return _read_only(image), _read_only(mask)
                self._discard(key)  # decoded and written again by the caller's put
        self.misses += 1
        return None

    def put(self, key: str, image: np.ndarray, mask: np.ndarray | None) -> None:
        """Store a sample: in memory while the budget allows, else (or also, in a
        DataLoader worker) on disk."""
        size = image.nbytes + (mask.nbytes if mask is not None else 0)
        workers = _workers()
        # Each worker of a loader holds its own in-memory part: they share the budget.
        budget = self.memory_bytes // workers if workers else self.memory_bytes
        in_memory = False
        if key not in self._memory and self._used + size <= budget:
            # read-only views: a caller changing a sample it got cannot change the cache's
            self._memory[key] = (_read_only(image), _read_only(mask))
            self._used += size
            in_memory = True
        if self.directory is not None and (not in_memory or workers):
            self._write(key, image, mask)

    def _write(self, key: str, image: np.ndarray, mask: np.ndarray | None) -> None:
        """Write an entry to disk; a folder that cannot be written is warned about once
        and then left alone (the sample is simply not kept there)."""
        if self._disk_error is not None:
            return
        image_path, mask_path = self._paths(key)
        if image_path.exists() and (mask is None or mask_path.exists()):
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # The mask goes first: an image file present means the entry is complete.
            if mask is not None:
                _save_atomic(mask_path, mask)
            _save_atomic(image_path, image)
        except OSError as exc:  # read-only, full, a file in the way, ...
            self._disk_error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):
                mask_path.unlink(missing_ok=True)  # no half entry left behind
            warnings.warn(
                f"the sample cache cannot write to {str(self.directory)!r} "
                f"({self._disk_error}); training goes on, decoding the samples that do not "
                "fit in its memory budget ('data.cache_memory_mb') every time",
                RuntimeWarning, stacklevel=3)

    def _discard(self, key: str) -> None:
        """Remove an entry's files (best effort: another process may have done it)."""
        for path in self._paths(key):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Drop the in-memory part (files on disk stay)."""
        self._memory.clear()
        self._used = 0


def _is_sample(image: np.ndarray, mask: np.ndarray | None) -> bool:
    """Whether arrays read back are an entry of this cache: a uint8 (H, W, 3) image and a
    uint8 (H, W) mask (or none)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        return False
    return mask is None or (mask.dtype == np.uint8 and mask.shape == image.shape[:2])


def _read_only(array: np.ndarray | None) -> np.ndarray | None:
    if array is None or not array.flags.writeable:
        return array
    view = array.view()
    view.flags.writeable = False
    return view


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
