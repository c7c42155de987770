"""Save / load / resume / checkpoint paths under bad input and faults.

Each test guards one promise of README's "What automask guarantees", "Small, safe saved
models" and "SAM checkpoints, offline" sections, on the tiny backbone and 64 px images.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from automask import SemanticSegmentor
from automask.datasets import make_synthetic
from automask.errors import CheckpointError, ConfigError, SavedModelError
from automask.models import build_segmenter
from automask.models.checkpoint import locate_checkpoint
from automask.saving import run_lock
from automask.training.state import FitState
from automask.utils import cache_dir

HP = {"optim.max_epochs": 1, "model.input_size": 64}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A CSV of 10 synthetic 64 px images and masks (absolute paths)."""
    root = tmp_path_factory.mktemp("audit_data")
    frame = make_synthetic(10, size=64, num_classes=2, seed=5, root=root / "data")
    frame.to_csv(root / "train.csv", index=False)
    return root


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A fitted predictor directory (one epoch, random initialisation)."""
    path = tmp_path_factory.mktemp("audit_base") / "run"
    SemanticSegmentor(path=path, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                  hyperparameters=HP)
    return path


def _meta_path(run: Path) -> Path:
    version = json.loads((run / "automask.json").read_text())["current"]
    return run / version / "predictor.json"


def _tiny_checkpoint(path: Path) -> Path:
    """A state dict in the layout the tiny backbone loads (random values)."""
    torch.save(build_segmenter("tiny", num_classes=1, input_size=64,
                               checkpoint="random").state_dict(), path)
    return path


# ---------------------------------------------------------------- save: nothing lost
def test_save_deletes_only_the_folders_automask_made(base, tmp_path):
    """A save into a folder holding other things never deletes them (no data lost)."""
    target = tmp_path / "mine"
    (target / "v-data").mkdir(parents=True)
    (target / "v-data" / "notes.txt").write_text("keep me")
    (target / ".staging-area").mkdir()
    SemanticSegmentor.load(base).save(target)
    assert (target / "v-data" / "notes.txt").read_text() == "keep me"
    assert (target / ".staging-area").is_dir()
    SemanticSegmentor.load(target).save(target)  # a superseded version of ours does go
    assert len([p for p in target.glob("v-2*")]) == 1


def test_saved_version_folder_follows_the_umask(base, tmp_path):
    """A saved predictor is readable by whoever the umask lets read it (not 0o700)."""
    old = os.umask(0o022)
    try:
        saved = SemanticSegmentor.load(base).save(tmp_path / "shared")
    finally:
        os.umask(old)
    [version] = saved.glob("v-*")
    assert version.stat().st_mode & 0o777 == 0o755


def test_failed_save_leaves_no_folder_behind(base, tmp_path):
    """A save that fails removes the folders it created (no debris)."""
    seg = SemanticSegmentor.load(base)
    seg._weights_files.clear()
    seg._weights_dir = tmp_path / "gone"  # the weights cannot be read: the save fails
    with pytest.raises(SavedModelError, match="cannot read weights .*gone"):
        seg.save(tmp_path / "new" / "predictor")
    assert not (tmp_path / "new").exists()


def test_failures_remove_their_own_folders_not_what_others_wrote_in_them(data, base,
                                                                       tmp_path, monkeypatch):
    """A fit, a save or a prediction that failed removed the highest folder it had
    created, whole: with the predictor another fit of a sweep had saved beside it
    (runs/sweep/b gone when runs/sweep/a failed), or another process's masks."""
    import automask.saving as saving
    from automask.prediction import _write_each
    from automask.training.lifecycle import FitRun

    seg = SemanticSegmentor.load(base)
    sweep = tmp_path / "sweep"

    def beside_then_fail(*args, **kwargs):  # another process saves beside, then we fail
        other = sweep / "b"
        if not other.exists():
            seg.save(other)
        raise KeyboardInterrupt

    monkeypatch.setattr(FitRun, "train_candidates", beside_then_fail)
    with pytest.raises(KeyboardInterrupt):
        SemanticSegmentor(path=sweep / "a", verbosity=0).fit(
            data / "train.csv", presets="tiny", hyperparameters=HP)
    assert not (sweep / "a").exists()
    assert SemanticSegmentor.load(sweep / "b").models_  # the other fit's predictor stays
    shutil.rmtree(sweep)

    def file_beside_then_fail(*args, **kwargs):
        (sweep / "b").mkdir()
        (sweep / "b" / "theirs.txt").write_text("another process's")
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "_save_locked", file_beside_then_fail)
    with pytest.raises(KeyboardInterrupt):
        seg.save(sweep / "a")
    assert not (sweep / "a").exists() and (sweep / "b" / "theirs.txt").is_file()

    out = tmp_path / "new" / "masks"
    write = lambda dest, prob, replace: dest.write_bytes(b"mask")  # noqa: E731

    def predictions(foreign):
        yield 0, None
        if foreign:  # another process writes its mask into the folder meanwhile
            (out / "theirs.png").write_bytes(b"theirs")
        raise KeyboardInterrupt

    for foreign in (False, True):
        with pytest.raises(KeyboardInterrupt):
            _write_each(predictions(foreign), [out / "0.png", out / "1.png"], out, write,
                        overwrite=False)
        if foreign:
            assert sorted(p.name for p in out.iterdir()) == ["theirs.png"]  # ours gone
        else:
            assert not (tmp_path / "new").exists()  # created by the call: removed


def test_an_interrupt_after_the_commit_leaves_the_new_predictor_with_its_own_logs(
        data, tmp_path, monkeypatch, caplog):
    """Ctrl-C just after a refit's predictor was committed parked its logs in the fit
    state and put the replaced fit's back: the folder's 2-epoch predictor drew 1 epoch,
    and the warning advised a resume of a finished fit."""
    import automask.saving as saving
    from automask.plots import read_history

    run = tmp_path / "run"
    SemanticSegmentor(path=run, verbosity=0).fit(data / "train.csv", presets="tiny",
                                                 hyperparameters=HP)

    def interrupted(seg):
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "keep_weights_open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SemanticSegmentor(path=run, verbosity=0).fit(
            data / "train.csv", presets="tiny", overwrite=True,
            hyperparameters={**HP, "optim.max_epochs": 2})
    monkeypatch.undo()
    seg = SemanticSegmentor.load(run)
    assert seg.fit_summary()["epochs"] == {"default": 2}
    assert sorted(read_history(run)["default"]["epoch"].dropna().unique()) == [0, 1]
    assert not (run / ".automask_fit").exists()
    assert "completed epochs are kept" not in caplog.text


def test_full_disk_at_the_commit_keeps_the_old_predictor_and_no_orphan(base, tmp_path,
                                                                       monkeypatch):
    """A save that cannot write its pointer leaves the old predictor and frees its copy."""
    import automask.saving as saving

    run = tmp_path / "run"
    shutil.copytree(base, run)
    versions = sorted(p.name for p in run.glob("v-*"))
    real = saving.atomic_write

    @contextlib.contextmanager
    def full_disk(path, mode="wb"):
        if Path(path).name == "automask.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        with real(path, mode) as fh:
            yield fh

    monkeypatch.setattr(saving, "atomic_write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        SemanticSegmentor.load(run).save(run)
    monkeypatch.undo()
    assert sorted(p.name for p in run.glob("v-*")) == versions
    assert SemanticSegmentor.load(run).best_model_ == "default"


def test_save_twice_after_fit_and_relative_path_after_chdir(data, tmp_path, monkeypatch):
    """A fit into a relative path saves again after a chdir, and the copies predict alike."""
    monkeypatch.chdir(tmp_path)
    _tiny_checkpoint(tmp_path / "tiny.pth")
    seg = SemanticSegmentor(path="run", verbosity=0).fit(
        data / "train.csv", presets="tiny",
        hyperparameters={**HP, "model.checkpoint": "tiny.pth", "peft.method": "lora"})
    assert seg.path_.is_absolute()
    test = pd.read_csv(data / "train.csv").iloc[:2]
    before = seg.predict(test)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert seg.save() == tmp_path / "run"  # the run folder, not ./run here
    seg.save(tmp_path / "copy")  # the weights the first save superseded are not needed
    assert not (tmp_path / "elsewhere" / "run").exists()
    for saved in (tmp_path / "run", tmp_path / "copy"):
        after = SemanticSegmentor.load(saved).predict(test)
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------ load: the key at fault
@pytest.mark.parametrize("edit, key", [
    (lambda meta: meta.update(models=[1]), "'models'"),
    (lambda meta: meta["models"]["default"].update(checkpoint=None), "'checkpoint'"),
    (lambda meta: meta["models"]["default"].update(weights_sha256=None), "'weights_sha256'"),
    (lambda meta: meta.update(eval_metric_="foo"), "'eval_metric_'.*unknown eval_metric"),
    (lambda meta: meta.update(eval_metric_="miou"), "'eval_metric_'"),
    (lambda meta: meta.update(num_classes_=5), "'num_classes_'"),
    (lambda meta: meta.update(task_="regression"), "'task_'"),
    (lambda meta: meta.update(classes_=["a", "b", "c"]), "'classes_'.*list of 2"),
    (lambda meta: meta.update(void_label_=7), "'void_label_'.*trained with"),
    (lambda meta: meta.update(best_model_="other"), "'best_model_'.*'other'"),
], ids=["models-list", "checkpoint-null", "sha256-null", "metric-unknown", "metric-task",
        "num-classes", "task", "classes-length", "void-label", "best-model"])
def test_load_names_the_field_of_a_malformed_record(base, tmp_path, edit, key):
    """A malformed predictor.json is a SavedModelError naming the file and the field at
    load time, not a failure at prediction."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    meta = json.loads(_meta_path(run).read_text())
    edit(meta)
    _meta_path(run).write_text(json.dumps(meta))
    with pytest.raises(SavedModelError, match=key) as info:
        SemanticSegmentor.load(run)
    assert str(_meta_path(run)) in str(info.value)


def test_load_says_which_folder_it_was_given(base, tmp_path):
    """A typo, the version folder inside a predictor, and a version without its
    predictor.json each get their own message."""
    with pytest.raises(SavedModelError, match="no such folder"):
        SemanticSegmentor.load(tmp_path / "nope")
    run = tmp_path / "run"
    shutil.copytree(base, run)
    version = _meta_path(run).parent
    with pytest.raises(SavedModelError, match=r"version folder .*load its parent") as info:
        SemanticSegmentor.load(version)
    assert repr(str(run)) in str(info.value)
    _meta_path(run).unlink()
    with pytest.raises(SavedModelError, match=r"predictor\.json is missing"):
        SemanticSegmentor.load(run)


def test_load_of_a_newer_versions_file_says_which_version_saved_it(base, tmp_path):
    """An unknown key from another automask version is named, with the saving version."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    meta = json.loads(_meta_path(run).read_text())
    meta["automask_version"] = "99.0"
    meta["models"]["default"]["config"]["model.new_knob"] = 1
    _meta_path(run).write_text(json.dumps(meta))
    with pytest.raises(SavedModelError, match=r"model 'default'.*new_knob.*automask 99\.0"):
        SemanticSegmentor.load(run)


def test_load_of_an_interrupted_or_running_fit_says_what_it_is(tmp_path):
    """Loading a fit's folder before it saved names the interrupted fit or its holder."""
    run = tmp_path / "run"
    run.mkdir()
    FitState(run).start({"train": []}, {})
    with pytest.raises(SavedModelError, match=r"interrupted fit.*resume=True"):
        SemanticSegmentor.load(run)
    with run_lock(run, "fit"):
        with pytest.raises(SavedModelError, match=rf"still writing.*pid {os.getpid()}\b"):
            SemanticSegmentor.load(run)
    with pytest.raises(SavedModelError, match="is a file; pass the predictor's folder"):
        SemanticSegmentor.load(run / ".automask_fit" / "plan.json")


def test_unreadable_candidate_record_is_named_on_resume(base, tmp_path):
    """A damaged state file of an interrupted fit is kept and named, not a JSONDecodeError."""
    state = FitState(tmp_path)
    state.start({"train": []}, {})
    record = state.root / "records" / "default.json"
    record.parent.mkdir()
    record.write_text('{"config": ')
    assert state.has_progress()  # kept for the user to inspect, not deleted
    with pytest.raises(ConfigError, match=r"candidate 'default'.*default\.json"):
        state.finished("default")
    # A record whose weights file is gone would fail every resume at the final save.
    record.write_text(json.dumps(json.loads(_meta_path(base).read_text())["models"]["default"]))
    with pytest.raises(ConfigError, match=r"default\.safetensors' is missing"):
        state.finished("default")
    # damaged weights: named before the unfinished candidates train, not at the final save
    [weights] = list(_meta_path(base).parent.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.models_dir.mkdir(parents=True, exist_ok=True)
    (state.models_dir / "default.safetensors").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"default\.safetensors' is damaged .*delete it to "
                                          r"train that candidate again"):
        state.finished("default")
    (state.models_dir / "default.safetensors").write_bytes(weights.read_bytes())
    assert state.finished("default").weights == "default.safetensors"


def test_save_and_load_expand_the_home_folder(base, tmp_path, monkeypatch):
    """'~/...' names the home folder, never a folder called '~' in the working folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    SemanticSegmentor.load(base).save("~/models/p")
    assert (tmp_path / "home" / "models" / "p" / "automask.json").is_file()
    assert not (tmp_path / "~").exists()
    assert SemanticSegmentor.load("~/models/p").path_ == tmp_path / "home" / "models" / "p"


def test_outputs_and_inputs_expand_the_home_folder(base, data, tmp_path, monkeypatch):
    """'~/...' in predict's input and save_to, the leaderboard's extra folders, save_table
    and export names the home folder: nothing is written to or read from a folder called
    '~' in the working folder."""
    from automask.leaderboard import save_table

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    seg = SemanticSegmentor.load(base)
    frame = pd.read_csv(data / "train.csv").iloc[:2]
    shutil.copytree(Path(frame["image"].iloc[0]).parent, home / "images")
    written = seg.predict(frame, save_to="~/masks")
    assert [Path(p).parent for p in written["label"]] == [home / "masks"] * 2
    assert len(seg.predict("~/images")) == len(list((home / "images").iterdir()))
    board = seg.leaderboard(frame, style="models", extra={"Own": "~/masks"})
    assert board.set_index("model").loc["Own", "test_iou"] == pytest.approx(
        board.set_index("model").loc[seg.best_model_, "test_iou"])
    assert save_table(board, "~/tables/board.md") == home / "tables" / "board.md"
    assert (home / "tables" / "board.md").read_text().startswith("|")
    assert seg.export("~/exported/model.pt2") == home / "exported" / "model.pt2"
    assert (home / "exported" / "model.pt2").is_file()
    assert not (tmp_path / "~").exists()


# ------------------------------------------------------------------- checkpoints
def test_malformed_sha256_is_refused_before_downloading(tmp_path, http_server, monkeypatch):
    """A SHA-256 that is no digest is named (argument or variable) before any download."""
    _tiny_checkpoint(tmp_path / "tiny.pth")
    url = f"{http_server(tmp_path)}/tiny.pth"
    with pytest.raises(CheckpointError, match=r"sha256 must be a SHA-256 digest.*'abc'"):
        locate_checkpoint("tiny", url=url, sha256="abc", progress=False)
    monkeypatch.setenv("AUTOMASK_SAM_SHA256_TINY", "not-hex")
    with pytest.raises(CheckpointError, match=r"\$AUTOMASK_SAM_SHA256_TINY.*'not-hex'"):
        locate_checkpoint("tiny", url=url, progress=False)
    assert not any((cache_dir() / "checkpoints").glob("*"))


def test_unusable_cache_folder_names_the_three_ways(tmp_path, http_server, monkeypatch):
    """An $AUTOMASK_HOME that cannot be created gives the CheckpointError, not an OSError."""
    _tiny_checkpoint(tmp_path / "tiny.pth")
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("AUTOMASK_HOME", str(tmp_path / "a_file" / "home"))
    with pytest.raises(CheckpointError, match=r"a_file/home/checkpoints.*three ways"):
        locate_checkpoint("tiny", url=f"{http_server(tmp_path)}/tiny.pth", progress=False)


def test_checkpoint_of_another_backbone_is_named(tmp_path):
    """A file made for another backbone is refused with the backbone it looks made for."""
    ckpt = _tiny_checkpoint(tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match=r"looks like a 'tiny' checkpoint.*'vit_b'"):
        build_segmenter("vit_b", num_classes=1, input_size=64, checkpoint=ckpt)


def test_relative_checkpoint_and_cache_paths_are_recorded_absolute(tmp_path, monkeypatch):
    """Checkpoint paths recorded in a saved predictor do not depend on the working folder."""
    monkeypatch.chdir(tmp_path)
    _tiny_checkpoint(tmp_path / "tiny.pth")
    assert locate_checkpoint("tiny", "tiny.pth").path == tmp_path / "tiny.pth"
    monkeypatch.setenv("AUTOMASK_HOME", "home")
    assert cache_dir() == tmp_path / "home"


def test_the_cache_follows_xdg_cache_home_without_automask_home(tmp_path, monkeypatch):
    """Users who move caches off a small home quota with XDG_CACHE_HOME (as pip and Hugging
    Face honour it) got 0.4-2.4 GB of SAM weights in ~/.cache all the same."""
    monkeypatch.delenv("AUTOMASK_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "big_disk"))
    assert cache_dir() == tmp_path / "big_disk" / "automask"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the spec says
    assert cache_dir() == tmp_path / "home" / ".cache" / "automask"
    monkeypatch.setenv("AUTOMASK_HOME", str(tmp_path / "own"))  # automask's own comes first
    assert cache_dir() == tmp_path / "own"


@pytest.mark.parametrize("before", [None, "123"])
def test_a_fit_leaves_lightnings_seed_variables_as_they_were(data, tmp_path, monkeypatch,
                                                             before):
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        if before is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, before)
    SemanticSegmentor(path=tmp_path / "run", seed=7, verbosity=0).fit(
        data / "train.csv", presets="tiny", hyperparameters=HP)
    assert [os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")] == [before] * 2


@pytest.mark.parametrize("path", ["", "  "])
def test_load_of_an_empty_path_is_refused_even_inside_a_saved_predictor(base, monkeypatch, path):
    """An empty path (an unset variable) does not load the predictor in the working folder."""
    monkeypatch.chdir(base)
    with pytest.raises(SavedModelError, match="empty path"):
        SemanticSegmentor.load(path)
    assert SemanticSegmentor.load(".").best_model_  # the working folder, asked for by name


def test_the_samples_cached_on_disk_go_with_the_fit_state(tmp_path, monkeypatch):
    """Decoded samples beyond the memory budget are written with the fit's state and
    removed with it once the predictor is saved: the folder keeps no copy of the data."""
    cached = []
    remove = FitState.remove

    def listing_remove(state):
        cached.extend(p.name for p in (state.root / "cache").rglob("*.npy"))
        remove(state)

    monkeypatch.setattr(FitState, "remove", listing_remove)
    frame = make_synthetic(6, size=40, num_classes=2, seed=1, root=tmp_path / "data")
    run = tmp_path / "run"
    seg = SemanticSegmentor(path=run, verbosity=0).fit(frame, presets="tiny", hyperparameters={
        "optim.max_epochs": 1, "model.input_size": 32, "data.cache_memory_mb": 0})
    assert len(cached) == 2 * len(frame)  # each sample's image and mask, in the state
    assert not list(run.rglob("*.npy")), sorted(map(str, run.rglob("*.npy")))
    assert not (run / ".automask_fit").exists()
    assert len(seg.predict(frame.head(1))) == 1


def test_scikit_learn_sees_fitted_as_predict_does(base):
    """check_is_fitted passed on an object an interrupted first fit left with ``path_`` and
    ``task_`` set, though predict refuses it; a loaded predictor passes."""
    from sklearn.exceptions import NotFittedError as SklearnNotFitted
    from sklearn.utils.validation import check_is_fitted

    half = SemanticSegmentor()
    half.path_, half.task_ = base, "binary"  # what an interrupted first fit leaves
    with pytest.raises(SklearnNotFitted):
        check_is_fitted(half)
    check_is_fitted(SemanticSegmentor.load(base))
