"""Distributed training proven: real 2-process DDP fits on CPU (gloo), tiny backbone.

Each multi-process test runs ``tests/ddp_worker.py`` (a user's script with spies) or
``automask fit`` in a subprocess with ``env.devices=2``; Lightning's launcher starts the
second process. What the processes trained on and wrote comes back in per-rank JSON files.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import automask
from automask.data import EpochSampler, ShardSampler
from automask.datasets.synthetic import make_synthetic
from automask.errors import ConfigError, DataValidationError
from automask.peft import PEFT_METHODS
from automask.training import distributed

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TUNE = 10, 5
POISONED = "method=bitfit"

# Every process: CPU, gloo, fp32 (so that a single-process validation can be compared
# exactly), 64 px inputs, batch 1 and an effective batch of 4 (two accumulation steps of
# one image on each of two processes).
DDP_HP = {
    "model.input_size": 64, "optim.batch_size": 1, "optim.effective_batch_size": 4,
    "env.accelerator": "cpu", "env.devices": 2, "env.precision": "32",
    "data.num_workers": 0, "optim.patience": 0,
}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    return env


def _run_group(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; fail unless every process of it has ended."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the distributed run did not end within {timeout} s:\n{out[-3000:]}")
    for _ in range(200):  # the launcher's children leave with it (or soon after)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a process of the distributed run was still alive after rank 0 ended:\n"
                    + out[-3000:])
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _worker(tmp: Path, tag: str, hp: dict, **spec) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp / tag
    out.mkdir()
    spec = {"out": str(out), "run": str(tmp / "run"), "train": str(tmp / "train.csv"),
            "hyperparameters": {**DDP_HP, **hp}, **spec}
    (out / "spec.json").write_text(json.dumps(spec))
    return _run_group([sys.executable, str(WORKER), str(out / "spec.json")], cwd=tmp), out


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    df = make_synthetic(N_TRAIN + N_TUNE, size=(64, 80), seed=3, root=tmp / "data")
    df.iloc[:N_TRAIN].to_csv(tmp / "train.csv", index=False)
    df.iloc[N_TRAIN:].to_csv(tmp / "tuning.csv", index=False)
    return tmp


# ------------------------------------------------------------------ samplers (one process)
@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (2, 4)])
def test_epoch_sampler_shards_every_sample_once(n, world):
    shares = []
    for rank in range(world):
        s = EpochSampler(n, shuffle=True, seed=5, rank=rank, world=world)
        s.set_epoch(3)
        shares.append([pos for pos, epoch in s])
        assert len(shares[-1]) == len(s) == math.ceil(n / world)  # equal steps for DDP
    flat = [p for share in shares for p in share]
    assert sorted(set(flat)) == list(range(n))  # nothing dropped
    assert len(flat) - n == (-n) % world  # only the documented padding repeats samples
    whole = EpochSampler(n, shuffle=True, seed=5)
    whole.set_epoch(3)
    assert [p for p, _ in whole] == [p for i in range(len(shares[0]))
                                     for share in shares for p in share[i:i + 1]][:n]


@pytest.mark.parametrize("n,world", [(5, 2), (4, 2), (7, 3)])
def test_shard_sampler_partitions_without_padding(n, world):
    shares = [list(ShardSampler(n, rank, world)) for rank in range(world)]
    assert sorted(p for share in shares for p in share) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_shard_sampler_keeps_an_images_windows_together():
    """Validation windows of one image (adjacent items of one group) go to one process,
    which scores them as one image; every item is validated once."""
    groups = [0, 0, 0, 0, 1, 2, 2, 3, 4, 4, 4]  # row position of each item
    shares = [list(ShardSampler(len(groups), rank, 2, groups)) for rank in range(2)]
    assert sorted(i for share in shares for i in share) == list(range(len(groups)))
    assert shares == [[0, 1, 2, 3, 5, 6, 8, 9, 10], [4, 7]]
    assert list(ShardSampler(len(groups), 0, 1, groups)) == list(range(len(groups)))


def test_writer_is_global_rank_zero(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.is_writer(2)  # the process Lightning's launcher starts first
    assert automask.is_main_process()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not distributed.is_writer(2) and distributed.is_writer(1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # local rank 0 of the second machine
    assert not distributed.is_writer(4)
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("RANK", "3")  # torchrun
    assert not distributed.is_writer(4) and not automask.is_main_process()


def test_strategy_choice_and_refusals(ddp_data):
    from automask.config import resolve
    from automask.hardware import distributed_strategy, resolve_env

    def cfg(**hp):
        return resolve("tiny", {"env.accelerator": "cpu", **hp})[0][1]

    assert distributed_strategy(cfg(**{"env.devices": 2, "peft.method": "lora"})) == "ddp"
    for method in ("conv_lora", "full", "scratch"):  # some parameters get no gradient
        assert distributed_strategy(cfg(**{"env.devices": 2, "peft.method": method})) == \
            "ddp_find_unused_parameters_true"
    assert distributed_strategy(cfg(**{"peft.method": "lora"})) == "auto"
    # the effective batch counts images on every process: 8 = 2 per step x 2 processes x 2
    _, env = resolve_env(cfg(**{"env.devices": 2, "optim.batch_size": 2,
                                "optim.effective_batch_size": 8}))
    assert env["accumulate"] == 2
    for bad in ("ddp_spawn", "ddp_notebook", "fsdp"):
        with pytest.raises(ConfigError, match=rf"'{bad}' for 'env.strategy'.*DDP"):
            distributed_strategy(cfg(**{"env.devices": 2, "env.strategy": bad}))
    seg = automask.SemanticSegmentor(path=ddp_data / "refused")
    with pytest.raises(ConfigError, match="env.devices"):
        seg.fit(pd.read_csv(ddp_data / "train.csv"), presets="tiny",
                hyperparameters={"env.accelerator": "cpu", "env.devices": [1, 2]})
    with pytest.raises(DataValidationError, match="fewer than the 3 processes"):
        seg.fit(pd.read_csv(ddp_data / "train.csv"),
                tuning_data=pd.read_csv(ddp_data / "tuning.csv").iloc[:2], presets="tiny",
                hyperparameters={"env.accelerator": "cpu", "env.devices": 3})
    assert not (ddp_data / "refused").exists()  # refused before anything was written


# ------------------------------------------------------------ two processes, public fit
@pytest.fixture(scope="module")
def every_method(ddp_data):
    """One 2-process fit of every PEFT method, 2 epochs, with the tuning data."""
    spec_tuning = str(ddp_data / "tuning.csv")
    hp = {"peft.method": list(PEFT_METHODS), "optim.max_epochs": 2}
    out = ddp_data / "every"
    out.mkdir()
    spec = {"out": str(out), "run": str(ddp_data / "run"), "train": str(ddp_data / "train.csv"),
            "tuning": spec_tuning, "hyperparameters": {**DDP_HP, **hp}, "eval_metric": "mae",
            # the loss of one candidate turns NaN in process 1 only, in its second epoch
            "nan": {"candidate": POISONED, "rank": 1, "after": N_TRAIN // 2 + 1}}
    (out / "spec.json").write_text(json.dumps(spec))
    proc = _run_group([sys.executable, str(WORKER), str(out / "spec.json")], cwd=ddp_data)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return ddp_data, _ranks(out), proc.stdout


def test_every_method_trains_under_ddp_with_replicas_in_step(every_method):
    _, (r0, r1), _ = every_method
    names = [f"method={m}" for m in PEFT_METHODS]
    assert sorted(r0["digests"]) == sorted(names) == sorted(r1["digests"])
    for name in names:  # gradients were averaged: both replicas hold the same weights
        assert r0["digests"][name] == r1["digests"][name], name
    assert r0["val_scores"] == r1["val_scores"] and r0["best_model"] == r1["best_model"]
    assert all(v is not None and math.isfinite(v) for v in r0["val_scores"].values())


def test_a_non_finite_loss_in_one_process_stops_both(every_method):
    _, (r0, r1), _ = every_method
    for r in (r0, r1):  # both stopped in epoch 1 and kept epoch 0: no process was left waiting
        assert "training loss became nan at epoch 2" in r["stopped"][POISONED], r["stopped"]
        assert r["history"][POISONED] == [0]
        assert {e for c, e, _ in r["seen"] if c == POISONED} == {0, 1}
    assert r0["digests"][POISONED] == r1["digests"][POISONED]
    assert all(v is None for k, v in r0["stopped"].items() if k != POISONED)


def test_each_sample_once_per_epoch_across_processes(every_method):
    _, (r0, r1), _ = every_method
    for name in (f"method={m}" for m in PEFT_METHODS if f"method={m}" != POISONED):
        for epoch in (0, 1):
            a = [i for c, e, idx in r0["seen"] if c == name and e == epoch for i in idx]
            b = [i for c, e, idx in r1["seen"] if c == name and e == epoch for i in idx]
            assert len(a) == len(b) == N_TRAIN // 2, (name, epoch, a, b)
            assert not set(a) & set(b) and sorted(a + b) == list(range(N_TRAIN)), (name, a, b)


def test_effective_batch_counts_images_on_every_process(every_method):
    _, (r0, r1), _ = every_method
    for step in r0["steps"] + r1["steps"]:
        if step["candidate"] == POISONED:
            continue
        images_per_update = step["batch_size"] * step["world"] * step["accumulate"]
        assert images_per_update == DDP_HP["optim.effective_batch_size"], step
        # 5 batches per process and epoch, an update every 2 (and at the epoch's end)
        assert step["global_step"] == 2 * math.ceil((N_TRAIN // 2) / step["accumulate"]), step


def test_one_process_writes_and_the_predictor_works_alone(every_method):
    tmp, (r0, r1), stdout = every_method
    assert r1["writes"] == []
    assert r0["writes"].count("save_predictor") == 1
    assert sorted(w for w in r0["writes"] if w.startswith("write_weights")) == \
        sorted(f"write_weights:method={m}" for m in PEFT_METHODS)
    assert r0["path"] == r1["path"] == str(tmp / "run")
    assert r0["predicted"] == r1["predicted"]  # after fit, both processes hold the predictor
    assert stdout.count("fit done in") == 1  # one process reports
    seg = automask.SemanticSegmentor.load(tmp / "run")  # this single process
    masks = seg.predict(pd.read_csv(tmp / "tuning.csv"))
    assert len(masks) == N_TUNE and masks[0].shape == (64, 80)


def test_validation_metric_is_reduced_not_rank_zero_share(every_method):
    """The score the 2-process fit recorded equals one process validating all images;
    rank 0's share alone, or Lightning's padded sampler, would give other values."""
    import lightning as L

    from automask.data import SegmentationDataModule, validate_frame
    from automask.saving import rebuild_model
    from automask.training.module import SegmentationModule

    tmp, (r0, _), _ = every_method
    seg = automask.SemanticSegmentor.load(tmp / "run")
    train = validate_frame(pd.read_csv(tmp / "train.csv"), image_col="image", label_col="label")
    tuning = validate_frame(pd.read_csv(tmp / "tuning.csv"), image_col="image", label_col="label")

    def validate(name: str, positions: list[int]) -> float:
        record = seg.models_[name]
        module = SegmentationModule(rebuild_model(seg, name), task="binary", num_classes=2,
                                    optim=record.config.optim, val_metric="mae")
        dm = SegmentationDataModule(train, tuning_spec=tuning.subset(np.array(positions)),
                                    input_size=64, batch_size=1, num_workers=0)
        trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False,
                            enable_progress_bar=False, enable_model_summary=False)
        return float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val_mae"])

    for name in ("method=lora", "method=conv_lora"):
        recorded = r0["val_scores"][name]
        alone = validate(name, list(range(N_TUNE)))
        # float rounding only: kernels pick other blockings with other thread counts
        assert alone == pytest.approx(recorded, rel=1e-4, abs=1e-7), name
    # the broken variants this check would catch
    assert abs(validate(name, [0, 2, 4]) - recorded) > 1e-4  # rank 0's share only
    assert abs(validate(name, [0, 1, 2, 3, 4, 0]) - recorded) > 1e-4  # padded to 6


# ------------------------------------------------------------- time limit, CLI, resume
def test_cli_fit_on_two_processes_stops_together_at_the_time_limit(ddp_data):
    run = ddp_data / "cli_run"
    cmd = [sys.executable, "-m", "automask", "fit", "--train", str(ddp_data / "train.csv"),
           "--tuning", str(ddp_data / "tuning.csv"), "--path", str(run), "--presets", "tiny",
           "--time-limit", "20", "--verbosity", "1",
           *[f"--hp={k}={v}" for k, v in {**DDP_HP, "peft.method": "lora",
                                          "optim.max_epochs": 100000}.items()]]
    proc = _run_group(cmd, cwd=ddp_data)  # also fails if a process outlives rank 0
    assert proc.returncode == 0, proc.stdout[-4000:]
    seg = automask.SemanticSegmentor.load(run)
    record = seg.models_[seg.best_model_]
    assert 1 <= record.epochs < 100000  # stopped by the time limit, not by max_epochs
    assert proc.stdout.count("fit done in") == 1  # one process reports
    assert proc.stdout.count("saved to") == 1
    assert len(list(run.glob("v-*"))) == 1 and not (run / ".automask_fit").exists()


def test_a_distributed_fit_takes_pictures_in_memory(ddp_data):
    """Each process writes its own copy of the arrays it was given; rank 0 alone keeps
    them in the run folder, and nothing of them stays once the fit completes."""
    hp = {"peft.method": "lora", "optim.max_epochs": 1}
    run = ddp_data / "in_memory_run"
    proc, out = _worker(ddp_data, "in_memory", hp, in_memory=True, run=str(run),
                        tuning=str(ddp_data / "tuning.csv"))
    assert proc.returncode == 0, proc.stdout[-4000:]
    r0, r1 = _ranks(out)
    seen = sorted(i for r in (r0, r1) for _, _, batch in r["seen"] for i in batch)
    assert seen == list(range(N_TRAIN))  # every training row once, across the processes
    assert r0["digests"] == r1["digests"] and r1["writes"] == []
    assert r0["predicted"] == r1["predicted"]
    assert not (run / ".automask_fit").exists()
    seg = automask.SemanticSegmentor.load(run)
    assert len(seg.predict(pd.read_csv(ddp_data / "tuning.csv").iloc[:2])) == 2


def test_interrupted_distributed_fit_resumes(ddp_data):
    hp = {"peft.method": "lora", "optim.max_epochs": 2}
    spec = {"tuning": str(ddp_data / "tuning.csv")}
    (ddp_data / "resume_run").mkdir()
    first, out1 = _worker(ddp_data, "crash", hp, crash_after_epoch=0,
                          run=str(ddp_data / "resume_run"), **spec)
    assert first.returncode == 3, first.stdout[-4000:]  # every process left after epoch 1
    assert (ddp_data / "resume_run" / ".automask_fit" / "checkpoints").is_dir()
    second, out2 = _worker(ddp_data, "resumed", hp, resume=True,
                           run=str(ddp_data / "resume_run"), **spec)
    assert second.returncode == 0, second.stdout[-4000:]
    r0, r1 = _ranks(out2)
    for r in (r0, r1):  # only the second epoch ran again, in both processes
        assert {e for _, e, _ in r["seen"]} == {1}
    assert r0["digests"] == r1["digests"] and r1["writes"] == []
    seg = automask.SemanticSegmentor.load(ddp_data / "resume_run")
    record = seg.models_[seg.best_model_]
    assert record.epochs == 2 and [h["epoch"] for h in record.history] == [0, 1]
