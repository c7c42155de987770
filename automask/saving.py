"""Saving and loading a fitted predictor: JSON files and the trainable weights.

Layout of a predictor directory (also the run directory of a fit)::

    automask.json                  # pointer: {"format", "format_version", "current": "v-..."}
    v-<time>-<id>/predictor.json   # versions, task, classes, models and their configs
    v-<time>-<id>/<model>.safetensors   # trainable weights of each model (adapters + decoder)
    .automask.lock                 # held while a fit or a save writes here

A predictor directory is always either the complete old predictor or the complete new
one. A save writes every file of the new version into a hidden staging folder beside the
current version, renames the folder to its version name, then replaces ``automask.json``
atomically (the commit point), and only then deletes the superseded versions. A reader
resolves the pointer once and opens every weights file of that version while loading, so
a save that follows cannot pull the files from under it (on POSIX systems an open file
outlives its deletion); if the version is replaced between reading the pointer and
opening the files, loading reads the pointer again.

The frozen SAM backbone is never written: loading rebuilds it through the checkpoint
resolver and checks the SHA-256 recorded at fit time. A model trained from random
initialisation has no checkpoint to rebuild from, so all its weights are written.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
import uuid
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from .data.io import color_map_from_rows, color_map_rows
from .errors import AutomaskError, CheckpointError, PathInUseError, SavedModelError
from .training.record import CandidateRecord
from .utils import atomic_write, remove_empty_folders, sha256_file, top_created

log = logging.getLogger("automask")

FORMAT = "automask-predictor"
FORMAT_VERSION = 2
POINTER_FILE = "automask.json"
META_FILE = "predictor.json"
LOCK_FILE = ".automask.lock"
OWNER_FILE = ".automask.lock.owner"
VERSION_PREFIX = "v-"
STAGING_PREFIX = ".staging-"

_STATE_ATTRS = ("task_", "num_classes_", "classes_", "eval_metric_", "void_label_",
                "best_model_", "fit_time_")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# The folders a save creates; only these are ever deleted from a predictor directory, so a
# save into a folder that holds other things (a user's "v-data/") never removes them.
_VERSION_NAME = re.compile(rf"{VERSION_PREFIX}\d{{8}}T\d{{12}}-[0-9a-f]{{8}}")
_STAGING_NAME = re.compile(rf"{re.escape(STAGING_PREFIX)}(old-)?[a-z0-9_]{{8}}")


def weights_filename(name: str) -> str:
    """Plain file name of a model's weights; candidate names may hold ',' and '='."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).lstrip(".") + ".safetensors"


def log_folder_name(name: str) -> str:
    """The folder under ``logs/`` of candidate ``name``: the name, with the characters a
    file name cannot hold (``/`` of a checkpoint path, ``\\``, ``:``...) and ``%`` written
    as ``%XX`` and a leading dot as ``%2E``; :func:`candidate_of_log_folder` reads it back."""
    folder = re.sub(r'[%/\\:*?"<>|\x00-\x1f]', lambda m: f"%{ord(m.group()):02X}", name)
    return "%2E" + folder[1:] if folder.startswith(".") else folder


def candidate_of_log_folder(folder: str) -> str:
    """The candidate name that :func:`log_folder_name` wrote as ``folder``."""
    from urllib.parse import unquote

    return unquote(folder)


def is_plain_name(name: Any) -> bool:
    """True for a file name with no folder part, no '..' and no leading dot."""
    return isinstance(name, str) and bool(_PLAIN_NAME.fullmatch(name)) and ".." not in name


def weights_to_save(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """(scope, tensors): trainable parameters, or the whole state for random-init models."""
    if model.checkpoint_info.get("source") == "random":
        state = model.state_dict()
        return "all", {k: v.detach().cpu().contiguous() for k, v in state.items()}
    params = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
              if p.requires_grad}
    return "trainable", params


def write_weights(model: torch.nn.Module, folder: Path, name: str) -> dict[str, str]:
    """Write a model's weights into ``folder``; returns the record's weights fields."""
    from safetensors.torch import save

    scope, tensors = weights_to_save(model)
    filename = weights_filename(name)
    dest = folder / filename
    with atomic_write(dest) as fh:
        fh.write(save(tensors))
    return {"weights": filename, "weights_scope": scope, "weights_sha256": sha256_file(dest)}


# ------------------------------------------------------------------------------- lock
@contextlib.contextmanager
def run_lock(path: Path, purpose: str) -> Iterator[None]:
    """Hold the directory's lock; raise PathInUseError naming the holder when taken.

    The lock is an operating-system file lock (``filelock``), so the kernel releases it
    when its holder dies, ``kill -9`` included: a stale lock file never blocks a later
    fit. The holder's pid, host and purpose are written beside it for the message. The
    lock is re-entrant within a process (a fit's final save takes it again).
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(path / LOCK_FILE), timeout=0, is_singleton=True)
    outer = not lock.is_locked
    try:
        lock.acquire()
    except Timeout:
        raise PathInUseError(
            f"{str(path)!r} is in use: {_owner(path)} holds its lock; wait for it to finish "
            "or choose another path"
        ) from None
    try:
        if outer:
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                     "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            with atomic_write(path / OWNER_FILE, "w") as fh:
                json.dump(owner, fh)
        yield
    finally:
        if outer:
            with contextlib.suppress(OSError):
                (path / OWNER_FILE).unlink()
        lock.release()


def _owner(path: Path) -> str:
    try:
        info = json.loads((path / OWNER_FILE).read_text())
        return (f"an automask {info.get('purpose', 'process')} (pid {info.get('pid')} on "
                f"{info.get('host')}, since {info.get('since')})")
    except (OSError, ValueError, AttributeError):
        return "another automask process"


# ------------------------------------------------------------------------------ save
def has_predictor(path: Path) -> bool:
    """True when ``path`` holds a predictor pointer (complete or not)."""
    return (path / POINTER_FILE).is_file()


def save_predictor(seg, path: Path) -> Path:
    """Write ``seg`` as a new version of the predictor in ``path``; returns its folder.

    ``path`` is made absolute first (``~`` expanded), so the folder returned (and ``seg``'s weights
    folder) stay valid after a change of working directory. When ``seg``'s weights were
    read from a version of ``path`` that this save supersedes, ``seg`` is pointed at the
    new version, whose weights are the same bytes. A save that fails removes the folders
    it created.
    """
    path = Path(path).expanduser().absolute()
    created = top_created(path)  # removed again if the save fails
    path.mkdir(parents=True, exist_ok=True)
    try:
        return _save_locked(seg, path)
    except PathInUseError:
        raise  # the folder is another process's now
    except BaseException:
        if created is not None and not has_predictor(path):
            # the predictor's folder (locked while saving) is this save's; the folders
            # above it go only while empty: another save may have written beside it
            shutil.rmtree(path, ignore_errors=True)
            remove_empty_folders(path.parent, created)
        raise


def _save_locked(seg, path: Path) -> Path:
    import automask

    with run_lock(path, "save"):
        staging = _new_staging(path)
        try:
            _record_given_checkpoint(seg)
            models = {}
            for name, record in seg.models_.items():
                _copy_weights(seg, name, staging / record.weights)
                models[name] = record.to_json()
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "automask_version": automask.__version__,
                "torch_version": torch.__version__,
                "params": {**seg.get_params(), "path": None},  # lives where it is loaded
                "color_map": color_map_rows(seg.color_map_),
                **{attr: getattr(seg, attr) for attr in _STATE_ATTRS},
                "models": models,
            }
            with atomic_write(staging / META_FILE, "w") as fh:
                json.dump(meta, fh, indent=2, default=str)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            version = f"{VERSION_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}"
            os.rename(staging, path / version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(path)
        pointer = {"format": FORMAT, "format_version": FORMAT_VERSION, "current": version}
        try:
            with atomic_write(path / POINTER_FILE, "w") as fh:  # the commit point
                json.dump(pointer, fh, indent=2)
        except BaseException:  # e.g. a full disk: the old predictor stays, without our copy
            if current_version(path) != version:
                shutil.rmtree(path / version, ignore_errors=True)
            raise
        _fsync_dir(path)
        weights_dir = getattr(seg, "_weights_dir", None)
        if weights_dir is not None and Path(weights_dir).absolute().parent == path:
            seg._weights_dir = path / version  # the old folder is deleted next
        for entry in path.iterdir():  # superseded versions and crashed writers' staging
            if entry.name != version and entry.is_dir() and (
                    _VERSION_NAME.fullmatch(entry.name) or _STAGING_NAME.fullmatch(entry.name)):
                # Renamed away first, so a reader sees a version whole or not at all.
                trash = path / f"{STAGING_PREFIX}old-{secrets.token_hex(4)}"
                with contextlib.suppress(OSError):
                    os.rename(entry, trash)
                    entry = trash
                shutil.rmtree(entry, ignore_errors=True)
    return path / version


def superseded(seg) -> bool:
    """Whether ``seg``'s folder now holds a version other than the one its weights were
    read from or written to (a fit or save since then, by another object or process)."""
    weights_dir = getattr(seg, "_weights_dir", None)
    path = Path(seg.path_)
    if weights_dir is None or Path(weights_dir).parent.resolve() != path.resolve():
        return False  # weights held elsewhere (a fit's own folder): nothing to compare
    return current_version(path) != Path(weights_dir).name


def current_version(path: Path) -> str | None:
    """The version ``path``'s pointer names (the folder name of its current copy), or None
    when it names none."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((path / POINTER_FILE).read_text()).get("current")
    return None


def _new_staging(path: Path) -> Path:
    """A new, empty staging folder in ``path``; its mode follows the umask like any folder."""
    for _ in range(100):
        staging = path / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
        try:
            staging.mkdir(mode=0o777)
            return staging
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a staging folder in {path}")  # pragma: no cover


def _copy_weights(seg, name: str, dest: Path) -> None:
    data, _ = read_weights(seg, name)  # checked: a corrupted file is never copied on
    with atomic_write(dest) as out:
        out.write(data)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------ load
class _Superseded(Exception):
    """The version read from the pointer disappeared while loading (a save replaced it)."""


def load_predictor(cls, path: Path):
    """Inverse of :func:`save_predictor`; raises SavedModelError on any inconsistency.

    ``path`` is made absolute first (``~`` expanded): the loaded predictor's ``path_``
    and weights folder do not depend on the working directory.
    """
    path = Path(path).expanduser().absolute()
    for _ in range(100):
        version = _read_pointer(path)
        try:
            return _load_version(cls, path, version)
        except _Superseded:
            if _read_pointer(path) == version:
                missing = (f"whose {META_FILE} is missing" if (path / version).is_dir()
                           else "which is missing")
                raise SavedModelError(
                    f"{str(path)!r} is incomplete: {POINTER_FILE} names version {version!r}, "
                    f"{missing}"
                ) from None
            time.sleep(0.01)
    raise SavedModelError(f"{str(path)!r} kept changing while it was being loaded")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SavedModelError(f"{str(file)!r} is corrupted: {exc}") from exc


def _read_pointer(path: Path) -> str:
    pointer_path = path / POINTER_FILE
    if path.is_file():
        raise SavedModelError(f"{str(path)!r} is a file; pass the predictor's folder (the one "
                              f"holding {POINTER_FILE})")
    if not path.exists():
        raise SavedModelError(f"no such folder {str(path)!r}: pass the folder of a saved "
                              "automask predictor")
    if not pointer_path.is_file() and (path / META_FILE).is_file():
        raise SavedModelError(f"{str(path)!r} is a version folder inside a predictor: load "
                              f"its parent {str(path.parent)!r}")
    if not pointer_path.is_file():
        raise SavedModelError(f"{str(path)!r} is not a saved automask predictor: no "
                              f"{POINTER_FILE}{_why_no_pointer(path)}")
    try:
        pointer = _read_json(pointer_path)
    except OSError as exc:
        raise SavedModelError(f"cannot read {str(pointer_path)!r}: {exc}") from exc
    if not isinstance(pointer, dict) or pointer.get("format") != FORMAT:
        raise SavedModelError(f"{str(pointer_path)!r} is not an automask predictor file")
    _check_version(pointer, path)
    version = pointer.get("current")
    if not (is_plain_name(version) and version.startswith(VERSION_PREFIX)):
        raise SavedModelError(
            f"{str(pointer_path)!r}: 'current' must name a version folder inside the "
            f"predictor directory, got {version!r}")
    return version


def _why_no_pointer(path: Path) -> str:
    """What a folder without a pointer holds instead, for the loading error's message."""
    from .training.state import STATE_DIR

    if not (path / STATE_DIR / "plan.json").is_file():
        return _lost_pointer(path)
    if _lock_held(path):
        return (f"; a fit is still writing into it ({_owner(path)}): load it once that fit "
                "has finished")
    return (f"; it holds an interrupted fit ({STATE_DIR}/): fit(..., resume=True) "
            "(automask fit --resume --path ...) continues it and saves the predictor")


def _lost_pointer(path: Path) -> str:
    """The advice for a folder that holds versions but lost its pointer (a partial copy)."""
    try:
        versions = sorted(entry.name for entry in path.iterdir()
                          if _VERSION_NAME.fullmatch(entry.name)
                          and (entry / META_FILE).is_file())
    except OSError:
        return ""
    if not versions:
        return ""
    pointer = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                          "current": versions[-1]})
    return (f", yet it holds the saved version {versions[-1]!r}"
            + (f" (the newest of {len(versions)})" if len(versions) > 1 else "")
            + f": {POINTER_FILE}, which names the version to load, was left behind (a "
            f"partial copy?). Copy the whole folder again, or write {POINTER_FILE} in it "
            f"holding {pointer}")


def _lock_held(path: Path) -> bool:
    """Whether another process holds ``path``'s lock now (probing takes it for a moment)."""
    from filelock import FileLock, Timeout

    if not (path / OWNER_FILE).is_file():  # written by every holder, removed on release
        return False
    lock = FileLock(str(path / LOCK_FILE), timeout=0, is_singleton=True)
    if lock.is_locked:  # held by this process
        return True
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:  # a read-only folder: nobody can be writing into it
        return False
    lock.release()
    return False


def _check_version(meta: dict, path: Path) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise SavedModelError(
            f"{str(path)!r} was saved in format version {meta.get('format_version')!r} by "
            f"automask {meta.get('automask_version', '(unknown)')}; this automask reads "
            f"version {FORMAT_VERSION}"
        )


def _load_version(cls, path: Path, version: str):
    folder = path / version
    meta_path = folder / META_FILE
    try:
        meta = _read_json(meta_path)
    except FileNotFoundError:
        raise _Superseded() from None
    except OSError as exc:
        raise SavedModelError(f"cannot read {str(meta_path)!r}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SavedModelError(f"{str(meta_path)!r} is not an automask predictor file")
    _check_version(meta, path)
    handles: dict[str, IO[bytes]] = {}
    try:
        seg = cls(**meta["params"])
        for attr in _STATE_ATTRS:
            setattr(seg, attr, meta[attr])
        seg.color_map_ = color_map_from_rows(meta["color_map"])
        seg.path_ = path
        seg.models_ = {}
        if not isinstance(meta["models"], dict) or not meta["models"]:
            raise SavedModelError(
                f"{str(meta_path)!r}: 'models' must be a non-empty object of model records, "
                f"got {_short(meta['models'])}")
        for name, raw in meta["models"].items():
            weights = raw.get("weights") if isinstance(raw, dict) else None
            if not is_plain_name(weights):
                raise SavedModelError(
                    f"{str(meta_path)!r}: model {name!r} names weights {weights!r}; weights "
                    "must be a plain file name inside the predictor directory")
            try:
                record = CandidateRecord.from_json(raw)
            except (KeyError, TypeError, ValueError, AutomaskError) as exc:
                raise SavedModelError(f"{str(meta_path)!r}: the record of model {name!r} is "
                                      f"incomplete or invalid: {exc!r}{_saved_by(meta)}") from exc
            try:
                handles[name] = open(folder / weights, "rb")  # noqa: SIM115 (kept open)
            except FileNotFoundError:
                if not folder.is_dir() or _read_pointer(path) != version:
                    raise _Superseded() from None
                raise SavedModelError(
                    f"missing weights file {weights!r} in {str(folder)!r}") from None
            except OSError as exc:  # a folder in its place, no permission to read it
                raise SavedModelError(
                    f"cannot read weights file {weights!r} in {str(folder)!r}: "
                    f"{exc.strerror or exc}") from exc
            seg.models_[name] = record
        if seg.best_model_ not in seg.models_:
            raise SavedModelError(
                f"{str(meta_path)!r}: 'best_model_' is {seg.best_model_!r}, which is not one "
                f"of its models ({', '.join(seg.models_)})")
        seg.config_ = seg.models_[seg.best_model_].config
        _check_state(seg, meta_path)
    except (SavedModelError, _Superseded):
        _close_all(handles)
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, AutomaskError) as exc:
        _close_all(handles)
        raise SavedModelError(
            f"{str(meta_path)!r} is incomplete or invalid: {exc!r}{_saved_by(meta)}") from exc
    seg._loaded = {}
    seg._weights_dir = folder
    seg._weights_files = handles
    weakref.finalize(seg, _close_all, handles)
    return seg


def _check_state(seg, meta_path: Path) -> None:
    """SavedModelError naming ``meta_path`` and the field when the fitted state read from
    it does not hold together (an edited file), instead of a failure at prediction."""
    import numbers

    from .training.plan import choose_eval_metric

    def bad(field: str, why: str) -> SavedModelError:
        return SavedModelError(f"{str(meta_path)!r}: {field!r} is {_short(getattr(seg, field))}"
                               f"; {why}")

    if seg.task_ not in ("binary", "multiclass"):
        raise bad("task_", "it must be 'binary' or 'multiclass'")
    k = seg.num_classes_
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 2 or (
            seg.task_ == "binary" and k != 2):
        raise bad("num_classes_", "a binary predictor has 2 classes, a multi-class one 2 "
                                  "or more")
    names = seg.classes_
    if not isinstance(names, list) or len(names) != k or not all(
            isinstance(n, str) for n in names):
        raise bad("classes_", f"it must be a list of {k} class names (num_classes_)")
    for name, record in seg.models_.items():
        if record.config.data.void_label != seg.void_label_:
            raise bad("void_label_", f"model {name!r} was trained with data.void_label "
                                     f"{record.config.data.void_label!r}")
    try:
        choose_eval_metric(seg.eval_metric_, seg.task_)
    except AutomaskError as exc:
        raise bad("eval_metric_", str(exc)) from None


def enclosing_predictor(path: str | os.PathLike) -> str | None:
    """The nearest folder above ``path`` that holds a saved predictor (its pointer file
    ``automask.json``) or a fit's state, else None."""
    from .training.state import STATE_DIR

    target = Path(os.path.realpath(Path(path).expanduser()))
    for folder in target.parents:
        if (folder / POINTER_FILE).is_file() or (folder / STATE_DIR).is_dir():
            return str(folder)
    return None


def predictor_part(folder: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """Which part of the predictor (or fit) in ``folder`` writing ``path`` would damage
    (``"its file 'automask.json'"``, ``"its folder 'logs'"``), else None: its pointer file,
    lock, versions, staging folders, resume state (``.automask_fit``) or training logs,
    whether or not the file exists yet. Other files in the folder (a picture saved beside
    the predictor) are the user's."""
    from .training.state import STATE_DIR

    root = Path(os.path.realpath(Path(folder).expanduser()))
    target = Path(os.path.realpath(Path(path).expanduser()))
    if target == root or root not in target.parents:
        return None
    first = target.relative_to(root).parts[0]
    if first in (POINTER_FILE, LOCK_FILE, OWNER_FILE, STATE_DIR, "logs") or \
            first.startswith((VERSION_PREFIX, STAGING_PREFIX)):
        return f"its {'file' if len(target.relative_to(root).parts) == 1 else 'folder'} {first!r}"
    return None


def _saved_by(meta: dict) -> str:
    """A hint for a file written by another automask version (e.g. a newer one's keys)."""
    import automask

    saved = meta.get("automask_version")
    if saved is None or str(saved) == automask.__version__:
        return ""
    return (f" (it was saved by automask {saved}; this is automask {automask.__version__}: "
            "load it with the version that saved it)")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def reload_into(seg, path: Path) -> None:
    """Give the estimator ``seg`` the fitted state of the predictor in ``path``, as
    :func:`load_predictor` returns it; ``seg``'s constructor arguments stay its own.

    The weights files stay open for as long as ``seg`` lives (the loaded copy's own
    finalizer is emptied first, so it closes nothing when that copy goes).
    """
    fitted = load_predictor(type(seg), Path(path))
    handles = dict(fitted._weights_files)
    fitted._weights_files.clear()
    for attr, value in vars(fitted).items():
        if attr not in seg.get_params():
            setattr(seg, attr, value)
    seg._weights_files = handles
    weakref.finalize(seg, _close_all, handles)


def _close_all(handles: dict[str, IO[bytes]]) -> None:
    for handle in handles.values():
        handle.close()


def read_weights(seg, name: str) -> tuple[bytes, str]:
    """(bytes of model ``name``'s weights file, a description of where they came from).

    The bytes are checked against the SHA-256 recorded when they were written, so a file
    changed since (corrupted on disk, edited) is named here, never copied on by a save or a
    pickle to fail later under another name.
    """
    record = seg.models_[name]
    where = str(Path(seg._weights_dir) / record.weights)
    data = getattr(seg, "_weights_bytes", {}).get(name)  # an unpickled predictor's
    handle = getattr(seg, "_weights_files", {}).get(name)
    try:
        if data is None:
            data = _read_whole(handle) if handle is not None else Path(where).read_bytes()
    except OSError as exc:
        raise SavedModelError(f"cannot read weights {where!r}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != record.weights_sha256:
        raise SavedModelError(f"weights file {where!r} is corrupted (SHA-256 mismatch): it "
                              "changed after it was written")
    return data, where


def keep_weights_open(seg) -> None:
    """Keep each of ``seg``'s weights files (in ``seg._weights_dir``) open for as long as
    ``seg`` lives, as :func:`load_predictor` does: the fitted predictor then pickles and
    saves even after its folder is moved, deleted or superseded. They are read by path
    instead when they cannot be opened, or when they would take more than half of the
    process's open-file limit (many fitted predictors kept at once must not starve image
    reading)."""
    handles: dict[str, IO[bytes]] = {}
    if not _descriptors_to_spare(len(seg.models_)):
        log.debug("weights files in %s not kept open: near the open-file limit",
                  seg._weights_dir)
        return
    try:
        for name, record in seg.models_.items():
            handles[name] = open(Path(seg._weights_dir) / record.weights, "rb")  # noqa: SIM115
    except OSError as exc:
        _close_all(handles)
        log.debug("weights files in %s not kept open: %s", seg._weights_dir, exc)
        return
    close_weights(seg)
    seg._weights_files = handles
    weakref.finalize(seg, _close_all, handles)


def _descriptors_to_spare(count: int) -> bool:
    """Whether ``count`` more open files keep this process within half its open-file
    limit (True where that cannot be known)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        used = len(os.listdir("/proc/self/fd"))
    except (ImportError, OSError, ValueError):
        return True
    return soft == resource.RLIM_INFINITY or used + count <= soft // 2


def close_weights(seg) -> None:
    """Close the weights files ``seg`` keeps open (before it is fitted again)."""
    _close_all(getattr(seg, "_weights_files", {}))


_READING = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child never waits for its parent's reader
    os.register_at_fork(after_in_child=lambda: globals().update(_READING=threading.Lock()))


def _read_whole(handle: IO[bytes]) -> bytes:
    """The whole file behind an open handle, read by offset: threads reading one handle at
    once (a prediction loading its model while another pickles the predictor) never move
    each other's position."""
    if not hasattr(os, "pread"):  # Windows: one reader at a time
        with _READING:
            handle.seek(0)
            return handle.read()
    fd = handle.fileno()
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 26), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def rebuild_model(seg, name: str) -> torch.nn.Module:
    """Build model ``name`` of a fitted or loaded predictor and load its saved weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from .training.builder import build_candidate_model

    record: CandidateRecord = seg.models_[name]
    data, where = read_weights(seg, name)  # SHA-256 checked
    recorded = record.checkpoint.get("sha256")
    if record.checkpoint.get("source") != "random" and not (
            isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded)):
        raise SavedModelError(
            f"the record of model {name!r} holds no SHA-256 of the SAM checkpoint it was "
            f"trained on (found {recorded!r}), so no file can be checked to be that one; the "
            "saved predictor is damaged or was edited: fit it again")
    given = getattr(seg, "_checkpoint_file", None)

    def build(checkpoint):
        return build_candidate_model(
            record.config, 1 if seg.task_ == "binary" else seg.num_classes_,
            checkpoint=checkpoint, progress=seg.verbosity >= 2,
            sha256=recorded)[0]  # checked on the file's bytes before torch.load reads them

    try:
        first = None
        tries = _checkpoints_to_try(record, given)
        if not tries:  # a file of the user's own, moved: no cache or download holds it
            raise CheckpointError(
                f"{record.checkpoint.get('path')!r} is not there, and a file of one's own (not "
                "the official checkpoint) is in no cache and cannot be downloaded")
        for checkpoint in tries:
            try:
                model = build(checkpoint)
                break
            except CheckpointError as exc:  # another file at that path: try the next
                first = first or exc
        else:
            assert first is not None
            raise first
    except CheckpointError as exc:
        where = record.checkpoint.get("path")
        gone = bool(where) and not Path(where).is_file()
        detail = ("and the checkpoint given to load is not that file" if given else
                  "which is no longer there, and no other copy was found" if gone
                  else "and no file with that SHA-256 was found")
        moved = ("" if given else
                 "; if the file has moved, load the predictor with SemanticSegmentor.load(path, "
                 "checkpoint=<its path now>) (automask: --checkpoint PATH)")
        raise SavedModelError(
            f"model {name!r} was trained on the SAM checkpoint {where} (SHA-256 {recorded}), "
            f"{detail}: {exc}{moved}"
        ) from exc
    if recorded and model.checkpoint_info.get("sha256") != recorded:
        raise SavedModelError(
            f"the SAM checkpoint found for model {name!r} ({model.checkpoint_info.get('path')}) "
            f"has SHA-256 {model.checkpoint_info.get('sha256')}, but the model was trained on "
            f"{recorded}"
        )
    _record_where_found(record, model.checkpoint_info.get("path"))
    try:
        tensors = load(data)
    except (SafetensorError, OSError) as exc:
        raise SavedModelError(f"cannot read weights {where!r}: {exc}") from exc
    _, expected = weights_to_save(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SavedModelError(
            f"weights {where!r} do not fit model {name!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    with torch.no_grad():
        for key, value in tensors.items():
            if state[key].shape != value.shape:
                raise SavedModelError(f"weights {key!r}: shape {tuple(value.shape)} in the file, "
                                      f"{tuple(state[key].shape)} in the model")
            state[key].copy_(value)
    return model.eval()


def _record_where_found(record: CandidateRecord, used: str | None) -> None:
    """When the recorded checkpoint file is gone and the model was built from another copy
    (given to ``load``, or in the cache), its SHA-256 checked: record that copy, so that the
    predictor saved again names a file it can be loaded from."""
    where = record.checkpoint.get("path")
    if (record.checkpoint.get("sha256") and used and used != where
            and not (where and Path(where).is_file()) and Path(used).is_file()):
        record.checkpoint = {**record.checkpoint, "path": str(used)}


def _record_given_checkpoint(seg) -> None:
    """Before a save: the file given to ``load(checkpoint=...)`` becomes the recorded path
    of every model trained on it whose recorded file is gone, built yet or not, so that the
    predictor saved again loads without ``checkpoint`` (its SHA-256 read once)."""
    given = getattr(seg, "_checkpoint_file", None)
    if given is None or not Path(given).is_file():
        return
    digest = None
    for record in seg.models_.values():
        where = record.checkpoint.get("path")
        if record.checkpoint.get("source") == "random" or (where and Path(where).is_file()):
            continue
        digest = digest or sha256_file(Path(given))
        if record.checkpoint.get("sha256") == digest:
            record.checkpoint = {**record.checkpoint, "path": str(Path(given).absolute())}


def _checkpoints_to_try(record: CandidateRecord, given: str | None = None) -> list:
    """The checkpoint arguments that may rebuild the same backbone, in the order tried (each
    checked against the record's SHA-256 before it is read): random; else the recorded
    file, when there; the file ``given`` to :meth:`~automask.SemanticSegmentor.load`; and
    the resolver (cache, then download) for an official checkpoint only: a file of the
    user's own (MedSAM) is in no cache, and downloading the official one cannot match."""
    info = record.checkpoint
    if info.get("source") == "random":
        return ["random"]
    tries: list = []
    recorded_path = info.get("path")
    if recorded_path and Path(recorded_path).is_file():
        tries.append(recorded_path)
    if given is not None and given not in tries:
        tries.append(given)
    if info.get("source") in ("cache", "download") or _is_official(record):
        tries.append(None)
    return tries


def _is_official(record: CandidateRecord) -> bool:
    """Whether the record's checkpoint SHA-256 is its backbone's pinned (or configured)
    one, so that the cache or a download may hold it."""
    from .models.backbones import get_spec
    from .models.checkpoint import _override

    backbone = record.config.model.backbone
    try:
        pinned = {get_spec(backbone).sha256, _override("SHA256", backbone)}
    except (KeyError, ValueError):
        return False
    return record.checkpoint.get("sha256") in {p.lower() for p in pinned if p}
