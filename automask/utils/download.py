"""Cache folder, SHA-256 hashing, atomic writes and verified downloads.

Used by the SAM checkpoint resolver and by the benchmark-archive fetcher. A download is
written to a temporary file in the destination folder and renamed into place only after
its SHA-256 matched, so an interrupted or corrupted download never leaves a file that a
later run would trust.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Iterator

from ..errors import DownloadError

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Root of automask's cache: ``$AUTOMASK_HOME``, else ``~/.cache/automask``."""
    env = os.environ.get("AUTOMASK_HOME")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "automask"
    return root


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``sha256`` when given.

    Args:
        url: http(s) or file URL.
        dest: final path; its folder is created.
        sha256: expected hex digest; a mismatch raises :class:`DownloadError` and leaves
            no file at ``dest``.
        progress: show a tqdm progress bar on stderr.
        timeout: socket timeout in seconds.

    Returns:
        ``dest`` as a Path.
    """
    dest = Path(dest)
    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (URL is ours)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DownloadError(f"could not download {url}: {exc}") from exc
    with response:
        total = int(response.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
        try:
            with atomic_write(dest) as fh:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except OSError as exc:
                        raise DownloadError(f"download of {url} broke off: {exc}") from exc
                    if not chunk:
                        break
                    fh.write(chunk)
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if sha256 is not None and digest.hexdigest() != sha256.lower():
                    raise DownloadError(
                        f"SHA-256 mismatch for {url}: expected {sha256}, got "
                        f"{digest.hexdigest()}; the file was not kept"
                    )
        finally:
            if bar is not None:
                bar.close()
    return dest


def copy_atomic(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a file so that ``dest`` is either absent or complete."""
    with open(src, "rb") as fin, atomic_write(dest) as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
    return Path(dest)
