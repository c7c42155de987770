"""The command line, each subcommand end to end in a real subprocess."""
from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask.datasets import make_synthetic, train_test_split

from cli_process import run_automask


def run_cli(*args: str, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m automask *args``, forked from a process that imported the libraries
    (tests/cli_process.py)."""
    return run_automask(*args, cwd=cwd, timeout=timeout)


def run_fresh(*args: str, cwd: Path | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m automask *args`` in a fresh interpreter, imports and all."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "automask", *args], capture_output=True, text=True,
        cwd=cwd, env=env, timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("automask: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def csvs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    frame = make_synthetic(24, size=96, num_classes=2, seed=2, root=root / "data")
    train, test = train_test_split(frame, test_size=0.25, seed=0)
    # Relative paths in a CSV resolve against the CSV's folder.
    for df in (train, test):
        for col in ("image", "label"):
            df[col] = [os.path.relpath(p, root) for p in df[col]]
    train.to_csv(root / "train.csv", index=False)
    test.to_csv(root / "test.csv", index=False)
    return root


@pytest.fixture(scope="module")
def run_dir(csvs):
    run = csvs / "run"
    proc = run_cli("fit", "--train", str(csvs / "train.csv"), "--presets", "tiny",
                   "--hp", "optim.max_epochs=1", "--hp", "peft.method=full",
                   "--hp", "peft.method=lora", "--path", str(csvs / "data" / ".." / "run"),
                   "--verbosity", "0")
    assert proc.returncode == 0, proc.stderr
    assert "method=full" in proc.stdout and "method=lora" in proc.stdout
    assert f"saved to {run}\n" in proc.stdout  # the path printed without its '..'
    return run


def test_fit_writes_a_loadable_predictor(run_dir):
    pointer = json.loads((run_dir / "automask.json").read_text())
    meta = json.loads((run_dir / pointer["current"] / "predictor.json").read_text())
    assert set(meta["models"]) == {"method=full", "method=lora"}


def test_fit_bad_input(csvs, tmp_path):
    proc = run_cli("fit", "--train", str(csvs / "nope.csv"), "--presets", "tiny",
                   "--path", str(tmp_path / "r"))
    assert_one_line_error(proc, "nope.csv")
    proc = run_cli("fit", "--train", str(csvs / "train.csv"), "--presets", "tiny",
                   "--hp", "optim.lrr=1", "--path", str(tmp_path / "r"))
    assert_one_line_error(proc, "optim.lrr", "optim.lr")
    assert not (tmp_path / "r").exists()


def test_predict_writes_masks(run_dir, csvs, tmp_path):
    out = tmp_path / "masks"
    proc = run_cli("predict", str(run_dir), "--data", str(csvs / "test.csv"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.glob("*.png"))
    assert len(files) == 6
    assert set(np.unique(np.array(Image.open(files[0])))) <= {0, 255}
    proc = run_cli("predict", str(run_dir), "--data", str(csvs / "data" / "images"),
                   "--out", str(tmp_path / "all"), "--model", "method=lora")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "all").glob("*.png"))) == 24


def test_commands_import_only_the_libraries_they_use(run_dir, csvs, tmp_path):
    """Loading a predictor to predict imported Lightning and torchmetrics (through the
    data and training packages and the saved metric's check): about 1.1 s of every start
    of `automask predict` on 2 cores, 2.8 s of `automask history`; `automask score`
    imported Lightning and scikit-learn (through automask.data and automask.datasets)."""
    code = ("import sys; from automask.cli import main; rc = main(sys.argv[1:]); "
            "print('LOADED', sorted(m for m in ('lightning', 'sklearn', 'torchmetrics') "
            "if m in sys.modules)); sys.exit(rc)")
    masks = csvs / "data" / "masks"
    for args, expected in (
            (["predict", str(run_dir), "--data", str(csvs / "test.csv"), "--out",
              str(tmp_path / "masks")], ["sklearn"]),  # the estimator is a sklearn one
            (["history", str(run_dir), "--out", str(tmp_path / "curves.png")], []),
            (["score", "--pred", str(masks), "--gt", str(masks)], ["torchmetrics"])):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert f"LOADED {expected}" in proc.stdout, (args[0], proc.stdout[-300:])
    assert len(list((tmp_path / "masks").glob("*.png"))) == 6
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_predict_bad_input(run_dir, csvs, tmp_path):
    proc = run_cli("predict", str(tmp_path / "no_run"), "--data", "x.csv", "--out", "o")
    assert_one_line_error(proc, "no_run")
    proc = run_cli("predict", str(run_dir), "--data", str(tmp_path / "nonexist") + "/",
                   "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "--data", "nonexist/' does not exist")
    for out in ("masks.png", "maps.npy"):  # --out is a folder: a file name is refused
        proc = run_cli("predict", str(run_dir), "--data", str(csvs / "test.csv"),
                       "--out", str(tmp_path / out))
        assert_one_line_error(proc, f"--out '{tmp_path / out}' looks like a file name")
    # the dataset's values need a color map to read backwards; probabilities have none
    proc = run_cli("predict", str(run_dir), "--data", str(csvs / "test.csv"),
                   "--out", str(tmp_path / "o"), "--values", "dataset")
    assert_one_line_error(proc, "--values dataset needs a model fitted with a color map",
                          "--values class_ids")
    proc = run_cli("predict", str(run_dir), "--data", str(csvs / "test.csv"),
                   "--out", str(tmp_path / "o"), "--values", "dataset", "--proba")
    assert_one_line_error(proc, "--values applies to masks")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needles", [
    (["fit", "--time-limit", "abc"], ["--time-limit", "'abc'", "automask fit --help"]),
    (["leaderboard", "x", "--style", "paper2"], ["'paper2'", "automask leaderboard --help"]),
    (["nope"], ["'nope'", "automask --help"]),
])
def test_usage_errors_are_one_line(args, needles):
    """argparse's own errors (a bad type or choice) are one line too, not the usage block."""
    assert_one_line_error(run_cli(*args), *needles)


def test_predict_proba_checks_every_image_before_writing_any_map(run_dir, csvs, tmp_path):
    images = sorted(str(p) for p in (csvs / "data" / "images").glob("*.png"))
    assert len(images) > 16  # more than one chunk of maps would be written before the last
    missing = str(tmp_path / "missing.png")
    pd.DataFrame({"image": images + [missing]}).to_csv(tmp_path / "data.csv", index=False)
    out = tmp_path / "maps"
    proc = run_cli("predict", str(run_dir), "--data", str(tmp_path / "data.csv"),
                   "--out", str(out), "--proba")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("automask: error:")
    assert f"row {len(images)} [image] {missing}: file not found" in proc.stderr
    assert not out.exists()


def test_predict_names_a_csv_it_cannot_parse(run_dir, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('image\n"unterminated\n')
    proc = run_cli("predict", str(run_dir), "--data", str(bad), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, str(bad), "could not be parsed")
    assert not (tmp_path / "o").exists()


def test_evaluate_prints_metrics(run_dir, csvs):
    proc = run_cli("evaluate", str(run_dir), "--data", str(csvs / "test.csv"), "--json")
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout)
    assert set(scores) == {"sm", "em", "wfm", "mae", "iou", "dice", "ber"}


def test_evaluate_and_leaderboard_take_the_tiling_the_papers_protocol_needs(run_dir, csvs):
    """--resolution input (the authors' protocol) scored tiled images at their own size,
    and the command line had no --tile to turn tiling off: both results were the same."""
    from automask import SemanticSegmentor

    def scores(data, *options):
        proc = run_cli("evaluate", str(run_dir), "--data", data, "--json", "--metrics",
                       "sm,mae", *options)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    seg = SemanticSegmentor.load(run_dir)
    large = csvs / "large.csv"  # past 1.25 x the 128 px input: tiled by default
    data = make_synthetic(3, size=200, num_classes=2, seed=4, root=csvs / "large")
    data.to_csv(large, index=False)
    paper = scores(str(large), "--tile", "off", "--resolution", "input")
    assert paper == pytest.approx(seg.evaluate(data, metrics=["sm", "mae"], tiling="off",
                                               resolution="input"))
    assert paper != pytest.approx(scores(str(large), "--resolution", "input"))
    proc = run_cli("leaderboard", str(run_dir), "--data", str(large), "--json",
                   "--metrics", "sm", "--tile", "off", "--resolution", "input")
    assert proc.returncode == 0, proc.stderr
    rows = {r["model"]: r for r in json.loads(proc.stdout)}
    assert rows[seg.best_model_]["test_sm"] == pytest.approx(paper["sm"])


def test_errors_name_the_commands_options_not_pythons_arguments(run_dir, csvs, tmp_path):
    """'n must be ...', '(extra=...) need labelled test data (data=...)': arguments a command
    line user never typed."""
    proc = run_cli("show", str(run_dir), "--data", str(csvs / "test.csv"), "--out",
                   str(tmp_path / "s.png"), "--n", "0")
    assert_one_line_error(proc, "--n must be a whole number")
    proc = run_cli("leaderboard", str(run_dir), "--extra", f"X={tmp_path}")
    assert_one_line_error(proc, "external rows (--extra) need labelled test data (--data)")


def test_evaluate_bad_input(run_dir, csvs):
    proc = run_cli("evaluate", str(run_dir), "--data", str(csvs / "test.csv"),
                   "--metrics", "iou,nonsense")
    assert_one_line_error(proc, "nonsense")


def test_leaderboard(run_dir, csvs):
    proc = run_cli("leaderboard", str(run_dir), "--data", str(csvs / "test.csv"), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {r["model"] for r in rows} == {"method=full", "method=lora"}
    assert all("test_iou" in r for r in rows)


def test_test_data_with_other_column_names_is_read_through_image_and_label(run_dir, csvs):
    """A test CSV whose columns are not the fit's could not be scored from the command line."""
    renamed = csvs / "test_renamed.csv"
    pd.read_csv(csvs / "test.csv").rename(columns={"image": "scan", "label": "truth"}) \
        .to_csv(renamed, index=False)
    plain = json.loads(run_cli("evaluate", str(run_dir), "--data", str(csvs / "test.csv"),
                               "--json").stdout)
    assert_one_line_error(run_cli("evaluate", str(run_dir), "--data", str(renamed)),
                          "missing column(s)", "--image/--label")
    proc = run_cli("evaluate", str(run_dir), "--data", str(renamed), "--image", "scan",
                   "--label", "truth", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == plain
    proc = run_cli("leaderboard", str(run_dir), "--data", str(renamed), "--image", "scan",
                   "--label", "truth", "--json")
    assert proc.returncode == 0, proc.stderr
    assert all("test_iou" in row for row in json.loads(proc.stdout))
    out = csvs / "renamed_masks"
    proc = run_cli("predict", str(run_dir), "--data", str(renamed), "--image", "scan",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.png"))) == len(pd.read_csv(renamed))


def test_leaderboard_takes_image_and_mask_folders(run_dir, csvs, tmp_path):
    """Its error on a folder advised --images/--masks, which it did not take."""
    import shutil

    test = pd.read_csv(csvs / "test.csv")
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for i, (image, mask) in enumerate(zip(test["image"], test["label"])):
        shutil.copy(csvs / image, tmp_path / "images" / f"{i}.png")
        shutil.copy(csvs / mask, tmp_path / "masks" / f"{i}.png")
    by_csv = run_cli("leaderboard", str(run_dir), "--data", str(csvs / "test.csv"), "--json")
    folders = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks")]
    by_folders = run_cli("leaderboard", str(run_dir), *folders, "--json")
    assert by_folders.returncode == 0, by_folders.stderr
    scores = {r["model"]: r["test_iou"] for r in json.loads(by_folders.stdout)}
    assert scores == {r["model"]: r["test_iou"] for r in json.loads(by_csv.stdout)}
    assert_one_line_error(run_cli("leaderboard", str(run_dir), "--data",
                                  str(csvs / "test.csv"), *folders), "not both")


def test_output_files_never_replace_the_commands_inputs(run_dir, csvs, tmp_path):
    """leaderboard --out the --data CSV, show --out one of its images, and a table or a
    picture into the predictor's logs are refused before any work, the files untouched
    (each was replaced, exit 0); a picture beside the predictor, an existing one included,
    is written."""
    data = csvs / "test.csv"
    image = csvs / pd.read_csv(data)["image"][0]
    logged = run_dir / "logs" / "method=full" / "metrics.csv"
    before = {p: p.read_bytes() for p in (data, image, logged) if p.is_file()}
    assert len(before) == 3
    proc = run_cli("leaderboard", str(run_dir), "--data", str(data), "--out", str(data))
    assert_one_line_error(proc, "it is the --data file, an input of this call")
    proc = run_cli("show", str(run_dir), "--data", str(data), "--out", str(image))
    assert_one_line_error(proc, "it is the image of row 0, an input of this call")
    proc = run_cli("leaderboard", str(run_dir), "--out", str(logged))
    assert_one_line_error(proc, "would write into the predictor", "its folder 'logs'")
    proc = run_cli("history", str(run_dir), "--out", str(run_dir / "logs" / "curves.png"))
    assert_one_line_error(proc, "would write into the predictor", "its folder 'logs'")
    assert {p: p.read_bytes() for p in before} == before
    assert not (run_dir / "logs" / "curves.png").exists()
    beside = run_dir / "curves.png"
    beside.write_bytes(b"old")
    proc = run_cli("history", str(run_dir), "--out", str(beside))
    assert proc.returncode == 0, proc.stderr
    assert beside.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaderboard_bad_input(tmp_path):
    (tmp_path / "automask.json").write_text("{not json")
    assert_one_line_error(run_cli("leaderboard", str(tmp_path)), "corrupted")


def test_params_prints_the_papers_counts():
    proc = run_cli("params", "--backbone", "vit_h", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in json.loads(proc.stdout)}
    assert round(rows["conv_lora"]["trainable"] / 1e6, 2) == 4.02
    assert round(rows["full"]["trainable"] / 1e6, 2) == 641.09


def test_params_bad_input():
    assert_one_line_error(run_cli("params", "--backbone", "vit_x"), "vit_x")


def test_score_folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        mask = np.zeros((40, 50), np.uint8)
        mask[10:30, 5 + i:25 + i] = 255
        Image.fromarray(mask).save(gt / f"im{i}.png")
        noisy = np.clip(mask.astype(float) + rng.normal(0, 40, mask.shape), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(pred / f"im{i}.png")
    proc = run_cli("score", "--pred", str(pred), "--gt", str(gt), "--json")
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout)
    assert 0.5 < scores["sm"] <= 1 and 0.5 < scores["iou"] <= 1
    (gt / "im0.png").rename(gt / "other.png")
    assert_one_line_error(run_cli("score", "--pred", str(pred), "--gt", str(gt)), "im0")


def test_score_extra_masks_from_the_command_line(tmp_path):
    """``automask score`` names a further ground truth mask and the option to give, which
    scores the image against the union of its masks."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    mask = np.zeros((10, 10), np.uint8)
    mask[:5] = 255
    Image.fromarray(mask).save(pred / "a.png")
    Image.fromarray(mask).save(gt / "a_mask.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(gt / "a_mask_1.png")
    proc = run_cli("score", "--pred", str(pred), "--gt", str(gt))
    assert_one_line_error(proc, "a further mask of ground truth a_mask.png",
                          "pass --extra-masks union")
    proc = run_cli("score", "--pred", str(pred), "--gt", str(gt), "--extra-masks", "union",
                   "--metrics", "iou", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"iou": 1.0, "n_images": 1}


def test_score_advice_names_the_commands_options(tmp_path):
    """Errors of ``automask score`` give their advice as its options (``--task binary``,
    ``--ignore-index 255``), not as the Python arguments of ``score``; following the advice
    scores the folders."""
    pred, grey, void = tmp_path / "pred", tmp_path / "grey", tmp_path / "void"
    for folder in (pred, grey, void):
        folder.mkdir()
    rng = np.random.default_rng(1)
    ramp = np.tile(np.arange(50, dtype=np.uint16) * 1300, (40, 1))  # a 16-bit map
    Image.fromarray(ramp).save(pred / "a.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(grey / "a.png")  # grey levels
    ids = (rng.random((40, 50)) > 0.5).astype(np.uint8)
    ids[:2] = 255  # a {0, 1} mask with a void border
    Image.fromarray(ids).save(void / "a.png")
    proc = run_cli("score", "--pred", str(pred), "--gt", str(grey))
    assert_one_line_error(proc, "a 16-bit grey map? Pass --task binary", "pass --task multiclass")
    assert "task=" not in proc.stderr
    proc = run_cli("score", "--pred", str(pred), "--gt", str(grey), "--task", "binary",
                   "--json")
    assert proc.returncode == 0 and 0 <= json.loads(proc.stdout)["sm"] <= 1, proc.stderr
    proc = run_cli("score", "--pred", str(pred), "--gt", str(void), "--task", "binary")
    assert_one_line_error(proc, "Pass --ignore-index 255 (read as an 8-bit mask")
    proc = run_cli("score", "--pred", str(pred), "--gt", str(void), "--task", "multiclass",
                   "--ignore-index", "999")
    assert_one_line_error(proc, "--ignore-index 999 cannot occur in the ground truths",
                          "or leave out --ignore-index when no pixel is void")


@pytest.mark.slow
def test_demo_runs_and_learns(tmp_path):
    """The README's first command, as a newcomer runs it: a fresh interpreter. Its fit gets
    what is left of 60 s less 20 (at least 30 s): on a slow CPU it stops at that share
    (20 of the tiny preset's 30 epochs on 2 AVX2 cores) and has learnt by then."""
    proc = run_fresh("demo", "--path", str(tmp_path / "demo"), "--time-limit", "60",
                   cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny" in proc.stdout  # no pretrained weights here: the banner says so
    assert (tmp_path / "demo" / "predictions.png").is_file()
    iou = float(next(line.split()[1] for line in proc.stdout.splitlines()
                     if line.strip().startswith("iou ")))
    baseline = float(proc.stdout.split("all-foreground iou ")[1].split(")")[0])
    assert iou > baseline + 0.2, proc.stdout


def test_demo_bad_input(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run_cli("demo", "--path", str(tmp_path / "file" / "sub")))
    # a folder holding the user's own data: refused before a file of it is replaced
    own = tmp_path / "proj" / "data" / "images" / "00000.png"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"the user's image")
    proc = run_cli("demo", "--path", str(tmp_path / "proj"))
    assert_one_line_error(proc)
    assert "holds 'data' already; pass a new folder (--path)" in proc.stderr
    assert own.read_bytes() == b"the user's image"
    assert [p.name for p in (tmp_path / "proj").rglob("*")] == ["data", "images", "00000.png"]


def test_debug_flag_shows_the_traceback():
    proc = run_cli("--debug", "params", "--backbone", "vit_x")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "vit_x" in proc.stderr


def test_fit_and_evaluate_on_colour_masks_with_a_color_map_file(tmp_path):
    """Colour-coded masks (each class a colour) could be trained only through the API."""
    colours = {(0, 0, 0): 0, (128, 64, 128): 1, (64, 0, 128): 2}
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        ids = np.zeros((48, 48), np.int64)
        ids[:, 16:] = 1
        ids[24 + i:, 32:] = 2
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{i}.png")
        palette = np.array(list(colours), np.uint8)
        Image.fromarray(palette[ids]).save(tmp_path / "masks" / f"{i}.png")
    (tmp_path / "colours.txt").write_text(
        "# R G B class\n0 0 0 0\n128,64,128,1\n64, 0, 128, 2  # road marking\n")
    common = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks")]
    proc = run_cli("fit", *common, "--presets", "tiny", "--hp", "optim.max_epochs=1",
                   "--hp", "model.input_size=64", "--path", str(tmp_path / "run"),
                   "--verbosity", "0", "--color-map", str(tmp_path / "colours.txt"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from automask import SemanticSegmentor

    seg = SemanticSegmentor.load(tmp_path / "run")
    assert seg.num_classes_ == 3 and seg.color_map_ == colours
    # its masks come out in the training masks' colours, the class ids as pixel values
    from automask.data import read_mask

    ids = seg.predict(str(tmp_path / "images"))
    seg.predict(str(tmp_path / "images"), save_to=tmp_path / "pred")
    for i, expected in enumerate(ids):
        out = tmp_path / "pred" / f"{i}.png"
        np.testing.assert_array_equal(read_mask(out), expected)
        np.testing.assert_array_equal(read_mask(out, color_map=colours), expected)
        with Image.open(out) as picture:
            assert {tuple(c) for c in np.array(picture.convert("RGB")).reshape(-1, 3)} <= set(
                colours)
        # another tool's output in the data set's colours, as a leaderboard's extra row
        (tmp_path / "theirs").mkdir(exist_ok=True)
        Image.fromarray(palette[expected]).save(tmp_path / "theirs" / f"{i}.png")
    from automask.datasets import from_folders

    data = from_folders(tmp_path / "images", tmp_path / "masks")
    board = seg.leaderboard(data, extra={"theirs": tmp_path / "theirs"}, style="models")
    ours, theirs = board.set_index("model").loc[[seg.best_model_, "theirs"], "test_miou"]
    assert ours == theirs  # the same class ids, read back from their colours
    proc = run_cli("evaluate", str(tmp_path / "run"), *common, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads(proc.stdout)["iou_per_class"]) == 3
    # --values dataset: RGB masks in the training masks' colours, not palette ids
    proc = run_cli("predict", str(tmp_path / "run"), "--data", str(tmp_path / "images"),
                   "--out", str(tmp_path / "rgb"), "--values", "dataset")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for i, expected in enumerate(ids):
        with Image.open(tmp_path / "rgb" / f"{i}.png") as picture:
            assert picture.mode == "RGB"
            np.testing.assert_array_equal(np.array(picture), palette[expected])
    (tmp_path / "bad.txt").write_text("0 0 0 0\n128 64 x 1\n")
    proc = run_cli("fit", *common, "--presets", "tiny", "--path", str(tmp_path / "bad"),
                   "--color-map", str(tmp_path / "bad.txt"))
    assert_one_line_error(proc, "line 2", "four integers")
    assert not (tmp_path / "bad").exists()


def _reader_gone(*args: str, cwd: Path) -> tuple[int, str]:
    """``python -m automask *args | head -0``: stdout's reader leaves before any line."""
    proc = subprocess.Popen([sys.executable, "-m", "automask", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=600)
    return proc.returncode, err


def test_a_closed_stdout_neither_stops_a_fit_nor_reads_as_an_error(csvs, tmp_path):
    """``automask fit ... | head -1`` stopped the fit at its next progress line (leaving
    .automask_fit behind, status 2, "automask: error: [Errno 32] Broken pipe"), and every
    command piped into a reader that left said the same."""
    from automask import SemanticSegmentor

    code, err = _reader_gone("fit", "--train", str(csvs / "train.csv"),
                             "--path", str(tmp_path / "run"),
                             "--presets", "tiny", "--hp", "optim.max_epochs=2",
                             "--hp", "model.input_size=32", "--verbosity", "1", cwd=tmp_path)
    assert code == 141 and "error" not in err and "Traceback" not in err, (code, err)
    seg = SemanticSegmentor.load(tmp_path / "run")  # trained to the end and saved
    assert seg.fit_summary()["epochs"] == {"default": 2}
    assert not (tmp_path / "run" / ".automask_fit").exists()
    code, err = _reader_gone("params", "--backbone", "tiny", "--json", cwd=tmp_path)
    assert (code, err) == (141, "")


def test_show_takes_the_csv_columns_options_and_warns_without_labels(csvs, run_dir, tmp_path):
    """``show`` had no --image/--label (its own error advised them), and drew a CSV whose
    masks sit in another column without the ground truth and without a word."""
    test = pd.read_csv(csvs / "test.csv").head(2)
    renamed = tmp_path / "renamed.csv"
    test.assign(image=[str(csvs / p) for p in test["image"]],
                label=[str(csvs / p) for p in test["label"]]).rename(
        columns={"image": "img", "label": "mask"}).to_csv(renamed, index=False)
    proc = run_cli("show", str(run_dir), "--data", str(renamed), "--image", "img",
                   "--label", "mask", "--out", str(tmp_path / "a.png"), "--n", "2")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    assert (tmp_path / "a.png").is_file()
    partly = tmp_path / "partly.csv"
    pd.read_csv(renamed).rename(columns={"img": "image"}).to_csv(partly, index=False)
    proc = run_cli("show", str(run_dir), "--data", str(partly), "--out",
                   str(tmp_path / "b.png"), "--n", "2")
    assert proc.returncode == 0, proc.stderr
    assert "has no label column 'label' (columns: ['image', 'mask']): drawn without the " \
           "ground truth; --label names the mask column" in proc.stderr


def test_tables_are_never_written_into_another_predictors_parts(run_dir, tmp_path):
    """params --out, and leaderboard --out into a predictor other than the one it reads
    (another run's training log), are refused before any work, the log untouched."""
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    [logged] = list((other / "logs").glob("*/metrics.csv"))[:1]
    before = logged.read_bytes()
    proc = run_cli("params", "--backbone", "tiny", "--methods", "lora", "--out", str(logged))
    assert_one_line_error(proc, "would write into the predictor", "its folder 'logs'")
    proc = run_cli("leaderboard", str(run_dir), "--out", str(logged))
    assert_one_line_error(proc, "would write into the predictor", str(other))
    assert logged.read_bytes() == before
    beside = other / "params.csv"  # beside a predictor: the user's own file
    assert run_cli("params", "--backbone", "tiny", "--methods", "lora",
                   "--out", str(beside)).returncode == 0
    assert "trainable" in beside.read_text()
