"""The Conv-LoRA paper's binary benchmarks: download, verify, unpack safely, read splits.

The paper's authors publish each benchmark as a zip archive (used by the AutoGluon
Conv-LoRA example) holding one folder with ``train.csv``, ``val.csv`` and ``test.csv``
(``polyp`` and ``camo_sem_seg`` have ``test_<dataset>.csv`` files instead) whose
``image``/``label`` columns are paths relative to that folder.

No SHA-256 is pinned for these archives yet (``sha256: None`` in :data:`BENCHMARKS`):
they are verified only when the caller passes ``sha256=``. Unpacking goes through
:func:`automask.utils.archive.safe_unpack` (no escaping members, size and ratio limits,
all or nothing); a folder automask did not make is never deleted or overwritten.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pandas as pd

from ..errors import ConfigError, DataValidationError
from ..utils.archive import check_destination_free, safe_unpack
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


def _find_split_folder(folder: Path) -> Path:
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    for candidate in candidates:
        if (candidate / "train.csv").is_file():
            return candidate
    raise DataValidationError(f"no train.csv found in {folder} or its sub-folders")


def _read_split(csv: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(csv)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataValidationError(f"cannot read the split file {csv}: {exc}") from exc
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


def _archive_usable(archive: Path, sha256: str | None) -> bool:
    """A cached archive is reused only when it matches ``sha256`` (if given) and opens."""
    if not archive.is_file():
        return False
    if sha256 is not None:
        return sha256_file(archive) == sha256.lower()
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return False
    return True


def fetch_benchmark(
    name: str,
    root: str | os.PathLike | None = None,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    max_bytes: int | None = None,
    max_ratio: float | None = None,
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
    max_bytes, max_ratio : optional
        Unpacking limits, see :func:`automask.utils.archive.safe_unpack` (defaults 64 GiB
        and 100 times the archive's size; ``$AUTOMASK_MAX_UNPACK_BYTES`` and
        ``$AUTOMASK_MAX_UNPACK_RATIO`` override them).

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
        Failed or short download, checksum mismatch, unsafe or oversized archive, or a
        folder ``<root>/<name>`` that automask did not make (it is never touched).
    DataValidationError
        No ``train.csv`` in the unpacked folder, or a split CSV that cannot be read or
        lacks the ``image``/``label`` columns (the message names the file). Hidden files
        (macOS ``._train.csv``) are not splits and are skipped.

    Notes
    -----
    The folder ``<root>/<name>`` is unpacked beside itself and moved into place complete,
    with a ``.complete`` marker inside. A folder without the marker was not made by
    automask: it is reported, never deleted. A cached archive that does not match
    ``sha256`` or cannot be opened as a zip is downloaded again (the new file replaces it
    only once complete and verified).
    """
    entry = BENCHMARKS.get(name)
    if entry is None and not url:
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
        check_destination_free(folder)  # before any download: a user's folder stays as it is
        if not _archive_usable(archive, sha256):
            download_file(url, archive, sha256=sha256, progress=progress)
        safe_unpack(archive, folder, max_bytes=max_bytes, max_ratio=max_ratio,
                    marker=(_DONE, f"{url}\n"))
    split_folder = _find_split_folder(folder)
    # Hidden files are skipped: "._train.csv" is macOS metadata (AppleDouble), not a split.
    csvs = sorted(p for p in split_folder.glob("*.csv") if not p.name.startswith("."))
    order = {"train": 0, "val": 1, "test": 2}
    csvs.sort(key=lambda p: (order.get(p.stem, 3), p.stem))
    return {csv.stem: _read_split(csv) for csv in csvs}
