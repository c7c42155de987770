"""The fit lifecycle: atomic predictor directories, locks, resume, Ctrl-C, safe outputs.

Real files, real Lightning fits on the tiny backbone, and real subprocesses for kill -9,
SIGINT and concurrent readers and writers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from automask import SemanticSegmentor
from automask.datasets import make_synthetic
from automask.errors import (
    ConfigError,
    DataValidationError,
    PathInUseError,
    SavedModelError,
    TrainingDivergedError,
)

from cli_process import run_automask

HP = {"optim.max_epochs": 1, "model.input_size": 64}
STATE = ".automask_fit"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A command run to its end, forked from a process that imported the libraries
    (tests/cli_process.py); ``start_cli`` starts a fresh interpreter to signal."""
    return run_automask(*args, timeout=timeout)


def _default_sigint() -> None:
    """In the child: Ctrl-C as in a terminal, whatever this pytest process inherited or
    earlier tests' libraries did to it (an ignored SIGINT, as a shell gives background
    jobs, or a blocked one: children inherit both)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


# Run first in the fits these tests interrupt or kill: once the resume checkpoint named
# ``hold`` is written, the fit waits in that epoch's end for good. The test then acts on a
# fit that is known to be running, however slowly this machine runs either process (a
# fit of 50 short epochs once ended before a loaded CI machine sent its Ctrl-C).
HOLD = textwrap.dedent("""
    import os, sys, time
    from automask.training.callbacks import EpochCheckpoint
    _write = EpochCheckpoint.on_train_epoch_end
    def _write_then_hold(self, trainer, module):
        _write(self, trainer, module)
        while self.path.name == os.environ.get("AUTOMASK_TEST_HOLD"):
            time.sleep(0.02)
    EpochCheckpoint.on_train_epoch_end = _write_then_hold
""")


def start_held(code: str, *args: str, hold: str = "default.ckpt") -> subprocess.Popen:
    """``python -c HOLD + code args``: a fit that stops for good after writing ``hold``."""
    return subprocess.Popen([sys.executable, "-c", HOLD + textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint,
                            env={**os.environ, "PYTHONUNBUFFERED": "1",
                                 "AUTOMASK_TEST_HOLD": hold})


def start_cli(*args: str, hold: str = "default.ckpt") -> subprocess.Popen:
    """``automask *args`` (its entry point, :func:`automask.cli.run`), held as above."""
    return start_held("from automask.cli import run\nsys.exit(run())\n", *args, hold=hold)


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): "
                                 f"{proc.stderr.read()[-2000:] if proc.stderr else ''}")
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def digest_tree(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A CSV of 20 synthetic 64 px images and masks (absolute paths)."""
    root = tmp_path_factory.mktemp("lifecycle")
    frame = make_synthetic(20, size=64, num_classes=2, seed=3, root=root / "data")
    frame.to_csv(root / "train.csv", index=False)
    return root


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A fitted predictor directory (one epoch)."""
    path = tmp_path_factory.mktemp("base") / "run"
    SemanticSegmentor(path=path, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                  hyperparameters=HP)
    return path


def checkpoint_epoch(run: Path, name: str = "default") -> int | None:
    """Epoch recorded in a candidate's resume checkpoint (None while there is none)."""
    ckpt = run / STATE / "checkpoints" / f"{name}.ckpt"
    if not ckpt.is_file():
        return None
    return int(torch.load(ckpt, weights_only=True, map_location="cpu")["epoch"])


# ------------------------------------------------------------ 1. atomic directories
def test_killed_refit_leaves_the_previous_predictor_complete(data, base, tmp_path):
    """kill -9 after the new fit wrote a candidate's weights: the old predictor still works."""
    run = tmp_path / "run"
    shutil.copytree(base, run)  # keep `base` untouched: work on a copy
    image = pd.read_csv(data / "train.csv")["image"].iloc[0]
    before = SemanticSegmentor.load(run).predict_proba([image])[0]
    files_before = digest_tree(run)
    proc = start_cli("fit", "--train", str(data / "train.csv"), "--presets", "tiny",
                     "--hp", "peft.method=full", "--hp", "peft.method=lora",
                     "--hp", "optim.max_epochs=8", "--hp", "model.input_size=64",
                     "--path", str(run), "--overwrite", "--verbosity", "0",
                     hold="method_lora.ckpt")  # the second candidate never ends
    try:  # the first candidate's weights are written; the second is training
        wait_for(lambda: (run / STATE / "records" / "method_full.json").is_file(), proc)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (run / STATE / "models" / "method_full.safetensors").is_file()
    after = SemanticSegmentor.load(run).predict_proba([image])[0]
    np.testing.assert_array_equal(before, after)
    skip = (STATE, "logs", ".automask.lock")  # the new fit's state, logs and stale lock
    kept = {k: v for k, v in digest_tree(run).items() if not k.startswith(skip)}
    assert kept == {k: v for k, v in files_before.items() if not k.startswith(skip)}
    assert any(k.startswith("v-") for k in kept)


WRITER = textwrap.dedent("""
    import os, sys
    from automask import SemanticSegmentor
    a, b, target, stop = sys.argv[1:5]
    models = [SemanticSegmentor.load(a), SemanticSegmentor.load(b)]
    n = 0
    while not os.path.exists(stop):
        models[n % 2].save(target, overwrite=True)
        n += 1
        if n == 2:  # both predictors were saved once: let the readers start
            open(stop + ".started", "w").close()
    print(n)
""")

READER = textwrap.dedent("""
    import sys, time, numpy as np
    from automask import SemanticSegmentor
    target, image, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    expected = [np.load(p) for p in sys.argv[4:6]]
    seen, errors = set(), []
    deadline, i = time.monotonic() + 300, 0
    # at least `count` loads, and on until both predictors were seen (a slow machine
    # can let one reader's loads all fall between two saves)
    while i < count or (len(seen) < 2 and time.monotonic() < deadline):
        i += 1
        try:
            seg = SemanticSegmentor.load(target)
            seg._model(None)  # reads the weights, checks their SHA-256 and loads them
            seen.add(seg.models_[seg.best_model_].weights_sha256)
            if i % 4 == 1:
                prob = seg.predict_proba([image])[0]
                if not any(np.array_equal(prob, e) for e in expected):
                    errors.append("a prediction matching neither predictor")
        except Exception as exc:
            errors.append(repr(exc))
    print(len(errors), " ".join(sorted(seen)), errors[:3], i)
""")


def test_readers_never_see_a_half_written_predictor(data, base, tmp_path):
    """One process saves two predictors in turn into a path; two others load and predict.

    Every load checks the weights' SHA-256 against the JSON (a half-written predictor
    would fail it); every fourth also predicts and must match one of the two predictors.
    """
    other = tmp_path / "other"
    SemanticSegmentor(path=other, seed=1, verbosity=0).fit(
        data / "train.csv", presets="tiny", hyperparameters=HP)
    target = tmp_path / "target"
    SemanticSegmentor.load(base).save(target)
    image = pd.read_csv(data / "train.csv")["image"].iloc[0]
    expected = []
    for i, run in enumerate((base, other)):
        np.save(tmp_path / f"e{i}.npy", SemanticSegmentor.load(run).predict_proba([image])[0])
        expected.append(str(tmp_path / f"e{i}.npy"))
    assert not np.array_equal(np.load(expected[0]), np.load(expected[1]))
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(base), str(other),
                               str(target), str(stop)], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "stop.started").is_file(), writer)
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(target), image, "16",
                                 *expected], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    results = [r.communicate(timeout=600)[0].strip() for r in readers]
    stop.touch()
    saves = int(writer.communicate(timeout=120)[0].split()[-1])
    assert writer.returncode == 0 and saves > 2, saves
    seen, loads = set(), 0
    for text in results:
        errors, *digests = text.split(" [")[0].split()
        assert int(errors) == 0, text
        seen.update(digests)
        loads += int(text.split()[-1])
    both = {SemanticSegmentor.load(run).models_["default"].weights_sha256
            for run in (base, other)}
    assert seen == both  # the readers raced with the writer and saw each predictor
    versions = [p.name for p in target.iterdir() if p.name.startswith("v-")]
    assert len(versions) == 1  # superseded versions are removed
    print(f"{saves} saves during {loads} loads: no error")


# ------------------------------------------------------- 2. overwrite refusal and lock
def test_fit_into_an_existing_predictor_is_refused_unless_overwrite(data, base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    files = digest_tree(run)
    with pytest.raises(ConfigError, match=r"already holds a predictor.*overwrite=True"):
        SemanticSegmentor(path=run, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                     hyperparameters=HP)
    assert digest_tree(run) == files
    proc = cli("fit", "--train", str(data / "train.csv"), "--presets", "tiny",
               "--path", str(run))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr, proc.stderr
    assert digest_tree(run) == files
    old_version = json.loads((run / "automask.json").read_text())["current"]
    # the replaced fit's logs of a candidate the new fit does not have, and of a resume
    for stale in ("method=lora", "method=lora-resumed-1", "default-resumed-2"):
        (run / "logs" / stale).mkdir(parents=True)
        (run / "logs" / stale / "metrics.csv").write_text("epoch,train_loss\n0,1.0\n")
    seg = SemanticSegmentor(path=run, seed=4, verbosity=0).fit(
        data / "train.csv", presets="tiny", hyperparameters=HP, overwrite=True)
    new_version = json.loads((run / "automask.json").read_text())["current"]
    assert new_version != old_version and not (run / old_version).exists()
    # the history drawn from the run is the new fit's alone
    assert {p.name for p in (run / "logs").iterdir()} == set(seg.models_) == {"default"}
    assert not (run / STATE).exists()  # the resume state goes once the fit is complete
    assert SemanticSegmentor.load(run).best_model_ == seg.best_model_


def test_a_failed_overwriting_fit_leaves_the_predictor_and_its_training_logs(data, base,
                                                                           tmp_path):
    """A fit with overwrite=True that fails once training has started (every candidate
    diverges) leaves the folder as it was, file for file: the old predictor and the logs
    its history is drawn from, which the new fit had set aside, and none of its own."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    (run / "logs" / "default-resumed-1").mkdir()  # a resumed part of the old fit's history
    (run / "logs" / "default-resumed-1" / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n")
    files = digest_tree(run)
    assert "logs/default/metrics.csv" in files
    diverging = {**HP, "optim.grad_clip": 0}
    for lr in (1e6, [1e6, 1e7]):  # the old fit's candidate afresh; two new candidates
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(TrainingDivergedError, match="nothing was saved"):
                SemanticSegmentor(path=run, verbosity=0).fit(
                    data / "train.csv", presets="tiny", overwrite=True,
                    hyperparameters={**diverging, "optim.lr": lr})
        assert digest_tree(run) == files, lr
    history = SemanticSegmentor.load(run).plot_history()
    assert history.axes and any(len(line.get_xdata()) for ax in history.axes
                                for line in ax.get_lines())


def test_logs_set_aside_outlive_an_interrupted_fit_and_a_new_start(tmp_path):
    """The replaced predictor's logs, set aside by a fit that was then interrupted, are
    still its logs when another fit starts (and sets aside the interrupted fit's): the
    first set aside stays, and a failure gives it back."""
    from automask.training.state import FitState

    logs = tmp_path / "logs"
    (logs / "default").mkdir(parents=True)
    (logs / "default" / "metrics.csv").write_text("old predictor")
    state = FitState(tmp_path)
    state.start({"candidates": {}}, {})
    state.stash_logs([logs / "default"])
    assert not (logs / "default").exists()
    (logs / "default").mkdir()
    (logs / "default" / "metrics.csv").write_text("interrupted fit")
    state.start({"candidates": {"default": {}}}, {})  # an overwriting fit after the interruption
    assert state.exists()
    state.stash_logs([logs / "default"])
    (logs / "default").mkdir()
    (logs / "default" / "metrics.csv").write_text("failed fit")
    state.restore_logs(logs)
    assert (logs / "default" / "metrics.csv").read_text() == "old predictor"
    assert not state.replaced_logs_dir.exists()


def test_a_path_that_cannot_hold_the_predictor_is_named_before_any_work(
        data, base, tmp_path, unwritable):
    """A file, a file on the way, a read-only folder: fit and save say which and why, and
    create nothing, where a PermissionError or FileExistsError came from deep inside."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept")
    locked = tmp_path / "locked"
    locked.mkdir()
    unwritable(locked)
    cases = {a_file: "it is a file, not a folder",
             a_file / "run": f"'{a_file}' on the way is a file, not a folder",
             locked / "run": f"the folder '{locked}' is not writable"}
    fitted = SemanticSegmentor.load(base)
    for path, reason in cases.items():
        with pytest.raises(ConfigError, match=re.escape(f"cannot fit into '{path}': {reason}")):
            SemanticSegmentor(path=path, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                          hyperparameters=HP)
        with pytest.raises(ConfigError, match=re.escape(f"cannot save to '{path}': {reason}")):
            fitted.save(path)
    assert a_file.read_text() == "kept" and list(locked.iterdir()) == []
    assert SemanticSegmentor.load(fitted.save(tmp_path / "free")).best_model_ == "default"


def test_second_fit_is_refused_while_one_runs_and_kill_9_resume(data, tmp_path):
    """Lock held by a running fit names its pid; after kill -9 a resume continues it."""
    run = tmp_path / "run"
    epochs = 24  # held after the first: the second fit and the kill come before the end
    proc = start_cli("fit", "--train", str(data / "train.csv"), "--presets", "tiny",
                     "--hp", f"optim.max_epochs={epochs}", "--hp", "model.input_size=64",
                     "--path", str(run), "--verbosity", "0")
    try:
        wait_for(lambda: (run / STATE / "checkpoints" / "default.ckpt").is_file(), proc)
        with pytest.raises(PathInUseError, match=rf"pid {proc.pid}\b"):
            SemanticSegmentor(path=run, verbosity=0).fit(
                data / "train.csv", presets="tiny", hyperparameters=HP, overwrite=True)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = checkpoint_epoch(run)  # the last completed epoch before the kill
    assert done is not None and done < epochs - 1
    assert not (run / "automask.json").exists()
    with pytest.raises(ConfigError, match="interrupted fit.*resume=True"):
        SemanticSegmentor(path=run, verbosity=0).fit(data / "train.csv", presets="tiny")
    resumed = cli("fit", "--resume", "--path", str(run), "--verbosity", "0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    seg = SemanticSegmentor.load(run)
    record = seg.models_["default"]
    assert [h["epoch"] for h in record.history] == list(range(epochs))  # each epoch once
    log = pd.read_csv(run / "logs" / "default-resumed-1" / "metrics.csv")
    assert log["epoch"].min() == done + 1 and log["epoch"].max() == epochs - 1
    assert len(seg.predict(pd.read_csv(data / "train.csv").iloc[:2])) == 2


def test_resume_refuses_other_data_or_options(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="nothing to resume"):
        SemanticSegmentor(path=run, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                     resume=True)
    assert not run.exists()
    from automask.training.state import FitState

    FitState(run).start({"candidates": {"default": {"optim.lr": 1.0}}}, {})
    with pytest.raises(ConfigError, match=r"'candidates' > 'default' > 'optim.lr' differs "
                                          r"from the interrupted fit's \(1.0 then, 0.0"):
        SemanticSegmentor(path=run, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                     hyperparameters=HP, resume=True)
    FitState(run).start({"candidates": {"default": {"optim.lr": 1.0}},
                         "call": {"presets": "medium_quality"}}, {})
    with pytest.raises(ConfigError, match=r"\(1.0 then, 0.0[0-9]* now\) \(the interrupted fit "
                                          r"used presets='medium_quality', this one "
                                          r"presets='tiny'\)"):
        SemanticSegmentor(path=run, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                     hyperparameters=HP, resume=True)


# ---------------------------------------------------------------- 4. non-finite loss
def test_diverging_candidate_is_dropped_and_the_other_saved(data, tmp_path):
    run = tmp_path / "run"
    hp = {**HP, "optim.lr": [2e-3, 1e6], "optim.grad_clip": 0}
    with pytest.warns(UserWarning, match=r"'lr=1000000.0' was dropped.*epoch 1.*optim\.lr"):
        seg = SemanticSegmentor(path=run, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                           hyperparameters=hp)
    assert list(seg.models_) == ["lr=0.002"]
    assert list(SemanticSegmentor.load(run).models_) == ["lr=0.002"]


def test_all_candidates_diverging_is_a_clear_error_and_writes_nothing(data, tmp_path):
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingDivergedError, match="nothing was saved.*optim.lr"):
            SemanticSegmentor(path=run, verbosity=0).fit(
                data / "train.csv", presets="tiny",
                hyperparameters={**HP, "optim.lr": 1e6, "optim.grad_clip": 0})
    assert not run.exists()


def test_divergence_after_a_validated_epoch_keeps_the_best_epoch(data, tmp_path, monkeypatch,
                                                                 capsys):
    """Fault injection: the auxiliary loss turns NaN from the third training step on. The
    epochs are counted from 1, as the progress lines count them, and the diverged epoch's
    line says so (it showed a train_loss of 0 and the last validation's score)."""
    import automask.training.module as module

    calls = {"n": 0}
    real = module.aux_loss

    def failing(model):
        calls["n"] += 1
        value = real(model)
        return value + float("nan") if calls["n"] > 2 else value

    monkeypatch.setattr(module, "aux_loss", failing)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"stopped: the training loss became nan at epoch 2, "
                                         r".*keeping its best epoch \(1\)"):
        seg = SemanticSegmentor(path=run, verbosity=1).fit(
            data / "train.csv", presets="tiny",
            hyperparameters={**HP, "optim.max_epochs": 4, "optim.batch_size": 8,
                             "optim.effective_batch_size": 8})
    record = seg.models_["default"]
    assert record.best_epoch == 0 and "nan" in record.stopped
    lines = [line for line in capsys.readouterr().out.splitlines() if "epoch 2/4" in line]
    assert len(lines) == 1 and "diverged (non-finite loss)" in lines[0], lines
    assert "train_loss" not in lines[0] and "val_" not in lines[0]
    assert [h["epoch"] for h in record.history] == [0]
    assert "nan" in seg.leaderboard().set_index("model").loc["default", "stopped"]
    assert SemanticSegmentor.load(run).models_["default"].best_epoch == 0


# ------------------------------------------------------------------------- 6. SIGINT
def test_ctrl_c_exits_130_and_the_fit_resumes(data, tmp_path, capsys):
    run = tmp_path / "run"
    epochs = 24  # held after the first: the interrupt comes before the end
    proc = start_cli("fit", "--train", str(data / "train.csv"), "--presets", "tiny",
                     "--hp", f"optim.max_epochs={epochs}", "--hp", "model.input_size=64",
                     "--path", str(run), "--verbosity", "1")
    try:
        wait_for(lambda: (run / STATE / "checkpoints" / "default.ckpt").is_file(), proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert not (run / "automask.json").is_file(), "the fit ended before the interrupt"
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "automask: interrupted"
    assert "Traceback" not in err
    done = checkpoint_epoch(run)
    assert done is not None
    # The epoch lines' best so far is in the resume checkpoint, equal to the best weights'.
    import torch

    states = torch.load(run / STATE / "checkpoints" / "default.ckpt", weights_only=False,
                        map_location="cpu")["callbacks"]
    [lines] = [v for k, v in states.items() if "EpochLines" in k]
    [best] = [v for k, v in states.items() if "BestTrainableWeights" in k]
    assert lines["best"] == best["best_score"] and lines["best_epoch"] == best["best_epoch"] + 1
    [clock] = [v for k, v in states.items() if "FitClock" in k]
    assert lines["elapsed"] > 0 and clock["seconds"] > 0
    capsys.readouterr()
    seg = SemanticSegmentor(path=run, verbosity=1).fit(
        data / "train.csv", presets="tiny",
        hyperparameters={"optim.max_epochs": epochs, "model.input_size": 64}, resume=True)
    history = seg.models_["default"].history
    assert [h["epoch"] for h in history] == list(range(epochs))
    record = seg.models_["default"]  # the time before the interruption counts too
    assert record.fit_time > record.train_time > clock["seconds"]
    # The resumed fit's epoch lines go on from the best score validated before the
    # interruption, not from its own first epoch.
    line = next(x for x in capsys.readouterr().out.splitlines() if "best " in x)
    shown = re.search(r"epoch (\d+)/\d+ .* best ([0-9.]+) \(epoch (\d+)\)", line)
    assert int(shown[1]) > 1, line  # a resumed epoch
    seen = [h for h in history if h["epoch"] < int(shown[1])]
    best = max(seen, key=lambda h: h["val_iou"])
    assert (float(shown[2]), int(shown[3])) == (round(best["val_iou"], 4), best["epoch"] + 1), line


API_FIT = textwrap.dedent("""
    import sys
    from automask import SemanticSegmentor
    try:
        SemanticSegmentor(path=sys.argv[2], verbosity=0).fit(
            sys.argv[1], presets="tiny",
            hyperparameters={"optim.max_epochs": 50, "model.input_size": 64})
    except KeyboardInterrupt:
        print("KeyboardInterrupt")
""")


def test_ctrl_c_raises_keyboard_interrupt_in_the_api(data, tmp_path):
    run = tmp_path / "run"
    proc = start_held(API_FIT, str(data / "train.csv"), str(run))
    try:
        wait_for(lambda: checkpoint_epoch(run) is not None, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert out.strip() == "KeyboardInterrupt", (proc.returncode, out, err[-2000:])
    assert "the completed epochs are kept" in err
    assert (run / STATE / "plan.json").is_file() and checkpoint_epoch(run) is not None


def test_a_ctrl_c_that_breaks_a_librarys_cleanup_is_still_a_ctrl_c(data, tmp_path, monkeypatch):
    """A Ctrl-C that landed in tqdm's first write (while it made its lock) made tqdm's
    ``finally`` raise AttributeError in place of the KeyboardInterrupt: the command line
    exited 1 with a traceback instead of 130. An error raised while a KeyboardInterrupt
    is handled now counts as that interrupt, and the completed epochs are kept."""
    from automask.training import progress

    real = progress.EpochLines._write

    def write(self, line):
        if " epoch 2/" in f" {line}":
            try:
                raise KeyboardInterrupt
            finally:  # what tqdm's cleanup did
                raise AttributeError("type object 'tqdm' has no attribute '_lock'")
        return real(self, line)

    monkeypatch.setattr(progress.EpochLines, "_write", write)
    run = tmp_path / "run"
    hp = {"optim.max_epochs": 4, "model.input_size": 64}
    nested = {"optim": {"max_epochs": 4}, "model": {"input_size": 64}}  # the same
    with pytest.raises(KeyboardInterrupt):
        SemanticSegmentor(path=run, verbosity=1).fit(data / "train.csv", presets="tiny",
                                                     hyperparameters=nested)
    assert (run / STATE / "plan.json").is_file() and checkpoint_epoch(run) is not None
    # recorded flat, so that `fit --resume --hp key=value` replaces a key given nested
    plan = json.loads((run / STATE / "plan.json").read_text())
    assert plan["call"]["hyperparameters"] == hp
    monkeypatch.undo()
    seg = SemanticSegmentor(path=run, verbosity=0).fit(
        data / "train.csv", presets="tiny", hyperparameters=hp, resume=True)
    assert seg.models_["default"].epochs == 4 and not (run / STATE).exists()


def test_epoch_lines_make_tqdms_write_lock_before_training(monkeypatch):
    """The window the test above simulates: tqdm made its write lock at the first epoch
    line, inside the training loop; the printer now makes it when it is built."""
    from tqdm import tqdm

    from automask.training.progress import EpochLines

    monkeypatch.delattr(tqdm, "_lock", raising=False)
    EpochLines("default", silent=True)
    assert not hasattr(tqdm, "_lock")  # a silent printer writes nothing
    EpochLines("default")
    assert hasattr(tqdm, "_lock")


# --------------------------------------------------------------- 3. predict outputs
def test_predict_never_overwrites_inputs_or_existing_files(data, base, tmp_path):
    seg = SemanticSegmentor.load(base)
    frame = pd.read_csv(data / "train.csv").iloc[:4]
    images = data / "data" / "images"
    masks = data / "data" / "masks"
    inputs = {**{f"i/{k}": v for k, v in digest_tree(images).items()},
              **{f"m/{k}": v for k, v in digest_tree(masks).items()}}
    assert Path(frame["image"].iloc[0]).parent == images  # PNG images: same stems
    proc = cli("predict", str(base), "--data", str(images), "--out", str(images),
               "--overwrite")
    assert proc.returncode == 2 and "would overwrite input files" in proc.stderr, proc.stderr
    assert frame["image"].iloc[0].rsplit("/", 1)[-1] in proc.stderr
    csv = tmp_path / "test.csv"
    frame.to_csv(csv, index=False)
    with pytest.raises(DataValidationError, match="mask of row 0"):
        seg.predict(csv, save_to=masks, overwrite=True)
    after = {**{f"i/{k}": v for k, v in digest_tree(images).items()},
             **{f"m/{k}": v for k, v in digest_tree(masks).items()}}
    assert after == inputs
    out = tmp_path / "out"
    seg.predict(frame.iloc[:2], save_to=out)
    written = digest_tree(out)
    with pytest.raises(DataValidationError, match=r"2 mask file\(s\) already exist"):
        seg.predict(frame, save_to=out)
    assert digest_tree(out) == written  # not even the two new masks were written
    (out / next(iter(written))).write_bytes(b"old")
    seg.predict(frame, save_to=out, overwrite=True)
    assert len(digest_tree(out)) == 4 and (out / next(iter(written))).read_bytes() != b"old"


def test_output_folders_that_name_nothing_or_the_predictor_itself_are_refused(data, base,
                                                                             tmp_path):
    """An empty output path (an unset environment variable) wrote masks, or a whole
    predictor, into the working folder; a folder inside the predictor's versions or logs
    was written, then deleted with them by the next save; a non-bool overwrite ("no")
    read as True. All are refused before any work, naming the value."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    seg = SemanticSegmentor.load(run)
    frame = pd.read_csv(data / "train.csv").iloc[:2]
    version = json.loads((run / "automask.json").read_text())["current"]
    files = digest_tree(run)
    cases = {"": r"must name a folder, got '' \(an unset environment variable\?\)",
             123: r"must be a folder path \(str or pathlib.Path\), got int 123",
             str(run / version / "backup"): rf".* lies in the predictor .*its folder '{version}'",
             str(run / "logs" / "masks"): r".* lies in the predictor .*its folder 'logs'"}
    for save_to, message in cases.items():
        with pytest.raises(DataValidationError, match="save_to " + message):
            seg.predict(frame, save_to=save_to)
        with pytest.raises(ConfigError, match=r"cannot save to .*" + message):
            seg.save(save_to)
    with pytest.raises(DataValidationError, match="overwrite must be True or False, got str"):
        seg.predict(frame, save_to=tmp_path / "out", overwrite="no")
    for path in (tmp_path / "copy", None):
        with pytest.raises(ConfigError, match="overwrite must be True or False"):
            seg.save(path, overwrite="no")
    assert digest_tree(run) == files and not (tmp_path / "out").exists()
    assert not list(Path.cwd().glob("0000*.png"))
    for out in ("", str(run / "logs" / "p")):
        proc = cli("predict", str(run), "--data", str(data / "train.csv"), "--out", out,
                   "--proba")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "--out" in proc.stderr, proc.stderr
    assert digest_tree(run) == files
    seg.save(run / "copies" / "a")  # a plain folder beside the predictor's parts is the user's
    assert SemanticSegmentor.load(run / "copies" / "a").best_model_ == seg.best_model_


def test_a_mask_another_process_writes_meanwhile_is_not_replaced(data, base, tmp_path,
                                                                 monkeypatch):
    """Two predictions into one folder at once, neither with overwrite: both checked the
    folder before either wrote, and each replaced the other's masks (a mix of two models'
    masks, both reporting success). A mask that appears after the check is now never
    replaced: the call fails naming it, and removes what it wrote."""
    import automask.prediction as prediction
    from automask.utils import atomic_write

    target = tmp_path / "x.png"
    target.write_bytes(b"theirs")
    with pytest.raises(FileExistsError, match=r"appeared while this file was being written.*"
                                              r"x\.png"):
        with atomic_write(target, replace=False) as fh:
            fh.write(b"ours")
    assert target.read_bytes() == b"theirs" and sorted(tmp_path.iterdir()) == [target]
    with atomic_write(tmp_path / "y.png", replace=False) as fh:  # a new file: written
        fh.write(b"ours")
    assert (tmp_path / "y.png").read_bytes() == b"ours"

    seg = SemanticSegmentor.load(base)
    frame = pd.read_csv(data / "train.csv").iloc[:4]
    out = tmp_path / "out"
    checked = prediction.mask_destinations

    def then_another_process_writes(*args, **kwargs):
        dests = checked(*args, **kwargs)
        out.mkdir(exist_ok=True)
        dests[2].write_bytes(b"the other process's mask")
        return dests

    monkeypatch.setattr(prediction, "mask_destinations", then_another_process_writes)
    with pytest.raises(FileExistsError, match="another process writing there"):
        seg.predict(frame, save_to=out)
    assert [p.name for p in out.iterdir()] == [Path(frame["image"].iloc[2]).stem + ".png"]
    assert (out / next(out.iterdir()).name).read_bytes() == b"the other process's mask"
    seg.predict(frame, save_to=out, overwrite=True)  # asked to: replaced
    assert len(list(out.iterdir())) == 4
    assert (out / next(out.iterdir()).name).read_bytes() != b"the other process's mask"


# ------------------------------------------------------------ 7. saved-model hygiene
def test_predictions_from_several_threads_at_once(data, tmp_path, monkeypatch):
    """A web server's threads predicting with one fitted predictor: each LoRA update reaches
    the frozen weights once (the fit leaves its model loaded and unmerged, and the first
    predictions merge it; the update is made slow so that the threads overlap inside the
    merge), no thread fails, and each gets what one prediction at a time gives."""
    import threading

    from automask.peft.lora import LoRALinear

    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        data / "train.csv", presets="tiny", hyperparameters={**HP, "peft.method": "lora"})
    model = seg._loaded[seg.best_model_]
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and not any(m.merged for m in layers)
    with torch.no_grad():  # updates large enough to see (B starts at zero)
        for m in layers:
            m.lora_B.weight.normal_(0, 0.1)
    before = [m.base_layer.weight.detach().clone() for m in layers]
    deltas = [m.delta_weight().detach().clone() for m in layers]
    images = sorted(str(p) for p in (data / "data" / "images").glob("*.png"))[:2]
    real = LoRALinear.delta_weight

    def slow(self):
        time.sleep(0.01)
        return real(self)
    monkeypatch.setattr(LoRALinear, "delta_weight", slow)
    start, results, errors = threading.Barrier(3), {}, []

    def predict(i: int) -> None:
        try:
            start.wait()
            results[i] = seg.predict_proba(images)
        except Exception as exc:  # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=predict, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seg._loaded[seg.best_model_] is model and all(m.merged for m in layers)
    for m, w0, delta in zip(layers, before, deltas):
        torch.testing.assert_close(m.base_layer.weight - w0, delta, rtol=1e-4, atol=1e-6)
    alone = seg.predict_proba(images)
    for i in range(3):
        for a, b in zip(results[i], alone, strict=True):
            np.testing.assert_array_equal(a, b)


def test_load_refuses_weights_outside_the_directory_and_missing_hashes(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    version = json.loads((run / "automask.json").read_text())["current"]
    meta_path = run / version / "predictor.json"
    meta = json.loads(meta_path.read_text())
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.safetensors").write_bytes(b"x")
    for evil in ("../outside/x.safetensors", "/etc/passwd", "sub/x.safetensors"):
        bad = json.loads(json.dumps(meta))
        bad["models"]["default"]["weights"] = evil
        meta_path.write_text(json.dumps(bad))
        with pytest.raises(SavedModelError, match=r"weights .*plain file name") as info:
            SemanticSegmentor.load(run)
        assert evil in str(info.value)
    bad = json.loads(json.dumps(meta))
    del bad["models"]["default"]["weights_sha256"]
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(SavedModelError, match="weights_sha256"):
        SemanticSegmentor.load(run)
    pointer = json.loads((run / "automask.json").read_text())
    pointer["current"] = "../elsewhere"
    (run / "automask.json").write_text(json.dumps(pointer))
    with pytest.raises(SavedModelError, match="'current' must name a version folder"):
        SemanticSegmentor.load(run)


# ------------------------------------------------------- 8. nothing left after failure
def test_failed_fit_or_predict_leaves_no_folder_behind(data, base, tmp_path):
    run = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match=r"env\.accelerator.*GPU"):
        SemanticSegmentor(path=run, verbosity=0).fit(
            data / "train.csv", presets="tiny", hyperparameters={**HP, "env.accelerator": "gpu"})
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    shutil.copytree(base, existing)
    files = digest_tree(existing)
    with pytest.raises(ConfigError, match=r"env\.accelerator.*GPU"):
        SemanticSegmentor(path=existing, verbosity=0).fit(
            data / "train.csv", presets="tiny", overwrite=True,
            hyperparameters={**HP, "env.accelerator": "gpu"})
    assert {k: v for k, v in digest_tree(existing).items() if ".automask.lock" not in k} \
        == {k: v for k, v in files.items() if ".automask.lock" not in k}
    seg = SemanticSegmentor.load(base)
    with pytest.raises(DataValidationError):
        seg.predict([str(tmp_path / "missing.png")], save_to=tmp_path / "masks" / "sub")
    assert not (tmp_path / "masks").exists()


def test_a_loaded_predictor_pickles_deepcopies_and_stands_alone(data, base, tmp_path):
    """pickle, copy.deepcopy and joblib take a loaded predictor (whose weights are read
    through open files) as well as a fitted one; the copy carries its weights, so it
    predicts and saves after the folder it came from is gone."""
    import copy
    import pickle

    import joblib

    run = tmp_path / "run"
    shutil.copytree(base, run)
    images = pd.read_csv(data / "train.csv")[["image"]].head(3)
    loaded = SemanticSegmentor.load(run)
    expected = loaded.predict_proba(images)
    pickled = pickle.dumps(loaded)
    deep = copy.deepcopy(loaded)
    joblib.dump(loaded, tmp_path / "seg.joblib")
    shutil.rmtree(run)
    copies = [pickle.loads(pickled), deep, joblib.load(tmp_path / "seg.joblib")]
    for seg in copies:
        for got, want in zip(seg.predict_proba(images), expected):
            np.testing.assert_allclose(got, want, atol=1e-6)
    # its logs went with the folder: the validation scores kept in its records are drawn
    val_ax = copies[0].plot_history().axes[1]
    [line] = val_ax.get_lines()
    history = copies[0].models_["default"].history
    assert list(line.get_ydata()) == [h["val_iou"] for h in history]
    assert val_ax.get_title() == "validation iou"
    saved = copies[0].save(tmp_path / "again")
    again = SemanticSegmentor.load(saved).predict_proba(images)
    for got, want in zip(again, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # the predictor the copies came from still predicts (its handles were not consumed)
    np.testing.assert_allclose(loaded.predict_proba(images)[0], expected[0],
                               atol=1e-6)
    # a fitted predictor's copy leaves the model built in memory behind, not its weights
    fitted = SemanticSegmentor(path=tmp_path / "fitted", verbosity=0).fit(
        data / "train.csv", presets="tiny", hyperparameters=HP)
    fitted.predict_proba(images.head(1))
    state = fitted.__getstate__()
    assert state["_loaded"] == {} and set(state["_weights_bytes"]) == set(fitted.models_)
    assert fitted._loaded  # the live object keeps its model


def test_a_fitted_predictor_pickles_and_saves_after_its_folder_is_gone(data, tmp_path):
    """A fitted predictor keeps its weights files open, as a loaded one does: once its
    folder is deleted it still pickles and saves, and the copies predict what it does."""
    import pickle

    images = pd.read_csv(data / "train.csv")[["image"]].head(2)
    fitted = SemanticSegmentor(path=tmp_path / "fitted", verbosity=0).fit(
        data / "train.csv", presets="tiny", hyperparameters=HP)
    expected = fitted.predict_proba(images)
    shutil.rmtree(tmp_path / "fitted")
    copy = pickle.loads(pickle.dumps(fitted))
    saved = SemanticSegmentor.load(fitted.save(tmp_path / "elsewhere"))
    for seg in (copy, saved):
        for got, want in zip(seg.predict_proba(images), expected):
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_fitted_predictor_near_the_open_file_limit_reads_its_weights_by_path(
        data, tmp_path, monkeypatch):
    """Kept-open weights files never take more than half the open-file limit: near it, a
    fitted predictor reads them by path, and still pickles while its folder is there."""
    import pickle
    import resource

    used = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(resource, "getrlimit", lambda _: (used + 4, used + 4))  # half: below
    images = pd.read_csv(data / "train.csv")[["image"]].head(1)
    fitted = SemanticSegmentor(path=tmp_path / "fitted", verbosity=0).fit(
        data / "train.csv", presets="tiny", hyperparameters=HP)
    assert fitted._weights_files == {}
    copy = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_allclose(copy.predict_proba(images)[0],
                               fitted.predict_proba(images)[0], atol=1e-6)


def test_weights_corrupted_after_load_are_named_by_pickle_and_save(data, base, tmp_path):
    """Weights changed on disk after a load are refused where they are read (pickle, save),
    naming that file, instead of being copied on to fail later under the copy's name."""
    import pickle

    run = tmp_path / "run"
    shutil.copytree(base, run)
    seg = SemanticSegmentor.load(run)
    [weights] = seg._weights_dir.glob("*.safetensors")
    with open(weights, "r+b") as fh:  # in place: the open handle sees the change
        fh.seek(-8, os.SEEK_END)
        fh.write(b"\x00" * 8)
    where = re.escape(repr(str(weights)))
    with pytest.raises(SavedModelError, match=f"{where} is corrupted"):
        pickle.dumps(seg)
    with pytest.raises(SavedModelError, match=f"{where} is corrupted"):
        seg.save(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    with pytest.raises(SavedModelError, match=f"{where} is corrupted"):
        seg.predict_proba(pd.read_csv(data / "train.csv")[["image"]].head(1))


def test_save_never_replaces_another_predictor_silently_and_takes_its_logs(base, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(base, other)
    (other / "logs" / "lr=0.1").mkdir()  # a candidate of the predictor held there
    (other / "logs" / "lr=0.1" / "metrics.csv").write_text("epoch,train_loss\n0,9.0\n")
    files = digest_tree(other)
    mine = tmp_path / "mine"
    shutil.copytree(base, mine)
    seg = SemanticSegmentor.load(mine)
    with pytest.raises(ConfigError, match=r"already holds another predictor.*overwrite=True"):
        seg.save(other)
    assert digest_tree(other) == files
    seg.save(mine)  # its own folder: a new version, no overwrite= needed
    seg.save(other, overwrite=True)
    assert sorted(p.name for p in (other / "logs").iterdir()) == ["default"]
    assert ((other / "logs" / "default" / "metrics.csv").read_bytes()
            == (base / "logs" / "default" / "metrics.csv").read_bytes())
    # a stale copy of a folder fitted again since it was read is no longer "its own"
    stale = SemanticSegmentor.load(mine)
    SemanticSegmentor.load(base).save(mine, overwrite=True)  # a newer version there
    newer = digest_tree(mine)
    with pytest.raises(ConfigError, match=r"already holds another predictor"):
        stale.save()
    assert digest_tree(mine) == newer
    stale.save(overwrite=True)
    # a fresh folder gets the logs too, so the saved predictor draws its own history
    fresh = seg.save(tmp_path / "fresh")
    # saved there again (a notebook cell run twice): its own copy is no other predictor
    assert seg.save(tmp_path / "fresh") == fresh and len(list(fresh.glob("v-*"))) == 1
    SemanticSegmentor.load(base).save(fresh, overwrite=True)  # now another object's save
    with pytest.raises(ConfigError, match=r"already holds another predictor"):
        seg.save(fresh)
    seg.save(fresh, overwrite=True)
    fig = SemanticSegmentor.load(fresh).plot_history()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["default"]


def test_weights_read_from_several_threads_at_once_are_whole(base, tmp_path):
    """A loaded predictor reads its weights through one open file: threads reading it at
    once (a prediction loading its model while another pickles or saves the predictor) each
    get the whole file, never a read moved by another thread's seek."""
    import threading

    from automask import saving

    seg = SemanticSegmentor.load(base)
    expected = next(iter(seg._weights_dir.glob("*.safetensors"))).read_bytes()
    start, wrong = threading.Barrier(4), []

    def read() -> None:
        start.wait()
        for _ in range(300):
            data, _ = saving.read_weights(seg, "default")
            if data != expected:
                wrong.append(len(data))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == [], f"{len(wrong)} reads of the wrong length, e.g. {wrong[:5]}"


FORKED = textwrap.dedent("""
    import multiprocessing, sys
    import numpy as np, torch
    from automask import SemanticSegmentor
    torch.set_num_threads(2)  # the parent's OpenMP team has threads to lose in a fork
    run, images = sys.argv[1], sys.argv[2:]
    seg = SemanticSegmentor.load(run)
    expected = seg.predict_proba(images)

    def work(image):
        return torch.get_num_threads(), seg.predict_proba([image])[0]

    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map_async(work, images).get(timeout=120)  # a hang fails, not waits
    assert [threads for threads, _ in got] == [1] * len(images), got
    for (_, prob), want in zip(got, expected):
        np.testing.assert_allclose(prob, want, atol=1e-6)
    print("forked workers predicted", len(got))

    # forked while another thread holds automask's locks (a web server's thread loading a
    # model or predicting): the workers start with free ones
    import threading
    from automask import saving, segmentor
    from automask.models import frozen
    locks = [segmentor._LOADING, frozen._LOCK, saving._READING]
    for lock in locks:
        lock.acquire()
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.map_async(work, images[:1]).get(timeout=120)
    finally:
        for lock in locks:
            lock.release()
    np.testing.assert_allclose(got[0][1], expected[0], atol=1e-6)
    print("forked while locked predicted", len(got))
""")

EXPORTED = textwrap.dedent("""
    import multiprocessing, sys
    import numpy as np, torch
    from automask import SemanticSegmentor
    torch.set_num_threads(2)
    run, out, image = sys.argv[1:4]
    seg = SemanticSegmentor.load(run)
    seg.export(out)  # runs the model on torch's CPU threads (its check), no prediction

    def work(image):
        return SemanticSegmentor.load(run).predict_proba([image])[0]

    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.map_async(work, [image]).get(timeout=120)
    np.testing.assert_allclose(got[0], seg.predict_proba([image])[0], atol=1e-6)
    print("forked after an export predicted")
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_workers_forked_after_a_prediction_predict(data, base, tmp_path):
    """A Pool forked (Linux's default start) after the parent predicted on the CPU: torch's
    OpenMP runtime would hang the workers' first multi-threaded operation; they run with one
    thread each and get the parent's probabilities."""
    images = pd.read_csv(data / "train.csv")["image"].head(4).tolist()
    script = tmp_path / "forked.py"
    script.write_text(FORKED)
    proc = subprocess.run([sys.executable, str(script), str(base), *images], capture_output=True,
                          text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forked workers predicted 4" in proc.stdout
    assert "forked while locked predicted 1" in proc.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_workers_forked_after_an_export_predict(data, base, tmp_path):
    image = pd.read_csv(data / "train.csv")["image"].iloc[0]
    script = tmp_path / "exported.py"
    script.write_text(EXPORTED)
    proc = subprocess.run([sys.executable, str(script), str(base), str(tmp_path / "m.onnx"),
                           image], capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forked after an export predicted" in proc.stdout


ROWS = [[f"i{i}.png", f"m{i}.png"] for i in range(6)]


@pytest.mark.parametrize("now, shown", [
    (ROWS[:4], "'train' differs from the interrupted fit's (6 entries then, 4 now, the first "
               "4 the same)"),
    (ROWS[:2] + [["x.png", "m2.png"]] + ROWS[3:4],
     "(6 entries then, 4 now; the first to differ is [2]: [\"i2.png\", \"m2.png\"] then, "
     "[\"x.png\", \"m2.png\"] now)"),
])
def test_resume_with_fewer_rows_says_how_many_and_which_differs(tmp_path, now, shown):
    """Training data of another length: its lengths and the first row that differs, not
    two long lists cut short to the same first characters."""
    from automask.training.state import FitState

    state = FitState(tmp_path)
    state.start({"train": ROWS, "seed": 0}, {})
    with pytest.raises(ConfigError) as info:
        state.check_plan({"train": now, "seed": 0})
    assert shown in str(info.value), str(info.value)
    state.check_plan({"train": ROWS, "seed": 0})  # the same plan resumes


# ------------------------------------------------------------ interrupted overwrite, resume
def _interrupt_at_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C as the line of epoch ``epoch`` is written (after that epoch's checkpoint)."""
    from automask.training import progress

    real = progress.EpochLines._write

    def write(self, line):
        if f" epoch {epoch}/" in f" {line}":
            raise KeyboardInterrupt
        return real(self, line)

    monkeypatch.setattr(progress.EpochLines, "_write", write)


def _fit_cut_at_epoch_2(run: Path, data: Path, monkeypatch) -> None:
    """A 3-epoch tiny fit into ``run``, Ctrl-C'd once epoch 1's checkpoint is written."""
    _interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        SemanticSegmentor(path=run, verbosity=1).fit(
            data / "train.csv", presets="tiny",
            hyperparameters={"optim.max_epochs": 3, "model.input_size": 64})


def test_an_interrupted_overwrite_gives_the_predictor_its_logs_until_resumed(
        data, base, tmp_path, monkeypatch):
    """Ctrl-C in an overwriting fit: the old predictor's history (and a copy saved
    elsewhere) is its own, not the interrupted fit's; a damaged epoch checkpoint is named
    on resume; the resume takes its logs back and ends with the new fit's history only."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    old_logs = digest_tree(run / "logs")
    hp = {"optim.max_epochs": 3, "model.input_size": 64}
    _interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        SemanticSegmentor(path=run, verbosity=1).fit(data / "train.csv", presets="tiny",
                                                     hyperparameters=hp, overwrite=True)
    monkeypatch.undo()
    assert digest_tree(run / "logs") == old_logs  # the predictor's, as before the fit
    old = SemanticSegmentor.load(run)
    assert digest_tree(old.save(tmp_path / "copy") / "logs") == old_logs
    # a partial copy of the folder cut the epoch checkpoint short: named, nothing trained
    ckpt = run / STATE / "checkpoints" / "default.ckpt"
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[:1000])
    with pytest.raises(ConfigError, match=re.escape(f"{str(ckpt)!r}, is unreadable") +
                       ".*delete it to train that candidate again"):
        SemanticSegmentor(path=run, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                     hyperparameters=hp, resume=True)
    assert digest_tree(run / "logs") == old_logs
    # damage in the zip's end records, which Python's zipfile reads past and torch refuses
    flipped = bytearray(whole)
    flipped[-30] ^= 0xFF
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match=re.escape(f"{str(ckpt)!r}, is unreadable")):
        SemanticSegmentor(path=run, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                     hyperparameters=hp, resume=True)
    ckpt.write_bytes(whole)
    seg = SemanticSegmentor(path=run, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                       hyperparameters=hp, resume=True)
    assert seg.models_["default"].epochs == 3
    names = sorted(p.name for p in (run / "logs").iterdir())
    assert names == ["default", "default-resumed-1"]  # the new fit's two parts, no more
    rows = pd.read_csv(run / "logs" / "default" / "metrics.csv")
    assert rows["epoch"].max() < 2  # the interrupted part: epochs 0 and 1 only
    assert digest_tree(run / "logs") != old_logs


def test_a_resume_refuses_sam_weights_replaced_since_the_interruption(data, tmp_path,
                                                                     monkeypatch):
    """The SAM file a fit trains on was replaced before the resume: refused, naming the
    file and both SHA-256s, instead of training on a mix of the two."""
    from automask.models import build_segmenter

    weights = tmp_path / "sam_tiny.pth"
    torch.save(build_segmenter("tiny", input_size=64, checkpoint="random").state_dict(),
               weights)
    first = hashlib.sha256(weights.read_bytes()).hexdigest()
    run = tmp_path / "run"
    hp = {"optim.max_epochs": 3, "model.input_size": 64, "peft.method": "lora",
          "model.checkpoint": str(weights)}
    _interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        SemanticSegmentor(path=run, verbosity=1).fit(data / "train.csv", presets="tiny",
                                                     hyperparameters=hp)
    monkeypatch.undo()
    torch.manual_seed(1)
    torch.save(build_segmenter("tiny", input_size=64, checkpoint="random").state_dict(),
               weights)
    second = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert first != second
    with pytest.raises(ConfigError, match=f"{re.escape(repr(str(weights)))} with SHA-256 "
                                          f"{second}.*trained on .* with SHA-256 {first}"):
        SemanticSegmentor(path=run, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                     hyperparameters=hp, resume=True)
    assert (run / STATE / "checkpoints" / "default.ckpt").is_file()  # nothing lost


def test_save_into_an_interrupted_fits_folder_needs_overwrite(data, base, tmp_path,
                                                              monkeypatch):
    """A folder that holds only an interrupted fit is no free folder: save refuses it
    without overwrite=True (the fit could be resumed), and with it replaces the fit whole,
    its state and logs too."""
    run = tmp_path / "run"
    _fit_cut_at_epoch_2(run, data, monkeypatch)
    monkeypatch.undo()
    assert (run / STATE).is_dir() and (run / "logs" / "default").is_dir()
    fitted = SemanticSegmentor.load(base)
    with pytest.raises(ConfigError, match="holds the state of another fit.*overwrite=True"):
        fitted.save(run)
    assert (run / STATE / "plan.json").is_file()  # still resumable
    fitted.save(run, overwrite=True)
    assert not (run / STATE).exists()
    assert digest_tree(run / "logs") == digest_tree(base / "logs")
    assert SemanticSegmentor.load(run).best_model_ == fitted.best_model_


def test_epoch_checkpoints_are_written_in_the_run_folder_only(data, tmp_path, monkeypatch):
    """Lightning's writer put each whole checkpoint in the system's temporary folder
    first (``tempfile.mkstemp``): a small $TMPDIR failed the fit with an error naming no
    file, whatever room the run folder had. A full temporary folder now changes nothing."""
    import errno
    import tempfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    run = tmp_path / "run"
    _fit_cut_at_epoch_2(run, data, monkeypatch)
    assert checkpoint_epoch(run) == 1  # epoch 1's end, read back
    assert sorted(p.name for p in (run / STATE / "checkpoints").iterdir()) == ["default.ckpt"]


PREDICT_HELD = textwrap.dedent("""
    import os, sys, time
    from automask.data import io
    _write = io.write_mask
    count = [0]
    def _write_then_hold(*args, **kwargs):
        _write(*args, **kwargs)
        count[0] += 1
        while count[0] == 3:  # three masks written: wait for the signal
            time.sleep(0.02)
    io.write_mask = _write_then_hold  # what predict imports when it writes
""")


@pytest.mark.parametrize("how", ["api", "cli"])
def test_sigterm_during_predict_leaves_no_masks(base, data, tmp_path, how):
    """SIGTERM (docker stop, SLURM's time limit) killed predict(save_to=...) on the spot:
    half the masks and a temporary file stayed, and the same call then refused the
    folder. It is Ctrl-C now: what was written goes (the CLI exits 130)."""
    out = tmp_path / "masks"
    images = str(data / "data" / "images")
    code = {"api": "from automask import SemanticSegmentor\n"
                   "try:\n"
                   "    seg = SemanticSegmentor.load(sys.argv[1])\n"
                   "    seg.predict(sys.argv[2], save_to=sys.argv[3])\n"
                   "except KeyboardInterrupt:\n"
                   "    print('KeyboardInterrupt')\n",
            "cli": "from automask.cli import main\n"
                   "sys.exit(main(['predict', sys.argv[1], '--data', sys.argv[2], '--out', "
                   "sys.argv[3]]))\n"}[how]
    proc = subprocess.Popen([sys.executable, "-c", PREDICT_HELD + code, str(base), images,
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: out.is_dir() and len(list(out.glob("*.png"))) == 3, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    if how == "api":
        assert proc.returncode == 0 and stdout.strip() == "KeyboardInterrupt", stderr[-2000:]
    else:
        assert proc.returncode == 130 and "automask: interrupted" in stderr, stderr[-2000:]
    # created by the call: removed whole, temporary files too
    assert not out.exists(), list(out.iterdir())


def test_sigterm_during_save_leaves_no_folder(base, tmp_path):
    """SIGTERM while save(path) copied the weights left a staging folder, the lock files
    and a folder that was not a predictor. As Ctrl-C now: nothing is left."""
    code = textwrap.dedent("""
        import sys, time
        from automask import SemanticSegmentor, saving
        _copy = saving._copy_weights
        def _copy_then_hold(*args):
            _copy(*args)
            while True:  # the weights are in the staging folder: wait for the signal
                time.sleep(0.02)
        saving._copy_weights = _copy_then_hold
        try:
            SemanticSegmentor.load(sys.argv[1]).save(sys.argv[2])
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
    """)
    target = tmp_path / "copy"
    proc = subprocess.Popen([sys.executable, "-c", code, str(base), str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(target.glob(".staging-*/*.safetensors")), proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and stdout.strip() == "KeyboardInterrupt", stderr[-2000:]
    assert not target.exists()


def test_a_predictor_whose_folder_was_fit_again_draws_its_own_validation_scores(base, data,
                                                                              tmp_path):
    """A loaded predictor whose folder another object then fits again (overwrite=True)
    keeps its weights; plot_history draws its own records' validation scores, with a
    warning, not the new fit's logs under its candidate's name."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    old = SemanticSegmentor.load(run)
    history = old.models_["default"].history
    assert len(history) == 1
    SemanticSegmentor(path=run, verbosity=0).fit(
        data / "train.csv", presets="tiny", overwrite=True,
        hyperparameters={**HP, "optim.max_epochs": 2})
    new_curve = SemanticSegmentor.load(run).plot_history().axes[1].get_lines()[0]
    assert len(new_curve.get_ydata()) == 2  # the folder's logs are the 2-epoch fit's
    with pytest.warns(UserWarning, match="holds another predictor now"):
        val_ax = old.plot_history().axes[1]
    [line] = val_ax.get_lines()
    assert list(line.get_ydata()) == [h["val_iou"] for h in history]
