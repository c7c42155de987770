"""SemanticSegmentor end to end: fit / predict / evaluate / leaderboard / save / load."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from automask import SemanticSegmentor
from automask.datasets import from_folders, make_synthetic, train_test_split
from automask.errors import (
    CheckpointError,
    ConfigError,
    DataValidationError,
    NotFittedError,
    SavedModelError,
)
from cli_process import run_automask
from conftest import shared_path

FAST = {"optim.max_epochs": 3}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    frame = make_synthetic(36, size=(96, 120), num_classes=2, seed=1,
                           root=tmp_path_factory.mktemp("synthetic"))
    return train_test_split(frame, test_size=0.25, seed=0)


@pytest.fixture(scope="module")
def fitted(synthetic, tmp_path_factory):
    train, _ = synthetic
    path = tmp_path_factory.mktemp("run")
    seg = SemanticSegmentor(label="label", path=path, verbosity=0)
    return seg.fit(train, presets="tiny", hyperparameters=FAST)


def test_three_lines_on_synthetic_data(fitted, synthetic):
    _, test = synthetic
    masks = fitted.predict(test)
    scores = fitted.evaluate(test)
    assert len(masks) == len(test)
    for mask, path in zip(masks, test["image"]):
        w, h = Image.open(path).size
        assert mask.shape == (h, w) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
    assert set(scores) == {"sm", "em", "wfm", "mae", "iou", "dice", "ber"}
    assert all(0.0 <= v <= 1.0 + 1e-3 for v in scores.values()), scores
    assert fitted.task_ == "binary" and fitted.num_classes_ == 2
    assert fitted.best_model_ in fitted.models_


def test_pictures_and_exports_never_replace_their_inputs(fitted, synthetic, tmp_path):
    """A picture path that is an image or a mask of the data drawn, or a file of the
    predictor (logs, versions, its pointer), is refused before any drawing, whatever is
    there; so is an export into the predictor's folders. Elsewhere a picture replaces an
    existing file."""
    from automask.errors import DataValidationError

    _, test = synthetic
    data = test.iloc[:2]
    run = Path(fitted.path_)
    targets = {data["image"].iloc[1]: "image of row", data["label"].iloc[0]: "mask of row"}
    for target, role in targets.items():
        before = Path(target).read_bytes()
        with pytest.raises(DataValidationError, match=f"it is the {role}"):
            fitted.plot_predictions(data, path=target)
        with pytest.raises(DataValidationError, match=f"it is the {role}"):
            fitted.plot_comparison(data, path=target)
        assert Path(target).read_bytes() == before
    csv = tmp_path / "d.csv"
    data.to_csv(csv, index=False)  # the synthetic paths are absolute
    with pytest.raises(DataValidationError, match="it is the image of row 1"):
        fitted.plot_predictions(str(csv), path=data["image"].iloc[1])
    [version] = [p.name for p in run.iterdir() if p.name.startswith("v-")]
    for inside in (run / "logs" / "a.png", run / version / "a.png"):
        with pytest.raises(DataValidationError, match="would write into the predictor"):
            fitted.plot_predictions(data, path=inside)
        with pytest.raises(DataValidationError, match="would write into the predictor"):
            fitted.plot_history(path=inside)
        with pytest.raises(DataValidationError, match="would write into the predictor"):
            fitted.export(inside.with_suffix(".onnx"))
        assert not inside.exists() and not inside.with_suffix(".onnx").exists()
    beside = tmp_path / "p.png"
    beside.write_bytes(b"old")
    fitted.plot_predictions(data, path=beside)
    assert beside.read_bytes()[:4] == b"\x89PNG"


def test_predict_accepts_paths_folders_and_single_files(fitted, synthetic):
    _, test = synthetic
    from_frame = fitted.predict(test.iloc[:2])
    from_list = fitted.predict(list(test["image"].iloc[:2]))
    from_one = fitted.predict(test["image"].iloc[0])
    for a, b in zip(from_frame, from_list):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(from_one[0], from_frame[0])


def test_predict_proba_matches_predict(fitted, synthetic):
    _, test = synthetic
    probs = fitted.predict_proba(test.iloc[:3])
    masks = fitted.predict(test.iloc[:3])
    for p, m in zip(probs, masks):
        assert p.dtype == np.float32 and p.shape == m.shape
        assert p.min() >= 0 and p.max() <= 1
        np.testing.assert_array_equal((p > 0.5).astype(np.uint8), m)


def test_predict_save_to_writes_lossless_pngs(fitted, synthetic, tmp_path):
    _, test = synthetic
    out = fitted.predict(test.iloc[:3], save_to=tmp_path / "masks")
    assert isinstance(out, pd.DataFrame) and len(out) == 3
    in_memory = fitted.predict(test.iloc[:3])
    for mask, path in zip(in_memory, out["label"]):
        saved = np.array(Image.open(path))
        np.testing.assert_array_equal(saved, mask * 255)


def test_evaluate_takes_metric_names_as_one_string(fitted, synthetic):
    _, test = synthetic
    listed = fitted.evaluate(test.iloc[:3], metrics=["iou", "mae"])
    assert fitted.evaluate(test.iloc[:3], metrics="iou, mae") == listed
    assert fitted.evaluate(test.iloc[:3], metrics="iou") == {"iou": listed["iou"]}


def test_not_fitted_and_unknown_model_errors(fitted, synthetic):
    _, test = synthetic
    with pytest.raises(NotFittedError, match="not fitted"):
        SemanticSegmentor().predict(test)
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        fitted.predict(test, model="nope")


def test_constructor_only_stores_arguments(tmp_path):
    seg = SemanticSegmentor(label="mask", path=tmp_path / "x", seed=3)
    assert seg.get_params()["label"] == "mask" and seg.get_params()["seed"] == 3
    assert not (tmp_path / "x").exists()


def test_bad_data_fails_before_anything_is_written(tmp_path, synthetic):
    train, _ = synthetic
    bad = train.copy()
    bad.loc[bad.index[1], "label"] = str(tmp_path / "missing.png")
    run = tmp_path / "run"
    with pytest.raises(DataValidationError, match="missing.png"):
        SemanticSegmentor(path=run, verbosity=0).fit(bad, presets="tiny")
    assert not run.exists()
    with pytest.raises(ConfigError, match="unknown preset"):
        SemanticSegmentor(path=run, verbosity=0).fit(train, presets="huge")
    with pytest.raises(ConfigError, match=r"'optim\.loss'.*'ce_dice' is for multiclass"):
        SemanticSegmentor(path=run, verbosity=0).fit(
            train, presets="tiny", hyperparameters={"optim.loss": "ce_dice"})
    assert not run.exists()


def test_two_candidates_leaderboard_and_model_switch(synthetic, tmp_path):
    from automask.models import build_segmenter, count_parameters
    from automask.peft import apply_peft

    train, test = synthetic
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        train, presets="tiny",
        hyperparameters={**FAST, "optim.max_epochs": 2, "peft.method": ["full", "lora"],
                         "env.gradient_checkpointing": True},
    )
    board = seg.leaderboard()
    assert sorted(board["model"]) == ["method=full", "method=lora"]
    for _, row in board.iterrows():
        model = build_segmenter("tiny", num_classes=1, input_size=128, checkpoint="random")
        apply_peft(model, method=row["method"])
        trainable, total = count_parameters(model)  # the paper's ratio: of the adapted model
        assert row["trainable_params_m"] == round(trainable / 1e6, 2)
        assert row["ratio_pct"] == round(100 * trainable / total, 2)
    assert board.loc[board["model"] == "method=lora", "ratio_pct"].item() < 100
    assert board.loc[board["model"] == "method=full", "ratio_pct"].item() == 100
    assert board["best"].sum() == 1
    a = seg.predict_proba(test.iloc[:2], model="method=full")
    b = seg.predict_proba(test.iloc[:2], model="method=lora")
    assert not np.allclose(a[0], b[0])
    with_test = seg.leaderboard(test)
    assert {"test_iou", "test_sm", "test_ber"} <= set(with_test.columns)


def test_save_load_predict_identical_and_no_backbone_weights(synthetic, tmp_path):
    """A LoRA model on a file checkpoint saves adapters + decoder only."""
    from safetensors.torch import load_file

    from automask.models import build_segmenter

    train, test = synthetic
    base = build_segmenter("tiny", num_classes=1, input_size=128, checkpoint="random")
    ckpt = tmp_path / "tiny_sam.pth"
    torch.save(base.state_dict(), ckpt)
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        train, presets="tiny",
        hyperparameters={**FAST, "optim.max_epochs": 1, "model.checkpoint": str(ckpt),
                         "peft.method": "lora"},
    )
    before = seg.predict(test)
    saved = seg.save(tmp_path / "saved")
    loaded = SemanticSegmentor.load(saved)
    after = loaded.predict(test)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    [weights] = list(saved.glob("v-*/*.safetensors"))
    keys = set(load_file(str(weights)))
    assert keys and all("lora" in k or k.startswith("mask_decoder.") for k in keys), keys
    assert not any(k.startswith("image_encoder.") and "lora" not in k for k in keys)
    assert weights.stat().st_size < 0.5 * ckpt.stat().st_size
    # The file checkpoint is gone and no cache holds it: loading must say so, not guess.
    ckpt.rename(tmp_path / "elsewhere.pth")
    with pytest.raises(SavedModelError, match="tiny_sam.pth.*no longer there") as info:
        SemanticSegmentor.load(saved).predict(test)
    assert "SemanticSegmentor.load(path, checkpoint=<its path now>) (automask: --checkpoint " \
        "PATH)" in str(info.value)
    # told where the file is now, loading checks its SHA-256 and predicts as before
    moved = SemanticSegmentor.load(saved, checkpoint=tmp_path / "elsewhere.pth")
    for a, b in zip(before, moved.predict(test)):
        np.testing.assert_array_equal(a, b)
    # saved again, it records the file it was built from: loading needs no checkpoint=
    assert moved.models_[moved.best_model_].checkpoint["path"] == str(tmp_path / "elsewhere.pth")
    for a, b in zip(before, SemanticSegmentor.load(moved.save(tmp_path / "resaved")
                                                   ).predict(test)):
        np.testing.assert_array_equal(a, b)
    other = {k: v + 1 for k, v in base.state_dict().items()}
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(SavedModelError, match=r"the checkpoint given to load is not that "
                                              r"file: .*other\.pth' has SHA-256"):
        SemanticSegmentor.load(saved, checkpoint=tmp_path / "other.pth").predict(test)
    with pytest.raises(SavedModelError, match=r"checkpoint '.*nowhere\.pth' is not a file"):
        SemanticSegmentor.load(saved, checkpoint=tmp_path / "nowhere.pth")
    with pytest.raises(SavedModelError, match=r"checkpoint must be a file path, got int 3"):
        SemanticSegmentor.load(saved, checkpoint=3)
    out = tmp_path / "cli_masks"
    proc = run_automask("predict", str(saved), "--data", str(test["image"].iloc[0]),
                        "--out", str(out), "--checkpoint", str(tmp_path / "elsewhere.pth"),
                        timeout=300)
    assert proc.returncode == 0, proc.stderr
    [mask] = list(out.glob("*.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(mask)) > 0, before[0] > 0)


def test_a_checkpoint_given_to_load_serves_only_the_models_that_lost_theirs(
        synthetic, tmp_path):
    """Two candidates on two checkpoint files, one of them moved: load(checkpoint=<it>)
    rebuilds that candidate from it and the other from its own file, which is still there."""
    from automask.models import build_segmenter

    train, test = synthetic
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = build_segmenter("tiny", num_classes=1, input_size=64, checkpoint="random")
        files.append(tmp_path / f"sam_{seed}.pth")
        torch.save(base.state_dict(), files[-1])
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        train, presets="tiny",
        hyperparameters={**FAST, "optim.max_epochs": 1, "model.input_size": 64,
                         "peft.method": "lora", "model.checkpoint": [str(f) for f in files]})
    names = list(seg.models_)
    assert len(names) == 2
    # each candidate's training log is kept, in one folder under logs/, though its name
    # holds the checkpoint's path (its '/' once made a folder tree the pruning removed)
    from automask.plots import read_history

    logs = sorted((tmp_path / "run" / "logs").rglob("metrics.csv"))
    assert len(logs) == 2 and all(p.parent.parent.name == "logs" for p in logs), logs
    curves = read_history(tmp_path / "run")
    assert sorted(curves) == sorted(names) and all(len(c) > 0 for c in curves.values())
    before = {n: seg.predict_proba(test.iloc[:2], model=n) for n in names}
    files[0].rename(tmp_path / "moved.pth")
    loaded = SemanticSegmentor.load(tmp_path / "run", checkpoint=tmp_path / "moved.pth")
    for n in names:
        for a, b in zip(before[n], loaded.predict_proba(test.iloc[:2], model=n)):
            np.testing.assert_array_equal(a, b)
    # saved again before any model is built: the moved file is recorded for the model
    # trained on it, so that the copy loads without checkpoint=
    SemanticSegmentor.load(tmp_path / "run", checkpoint=tmp_path / "moved.pth").save(
        tmp_path / "resaved")
    moved = files[0].name
    again = SemanticSegmentor.load(tmp_path / "resaved")
    for n in names:
        for a, b in zip(before[n], again.predict_proba(test.iloc[:2], model=n)):
            np.testing.assert_array_equal(a, b)
    assert any(moved in n for n in names)
    # another file now at the recorded path (a re-download, another version): the file
    # given to load is tried next, not refused unread
    shutil.copyfile(files[1], files[0])
    loaded = SemanticSegmentor.load(tmp_path / "run", checkpoint=tmp_path / "moved.pth")
    for n in names:
        for a, b in zip(before[n], loaded.predict_proba(test.iloc[:2], model=n)):
            np.testing.assert_array_equal(a, b)


def test_a_record_without_the_checkpoints_sha256_is_refused(fitted, synthetic, tmp_path):
    """A record whose hash was lost (an edited predictor.json) loaded whatever file lay at
    the recorded path; nothing could check that it was the one trained on."""
    from automask.errors import SavedModelError
    from automask.saving import _checkpoints_to_try

    saved = fitted.save(tmp_path / "saved")
    [meta] = list(saved.glob("v-*/predictor.json"))
    data = json.loads(meta.read_text())
    records = data["models"]
    assert all(r["checkpoint"]["source"] == "random" for r in records.values())
    name = next(iter(records))
    records[name]["checkpoint"] = {"source": "file", "path": str(tmp_path / "sam.pth")}
    meta.write_text(json.dumps(data))
    with pytest.raises(SavedModelError, match=f"the record of model {name!r} holds no SHA-256"):
        SemanticSegmentor.load(saved).predict_proba(synthetic[1].iloc[:1], model=name)
    # a user's own file (not the official one) is looked for at its path and in the file
    # given to load, never in the cache or by downloading the official weights
    record = SemanticSegmentor.load(tmp_path / "saved").models_[name]
    record.checkpoint = {"source": "file", "path": str(tmp_path / "gone.pth"), "sha256": "ab" * 32}
    assert _checkpoints_to_try(record, "given.pth") == ["given.pth"]
    assert _checkpoints_to_try(record, None) == []  # moved, nothing given: no download
    record.checkpoint = {"source": "cache", "path": str(tmp_path / "gone.pth"), "sha256": "ab" * 32}
    assert _checkpoints_to_try(record, None) == [None]


def test_load_rejects_incomplete_corrupted_and_incompatible(fitted, synthetic, tmp_path):
    saved = fitted.save(tmp_path / "saved")
    with pytest.raises(SavedModelError, match="not a saved automask predictor") as info:
        SemanticSegmentor.load(tmp_path)
    assert "left behind" not in str(info.value)
    pointer = saved / "automask.json"
    [version] = list(saved.glob("v-*"))
    # a copy that left the pointer behind names the version it would load and the fix
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy, ignore=shutil.ignore_patterns("automask.json"))
    with pytest.raises(SavedModelError) as info:
        SemanticSegmentor.load(copy)
    text = str(info.value)
    assert f"yet it holds the saved version {version.name!r}: automask.json" in text, text
    written = json.loads(text.split(" holding ", 1)[1])
    (copy / "automask.json").write_text(json.dumps(written))
    assert SemanticSegmentor.load(copy).best_model_ == fitted.best_model_
    meta = version / "predictor.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(SavedModelError, match="corrupted"):
        SemanticSegmentor.load(saved)
    meta.write_text(text.replace('"format_version": 2', '"format_version": 99'))
    with pytest.raises(SavedModelError, match="format version 99"):
        SemanticSegmentor.load(saved)
    meta.write_text(text)
    pointer_text = pointer.read_text()
    pointer.write_text(pointer_text[:-5])
    with pytest.raises(SavedModelError, match="corrupted"):
        SemanticSegmentor.load(saved)
    pointer.write_text(pointer_text)
    [weights] = list(version.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(SavedModelError, match="corrupted"):
        SemanticSegmentor.load(saved).predict(synthetic[1].iloc[:1])
    weights.unlink()
    with pytest.raises(SavedModelError, match="missing weights"):
        SemanticSegmentor.load(saved)
    weights.mkdir()  # a folder in its place: named, not a raw IsADirectoryError
    with pytest.raises(SavedModelError, match=f"cannot read weights file {weights.name!r}"):
        SemanticSegmentor.load(saved)


def test_time_limit_is_honoured(synthetic, tmp_path):
    train, _ = synthetic
    limit = 25.0
    t0 = time.monotonic()
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        train, presets="tiny", hyperparameters={"optim.max_epochs": 10_000}, time_limit=limit
    )
    elapsed = time.monotonic() - t0
    assert elapsed <= 1.1 * limit, elapsed
    assert elapsed >= 0.7 * limit, elapsed  # it used the time rather than stopping at once
    record = seg.models_[seg.best_model_]
    assert record.epochs < 10_000
    assert record.stopped == f"its share of time_limit ran out after {record.epochs} of 10000 " \
                             "epochs"
    assert seg.leaderboard(style="models")["stopped"].tolist() == [record.stopped]


@pytest.mark.parametrize("limit", [1e14, 1e30, 1.7e308])
def test_a_time_limit_longer_than_any_fit_trains_every_epoch(synthetic, tmp_path, limit):
    """A limit past what datetime.timedelta holds (999,999,999 days) is a limit that never
    ends a fit: every epoch is trained (it was an OverflowError after the data checks)."""
    train, _ = synthetic
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        train.iloc[:4], presets="tiny", time_limit=limit,
        hyperparameters={"optim.max_epochs": 2, "model.input_size": 32})
    record = seg.models_[seg.best_model_]
    assert (record.epochs, record.stopped) == (2, None)


def test_patience_stop_is_recorded_and_shown(synthetic, tmp_path, capsys):
    """optim.patience=1 with a learning rate too small to change a weight: the second
    validation is no better than the first, so training stops after 2 of 5 epochs and
    the record, the leaderboard and the printed summary say why. A candidate that trains
    every epoch says nothing."""
    train, _ = synthetic
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=1).fit(
        train, presets="tiny", hyperparameters={
            "optim.max_epochs": [5, 1], "optim.patience": 1, "optim.lr": 1e-30,
            "model.input_size": 64})
    stopped = seg.leaderboard(style="models").set_index("model")["stopped"]
    assert seg.models_["max_epochs=5"].epochs == 2
    assert stopped["max_epochs=5"] == seg.models_["max_epochs=5"].stopped == (
        "no better validation score in 1 validation(s) (optim.patience) after 2 of 5 epochs")
    assert seg.models_["max_epochs=1"].stopped is None and stopped.isna()["max_epochs=1"]
    assert seg.fit_summary()["stopped"] == {"max_epochs=5": stopped["max_epochs=5"],
                                            "max_epochs=1": None}
    summary = capsys.readouterr().out.split("fit done in ")[1].splitlines()
    at = next(i for i, line in enumerate(summary) if line.split()[0] == "max_epochs=5")
    assert summary[at + 1].split() == ["stopped:", *stopped["max_epochs=5"].split()]
    assert sum("stopped:" in line for line in summary) == 1, summary


@pytest.mark.slow
def test_three_lines_on_kvasir_subset(tmp_path):
    folder = shared_path("data", "kvasir_seg")
    frame = from_folders(folder / "images", folder / "masks")
    train, test = frame.iloc[:16], frame.iloc[16:20]
    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0)
    seg.fit(train, presets="tiny", hyperparameters={"optim.max_epochs": 1})
    masks = seg.predict(test)
    scores = seg.evaluate(test)
    for mask, path in zip(masks, test["image"]):
        w, h = Image.open(path).size
        assert mask.shape == (h, w)
    assert 0 <= scores["iou"] <= 1 and 0 <= scores["sm"] <= 1


@pytest.mark.slow
def test_three_lines_on_camvid_multiclass_with_void_ignored(tmp_path):
    folder = shared_path("data", "camvid")
    frame = from_folders(folder / "images", folder / "masks")
    train, test = frame.iloc[:12], frame.iloc[12:15]
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0)
    seg.fit(train, presets="tiny", hyperparameters={"optim.max_epochs": 1, "data.void_label": 11})
    assert seg.task_ == "multiclass" and seg.num_classes_ == 11
    masks = seg.predict(test)
    for mask in masks:
        assert mask.shape == (360, 480) and mask.max() < 11
    probs = seg.predict_proba(test.iloc[:1])[0]
    assert probs.shape == (11, 360, 480)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
    scores = seg.evaluate(test)
    assert set(scores) == {"acc", "miou", "iou_per_class"}
    assert len(scores["iou_per_class"]) == 11


def test_same_seed_same_model_on_cpu(synthetic, tmp_path):
    train, test = synthetic
    hp = {"optim.max_epochs": 1, "peft.method": "conv_lora"}  # noisy gates use the seed too
    probs = [
        SemanticSegmentor(path=tmp_path / f"run{i}", seed=5, verbosity=0)
        .fit(train, presets="tiny", hyperparameters=hp).predict_proba(test.iloc[:2])
        for i in range(2)
    ]
    other = SemanticSegmentor(path=tmp_path / "run_other", seed=6, verbosity=0).fit(
        train, presets="tiny", hyperparameters=hp).predict_proba(test.iloc[:2])
    np.testing.assert_array_equal(probs[0][0], probs[1][0])
    assert not np.array_equal(probs[0][0], other[0])


def test_a_later_candidate_without_weights_fails_before_any_training(synthetic, tmp_path,
                                                                     monkeypatch):
    """Candidates tiny (random weights) then vit_b, whose weights cannot be had: the fit fails
    naming the vit_b candidate before the tiny one trains, and leaves no folder."""
    from automask.training import recipe

    train, _ = synthetic
    monkeypatch.setenv("AUTOMASK_SAM_URL_VIT_B", "http://127.0.0.1:9/sam_vit_b_01ec64.pth")
    trained = []
    original = recipe.train_candidate
    monkeypatch.setattr(recipe, "train_candidate",
                        lambda name, *a, **k: trained.append(name) or original(name, *a, **k))
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0)
    with pytest.raises(CheckpointError, match=r"^candidate 'backbone=vit_b': no weights for "
                                              r"backbone 'vit_b'.*\(3\) let automask"):
        seg.fit(train, presets="tiny", hyperparameters={
            "model.backbone": ["tiny", "vit_b"], "model.input_size": 64})
    assert trained == [] and not (tmp_path / "run").exists()


def test_pretrained_preset_without_weights_fails_clearly(synthetic, tmp_path, monkeypatch):
    """No file, empty cache, download refused: one error naming the three ways, no training."""
    train, _ = synthetic
    monkeypatch.setenv("AUTOMASK_SAM_URL_VIT_B", "http://127.0.0.1:9/sam_vit_b_01ec64.pth")
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0)
    with pytest.raises(CheckpointError) as info:
        seg.fit(train, presets="medium_quality", hyperparameters={"model.input_size": 64})
    message = str(info.value)
    for way in ('(1) pass hyperparameters={"model.checkpoint": ',
                "(2) place that file in the cache", "(3) let automask"):
        assert way in message, message
    assert not hasattr(seg, "best_model_")


def test_square_resize_fits_and_predicts_stretched_images(tmp_path):
    """data.resize="square": the predictor stretches each whole image to the input, runs
    the model, and stretches the probabilities back, for the free and the prompted path;
    the exported metadata says so."""
    import torch.nn.functional as F

    from automask.data.io import read_image
    from automask.data.transforms import normalize_pad, resize_image
    from automask.export import preprocessing_metadata
    from automask.models.segmenter import Prompt

    frame = make_synthetic(6, size=(36, 76), num_classes=2, seed=4, root=tmp_path / "data")
    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters={"optim.max_epochs": 1, "model.input_size": 64,
                                                "data.resize": "square", "env.precision": "32"})
    assert seg.config_.data.resize == "square"
    got = seg.predict_proba(frame.head(1))[0]  # (36, 76); 76 < 1.25 x 64: not tiled
    net = seg._model(None)
    x = normalize_pad(resize_image(read_image(frame["image"][0]), (64, 64)), 64)[None]
    with torch.no_grad():
        logits = net(x).float()  # (1, 1, 64, 64)
    expected = F.interpolate(torch.sigmoid(logits), size=(36, 76), mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    assert got.shape == (36, 76)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # a box is mapped by each axis's own scale: the whole image's box is the whole input
    boxed = seg.predict_proba(frame.head(1), boxes=[[0, 0, 76, 36]])[0]
    with torch.no_grad():
        box_logits = net(x, [Prompt(box=torch.tensor([0.0, 0.0, 64.0, 64.0]))]).float()
    np.testing.assert_allclose(
        boxed, F.interpolate(torch.sigmoid(box_logits), size=(36, 76), mode="bilinear",
                             align_corners=False)[0, 0].numpy(), atol=1e-5)
    meta = preprocessing_metadata(net, resize=seg.config_.data.resize)
    assert meta["resize_mode"] == "square" and meta["padding"].startswith("none")


@pytest.mark.parametrize("resize", ["square", "longest_side"])
def test_evaluate_at_the_input_resolution_scores_the_model_view_against_nearest_masks(
        resize, tmp_path, capsys):
    """evaluate(resolution="input"), the authors' protocol: the probabilities as the model
    gives them for the image's extent in the input (no resize back), against the mask
    resized to them by nearest neighbour; leaderboard and the command line pass it on."""
    import json

    from automask import cli
    from automask.data.io import read_image
    from automask.data.transforms import normalize_pad, resize_image, resize_nearest
    from automask.metrics import build_metrics
    from automask.prediction import metric_conventions

    frame = make_synthetic(4, size=(36, 76), num_classes=2, seed=6, root=tmp_path / "data")
    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters={"optim.max_epochs": 1, "model.input_size": 64,
                                                "data.resize": resize, "env.precision": "32"})
    h, w = (64, 64) if resize == "square" else (30, 64)  # 36 x 76 with its longest side at 64
    net = seg._model(None)
    names = ["sm", "em", "iou", "mae"]
    scorers = build_metrics("binary", names, **metric_conventions("binary", 1))
    for image, label in zip(frame["image"], frame["label"]):
        x = normalize_pad(resize_image(read_image(image), (h, w)), 64)[None]
        with torch.no_grad():
            prob = torch.sigmoid(net(x).float())[0, 0, :h, :w]  # (h, w), no resize back
        mask = resize_nearest(np.asarray(Image.open(label)), (h, w))
        for scorer in scorers.values():
            scorer.update(prob, torch.from_numpy((mask > 127).astype(np.int64)))
    expected = {k: float(s.compute()) for k, s in scorers.items()}
    got = seg.evaluate(frame, metrics=names, resolution="input")
    assert got.keys() == expected.keys()
    for key in names:
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    original = seg.evaluate(frame, metrics=names)
    assert original == seg.evaluate(frame, metrics=names, resolution="original")
    board = seg.leaderboard(frame, metrics=["sm"], resolution="input", style="models")
    assert board["test_sm"].iloc[0] == pytest.approx(got["sm"], abs=1e-12)
    csv = tmp_path / "test.csv"
    frame.to_csv(csv, index=False)
    assert cli.main(["evaluate", str(tmp_path / "run"), "--data", str(csv), "--metrics",
                     "sm", "--resolution", "input", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sm"] == pytest.approx(got["sm"], abs=1e-12)
    with pytest.raises(ConfigError, match="resolution must be one of"):
        seg.evaluate(frame, resolution="1024")
    with pytest.raises(ConfigError, match="external rows"):
        seg.leaderboard(frame, extra={"other": tmp_path}, resolution="input")


def test_time_limit_shares_are_even_for_even_candidates(monkeypatch, tmp_path):
    """Each candidate's share of time_limit keeps for all but training what the candidate
    before it spent on that (the first: 5% of its share), not a fixed 7% + 1 s that later
    candidates inherit unused: four alike candidates train alike. A clock of our own, so
    that the arithmetic, not this machine's speed, is tested."""
    from types import SimpleNamespace

    from automask.config import resolve
    from automask.training import recipe
    from automask.training.lifecycle import FitRun

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    setup, after = 0.4, 1.6  # seconds a candidate spends building, and after training
    trained = {}

    class Record:
        def to_json(self):
            return {}

    def fake_train(name, cfg, *args, budget, reserve, **kwargs):
        clock[0] += setup
        seconds = recipe.training_seconds(budget, setup, reserve)
        trained[name] = seconds
        clock[0] += seconds + after
        return recipe.Outcome(model=None, record=Record(), trained_s=seconds)

    monkeypatch.setattr(recipe, "train_candidate", fake_train)
    [(_, cfg)] = resolve("tiny", {})  # random weights: nothing to locate
    plan = SimpleNamespace(candidates=[(f"seed={i}", cfg) for i in range(4)], spec=None,
                           tuning_spec=None, metric="iou")
    with FitRun(tmp_path / "run", overwrite=False, resume=False) as run:
        run.state.start({"candidates": {}}, {})
        records, _ = run.train_candidates(plan, seed=0, verbosity=0, deadline=clock[0] + 40.0)
    assert list(records) == list(trained) == [f"seed={i}" for i in range(4)]
    first, *later = trained.values()
    assert first == pytest.approx(10 - setup - 0.5)  # a 10 s share, 5% kept
    # the later ones keep what the first spent on all but training (2 s) and train alike:
    # the time the first took is gone, the rest is shared evenly
    share = (40 - (setup + first + after)) / 3
    assert later == pytest.approx([share - setup - after] * 3)
    assert clock[0] == pytest.approx(1040.0)  # the whole limit, no more
