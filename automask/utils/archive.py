"""Unpacking zip archives safely: no escaping members, bounded size, all or nothing.

Before anything is written, every member is checked: absolute paths, drive letters,
``..`` components and symbolic links are refused, and so is an archive whose members
add up to more than a size limit or whose unpacked size is more than a ratio times the
archive's size (a zip bomb). The archive is unpacked into a temporary sibling folder
``.<dest name>.<8 hex digits>.unpack`` and renamed onto the destination only when
complete; an existing destination with files in it is never replaced or deleted.

Limits (defaults, each overridable by an argument or an environment variable):

* :data:`MAX_UNPACK_BYTES` = 64 GiB of unpacked data, ``$AUTOMASK_MAX_UNPACK_BYTES``;
* :data:`MAX_UNPACK_RATIO` = 100 times the archive's size, ``$AUTOMASK_MAX_UNPACK_RATIO``.

Images and masks barely compress (the paper's archives unpack to about 1x their size);
deflate reaches about 1000x only on degenerate data such as zeros.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import ConfigError, DownloadError
from .download import is_temp_of, temp_name

MAX_UNPACK_BYTES = 64 * 2**30
MAX_UNPACK_RATIO = 100.0
ENV_MAX_BYTES = "AUTOMASK_MAX_UNPACK_BYTES"
ENV_MAX_RATIO = "AUTOMASK_MAX_UNPACK_RATIO"
UNPACK_SUFFIX = ".unpack"
#: A staging folder untouched for this many seconds belongs to a dead process.
STALE_UNPACK_SECONDS = 24 * 3600.0
_CHUNK = 1 << 20


def _limit(value: float | None, env: str, default: float, kind: type) -> float:
    """The argument, else the environment variable, else the default; validated."""
    source = "argument"
    if value is None:
        raw = os.environ.get(env)
        if raw is None or not raw.strip():
            return default
        source = f"${env}"
        try:
            value = kind(raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{source} must be a positive number, got {raw!r}") from exc
    if isinstance(value, bool) or not value > 0:
        raise ConfigError(f"unpack limit ({source}) must be a positive number, got {value!r}")
    return value


def _member_target(member: zipfile.ZipInfo, dest: Path) -> Path | None:
    """Where a member would land under ``dest``, or None when it would escape it."""
    name = member.filename.replace("\\", "/")
    if not name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = PurePosixPath(name).parts
    if any(part == ".." for part in parts):
        return None
    mode = member.external_attr >> 16
    if stat.S_ISLNK(mode):
        return None
    target = (dest / Path(*parts)).resolve() if parts else dest.resolve()
    root = dest.resolve()
    if target != root and root not in target.parents:
        return None
    return target


def _remove_stale_staging(dest: Path) -> None:
    """Delete staging folders of ``dest`` left by processes killed while unpacking."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(dest.parent):
            if not is_temp_of(entry.name, dest, UNPACK_SUFFIX):
                continue
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                age = time.time() - info.st_mtime
                if stat.S_ISDIR(info.st_mode) and age > STALE_UNPACK_SECONDS:
                    shutil.rmtree(entry.path)


def _new_staging(dest: Path) -> Path:
    for _ in range(100):
        staging = temp_name(dest, UNPACK_SUFFIX)
        try:
            staging.mkdir(mode=0o777)  # the umask applies, as for any new folder
            return staging
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a staging folder beside {dest}")  # pragma: no cover


def check_destination_free(dest: str | os.PathLike) -> None:
    """Raise unless ``dest`` is absent or an empty folder (which may be replaced).

    Raises
    ------
    DownloadError
        Naming ``dest`` when it is a file or a folder with something in it.
    """
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise DownloadError(f"{dest} exists and is not a folder; automask will not replace it")
    if dest.is_dir() and any(dest.iterdir()):
        raise DownloadError(
            f"{dest} already exists and was not made by automask (it lacks automask's "
            "completion marker); automask never deletes or overwrites it: move it away, "
            "delete it yourself, or choose another root"
        )


def safe_unpack(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_bytes: int | None = None,
    max_ratio: float | None = None,
    marker: tuple[str, str] | None = None,
) -> Path:
    """Unpack a zip into a new folder ``dest`` after checking every member and the size.

    Parameters
    ----------
    archive : str or PathLike
        The zip file.
    dest : str or PathLike
        Folder to create. It must not exist, or be an empty folder.
    max_bytes : int, optional
        Most unpacked bytes allowed; default ``$AUTOMASK_MAX_UNPACK_BYTES``, else
        :data:`MAX_UNPACK_BYTES` (64 GiB).
    max_ratio : float, optional
        Most unpacked bytes per archive byte; default ``$AUTOMASK_MAX_UNPACK_RATIO``,
        else :data:`MAX_UNPACK_RATIO` (100).
    marker : (str, str), optional
        ``(file name, text)`` of a file written inside the folder before it is moved into
        place, so that the folder never appears without it.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    DownloadError
        Unreadable or corrupt archive, an unsafe member, a limit exceeded (the limit and
        how to raise it are named), too little free disk space, or an existing ``dest``.
        Nothing is left behind: ``dest`` appears only complete.
    ConfigError
        A limit that is not a positive number.
    """
    archive, dest = Path(archive), Path(dest)
    limit_bytes = int(_limit(max_bytes, ENV_MAX_BYTES, MAX_UNPACK_BYTES, int))
    limit_ratio = float(_limit(max_ratio, ENV_MAX_RATIO, MAX_UNPACK_RATIO, float))
    check_destination_free(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DownloadError(f"{archive} is not a readable zip archive: {exc}") from exc
    with zf:
        members = zf.infolist()
        unsafe = [m.filename for m in members if _member_target(m, dest) is None]
        if unsafe:
            raise DownloadError(
                f"refusing to unpack {archive}: member(s) would escape the target folder: "
                + ", ".join(repr(u) for u in unsafe[:10])
            )
        total = sum(m.file_size for m in members)
        size = max(1, archive.stat().st_size)
        if total > limit_bytes:
            raise DownloadError(
                f"refusing to unpack {archive}: its members add up to {total} bytes, over the "
                f"limit of {limit_bytes} bytes (raise it with max_bytes= or ${ENV_MAX_BYTES})"
            )
        if total / size > limit_ratio:
            raise DownloadError(
                f"refusing to unpack {archive}: {size} bytes would unpack to {total} bytes, "
                f"{total / size:.0f} times its size, over the limit of {limit_ratio:g} times "
                f"(a zip bomb?; raise it with max_ratio= or ${ENV_MAX_RATIO})"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest.parent).free
        if total > free:
            raise DownloadError(
                f"cannot unpack {archive}: it needs {total} bytes but {dest.parent} has "
                f"{free} bytes free"
            )
        _remove_stale_staging(dest)
        staging = _new_staging(dest)
        try:
            _extract(zf, members, staging, archive, limit_bytes)
            if marker is not None:
                (staging / marker[0]).write_text(marker[1])
            check_destination_free(dest)
            with contextlib.suppress(FileNotFoundError, OSError):
                dest.rmdir()  # an empty folder only: rmdir never removes contents
            try:
                os.rename(staging, dest)
            except OSError as exc:
                raise DownloadError(
                    f"could not move the unpacked archive to {dest}: {exc}"
                ) from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest


def _extract(
    zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], staging: Path, archive: Path,
    limit_bytes: int,
) -> None:
    """Write every member under ``staging``, counting the bytes actually produced."""
    written = 0
    try:
        for member in members:
            target = _member_target(member, staging)
            assert target is not None, "members were checked against the same layout"
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as out:
                for chunk in iter(lambda src=src: src.read(_CHUNK), b""):
                    written += len(chunk)
                    if written > limit_bytes:
                        raise DownloadError(
                            f"refusing to unpack {archive}: it produced more than the limit of "
                            f"{limit_bytes} bytes (raise it with max_bytes= or ${ENV_MAX_BYTES})"
                        )
                    out.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:
        if isinstance(exc, DownloadError):
            raise
        raise DownloadError(f"{archive} could not be unpacked: {exc}") from exc
