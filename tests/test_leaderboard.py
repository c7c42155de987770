"""Leaderboards: repeated runs over seeds, external rows, the paper's table, saving, CLI."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask import SemanticSegmentor
from automask.data import SegmentationDataModule
from automask.datasets import make_synthetic, train_test_split
from automask.errors import ConfigError, DataValidationError
from automask.leaderboard import (
    PARAMS_COLUMN,
    aggregate_runs,
    format_cell,
    format_params,
    paper_table,
    save_table,
)
from automask.metrics import score

from cli_process import run_automask

TINY = {"optim.max_epochs": 1, "model.input_size": 64, "optim.select_metric": "sm",
        "data.num_workers": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("board_data")
    frame = make_synthetic(16, size=64, num_classes=2, seed=3, root=root / "synthetic")
    train, test = train_test_split(frame, test_size=0.25, seed=0)
    test.to_csv(root / "test.csv", index=False)
    return root, train, test


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """2 methods x 2 seeds; records each run's validation images and data seed."""
    _, train, _ = data
    seen = []
    original = SegmentationDataModule.setup

    def spy(self, stage=None):
        first = self.train_spec is None
        original(self, stage)
        if first:
            seen.append((self.seed, tuple(self.val_spec.frame["image"])))

    SegmentationDataModule.setup = spy
    try:
        seg = SemanticSegmentor(path=tmp_path_factory.mktemp("board_run"), seed=7, verbosity=0)
        seg.fit(train, presets="tiny", hyperparameters={
            **TINY, "peft.method": ["full", "lora"], "env.seed": [0, 1]})
    finally:
        SegmentationDataModule.setup = original
    return seg, seen


def test_seeds_make_named_runs_on_one_split(runs, data):
    seg, seen = runs
    _, _, test = data
    assert list(seg.models_) == ["method=full,seed=0", "method=full,seed=1",
                                 "method=lora,seed=0", "method=lora,seed=1"]
    # Each run set up its data once: the run's seed drives augmentation and order, and the
    # validation images (the split, from the predictor's seed 7) are the same for all.
    assert [s for s, _ in seen] == [0, 1, 0, 1]
    assert len({images for _, images in seen}) == 1 and len(seen[0][1]) > 0
    a = seg.predict_proba(test.iloc[:1], model="method=lora,seed=0")[0]
    b = seg.predict_proba(test.iloc[:1], model="method=lora,seed=1")[0]
    assert not np.allclose(a, b)  # the seed changed the run
    assert seg.eval_metric_ == "sm"  # optim.select_metric chose the validation metric


def test_runs_aggregate_to_mean_and_sample_std(runs, data):
    seg, _ = runs
    _, _, test = data
    models = seg.leaderboard(style="models")
    assert len(models) == 4 and set(models["seed"]) == {0, 1}
    assert "val_sm" in models.columns
    board = seg.leaderboard(test)  # runs differing only by seed: one row per method
    assert board["val_sm"].is_monotonic_decreasing  # best first
    assert sorted(board["model"]) == ["full", "lora"]
    assert set(board["runs"]) == {2} and set(board["seeds"]) == {"0,1"}
    for method in ("full", "lora"):
        row = board.set_index("model").loc[method]
        per_run = [seg.evaluate(test, model=f"method={method},seed={s}") for s in (0, 1)]
        for metric in ("sm", "iou", "ber"):
            values = np.array([r[metric] for r in per_run])
            assert row[f"test_{metric}"] == pytest.approx(values.mean(), abs=1e-12)
            assert row[f"test_{metric}_std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        vals = [seg.models_[f"method={method},seed={s}"]["val_score"] for s in (0, 1)]
        assert row["val_sm"] == pytest.approx(np.mean(vals))
    best_group = seg.best_model_.split(",")[0].split("=")[1]
    assert board.set_index("model").loc[best_group, "best"]


def _gt_arrays(test) -> list[np.ndarray]:
    return [np.array(Image.open(p)) for p in test["label"]]


def _write_folder(folder: Path, stems, arrays, suffix=".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in zip(stems, arrays):
        if suffix == ".npy":
            np.save(folder / f"{stem}.npy", arr)
        else:
            Image.fromarray(arr).save(folder / f"{stem}{suffix}")
    return folder


def test_external_rows_score_like_the_metrics(runs, data, tmp_path):
    seg, _ = runs
    _, _, test = data
    gts = _gt_arrays(test)
    stems = [Path(p).stem for p in test["image"]]
    truth = _write_folder(tmp_path / "truth", stems, [(g > 0).astype(np.uint8) * 255 for g in gts])
    zeros = _write_folder(tmp_path / "zeros", stems, [np.zeros_like(g) for g in gts])
    probs = _write_folder(tmp_path / "probs", stems, [(g > 0).astype(np.float32) for g in gts],
                          suffix=".npy")
    own = _write_folder(tmp_path / "own", stems,
                        seg.predict_proba(test, model=seg.best_model_), suffix=".npy")
    # channels last (a Keras model's output) and 16-bit PNGs read as the same maps
    last = _write_folder(tmp_path / "last", stems,
                         [(g > 0).astype(np.float32)[..., None] for g in gts], suffix=".npy")
    deep = _write_folder(tmp_path / "deep", stems, [(g > 0).astype(np.uint16) * 65535
                                                    for g in gts])
    board = seg.leaderboard(test, style="models",
                            extra={"Truth": truth, "Zeros": zeros, "Probs": probs, "Own": own,
                                   "Last": last, "Deep": deep})
    rows = board.set_index("model")
    for name in ("Truth", "Probs", "Last", "Deep"):
        assert rows.loc[name, "test_iou"] == 1.0 and rows.loc[name, "test_dice"] == 1.0
        assert rows.loc[name, "test_mae"] == 0.0 and rows.loc[name, "test_ber"] == 0.0
        assert rows.loc[name, "test_sm"] == pytest.approx(1.0)
    expected = score([np.zeros_like(g) for g in gts], gts, task="binary")
    for metric, value in expected.items():
        assert rows.loc["Zeros", f"test_{metric}"] == pytest.approx(value), metric
    assert rows.loc["Zeros", "test_mae"] == pytest.approx(np.mean([(g > 0).mean() for g in gts]))
    assert rows.loc["Zeros", "test_ber"] == pytest.approx(0.5)  # misses every object pixel
    external = rows.loc[["Truth", "Zeros", "Probs"]]
    # A model's own probability maps, as an external row, score exactly as the model does.
    for metric in ("sm", "em", "wfm", "mae", "iou", "dice", "ber"):
        assert rows.loc["Own", f"test_{metric}"] == pytest.approx(
            rows.loc[seg.best_model_, f"test_{metric}"], abs=1e-9), metric
    assert external["trainable_params_m"].isna().all() and (external["source"] == "external").all()
    assert not external["best"].any()
    # the fit rows' integer columns stay integers beside the external rows' empty cells
    for column in ("input_size", "seed"):
        assert str(board[column].dtype) == "Int64", column
        assert external[column].isna().all()
        assert "." not in str(rows.loc[seg.best_model_, column]), column  # 512, not 512.0


def test_external_integer_maps_share_one_scale_as_score_reads_them(runs, data, tmp_path):
    """Each external file was read on its own scale: a faint 16-bit map (values below 256)
    as 8-bit, a faint 8-bit map holding only 0 and 1 as a 0/1 mask."""
    seg, _ = runs
    _, _, test = data
    gts = _gt_arrays(test)
    stems = [Path(p).stem for p in test["image"]]
    deep = [(g > 0).astype(np.uint16) * 60000 for g in gts]
    deep[0] = np.full_like(deep[0], 200)  # 0.3 %: background, not 78 %
    eight = [(g > 0).astype(np.uint8) * 255 for g in gts]
    eight[0] = np.zeros_like(eight[0])
    eight[0][: eight[0].shape[0] // 2] = 1  # 1/255: background, not a mask's object
    folders = {"Deep": _write_folder(tmp_path / "deep", stems, deep),
               "Eight": _write_folder(tmp_path / "eight", stems, eight)}
    with pytest.warns(UserWarning, match="hold only 0 and 1"):
        rows = seg.leaderboard(test, style="models", extra=folders).set_index("model")
    for name, maps, full in (("Deep", deep, 65535), ("Eight", eight, 255)):
        expected = score([m / full for m in maps], gts, task="binary")
        for metric in ("mae", "iou", "ber", "sm"):
            assert rows.loc[name, f"test_{metric}"] == pytest.approx(expected[metric]), (
                name, metric)



def test_external_masks_with_the_void_copied_in_are_refused_as_score_refuses_them(
        runs, data, tmp_path):
    """0/1 masks with 255 at the void pixels were read as 8-bit maps (each 1 a 1/255,
    background: IoU 0) where score(..., ignore_index=255) refuses them."""
    seg, _ = runs
    _, _, test = data
    gts = _gt_arrays(test)
    stems = [Path(p).stem for p in test["image"]]
    masks = [(g > 0).astype(np.uint8) for g in gts]
    for mask in masks:
        mask[0] = 255
    folder = _write_folder(tmp_path / "copied", stems, masks)
    with pytest.raises(DataValidationError, match="holds only 0, 1 and 255, the ignore_index"):
        seg.leaderboard(test, style="models", extra={"Copied": folder})


def test_external_rows_pair_by_mask_stem_and_name_what_is_missing(runs, data, tmp_path):
    seg, _ = runs
    _, _, test = data
    renamed = test.copy()
    (tmp_path / "gt").mkdir()
    renamed["label"] = [shutil.copy(p, tmp_path / "gt" / f"mask_{Path(p).name}")
                        for p in test["label"]]
    gts = _gt_arrays(test)
    mask_stems = [Path(p).stem for p in renamed["label"]]
    preds = _write_folder(tmp_path / "by_mask", mask_stems, gts)
    board = seg.leaderboard(renamed, style="models", extra={"M": preds})
    assert board.set_index("model").loc["M", "test_iou"] == 1.0

    os.remove(preds / f"{mask_stems[1]}.png")
    with pytest.raises(DataValidationError,
                       match=rf"1 of {len(test)} rows have no prediction.*row 1 "):
        seg.leaderboard(renamed, extra={"M": preds})
    with pytest.raises(DataValidationError, match="not found: .*nowhere"):
        seg.leaderboard(test, extra={"M": tmp_path / "nowhere"})
    small = _write_folder(tmp_path / "small", [Path(p).stem for p in test["image"]],
                          [g[:32, :32] for g in gts])
    with pytest.raises(DataValidationError, match=r"small.*is \(32, 32\) but its mask"):
        seg.leaderboard(test, extra={"S": small})
    with pytest.raises(ConfigError, match=r"\['lora'\] are already names"):
        seg.leaderboard(test, extra={"lora": small})
    with pytest.raises(ConfigError, match="need labelled test data"):
        seg.leaderboard(extra={"S": small})
    # test metrics without test data were checked, then dropped without a word
    with pytest.raises(ConfigError, match=r"metrics \['sm'\] score test data"):
        seg.leaderboard(metrics=["sm"])
    with pytest.raises(ConfigError, match=r"extra must be a dict of row name to predictions "
                                          r"folder.*got a list"):
        seg.leaderboard(test, extra=[str(small)])
    with pytest.raises(ConfigError, match="'miou' is a multiclass metric"):
        seg.leaderboard(test, extra={"S": small}, metrics=["sm", "miou"])
    with pytest.raises(ConfigError, match="unknown leaderboard style 'nice'"):
        seg.leaderboard(test, style="nice")


def test_external_rows_refuse_two_images_for_one_prediction(runs, data, tmp_path):
    """Two test images in different folders with one stem would both be scored against the
    one prediction of that stem: refused, naming both rows; predict's outputs for them, a
    tree of sub-folders, pair by each image's path. The same image listed twice is
    scored twice against its file, as the model's rows score it."""
    seg, _ = runs
    _, _, test = data
    stems = [Path(p).stem for p in test["image"]]
    preds = _write_folder(tmp_path / "preds", stems, [g.copy() for g in _gt_arrays(test)])
    other = tmp_path / "elsewhere"
    other.mkdir()
    clash = test.copy()
    clash.loc[clash.index[1], "image"] = str(shutil.copy(
        test["image"].iloc[0], other / Path(test["image"].iloc[0]).name))
    with pytest.raises(DataValidationError, match=rf"rows 0 .* and 1 .*elsewhere.* same file "
                                                  rf"stem.*'{stems[0]}\.png'"):
        seg.leaderboard(clash, extra={"M": preds})
    # predict's own outputs for them keep each image's folder (x.png in two sub-folders):
    # that tree pairs, each image with its own prediction
    tree = tmp_path / "tree"
    seg.predict(clash, save_to=tree)
    assert not any(p.is_file() for p in tree.iterdir())  # only sub-folders at the top
    board = seg.leaderboard(clash, style="models", extra={"P": tree}).set_index("model")
    assert board.loc["P", "test_iou"] == pytest.approx(board.loc[seg.best_model_, "test_iou"])
    twice = pd.concat([test, test.iloc[:1]], ignore_index=True)
    with pytest.warns(UserWarning, match="repeat the image of another row"):
        board = seg.leaderboard(twice, style="models", extra={"M": preds}).set_index("model")
    assert board.loc["M", "test_iou"] == 1.0


def test_external_predictions_pair_names_written_decomposed(tmp_path):
    """An image and its prediction named ``café`` as macOS writes it (e + combining acute)
    pair, whether the predictions lie flat or in a tree."""
    from types import SimpleNamespace

    from automask.leaderboard import pair_predictions

    name = unicodedata.normalize("NFD", "café")
    for folder in ("images", "masks", "flat", "tree/a", "tree/b"):
        (tmp_path / folder).mkdir(parents=True)
    image, mask = tmp_path / "images" / f"{name}.png", tmp_path / "masks" / f"{name}.png"
    other = tmp_path / "images" / "other.png"
    for path in (image, mask, other, tmp_path / "masks" / "other.png",
                 tmp_path / "flat" / f"{name}.png", tmp_path / "flat" / "other.png",
                 tmp_path / "tree" / "a" / f"{name}.png", tmp_path / "tree" / "b" / "other.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    spec = SimpleNamespace(label_col="label", frame=pd.DataFrame(
        {"image": [str(image), str(other)], "label": [str(mask), str(mask)]}))
    assert [p.name for p in pair_predictions(spec, "image", tmp_path / "flat")] == [
        f"{name}.png", "other.png"]
    assert [p.parent.name for p in pair_predictions(spec, "image", tmp_path / "tree")] == [
        "a", "b"]


def _parse(cell: str) -> tuple[float, float | None]:
    match = re.fullmatch(r"(-?[0-9.]+)(?: ± ([0-9.]+))?", cell)
    assert match, cell
    return float(match[1]), (float(match[2]) if match[2] else None)


def test_paper_style(runs, data, tmp_path):
    seg, _ = runs
    _, _, test = data
    gts = _gt_arrays(test)
    truth = _write_folder(tmp_path / "truth", [Path(p).stem for p in test["image"]], gts)
    methods = seg.leaderboard(test, style="methods", extra={"GT": truth}).set_index("model")
    paper = seg.leaderboard(test, style="paper", extra={"GT": truth})
    assert list(paper.columns[:2]) == ["Method", PARAMS_COLUMN]
    assert {"S_alpha ↑", "E_phi ↑", "F_beta^w ↑", "IoU ↑", "Dice ↑", "BER ↓", "MAE ↓"} <= set(
        paper.columns)
    # External rows first, then registry order; full on a random init is the scratch row.
    assert list(paper["Method"]) == ["GT", "SAM (from scratch)", "LoRA"]
    rows = paper.set_index("Method")
    assert rows.loc["GT", PARAMS_COLUMN] == "-"
    assert rows.loc["GT", "IoU ↑"] == "100.0" and rows.loc["GT", "BER ↓"] == "0.00"
    lora = methods.loc["lora"]
    assert rows.loc["LoRA", PARAMS_COLUMN] == (
        f"{lora['trainable_params_m']:.2f} / {lora['ratio_pct']:.2f}%")
    assert rows.loc["SAM (from scratch)", PARAMS_COLUMN].endswith(" / 100%")
    for label, group in (("LoRA", "lora"), ("SAM (from scratch)", "full")):
        mean, std = _parse(rows.loc[label, "S_alpha ↑"])
        assert mean == round(100 * methods.loc[group, "test_sm"], 1)
        assert std == round(100 * methods.loc[group, "test_sm_std"], 2)
        mean, std = _parse(rows.loc[label, "BER ↓"])  # one more decimal, as the paper
        assert mean == round(100 * methods.loc[group, "test_ber"], 2)
        assert std == round(100 * methods.loc[group, "test_ber_std"], 3)


def test_paper_table_orders_rows_by_registry_and_labels_variants():
    """Pure function: a hand-made ``models`` board, rows given in the worst order."""
    def run(group, method, variant, seed, miou, pretrained=True):
        return {"model": f"{group},seed={seed}", "source": "fit", "group": group,
                "variant": variant, "method": method, "pretrained": pretrained,
                "seed": seed, "trainable_params_m": 4.0, "ratio_pct": 0.62,
                "val_miou": miou, "test_miou": miou, "best": False}

    models = pd.DataFrame([
        run("method=conv_lora,rank=8", "conv_lora", "rank=8", 0, 0.70),
        run("method=conv_lora,rank=8", "conv_lora", "rank=8", 1, 0.72),
        run("method=lora,rank=3", "lora", "rank=3", 0, 0.60),
        run("method=decoder_only,rank=3", "decoder_only", "rank=3", 0, 0.50),
        run("method=full,rank=3", "full", "rank=3", 0, 0.40, pretrained=False),
        {"model": "Trans2Seg", "source": "external", "group": "Trans2Seg",
         "test_miou": 0.7215, "best": False},
    ])
    methods = aggregate_runs(models)
    conv = methods.set_index("model").loc["method=conv_lora,rank=8"]
    assert conv["runs"] == 2 and conv["seeds"] == "0,1"
    assert conv["test_miou"] == pytest.approx(0.71)
    assert conv["test_miou_std"] == pytest.approx(np.std([0.70, 0.72], ddof=1))
    table = paper_table(methods, decimals=2)
    assert list(table["Method"]) == ["Trans2Seg", "SAM (from scratch) (rank=3)",
                                     "Decoder-only (rank=3)", "LoRA (rank=3)",
                                     "Conv-LoRA (rank=8)"]
    cells = table.set_index("Method")["mIoU ↑"]
    assert cells["Trans2Seg"] == "72.15" and cells["LoRA (rank=3)"] == "60.00"
    assert cells["Conv-LoRA (rank=8)"] == "71.00 ± 1.414"


def test_formatting_follows_the_paper():
    assert format_params(4.02, 0.63) == "4.02 / 0.63%"
    assert format_params(641.09, 100.0) == "641.09 / 100%"
    assert format_params(float("nan"), float("nan")) == "-"
    assert format_cell(0.92, 0.0015, 1) == "92.0 ± 0.15"
    assert format_cell(0.0254, 0.00081, 2) == "2.54 ± 0.081"
    assert format_cell(0.9204, float("nan"), 1) == "92.0"  # one run: no std
    assert format_cell(float("nan"), None, 1) == "-"


def test_save_table_csv_and_markdown(tmp_path):
    df = pd.DataFrame({"Method": ["LoRA", "a|b"], PARAMS_COLUMN: ["4.00 / 0.62%", "-"],
                       "IoU ↑": ["91.2 ± 0.28", "90.0"]})
    save_table(df, tmp_path / "t.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv", dtype=str), df)
    save_table(df, tmp_path / "t.md")
    lines = (tmp_path / "t.md").read_text(encoding="utf-8").splitlines()
    assert lines[0] == f"| Method | {PARAMS_COLUMN} | IoU ↑ |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| LoRA | 4.00 / 0.62% | 91.2 ± 0.28 |"
    assert lines[3] == "| a\\|b | - | 90.0 |"
    with pytest.raises(ConfigError, match=r"t\.xlsx.*\.csv or \.md"):
        save_table(df, tmp_path / "t.xlsx")
    assert not (tmp_path / "t.xlsx").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_automask(*args)  # forked from a process that imported the libraries


def test_cli_leaderboard_extra_and_paper_table(runs, data, tmp_path):
    seg, _ = runs
    root, _, test = data
    truth = _write_folder(tmp_path / "truth", [Path(p).stem for p in test["image"]],
                          _gt_arrays(test))
    out = tmp_path / "table.md"
    proc = run_cli("leaderboard", str(seg.path_), "--data", str(root / "test.csv"),
                   "--extra", f"GT={truth}", "--style", "paper", "--metrics", "sm,ber",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == f"| Method | {PARAMS_COLUMN} | S_alpha ↑ | BER ↓ |"
    assert lines[2] == "| GT | - | 100.0 | 0.00 |"
    assert lines[3].startswith("| SAM (from scratch) |") and " ± " in lines[3]
    assert lines[4].startswith("| LoRA |")
    assert "SAM (from scratch)" in proc.stdout

    missing = tmp_path / "nowhere"
    bad = tmp_path / "bad.md"
    proc = run_cli("leaderboard", str(seg.path_), "--data", str(root / "test.csv"),
                   "--extra", f"X={missing}", "--style", "paper", "--out", str(bad))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("automask: error:"), proc.stderr
    assert str(missing) in lines[0] and "Traceback" not in proc.stderr
    assert not bad.exists()


def test_cli_extra_needs_name_and_folder(capsys, tmp_path):
    from automask.cli import main

    assert main(["leaderboard", str(tmp_path), "--extra", "justaname"]) == 2
    assert "--extra expects NAME=DIR, got 'justaname'" in capsys.readouterr().err
    assert main(["leaderboard", str(tmp_path), "--out", str(tmp_path / "t.txt")]) == 2
    assert ".csv or .md" in capsys.readouterr().err


def test_cli_params_paper_style(tmp_path):
    out = tmp_path / "params.csv"
    proc = run_cli("params", "--backbone", "vit_h", "--methods", "conv_lora,full",
                   "--style", "paper", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    assert list(table["Method"]) == ["Conv-LoRA", "Full fine-tuning"]
    assert list(table[PARAMS_COLUMN]) == ["4.02 / 0.63%", "641.09 / 100%"]


def test_seed_lists_name_their_candidates():
    from automask.config import resolve

    assert [n for n, _ in resolve("tiny", {"env.seed": [0, 1]})] == ["seed=0", "seed=1"]
    names = [n for n, _ in resolve("tiny", {"env.seed": [3, 4], "peft.method": "lora",
                                            "peft.rank": [2, 8]})]
    assert names == ["seed=3,rank=2", "seed=3,rank=8", "seed=4,rank=2", "seed=4,rank=8"]
    assert [c.env.seed for _, c in resolve("tiny", {})] == [None]  # the predictor's seed


def test_a_scratch_candidate_on_a_checkpoint_file_is_not_called_pretrained(tmp_path):
    """'pretrained' read model.checkpoint, so a scratch row of a fit on SAM's weights said
    True though scratch always trains from random weights."""
    import torch

    from automask.models import build_segmenter

    torch.manual_seed(0)
    weights = tmp_path / "sam_tiny.pth"
    torch.save(build_segmenter("tiny", num_classes=1, input_size=32,
                               checkpoint="random").state_dict(), weights)
    frame = make_synthetic(6, size=32, root=tmp_path / "data")
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        frame, presets="tiny",
        hyperparameters={"model.checkpoint": str(weights), "model.input_size": 32,
                         "optim.max_epochs": 1, "data.num_workers": 0,
                         "peft.method": ["scratch", "lora"]})
    table = seg.leaderboard(style="models").set_index("method")
    assert table.loc["scratch", "pretrained"] == False  # noqa: E712 (a numpy bool)
    assert table.loc["lora", "pretrained"] == True  # noqa: E712


def test_tables_are_written_as_utf8_whatever_the_locale(tmp_path):
    """The paper table holds '↓' and '±': under a C (ASCII) or cp1252 locale save_table
    raised UnicodeEncodeError."""
    table = pd.DataFrame({"Method": ["Conv-LoRA"], "BER ↓": ["2.54 ± 0.10"]})
    script = (
        "import sys, pandas as pd\n"
        "from automask.leaderboard import save_table\n"
        "df = pd.DataFrame({'Method': ['Conv-LoRA'], 'BER \\u2193': ['2.54 \\u00b1 0.10']})\n"
        "for name in sys.argv[1:]: save_table(df, name)\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0",
           "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "ascii"}
    out = [tmp_path / "t.csv", tmp_path / "t.md"]
    proc = subprocess.run([sys.executable, "-c", script, *map(str, out)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert pd.read_csv(out[0], encoding="utf-8").equals(table)
    assert "BER ↓" in out[1].read_text(encoding="utf-8")
