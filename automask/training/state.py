"""The resumable state of a fit, kept in ``<run>/.automask_fit/`` until the fit completes.

Layout::

    plan.json                  # the fit's arguments, candidates and data (what resume checks)
    train.csv, tuning.csv      # the validated data (absolute paths), for `automask fit --resume`
    inputs/<k>-<column>/<sha256>.npy|.png|.tiff
                               # images and masks given in memory, as files named by content
    checkpoints/<model>.ckpt   # end of the candidate's last completed epoch: trainable weights,
                               # optimiser, schedule, loops, callbacks, RNG (Lightning format)
    models/<model>.safetensors # weights of each finished candidate
    records/<model>.json       # a finished candidate's record (the commit point), or why it
                               # was dropped
    weights.json               # the SAM file(s) found and their SHA-256 (what resume checks)
    replaced_logs/<folder>     # the replaced predictor's logs of the candidates trained so far
    interrupted_logs/<folder>  # an interrupted fit's own logs, while the predictor has its own

Every file is written atomically (temporary file, then rename), so ``kill -9`` at any
moment leaves each one complete or absent, and at most the running epoch is lost.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import ConfigError
from ..utils import atomic_write, sha256_file
from .record import CandidateRecord

STATE_DIR = ".automask_fit"


def _stem(name: str) -> str:
    from ..saving import weights_filename

    return weights_filename(name)[: -len(".safetensors")]


class FitState:
    """The state folder of a fit in ``run_dir``."""

    def __init__(self, run_dir: Path):
        self.root = Path(run_dir) / STATE_DIR

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def inputs_dir(self) -> Path:
        return self.root / "inputs"

    @property
    def replaced_logs_dir(self) -> Path:
        """Where the training logs of the predictor a fit replaces wait (see
        :meth:`stash_logs`) until the new one is saved."""
        return self.root / "replaced_logs"

    def stash_logs(self, folders: list[Path]) -> None:
        """Move the log ``folders`` of a candidate trained afresh out of the way, into
        :attr:`replaced_logs_dir`, rather than delete them: until the new predictor is saved
        the old one stays in the run directory, and a fit that fails gives them back
        (:meth:`restore_logs`). A folder already waiting there (set aside by an interrupted
        fit, whose own logs these are) stays: it belongs to the predictor in the folder."""
        for folder in folders:
            dest = self.replaced_logs_dir / folder.name
            if dest.exists():
                shutil.rmtree(folder, ignore_errors=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(folder, dest)

    def restore_logs(self, logs_dir: Path) -> None:
        """Put the folders :meth:`stash_logs` set aside back into ``logs_dir``, each in place
        of a folder of the same name there (the failed fit's)."""
        if not self.replaced_logs_dir.is_dir():
            return
        for folder in sorted(self.replaced_logs_dir.iterdir()):
            dest = Path(logs_dir) / folder.name
            if dest.exists():
                shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(folder, dest)
        shutil.rmtree(self.replaced_logs_dir, ignore_errors=True)

    @property
    def parked_logs_dir(self) -> Path:
        """Where an interrupted fit's own training logs wait (see :meth:`park_logs`) while
        the predictor it was to replace has its logs back."""
        return self.root / "interrupted_logs"

    def park_logs(self, logs_dir: Path, ours: list[str]) -> None:
        """An interrupted fit's log folders ``ours`` (names under ``logs_dir``) go into
        :attr:`parked_logs_dir`, and the folders :meth:`stash_logs` set aside come back:
        until the fit resumes, the run folder's logs are those of its predictor."""
        for name in ours:
            dest = self.parked_logs_dir / name
            if dest.exists():
                shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(logs_dir) / name, dest)
        self.restore_logs(logs_dir)

    def unpark_logs(self, logs_dir: Path, replaced: list[Path]) -> None:
        """Undo :meth:`park_logs` when the fit resumes: the predictor's log folders
        ``replaced`` (those of the parked logs' candidates) are set aside again and the
        parked ones return to ``logs_dir``."""
        if not self.parked_logs_dir.is_dir():
            return
        self.stash_logs(replaced)
        for folder in sorted(self.parked_logs_dir.iterdir()):
            dest = Path(logs_dir) / folder.name
            if dest.exists():  # not the predictor's (stashed above): a leftover
                shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(folder, dest)
        shutil.rmtree(self.parked_logs_dir, ignore_errors=True)

    def keep_inputs(self, moves: dict[str, str]) -> None:
        """Move each file ``moves`` names (a temporary file of an in-memory picture) to its
        new path in :attr:`inputs_dir`: renamed on one filesystem, else copied atomically
        and removed, so that the pictures are not on disk twice. A file already there
        (kept by the interrupted fit; named by its content) stays as it is."""
        for src, dst in moves.items():
            dst = Path(dst)
            assert dst.parent.parent == self.inputs_dir, dst
            if not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(src, dst)
                    continue
                except OSError:  # another filesystem (EXDEV)
                    with atomic_write(dst, "wb") as fh, open(src, "rb") as source:
                        shutil.copyfileobj(source, fh)
            Path(src).unlink(missing_ok=True)

    def exists(self) -> bool:
        return (self.root / "plan.json").is_file()

    def has_progress(self) -> bool:
        """True when an epoch or a candidate completed (resume would save work)."""
        if any(self.root.glob("checkpoints/*.ckpt")):
            return True
        for path in self.root.glob("records/*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                return True  # unreadable: keep it, resume names the file at fault
            if not isinstance(data, dict) or "dropped" not in data:
                return True
        return False

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------- plan
    def start(self, plan: dict[str, Any], frames: dict[str, pd.DataFrame]) -> None:
        """Record a new fit's plan and data (replacing any earlier state but the logs an
        interrupted fit set aside: they are those of the predictor still in the folder)."""
        if self.replaced_logs_dir.is_dir():
            for entry in self.root.iterdir():
                if entry != self.replaced_logs_dir:
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
        else:
            self.remove()
        for key, frame in frames.items():
            with atomic_write(self.root / f"{key}.csv", "w") as fh:
                frame.to_csv(fh, index=False)
        with atomic_write(self.root / "plan.json", "w") as fh:
            json.dump(_plain(plan), fh, indent=2)

    def plan(self) -> dict[str, Any]:
        try:
            plan = json.loads((self.root / "plan.json").read_text())
            if not isinstance(plan, dict):
                raise ValueError(f"it holds a {type(plan).__name__}, not an object")
            return plan
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot resume: {str(self.root / 'plan.json')!r} is unreadable "
                              f"({exc}); fit again with overwrite=True") from exc

    def data_file(self, key: str) -> Path | None:
        path = self.root / f"{key}.csv"
        return path if path.is_file() else None

    def check_plan(self, plan: dict[str, Any]) -> None:
        """Raise ConfigError naming the first entry that differs from the recorded plan."""
        recorded, given = self.plan(), _plain(plan)
        for key in sorted(set(recorded) | set(given)):
            if key == "call":
                continue
            if recorded.get(key) != given.get(key):
                where, then, now = _first_difference(recorded.get(key), given.get(key), key)
                presets = [(c if isinstance(c, dict) else {}).get("presets")
                           for c in (recorded.get("call"), given.get("call"))]
                cause = (f" (the interrupted fit used presets={presets[0]!r}, this one "
                         f"presets={presets[1]!r})" if presets[0] != presets[1] else "")
                raise ConfigError(
                    f"cannot resume the fit in {str(self.root.parent)!r}: {where} differs "
                    f"from the interrupted fit's ({_then_and_now(then, now)})"
                    f"{cause}; pass the same data and options, or fit with overwrite=True "
                    "to start again"
                )

    # ---------------------------------------------------------- candidates
    def checkpoint_path(self, name: str) -> Path:
        return self.root / "checkpoints" / f"{_stem(name)}.ckpt"

    def record_weights(self, weights: dict[str, tuple[str, str]]) -> None:
        """Record the pretrained weights a new fit found (:func:`~automask.training.plan.
        locate_weights`: backbone and ``model.checkpoint`` -> file and SHA-256)."""
        with atomic_write(self.root / "weights.json", "w") as fh:
            json.dump(weights, fh, indent=2)

    def check_weights(self, weights: dict[str, tuple[str, str]]) -> None:
        """Raise ConfigError when a resumed fit found other weights than the interrupted
        one (:meth:`record_weights`): a file replaced in the meantime, whose candidates
        would train partly on each and whose finished ones could no longer be loaded."""
        path = self.root / "weights.json"
        if not path.is_file():  # recorded by no earlier automask: nothing to compare
            return
        try:
            recorded = json.loads(path.read_text())
            if not isinstance(recorded, dict):
                raise ValueError(f"it holds a {type(recorded).__name__}, not an object")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot resume: {str(path)!r} is unreadable ({exc}); fit "
                              "again with overwrite=True") from exc
        for key, (file, digest) in weights.items():
            then = recorded.get(key)
            if isinstance(then, list) and len(then) == 2 and then[1] != digest:
                backbone = key.split(" ", 1)[0]
                raise ConfigError(
                    f"cannot resume the fit in {str(self.root.parent)!r}: the SAM weights of "
                    f"backbone {backbone!r} are now {file!r} with SHA-256 {digest}, but the "
                    f"interrupted fit trained on {then[0]!r} with SHA-256 {then[1]}; put "
                    "that file back, or fit again with overwrite=True")

    def check_checkpoint(self, name: str) -> None:
        """Raise ConfigError, naming the file and the way out, when candidate ``name`` has an
        epoch checkpoint that cannot be read whole (cut short by a partial copy of the run
        folder, or damaged): ``torch.save`` writes a zip archive, whose every member's
        CRC is checked here, before the candidate's model is built."""
        path = self.checkpoint_path(name)
        if not path.is_file():
            return
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise ValueError(f"its member {bad!r} is damaged")
            # torch's own reader too: it refuses damage in the zip's end records that
            # Python's zipfile reads past
            import torch

            reader = getattr(torch._C, "PyTorchFileReader", None)  # torch.load's own reader
            if reader is not None:
                reader(str(path))
        except (OSError, ValueError, RuntimeError, zipfile.BadZipFile, EOFError) as exc:
            raise ConfigError(
                f"cannot resume: the epoch checkpoint of candidate {name!r}, {str(path)!r}, is "
                f"unreadable ({exc}); delete it to train that candidate again from its first "
                "epoch, or fit again with overwrite=True") from exc

    def finished(self, name: str) -> CandidateRecord | str | None:
        """The candidate's record, the reason it was dropped, or None when unfinished."""
        path = self.root / "records" / f"{_stem(name)}.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "dropped" in data:
                return str(data["dropped"])
            record = CandidateRecord.from_json(data)
            weights = self.models_dir / record.weights
            if not weights.is_file():
                raise ValueError(f"its weights file {str(weights)!r} is missing")
            if record.weights_sha256 and sha256_file(weights) != record.weights_sha256:
                # found now, not after the unfinished candidates have trained
                raise ValueError(f"its weights file {str(weights)!r} is damaged (its SHA-256 "
                                 "is not the one recorded)")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"cannot resume: the record of candidate {name!r}, {str(path)!r}, is unreadable "
                f"({exc}); delete it to train that candidate again, or fit again with "
                "overwrite=True"
            ) from exc
        return record

    def finish(self, name: str, record: CandidateRecord | None, dropped: str = "") -> None:
        """Commit a finished (or dropped) candidate and forget its epoch checkpoint."""
        data = record.to_json() if record is not None else {"dropped": dropped}
        with atomic_write(self.root / "records" / f"{_stem(name)}.json", "w") as fh:
            json.dump(data, fh, indent=2, default=str)
        self.checkpoint_path(name).unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    """JSON round trip, so that a plan compares equal to the one read back."""
    return json.loads(json.dumps(value, default=str))


def _first_difference(then: Any, now: Any, key: str) -> tuple[str, Any, Any]:
    """Where two plan entries first differ, innermost: ``("'candidates' > 'default' >
    'optim.lr'", 0.001, 0.002)`` or ``("'train'[3][1]", "a.png", "b.png")`` rather than two
    whole values cut short. A key on one side only, lists of different lengths, or values
    of other kinds end the descent."""
    path: list[str] = [repr(key)]
    while True:
        if isinstance(then, dict) and isinstance(now, dict):
            inner = next(k for k in [*then, *(k for k in now if k not in then)]
                         if then.get(k, _ABSENT) != now.get(k, _ABSENT))
            path.append(repr(inner))
            then, now = then.get(inner, "(absent)"), now.get(inner, "(absent)")
        elif isinstance(then, list) and isinstance(now, list) and len(then) == len(now):
            pos = next(i for i, (a, b) in enumerate(zip(then, now)) if a != b)
            path[-1] += f"[{pos}]"  # 'train'[3][1]: the training data's row 3, its mask
            then, now = then[pos], now[pos]
        else:
            return " > ".join(path), then, now


_ABSENT = object()


def _then_and_now(then: Any, now: Any) -> str:
    """Two differing plan values for a message: lists of different lengths (the rows of
    the training data) by their lengths and the first entry that differs, which two
    lists cut short would not show; anything else as both values cut short."""
    if isinstance(then, list) and isinstance(now, list) and len(then) != len(now):
        text = f"{len(then)} entries then, {len(now)} now"
        pos = next((i for i, (a, b) in enumerate(zip(then, now)) if a != b), None)
        if pos is not None:
            return f"{text}; the first to differ is [{pos}]: {_short(then[pos])} then, " \
                   f"{_short(now[pos])} now"
        return f"{text}, the first {min(len(then), len(now))} the same"
    return f"{_short(then)} then, {_short(now)} now"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
