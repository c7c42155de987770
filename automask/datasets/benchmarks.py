"""The Conv-LoRA paper's binary benchmarks: download, verify, unpack safely, read splits.

The paper's authors publish each benchmark as a zip archive (used by the AutoGluon
Conv-LoRA example) holding one folder with ``train.csv``, ``val.csv`` and ``test.csv``
(``polyp`` and ``camo_sem_seg`` have ``test_<dataset>.csv`` files instead) whose
``image``/``label`` columns are paths relative to that folder.

No SHA-256 is pinned for these archives yet (``sha256: None`` in :data:`BENCHMARKS`):
they are verified only when the caller passes ``sha256=``.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import pandas as pd

from ..errors import ConfigError, DataValidationError, DownloadError
from ..utils.download import cache_dir, download_file, sha256_file

_BASE_URL = "https://automl-mm-bench.s3.amazonaws.com/semantic_segmentation"
_DONE = ".complete"

#: name -> {"url": ..., "sha256": hex digest or None (not pinned)}
BENCHMARKS: dict[str, dict[str, str | None]] = {
    name: {"url": f"{_BASE_URL}/{name}.zip", "sha256": None}
    for name in (
        "polyp",
        "isic2017",
        "camo_sem_seg",
        "SBU-shadow",
        "leaf_disease_segmentation",
        "road_segmentation",
    )
}


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


def safe_unpack(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack a zip into ``dest`` after checking that no member escapes it.

    Every member is checked before anything is written; absolute paths, drive letters,
    ``..`` components and symbolic links are refused. ``dest`` appears only once the
    whole archive is unpacked (it is built in a temporary sibling folder).

    Raises
    ------
    DownloadError
        Unreadable archive or an unsafe member (named in the message).
    """
    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DownloadError(f"{archive} is not a readable zip archive: {exc}") from exc
    with zf:
        members = zf.infolist()
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            unsafe = [m.filename for m in members if _member_target(m, staging) is None]
            if unsafe:
                raise DownloadError(
                    f"refusing to unpack {archive}: member(s) would escape the target folder: "
                    + ", ".join(repr(u) for u in unsafe[:10])
                )
            try:
                for member in members:
                    zf.extract(member, staging)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise DownloadError(f"{archive} could not be unpacked: {exc}") from exc
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest


def _find_split_folder(folder: Path) -> Path:
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    for candidate in candidates:
        if (candidate / "train.csv").is_file():
            return candidate
    raise DataValidationError(f"no train.csv found in {folder} or its sub-folders")


def _read_split(csv: Path) -> pd.DataFrame:
    df = pd.read_csv(csv)
    first = str(df.columns[0]) if len(df.columns) else ""
    if first == "" or first.startswith("Unnamed"):
        df = df.set_index(df.columns[0])
        df.index.name = None
    missing = [c for c in ("image", "label") if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"{csv} lacks column(s) {missing}; it has {[str(c) for c in df.columns]}"
        )
    base = csv.parent
    for column in ("image", "label"):
        df[column] = [
            os.path.abspath(base / str(p)) if isinstance(p, str) and p.strip() else p
            for p in df[column]
        ]
    return df


def fetch_benchmark(
    name: str,
    root: str | os.PathLike | None = None,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Download (once), verify, unpack and read one of the paper's benchmarks.

    Parameters
    ----------
    name : str
        One of :data:`BENCHMARKS` (``polyp``, ``isic2017``, ``camo_sem_seg``,
        ``SBU-shadow``, ``leaf_disease_segmentation``, ``road_segmentation``), or any
        name when ``url`` is given.
    root : path, optional
        Folder for the archive and the unpacked data; default ``<cache>/datasets``.
    url : str, optional
        Override the registered URL (mirrors, tests).
    sha256 : str, optional
        Expected SHA-256 of the archive; default: the registered one (None for now, so
        unverified unless given).
    progress : bool
        Show a download progress bar.

    Returns
    -------
    dict of str to pandas.DataFrame
        One frame per CSV (``train``, ``val``, ``test`` or ``test_<dataset>``) with
        absolute ``image`` and ``label`` paths.

    Raises
    ------
    ConfigError
        Unknown name without ``url``.
    DownloadError
        Failed download, checksum mismatch or unsafe archive.
    """
    entry = BENCHMARKS.get(name)
    if entry is None and url is None:
        raise ConfigError(
            f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)} (or pass url=)"
        )
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"benchmark name {name!r} must be a plain folder name")
    url = url or entry["url"]
    sha256 = sha256 or (entry or {}).get("sha256")
    base = Path(root).expanduser() if root is not None else cache_dir() / "datasets"
    archive = base / f"{name}.zip"
    folder = base / name
    if not (folder / _DONE).exists():
        if archive.exists() and sha256 is not None and sha256_file(archive) != sha256.lower():
            archive.unlink()
        if not archive.exists():
            download_file(url, archive, sha256=sha256, progress=progress)
        safe_unpack(archive, folder)
        (folder / _DONE).write_text(f"{url}\n")
    split_folder = _find_split_folder(folder)
    csvs = sorted(split_folder.glob("*.csv"))
    order = {"train": 0, "val": 1, "test": 2}
    csvs.sort(key=lambda p: (order.get(p.stem, 3), p.stem))
    return {csv.stem: _read_split(csv) for csv in csvs}
