"""Audit of prediction, tiling, export, leaderboard and the command line: bad input fails
before any work with a message naming the value at fault, and a failure leaves no debris."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from automask import SemanticSegmentor, cli
from automask.datasets import make_synthetic
from automask.errors import ConfigError, DataValidationError

from cli_process import run_automask

S = 32  # model input side


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny binary predictor saved in ``run``, with its labelled CSV."""
    root = tmp_path_factory.mktemp("audit_predict")
    frame = make_synthetic(6, size=S, num_classes=2, seed=3, root=root / "data")
    csv = root / "data" / "data.csv"
    frame.to_csv(csv, index=False)
    seg = SemanticSegmentor(label="label", path=root / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters={"optim.max_epochs": 1, "model.input_size": S},
    )
    return seg, root / "run", csv


def _cli(*args: str) -> int:
    return cli.main([str(a) for a in args])


# ---------------------------------------------------------------------- command line
def test_predict_proba_failing_midway_removes_the_maps_and_folders_it_created(
        fitted, tmp_path, monkeypatch, capsys):
    """predict --proba that fails after writing some maps leaves no file or folder behind."""
    import automask.prediction as prediction

    _, run, csv = fitted
    real = prediction.iter_proba

    def fails_after_one(*args, **kwargs):
        probs = real(*args, **kwargs)
        yield next(probs)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(prediction, "iter_proba", fails_after_one)
    out = tmp_path / "new" / "maps"
    assert _cli("predict", run, "--data", csv, "--out", out, "--proba") == 2
    assert "disk full" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_predict_boxes_with_data_lacking_the_image_column_is_a_one_line_error(
        fitted, tmp_path):
    """--boxes with a --data CSV that has no image column exits 2 naming the column."""
    _, run, csv = fitted
    data = tmp_path / "data.csv"
    data.write_text("path\nx.png\n")
    boxes = tmp_path / "boxes.csv"
    image = pd.read_csv(csv)["image"][0]
    boxes.write_text(f"image,x0,y0,x1,y1\n{image},0,0,4,4\n")
    proc = run_automask("predict", str(run), "--data", str(data), "--out",
                        str(tmp_path / "out"), "--boxes", str(boxes), timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert "'image'" in lines[0] and str(data) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_boxes_row_without_an_image_path_is_named(fitted, tmp_path, capsys):
    """A --boxes row with an empty image cell is reported as such, with its row."""
    _, run, csv = fitted
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,x0,y0,x1,y1\n,0,0,4,4\n")
    assert _cli("predict", run, "--data", csv, "--out", tmp_path / "out",
                "--boxes", boxes) == 2
    err = capsys.readouterr().err
    assert "row 0 has no image path" in err and str(boxes) in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("values, says", [("4,0,2,4", "x1 > x0"), ("0,0,nan,4", "not finite"),
                                          ("0,0,four,4", "not numeric")])
def test_a_bad_box_names_the_boxes_file_and_its_row(fitted, tmp_path, capsys, values, says):
    """A reversed, NaN or non-numeric box in --boxes is reported with the --boxes file and
    the row of that file (not the row of --data), before anything is written."""
    _, run, csv = fitted
    images = pd.read_csv(csv)["image"]
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(f"image,x0,y0,x1,y1\n{images[0]},0,0,4,4\n{images[2]},{values}\n")
    assert _cli("predict", run, "--data", csv, "--out", tmp_path / "out",
                "--boxes", boxes) == 2
    err = capsys.readouterr().err
    assert str(boxes) in err and "row 1" in err and says in err, err
    assert not (tmp_path / "out").exists()


def test_boxes_paths_with_a_tilde_match_the_data_as_predict_resolves_them(
        fitted, tmp_path, monkeypatch, capsys):
    """--boxes image paths starting with ~ match --data images, as validation expands them."""
    _, run, csv = fitted
    monkeypatch.setenv("HOME", str(csv.parent))
    image = Path(pd.read_csv(csv)["image"][1])
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(f"image,x0,y0,x1,y1\n~/{image.relative_to(csv.parent)},0,0,8,8\n")
    out = tmp_path / "out"
    assert _cli("predict", run, "--data", csv, "--out", out, "--boxes", boxes) == 0, \
        capsys.readouterr().err
    assert len(list(out.iterdir())) == len(pd.read_csv(csv))


def test_leaderboard_out_that_cannot_be_written_fails_before_scoring(
        fitted, tmp_path, monkeypatch, capsys):
    """leaderboard --out naming a folder fails before any model is scored."""
    _, run, csv = fitted

    def no_scoring(*args, **kwargs):
        raise AssertionError("a model was scored before --out was checked")

    monkeypatch.setattr(SemanticSegmentor, "evaluate", no_scoring)
    table = tmp_path / "table.md"
    table.mkdir()
    assert _cli("leaderboard", run, "--data", csv, "--out", table) == 2
    err = capsys.readouterr().err
    assert str(table) in err and "folder" in err, err


# ------------------------------------------------------------------------ prediction
def test_save_to_that_cannot_be_a_folder_fails_before_any_prediction(fitted, tmp_path):
    """save_to under a file, or a destination that is a folder, is refused before work."""
    seg, _, csv = fitted
    images = list(pd.read_csv(csv)["image"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataValidationError, match="is a file, not a folder") as info:
        seg.predict(images, save_to=blocker / "masks")
    assert str(blocker) in str(info.value)
    out = tmp_path / "masks"
    (out / f"{Path(images[0]).stem}.png").mkdir(parents=True)
    with pytest.raises(DataValidationError, match="are folders, not files"):
        seg.predict(images, save_to=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [f"{Path(images[0]).stem}.png"]


def test_shared_stems_keep_their_folders_below_the_output_folder(fitted, tmp_path):
    """Inputs a/x.png, b/x.png and c/d/x.png saved to one folder keep their paths below
    their common folder (a file given twice: one output); files that still share a name
    (a/x.png beside a/x.jpg), or a file where an output folder goes, are refused before any
    work, naming the paths."""
    seg, _, csv = fitted
    first = Path(pd.read_csv(csv)["image"][0])
    paths = []
    for sub in ("a", "b", "c/d"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        paths.append(tmp_path / "in" / sub / "x.png")
        paths[-1].write_bytes(first.read_bytes())
    out = tmp_path / "out"
    written = seg.predict([str(p) for p in paths + paths[:1]], save_to=out)
    assert list(written["label"]) == [str(out / "a/x.png"), str(out / "b/x.png"),
                                      str(out / "c/d/x.png"), str(out / "a/x.png")]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "a/x.png", "b/x.png", "c/d/x.png"]
    want = seg.predict([str(first)])[0]
    for dest in written["label"]:
        assert np.array_equal(np.asarray(Image.open(dest)) > 0, want > 0) and want.any()
    jpeg = tmp_path / "in" / "a" / "x.jpg"
    Image.open(first).convert("RGB").save(jpeg)
    with pytest.raises(DataValidationError, match="share file names") as info:
        seg.predict([str(paths[0]), str(jpeg), str(paths[1])], save_to=tmp_path / "out2")
    assert str(paths[0]) in str(info.value) and str(jpeg) in str(info.value), info.value
    assert not (tmp_path / "out2").exists()
    (tmp_path / "out3").mkdir()
    (tmp_path / "out3" / "b").write_text("x")
    with pytest.raises(DataValidationError, match=r"out3/b'\] in .* stand where the outputs' "
                                                  "folders go"):
        seg.predict([str(p) for p in paths], save_to=tmp_path / "out3")
    assert [p.name for p in (tmp_path / "out3").iterdir()] == ["b"]


def test_a_failed_write_removes_the_sub_folders_it_made(fitted, tmp_path, monkeypatch):
    """Outputs kept below sub-folders: a write failing half-way leaves the folder as it was."""
    import automask.data.io as io

    seg, _, csv = fitted
    first = Path(pd.read_csv(csv)["image"][0])
    paths = []
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        paths.append(tmp_path / "in" / sub / "x.png")
        paths[-1].write_bytes(first.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    real, calls = io.write_mask, []

    def failing(dest, mask, task, color_map=None, **kwargs):
        calls.append(dest)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(dest, mask, task, color_map, **kwargs)

    monkeypatch.setattr(io, "write_mask", failing)
    with pytest.raises(OSError, match="disk full"):
        seg.predict([str(p) for p in paths], save_to=out)
    assert len(calls) == 2 and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("stop", ["write", "predict", "evaluate"])
def test_a_prediction_stopped_half_way_gives_the_float32_weights_back(fitted, tmp_path,
                                                                      monkeypatch, stop):
    """On a bf16 CPU a prediction holds the frozen linear weights in bf16 while it runs. A
    prediction stopped half-way (a failed write, Ctrl-C, an error in the caller's loop)
    ends the hold at once, not when its exception is collected: a notebook keeps the last
    one, and the model, still in bf16, then failed to export ("unsupported ScalarType
    BFloat16") and ran in bf16 outside autocast."""
    seg, _, csv = fitted
    net, cfg = seg._model(None), seg._config(None)
    frozen = [m.weight for m in net.modules() if type(m) is torch.nn.Linear]
    for weight in frozen:
        weight.requires_grad_(False)
    try:
        _stop_a_prediction(seg, net, cfg, frozen, csv, tmp_path, monkeypatch, stop)
    finally:  # the module's fitted model as it was for the other tests
        for weight in frozen:
            weight.requires_grad_(True)


def _stop_a_prediction(seg, net, cfg, frozen, csv, tmp_path, monkeypatch, stop):
    import automask.data.io as io
    import automask.hardware
    import automask.models.frozen as frozen_module
    from automask import prediction
    from automask.models.frozen import frozen_linears_in_bf16

    with frozen_linears_in_bf16(net) as cast:  # a hold casts them, as on a bf16 CPU
        assert cast > 0 and all(w.dtype == torch.bfloat16 for w in frozen)
    monkeypatch.setattr(cfg.env, "precision", "bf16-mixed")
    # a CPU with bf16 products: elsewhere a bf16-mixed predictor predicts in float32
    monkeypatch.setattr(automask.hardware, "cpu_supports_bf16", lambda: True)
    holds = []
    real_hold = frozen_linears_in_bf16

    @contextlib.contextmanager
    def counted(model, enabled=True, park=False):
        with real_hold(model, enabled=enabled, park=park) as held:
            holds.append(held)
            yield held
    monkeypatch.setattr(frozen_module, "frozen_linears_in_bf16", counted)
    images = list(pd.read_csv(csv)["image"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the images

    kept = []
    try:
        if stop == "write":
            def failing(*args, **kwargs):
                raise OSError("disk full")

            monkeypatch.setattr(io, "write_mask", failing)
            seg.predict(images, save_to=tmp_path / "out")
        elif stop == "predict":
            monkeypatch.setattr(prediction, "to_mask", interrupted)
            seg.predict(images)
        else:
            import automask.data

            monkeypatch.setattr(automask.data, "read_mask", interrupted)
            seg.evaluate(csv)
    except (OSError, KeyboardInterrupt) as exc:
        kept.append(exc)  # as a notebook keeps sys.last_value
    assert holds and holds[0] == len(frozen)  # the stopped prediction held them
    assert kept and all(w.dtype == torch.float32 for w in frozen)


def test_prediction_streams_keep_autocast_and_inference_mode_to_themselves(fitted, tmp_path,
                                                                           monkeypatch):
    """The caller's code between two predictions (writing a mask) runs outside the
    stream's autocast and inference mode, and none is left on afterwards: images with a
    box and images without, two streams read in turn, left bf16 autocast on for the
    thread (a later export then failed on a bf16 output)."""
    import automask.data.io as io
    import automask.hardware
    import automask.prediction as prediction

    seg, _, csv = fitted
    monkeypatch.setattr(seg._config(None).env, "precision", "bf16-mixed")
    # a CPU with bf16 products: elsewhere a bf16-mixed predictor predicts in float32
    monkeypatch.setattr(automask.hardware, "cpu_supports_bf16", lambda: True)
    images = list(pd.read_csv(csv)["image"])
    real, states, inside = io.write_mask, [], []
    real_probabilities = prediction._probabilities

    def recording(*args, **kwargs):
        states.append((torch.is_autocast_enabled("cpu"), torch.is_inference_mode_enabled()))
        return real(*args, **kwargs)

    def probabilities(*args, **kwargs):
        inside.append(torch.is_autocast_enabled("cpu"))
        return real_probabilities(*args, **kwargs)

    monkeypatch.setattr(io, "write_mask", recording)
    monkeypatch.setattr(prediction, "_probabilities", probabilities)
    boxes = [None, (0, 0, 8, 8), None, None, (2, 2, 12, 12), None]  # one per image
    seg.predict(images, save_to=tmp_path / "out", boxes=boxes)
    assert inside and all(inside)  # the model ran under bf16 autocast
    assert states == [(False, False)] * len(images)
    assert not torch.is_autocast_enabled("cpu") and not torch.is_inference_mode_enabled()


def test_a_bf16_predictor_predicts_in_float32_where_the_cpu_has_no_bf16(fitted, monkeypatch):
    """A predictor fit under bf16-mixed (on a GPU, or a CPU with bf16 products) and used
    on a CPU without them predicts in float32, exactly as a float32 predictor: emulated
    bf16 took a vit_b prediction 9x as long. Where the CPU has them, bf16 autocast."""
    import automask.hardware

    seg, _, csv = fitted
    images = list(pd.read_csv(csv)["image"])[:3]
    cfg = seg._config(None)
    monkeypatch.setattr(cfg.env, "precision", "32-true")
    float32 = seg.predict_proba(images)
    monkeypatch.setattr(cfg.env, "precision", "bf16-mixed")
    monkeypatch.setattr(automask.hardware, "cpu_supports_bf16", lambda: False)
    emulated = seg.predict_proba(images)
    monkeypatch.setattr(automask.hardware, "cpu_supports_bf16", lambda: True)
    native = seg.predict_proba(images)
    for a, b in zip(float32, emulated, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, c) for a, c in zip(float32, native, strict=True))


def test_tiled_proba_names_a_bad_batch_size_or_image():
    """tiled_proba refuses a batch size below 1 or a non-RGB array, naming the value."""
    from automask.tiling import tiled_proba

    def forward(batch):
        return torch.sigmoid(batch[:, :1])

    image = np.zeros((40, 70, 3), np.uint8)
    for batch_size in (0, -2):
        with pytest.raises(ValueError, match=rf"batch_size .* got {batch_size}"):
            tiled_proba(forward, image, S, batch_size, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\(H, W, 3\).*\(40, 70\)"):
        tiled_proba(forward, image[..., 0], S, 2, torch.device("cpu"))
    assert tiled_proba(forward, image, S, 3, torch.device("cpu")).shape == (1, 40, 70)


def test_use_tiles_refuses_an_unknown_mode():
    """use_tiles names a tiling mode it does not know instead of treating it as "auto"."""
    from automask.tiling import use_tiles

    assert use_tiles((100, 100), S, "on") and not use_tiles((100, 100), S, "off")
    with pytest.raises(ConfigError, match="'ON'"):
        use_tiles((100, 100), S, "ON")


# --------------------------------------------------------------------------- export
def test_export_to_a_folder_or_under_a_file_fails_before_any_work(fitted, tmp_path,
                                                                   monkeypatch):
    """export to an existing folder, or below a file, raises ConfigError naming it first."""
    import automask.export as export

    seg, _, _ = fitted

    def no_work(*args, **kwargs):
        raise AssertionError("the model was copied before the path was checked")

    monkeypatch.setattr(export, "inference_copy", no_work)
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a folder") as info:
        seg.export(folder)
    assert str(folder) in str(info.value)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        seg.export(blocker / "model.onnx")


def test_failed_export_removes_the_folders_it_created(fitted, tmp_path, monkeypatch):
    """An export that fails leaves no new folder behind."""
    import automask.export as export

    seg, _, _ = fitted

    def fails(*args, **kwargs):
        raise export.ExportError("exporter failed (simulated)")

    monkeypatch.setattr(export, "_export_onnx", fails)
    with pytest.raises(export.ExportError, match="simulated"):
        seg.export(tmp_path / "new" / "deep" / "model.onnx")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- leaderboard
def test_leaderboard_metrics_as_a_string_or_an_empty_list(fitted):
    """leaderboard(metrics="iou,dice") scores those metrics; metrics=[] is a ConfigError."""
    seg, _, csv = fitted
    board = seg.leaderboard(csv, metrics="iou,dice", style="models")
    assert {"test_iou", "test_dice"} <= set(board.columns)
    assert board["test_iou"].iloc[0] == pytest.approx(
        seg.evaluate(csv, metrics=["iou"])["iou"])
    with pytest.raises(ConfigError, match="metrics is empty"):
        seg.leaderboard(csv, metrics=[])
    with pytest.raises(ConfigError, match="non-empty strings"):
        seg.leaderboard(csv, extra={"": str(csv.parent)})


def test_aggregate_runs_of_an_empty_or_foreign_board():
    """aggregate_runs of an empty board is empty; a board without 'group' is named."""
    from automask.leaderboard import aggregate_runs, paper_table

    empty = aggregate_runs(pd.DataFrame())
    assert len(empty) == 0 and len(paper_table(empty)) == 0
    with pytest.raises(DataValidationError, match=r"lacks the column\(s\) \['group', 'best'\]"):
        aggregate_runs(pd.DataFrame({"model": ["a"], "val_iou": [0.5]}))


def test_evaluate_with_no_metrics_is_refused_before_predicting(fitted, monkeypatch):
    """evaluate(metrics=[]) is a ConfigError, not an empty dict after predicting every image."""
    seg, _, csv = fitted
    from automask import prediction

    def no_prediction(*args, **kwargs):
        raise AssertionError("an image was predicted")

    monkeypatch.setattr(prediction, "iter_proba", no_prediction)
    with pytest.raises(ConfigError, match="metrics is empty"):
        seg.evaluate(csv, metrics=[])
    with pytest.raises(ConfigError, match="metrics is empty"):
        seg.evaluate(csv, metrics=" , ")


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "0"])
def test_a_seed_out_of_range_is_named_before_the_run_starts(fitted, tmp_path, seed):
    """A seed numpy and Lightning cannot take is a ConfigError naming it; no run folder."""
    _, _, csv = fitted
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        SemanticSegmentor(path=run, seed=seed, verbosity=0).fit(
            csv, presets="tiny", hyperparameters={"optim.max_epochs": 1})
    assert not run.exists()


def test_evaluate_json_is_strict_json_when_a_class_is_absent(capsys):
    """`automask evaluate --json` prints null, not NaN, for a class absent everywhere, so
    strict JSON parsers read it."""
    import json

    scores = {"miou": 0.5, "iou_per_class": [0.9, float("nan"), 0.1], "mae": float("inf")}
    cli._print_scores(scores, as_json=True)
    text = capsys.readouterr().out

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    parsed = json.loads(text, parse_constant=refuse)
    assert parsed == {"miou": 0.5, "iou_per_class": [0.9, None, 0.1], "mae": None}


def test_a_folder_of_images_skips_hidden_files_and_sub_folders(fitted, tmp_path):
    """macOS leaves "._a.png" metadata beside a.png: predicting on the folder must not read
    it as an image (it failed as an unreadable image), nor a sub-folder named like one."""
    seg, _, csv = fitted
    folder = tmp_path / "images"
    folder.mkdir()
    source = Path(pd.read_csv(csv)["image"].iloc[0])
    (folder / source.name).write_bytes(source.read_bytes())
    (folder / f"._{source.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "nested.png").mkdir()
    masks = seg.predict(folder)
    assert len(masks) == 1
    np.testing.assert_array_equal(masks[0], seg.predict([str(source)])[0])


def test_a_folder_of_sub_folders_is_predicted_and_its_outputs_scored(fitted, tmp_path):
    """A folder holding only sub-folders (Cityscapes' ``val/<city>/``) was "no image files":
    predict takes the images below it, as from_folders does (hidden folders skipped), and
    score_folders pairs the outputs ``a/x.png``, ``b/x.png`` with a ground-truth tree of the
    same shape, or flat outputs with a tree by stem alone."""
    from automask.metrics import score_folders

    seg, _, csv = fitted
    table = pd.read_csv(csv)
    images, gts = tmp_path / "images", tmp_path / "gts"
    layout = {"a/x": 0, "b/x": 1, "b/y": 2}  # x in two folders: its outputs keep them
    for key, row in layout.items():
        for root, column in ((images, "image"), (gts, "label")):
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / f"{key}.png").write_bytes(Path(table[column][row]).read_bytes())
    (images / ".cache").mkdir()  # a hidden folder's files are no input
    (images / ".cache" / "z.png").write_bytes(Path(table["image"][3]).read_bytes())
    out = tmp_path / "out"
    written = seg.predict(images, save_to=out)
    assert list(written["label"]) == [str(out / f"{key}.png") for key in layout]
    for key, row in layout.items():
        want = seg.predict([table["image"][row]])[0]
        assert np.array_equal(np.asarray(Image.open(out / f"{key}.png")) > 0, want > 0)
    assert score_folders(out, gts, metrics=["iou"])["n_images"] == 3  # the round trip
    # pairing by the path below: the ground truths scored against copies of themselves give
    # an IoU of 1 only when a/x meets a/x and b/x meets b/x (their masks differ)
    assert not np.array_equal(np.asarray(Image.open(gts / "a/x.png")),
                              np.asarray(Image.open(gts / "b/x.png")))
    copies = tmp_path / "copies"
    for key in layout:
        (copies / key).parent.mkdir(parents=True, exist_ok=True)
        (copies / f"{key}.png").write_bytes((gts / f"{key}.png").read_bytes())
    assert score_folders(copies, gts, metrics=["iou"]) == {"iou": 1.0, "n_images": 3}
    # unique names in sub-folders: flat outputs, paired with the tree by stem alone
    unique = {"c/u": 0, "d/v": 1}
    for key, row in unique.items():
        (tmp_path / "images2" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images2" / f"{key}.png").write_bytes(Path(table["image"][row]).read_bytes())
        (tmp_path / "gts2" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "gts2" / f"{key}.png").write_bytes(Path(table["label"][row]).read_bytes())
    seg.predict(tmp_path / "images2", save_to=tmp_path / "out2")
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["u.png", "v.png"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for key in unique:
        (flat / f"{key[2:]}.png").write_bytes((tmp_path / "gts2" / f"{key}.png").read_bytes())
    assert score_folders(flat, tmp_path / "gts2", metrics=["iou"]) == {"iou": 1.0, "n_images": 2}
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataValidationError, match="no image files in folder .* nor in its "
                                                  "sub-folders"):
        seg.predict(tmp_path / "empty")


def test_a_list_of_image_paths_without_a_header_is_predicted(fitted, tmp_path):
    """``find . -name '*.png' > list.txt`` gives paths one per line, no header: its first
    path became the column name ("missing column ['image']"). For prediction, which needs
    the image column only, such a list is read with its first path as the first row; a
    table whose header names other columns, and evaluation, still name what is missing."""
    seg, run, csv = fitted
    images = list(pd.read_csv(csv)["image"][:3])
    want = seg.predict(images)
    absolute = tmp_path / "list.txt"
    absolute.write_text("\n".join(images) + "\n")
    got = seg.predict(absolute)
    assert len(got) == 3 and all(np.array_equal(a, b) for a, b in zip(got, want))
    (tmp_path / "copies").mkdir()
    for image in images[1:]:
        (tmp_path / "copies" / Path(image).name).write_bytes(Path(image).read_bytes())
    relative = tmp_path / "copies" / "relative.txt"  # names relative to the list's folder
    relative.write_text("\n".join(Path(p).name for p in images[1:]))
    assert all(np.array_equal(a, b) for a, b in zip(seg.predict(relative), want[1:]))
    (tmp_path / "one.txt").write_text(images[2])
    assert np.array_equal(seg.predict(tmp_path / "one.txt")[0], want[2])
    assert _cli("predict", run, "--data", absolute, "--out", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        Path(p).name for p in images)
    with pytest.raises(DataValidationError, match="are file paths: the table needs a header"):
        seg.evaluate(absolute)
    (tmp_path / "other.csv").write_text("scan\n" + images[0] + "\n")
    with pytest.raises(DataValidationError, match=r"has no image column|missing column"):
        seg.predict(tmp_path / "other.csv")


def test_an_empty_list_or_glob_of_images_says_so(fitted, tmp_path):
    """A list, tuple or iterator of no paths (a glob that matched nothing) is named as such,
    not as an empty data frame the user never made."""
    seg, _, _ = fitted
    for empty, kind in (([], "list"), ((), "tuple"), (tmp_path.glob("*.png"), "generator")):
        with pytest.raises(DataValidationError, match=rf"^no images given: the {kind} of paths "
                                                      "is empty$"):
            seg.predict(empty)


@pytest.mark.parametrize("image_name, mask_name", [
    ("{k}.png", "{k}_mask.png"),  # Kaggle's brain MRI, BUSI: one folder, "_mask"
    ("{k}_sat.png", "{k}_mask.png"),  # DeepGlobe roads: "_sat" beside "_mask"
])
def test_a_folder_of_images_with_their_masks_beside_them_predicts_the_images_only(
        fitted, tmp_path, image_name, mask_name):
    """A folder that keeps each image's mask beside it (the layout from_folders splits when
    given one folder twice) was predicted whole: the masks were read as images and their
    "predictions" written beside the others. They are left out with a warning naming them;
    a further mask (``x_mask_1``) too, an unrelated file is kept, and a path list still
    predicts a mask file when asked."""
    seg, _, csv = fitted
    table = pd.read_csv(csv)
    folder = tmp_path / "shared"
    folder.mkdir()
    for k in range(3):
        (folder / image_name.format(k=k)).write_bytes(Path(table["image"][k]).read_bytes())
        (folder / mask_name.format(k=k)).write_bytes(Path(table["label"][k]).read_bytes())
    (folder / mask_name.format(k="0_1").replace("0_1_mask", "0_mask_1")).write_bytes(
        Path(table["label"][3]).read_bytes())
    (folder / "other_mask.png").write_bytes(Path(table["image"][4]).read_bytes())  # no pair
    images = sorted([image_name.format(k=k) for k in range(3)] + ["other_mask.png"])
    with pytest.warns(UserWarning, match=r"left out 4 file\(s\) .* masks of images beside "
                                         r"them \(0_mask.png, 0_mask_1.png, 1_mask.png"):
        written = seg.predict(folder, save_to=tmp_path / "out")
    assert [Path(p).name for p in written["image"]] == images
    for name in images:
        want = seg.predict([str(folder / name)])[0]
        got = np.asarray(Image.open(tmp_path / "out" / Path(name).with_suffix(".png").name))
        assert np.array_equal(got > 0, want > 0)
    assert len(seg.predict([str(folder / mask_name.format(k=0))])) == 1  # asked by path


def test_a_data_sets_root_folder_predicts_its_images_not_its_masks(fitted, tmp_path):
    """``predict("data/kvasir")`` on images/ + masks/ sub-folders predicted the masks too
    (twice the files, the returned list out of step with the images); a folder named as
    a mask folder is left out with a warning, and predicted when given itself."""
    seg, _, csv = fitted
    table = pd.read_csv(csv)
    root = tmp_path / "data"
    for sub, column in (("images", "image"), ("masks", "label")):
        (root / sub).mkdir(parents=True)
        for k in range(3):
            (root / sub / f"{k}.png").write_bytes(Path(table[column][k]).read_bytes())
    with pytest.warns(UserWarning, match=r"left out the sub-folder\(s\) 'masks' of .*named "
                                         r"as the masks of the images beside them"):
        found = seg.predict(root)
    assert len(found) == 3
    for k in range(3):
        assert np.array_equal(found[k], seg.predict([str(root / "images" / f"{k}.png")])[0])
    assert len(seg.predict(root / "masks")) == 3  # asked for by itself


def test_an_open_file_is_one_images_bytes_not_lines_of_paths(fitted, tmp_path):
    """predict(open(p, "rb")) or an upload's BytesIO was iterated line by line as paths
    (69 problems in 69 rows); in a cell, an open file or any other object was read as the
    text of a path ("<_io.BytesIO object at 0x...>: file not found")."""
    import datetime
    import io

    seg, _, csv = fitted
    path = pd.read_csv(csv)["image"][0]
    want = seg.predict([path])[0]
    with open(path, "rb") as fh:
        assert np.array_equal(seg.predict(fh)[0], want)
    assert np.array_equal(seg.predict(io.BytesIO(Path(path).read_bytes()))[0], want)
    with open(csv) as fh, pytest.raises(DataValidationError, match="opened as text; pass the "
                                                                   "file's path"):
        seg.predict(fh)
    with pytest.raises(DataValidationError, match="holds 5 bytes that are no image file"):
        seg.predict(io.BytesIO(b"hello"))
    for cell, says in ((io.BytesIO(b"x"), "an open BytesIO, not a file path"),
                       (datetime.date(2020, 1, 1), "a value of type date ('2020-01-01'), not "
                                                   "a file path")):
        with pytest.raises(DataValidationError, match=re.escape(says)):
            seg.predict(pd.DataFrame({"image": [cell]}))


def test_evaluate_on_colour_masks_does_not_advise_an_option_it_lacks(fitted, tmp_path):
    """The advice 'pass color_map=...' (a fit's option) ended in evaluate's TypeError."""
    seg, _, csv = fitted
    table = pd.read_csv(csv).iloc[:2].copy()
    for k, label in enumerate(table["label"]):
        mask = np.asarray(Image.open(label)) > 0
        red = np.zeros((*mask.shape, 3), np.uint8)
        red[mask] = (255, 0, 0)
        Image.fromarray(red).save(tmp_path / f"red{k}.png")
        table.loc[table.index[k], "label"] = str(tmp_path / f"red{k}.png")
    with pytest.raises(DataValidationError, match="the model was fit on masks without a "
                                                  "colour map") as info:
        seg.evaluate(table)
    assert "pass color_map" not in str(info.value)


def test_predict_on_a_folder_with_masks_beside_its_images_from_the_command_line(
        fitted, tmp_path):
    """``automask predict RUN --data FOLDER`` leaves the masks beside the images out and
    says so, in a line of its own as its errors are (Python's format, with the file and
    source line of the call, only under ``--debug``)."""
    _, run, csv = fitted
    table = pd.read_csv(csv)
    folder = tmp_path / "shared"
    folder.mkdir()
    for k in range(2):
        (folder / f"{k}.png").write_bytes(Path(table["image"][k]).read_bytes())
        (folder / f"{k}_seg.png").write_bytes(Path(table["label"][k]).read_bytes())
    proc = subprocess.run(
        [sys.executable, "-m", "automask", "predict", str(run), "--data", str(folder),
         "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "left out" in line]
    assert len(lines) == 1 and lines[0].startswith("automask: warning: left out 2 file(s)")
    assert "UserWarning" not in proc.stderr and "seg.predict(" not in proc.stderr  # no source
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png"]
    proc = subprocess.run(  # --debug: Python's own format, with the warning's origin
        [sys.executable, "-m", "automask", "predict", str(run), "--data", str(folder),
         "--out", str(tmp_path / "out"), "--overwrite", "--debug"],
        capture_output=True, text=True)
    assert proc.returncode == 0 and "UserWarning: left out 2 file(s)" in proc.stderr


def test_a_list_of_open_files_is_a_batch_of_images(fitted):
    """The README lists a list of open files (a batch of uploads), paths mixed in; each
    open file was refused as "an open BufferedReader, not a file path"."""
    import io

    seg, _, csv = fitted
    paths = list(pd.read_csv(csv)["image"][:3])
    want = seg.predict(paths)
    with open(paths[0], "rb") as first:
        got = seg.predict([first, io.BytesIO(Path(paths[1]).read_bytes()), paths[2]])
    assert len(got) == 3 and all(np.array_equal(a, b) for a, b in zip(got, want))
    with pytest.raises(DataValidationError, match=r"item 1: the BytesIO given holds 5 bytes"):
        seg.predict([paths[0], io.BytesIO(b"hello")])


def test_a_folder_with_images_says_which_sub_folders_images_it_left_out(fitted, tmp_path):
    """A folder holding images and sub-folders of images predicts its own; the others
    were dropped without a word. A masks/ sub-folder is no images to mention."""
    seg, _, csv = fitted
    source = Path(pd.read_csv(csv)["image"].iloc[0])
    folder = tmp_path / "images"
    for sub in ("", "later", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / source.name).write_bytes(source.read_bytes())
    with pytest.warns(UserWarning, match=r"left out 1 image\(s\) in the sub-folder\(s\) "
                                         r"'later' of") as caught:
        masks = seg.predict(folder)
    assert len(masks) == 1
    assert not any("'masks'" in str(w.message) for w in caught)
