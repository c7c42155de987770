"""Cache folder, SHA-256 hashing, atomic writes and verified downloads.

Used by the SAM checkpoint resolver, the benchmark-archive fetcher and the predictor
saver. A file is written to a temporary ``.<name>.<8 random characters>.part`` file in the
destination folder and renamed into place only once it is complete, so an interrupted or
corrupted write never leaves a file that a later run would trust. A download is complete
when it has as many bytes as its ``Content-Length`` said and, when one is given, its
SHA-256 matches.

File modes: a new file gets ``0o666 & ~umask`` (``0o644`` under the usual umask 022), as
``open()`` would give it; a file that replaces an existing one keeps the existing file's
permission bits.

``.part`` files left by a killed process are removed by the next download to the same
destination once untouched for :data:`STALE_PART_SECONDS` (a live download writes at
least once per read timeout, so it is never that old). Only files named by the pattern
above are touched.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import re
import secrets
import shutil
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Iterator

from ..errors import DownloadError

_CHUNK = 1 << 20
PART_SUFFIX = ".part"
#: A ``.part`` file untouched for this many seconds belongs to a dead process.
STALE_PART_SECONDS = 600.0


def cache_dir() -> Path:
    """Root of automask's cache: ``$AUTOMASK_HOME``, else ``$XDG_CACHE_HOME/automask``
    (as pip and Hugging Face honour it, to keep caches off a small home quota), else
    ``~/.cache/automask``.

    Always absolute (a relative ``$AUTOMASK_HOME`` is taken from the working directory
    now), because the paths of cached files are recorded in saved predictors.
    """
    env = os.environ.get("AUTOMASK_HOME")
    xdg = os.environ.get("XDG_CACHE_HOME")
    if env:
        root = Path(env).expanduser()
    elif xdg and os.path.isabs(os.path.expanduser(xdg)):  # the spec ignores relative ones
        root = Path(xdg).expanduser() / "automask"
    else:
        root = Path.home() / ".cache" / "automask"
    return root.absolute()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    with open(path, "rb") as fh:
        return sha256_fileobj(fh)


def sha256_fileobj(fh: IO[bytes]) -> str:
    """Hex SHA-256 of an open binary file from its current position to its end."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def temp_name(path: Path, suffix: str = PART_SUFFIX) -> Path:
    """A fresh sibling name ``.<name>.<8 hex digits><suffix>`` for a temporary file."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"


def is_temp_of(candidate: str, path: Path, suffix: str = PART_SUFFIX) -> bool:
    """Whether the file name ``candidate`` is one of :func:`temp_name`'s names for ``path``.

    Also matches the names of earlier versions (``tempfile.mkstemp``'s 8 characters).
    """
    pattern = rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}{re.escape(suffix)}"
    return re.fullmatch(pattern, candidate) is not None


def remove_stale_parts(
    path: str | os.PathLike, max_age: float = STALE_PART_SECONDS
) -> list[Path]:
    """Delete the ``.part`` files of ``path`` left by dead processes.

    Only regular files named like :func:`temp_name`'s names for ``path`` and not modified
    for ``max_age`` seconds are removed; anything else in the folder is left alone.

    Returns
    -------
    list of Path
        The files removed.
    """
    path = Path(path)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not is_temp_of(entry.name, path):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < max_age:
                continue
            os.unlink(entry.path)
        except OSError:
            continue  # gone meanwhile, or not ours to remove
        removed.append(Path(entry.path))
    return removed


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create a new, empty temporary file beside ``path`` with the umask's mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = temp_name(path)
        try:
            return os.open(tmp, flags, 0o666), tmp  # the kernel applies the umask
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")  # pragma: no cover


def top_created(path: str | os.PathLike) -> Path | None:
    """The highest missing folder on the way to ``path`` (the one ``mkdir(parents=True)``
    creates first), or None when ``path`` exists: what to remove when the work fails."""
    top = None
    for folder in [Path(path), *Path(path).parents]:
        if folder.exists():
            break
        top = folder
    return top


def remove_empty_folders(path: str | os.PathLike, top: str | os.PathLike | None) -> None:
    """Remove ``path`` and the folders above it up to ``top`` (see :func:`top_created`),
    each only while it is empty: the folders a failed call created go again, but not what
    another process wrote into them meanwhile (two fits of a sweep into one new folder)."""
    if top is None:
        return
    folder, top = Path(path), Path(top)
    if folder != top and top not in folder.parents:
        return
    while True:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): what is above it stays too
            return
        if folder == top:
            return
        folder = folder.parent


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *,
                 replace: bool = True) -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it onto ``path`` only on success.

    Parameters
    ----------
    path : str or PathLike
        Final file; its folder is created.
    mode : str
        ``"wb"`` or ``"w"`` (text, UTF-8 whatever the locale).
    replace : bool, default True
        False: never replace a file at ``path``, even one another process made after the
        caller checked (the temporary file is linked to ``path``, which fails when
        ``path`` exists, and then removed); FileExistsError naming ``path`` then. Where the
        filesystem has no hard links, the check and the rename are two steps.

    Notes
    -----
    A new file gets mode ``0o666 & ~umask``; replacing an existing file keeps that file's
    permission bits. On any exception the temporary file is removed and ``path`` is left
    as it was. An ``OSError`` that names no file (a full disk while writing, ``ENOSPC``)
    is given ``path`` as its file name, so its message says what could not be written; one
    with no error number either (numpy's ``tofile`` cut short) is raised again as an
    ``OSError`` whose message names ``path`` and keeps the original words.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with contextlib.suppress(FileNotFoundError):
            existing = os.stat(path)
            if stat.S_ISREG(existing.st_mode):
                os.chmod(tmp, stat.S_IMODE(existing.st_mode) & 0o777)
        # text as UTF-8 whatever the locale (a C or cp1252 one cannot encode '↓', 'é')
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _rename_new(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:  # renamed onto ``path`` already: nothing left behind
            pass
        except OSError as gone:  # a folder made read-only meanwhile: the first error is the one
            exc.add_note(f"automask: the temporary file {tmp!r} of {str(path)!r} could not be "
                         f"removed ({gone.strerror or gone})")
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is None:
            # a bare message (numpy's tofile: "1000000 requested and 50144 written"): a file
            # name alone would print as "[Errno None] None: '<path>'"
            raise OSError(f"cannot write {str(path)!r}: {exc or type(exc).__name__} (a full "
                          "disk, or a file size limit?)") from exc
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # "[Errno 28] No space left on device: '<path>'"
        raise


def _rename_new(tmp: str, path: Path) -> None:
    """Rename ``tmp`` to ``path`` unless ``path`` exists (FileExistsError then)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "it appeared while this file was being written "
                              "(another process writing there?)", str(path)) from None
    except OSError:  # no hard links here (a FAT or some network filesystems)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "it appeared while this file was being "
                                  "written (another process writing there?)",
                                  str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its length and ``sha256``.

    Parameters
    ----------
    url : str
        http(s) or file URL.
    dest : str or PathLike
        Final path; its folder is created. Stale ``.part`` files of earlier, killed
        downloads to ``dest`` are removed first (see :func:`remove_stale_parts`).
    sha256 : str, optional
        Expected hex digest.
    progress : bool
        Show a tqdm progress bar on stderr.
    timeout : float
        Socket timeout in seconds.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    DownloadError
        ``sha256`` is not a hex digest or ``dest``'s folder cannot be created (both before
        anything is requested), the request failed, the body ended before its
        ``Content-Length``, the SHA-256 does not match, or the file cannot be written.
        ``dest`` is then left as it was and no partial file is kept.
    """
    dest = Path(dest)
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(sha256).strip().lower()):
        raise DownloadError(f"the SHA-256 to check {url} against must be 64 hexadecimal "
                            f"digits, got {sha256!r}; nothing was downloaded")
    sha256 = sha256.strip().lower() if sha256 is not None else None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the folder {str(dest.parent)!r} to download {url} "
                            f"into: {exc}") from exc
    remove_stale_parts(dest)
    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (URL is ours)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        raise DownloadError(f"could not download {url}: {exc}") from exc
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.strip().isdigit() else None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
        received = 0
        try:
            with atomic_write(dest) as fh:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise DownloadError(
                            f"download of {url} broke off after {received} bytes: {exc!r}; "
                            "the partial file was not kept"
                        ) from exc
                    if not chunk:
                        break
                    fh.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if total is not None and received != total:
                    raise DownloadError(
                        f"download of {url} ended after {received} of the {total} bytes its "
                        "Content-Length announced; the partial file was not kept"
                    )
                if sha256 is not None and digest.hexdigest() != sha256.lower():
                    raise DownloadError(
                        f"SHA-256 mismatch for {url}: expected {sha256}, got "
                        f"{digest.hexdigest()}{_what_came(response, received)}; the file was "
                        "not kept"
                    )
        except OSError as exc:  # disk full, read-only cache, a folder in dest's place...
            raise DownloadError(f"could not write the download of {url} to {str(dest)!r}: "
                                f"{exc}; the partial file was not kept") from exc
        finally:
            if bar is not None:
                bar.close()
    return dest


def _what_came(response, received: int) -> str:
    """For a checksum mismatch: the size, and the type when the server sent a web page
    (an error or login page answered with status 200) instead of a file."""
    kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    page = (f", a {kind} answer: a web page, not the file? (a wrong URL, or a mirror that "
            "asks to log in)") if kind.startswith("text/") else ""
    return f" ({received} bytes{page})"


def copy_atomic(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a file so that ``dest`` is either absent or complete."""
    with open(src, "rb") as fin, atomic_write(dest) as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
    return Path(dest)
