"""Issue 11 on the command line: epoch lines in a log file, folders and class names,
probability maps, palette masks, pictures, and a --help that does not import torch.

Every command runs in a process of its own (``python -m automask``, forked from one that
imported the libraries: tests/cli_process.py)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from automask.data import read_mask
from automask.data.io import class_colors
from automask.datasets import make_synthetic
from automask.datasets.folders import find_classes_file, read_class_names
from automask.errors import DataValidationError

from cli_process import run_automask
from conftest import python_stdout, shared_path

NAMES = ["background", "disc", "square"]
FAST = ["--presets", "tiny", "--hp", "optim.max_epochs=2", "--hp", "model.input_size=64"]


def run_cli(*args: str, stdout=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m automask *args`` (forked from a process that imported the libraries,
    tests/cli_process.py); ``stdout`` an open file to receive the output."""
    return run_automask(*args, stdout=stdout, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("automask: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three-class synthetic data in images/ and masks/, with a numbered classes.txt beside."""
    root = tmp_path_factory.mktemp("follow")
    make_synthetic(14, size=64, num_classes=3, seed=4, root=root)
    (root / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(NAMES)))
    return root


@pytest.fixture(scope="module")
def fitted(data):
    """A fit from folders with its stdout redirected to a file (as in a CI log)."""
    run = data / "run"
    log = data / "fit_stdout.txt"
    with open(log, "w") as fh:
        proc = run_cli("fit", "--images", str(data / "images"), "--masks", str(data / "masks"),
                       *FAST, "--hp", "peft.method=full", "--hp", "peft.method=lora",
                       "--path", str(run), stdout=fh)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, log.read_text()


def test_fit_log_has_one_plain_line_per_epoch_and_a_summary(fitted):
    _, text = fitted
    assert "\r" not in text
    lines = text.splitlines()
    epoch_lines = [line for line in lines if re.match(r"\[[^]]+\]\s+epoch \d+/\d+", line)]
    names = [line.split()[0] for line in epoch_lines]
    assert names == ["[method=full]"] * 2 + ["[method=lora]"] * 2, text
    for i, line in enumerate(epoch_lines):
        assert f"epoch {i % 2 + 1}/2" in line
        for part in ("train_loss ", "val_miou ", "best ", "elapsed ", "eta "):
            assert part in line, (part, line)
    # at most a few lines per epoch: epoch lines, the summary and the leaderboard
    assert len(lines) <= 4 * len(epoch_lines) + 3, text
    assert any(line.startswith("fit done in ") for line in lines), text
    assert any(line.startswith("best model: method=") for line in lines), text


def test_fit_reads_class_names_from_classes_txt(fitted):
    run, _ = fitted
    pointer = json.loads((run / "automask.json").read_text())
    meta = json.loads((run / pointer["current"] / "predictor.json").read_text())
    assert meta["classes_"] == NAMES
    assert set(meta["models"]) == {"method=full", "method=lora"}


def test_fit_from_folders_bad_input(data, tmp_path):
    proc = run_cli("fit", "--images", str(data / "images"), "--masks", str(tmp_path / "none"),
                   *FAST, "--path", str(tmp_path / "r"))
    assert_one_line_error(proc, "none")
    proc = run_cli("fit", "--images", str(data / "images"), *FAST, "--path", str(tmp_path / "r"))
    assert_one_line_error(proc, "--images and --masks")
    proc = run_cli("fit", "--train", "x.csv", "--images", str(data / "images"), "--masks",
                   str(data / "masks"), *FAST, "--path", str(tmp_path / "r"))
    assert_one_line_error(proc, "--train", "--images")
    proc = run_cli("fit", "--images", str(data / "images"), "--masks", str(data / "masks"),
                   *FAST, "--class-names", "a,b", "--path", str(tmp_path / "r"))
    assert proc.returncode == 2 and "outside [0, 2): class_names names 2 classes" in proc.stderr, \
        proc.stderr
    proc = run_cli("fit", "--train", "x.csv", *FAST, "--hp", "optim.learning_rate=0.1",
                   "--path", str(tmp_path / "r"))
    assert_one_line_error(proc, "optim.learning_rate", "did you mean 'optim.lr'")
    assert not (tmp_path / "r").exists()


def test_evaluate_folders_prints_per_class_names(fitted, data):
    run, _ = fitted
    proc = run_cli("evaluate", str(run), "--images", str(data / "images"),
                   "--masks", str(data / "masks"))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    per_class = {r[1]: r[2] for r in rows if len(r) >= 3 and r[0].isdigit()}
    assert set(per_class) == set(NAMES), proc.stdout
    assert any(r[0] == "miou" for r in rows)
    proc = run_cli("evaluate", str(run), "--images", str(data / "images"))
    assert_one_line_error(proc, "--masks")


def test_evaluate_names_a_class_id_the_fitted_model_does_not_know(fitted, data, tmp_path):
    """A mask id past the model's classes is reported against the model (fitted on 3
    classes), not with fit's advice to pass num_classes."""
    import shutil

    run, _ = fitted
    masks = tmp_path / "masks"
    shutil.copytree(data / "masks", masks)
    first = sorted(masks.glob("*.png"))[0]
    mask = read_mask(first)
    mask[:4, :4] = 5
    Image.fromarray(mask).save(first)
    proc = run_cli("evaluate", str(run), "--images", str(data / "images"), "--masks",
                   str(masks))
    assert proc.returncode == 2, proc.stderr
    assert "class id(s) {5} outside [0, 3): the model was fitted on 3 classes (ids 0-2)" \
        in proc.stderr, proc.stderr
    assert "pass num_classes" not in proc.stderr and first.name in proc.stderr
    proc = run_cli("evaluate", str(run))
    assert_one_line_error(proc, "--data")


def test_mask_and_image_name_endings_from_the_command_line(fitted, data, tmp_path, capsys):
    """Masks named <stem>_shadow.png pair by the ending they all share, or with
    --mask-suffix; for a single mask, whose name alone tells no ending, the one-line error
    names the option to pass. (The same command as a process once; in this process for
    the other cases.)"""
    import shutil

    from automask import cli

    run, _ = fitted
    masks = tmp_path / "masks"
    masks.mkdir()
    for mask in (data / "masks").glob("*.png"):
        shutil.copy(mask, masks / f"{mask.stem}_shadow.png")
    expected = run_cli("evaluate", str(run), "--images", str(data / "images"), "--masks",
                       str(data / "masks"), "--json")
    assert expected.returncode == 0, expected.stderr
    proc = run_cli("evaluate", str(run), "--images", str(data / "images"), "--masks",
                   str(masks), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(expected.stdout)
    assert cli.main(["evaluate", str(run), "--images", str(data / "images"), "--masks",
                     str(masks), "--mask-suffix", "_shadow", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(expected.stdout)
    one = tmp_path / "one"
    (one / "images").mkdir(parents=True)
    (one / "masks").mkdir()
    image = sorted((data / "images").iterdir())[0]
    shutil.copy(image, one / "images" / image.name)
    shutil.copy(masks / f"{image.stem}_shadow.png", one / "masks")
    assert cli.main(["evaluate", str(run), "--images", str(one / "images"), "--masks",
                     str(one / "masks")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("automask: error: no image/mask pairs")
    assert "--mask-suffix _shadow" in lines[0]
    proc = run_cli("evaluate", str(run), "--data", "x.csv", "--mask-suffix", "_shadow")
    assert_one_line_error(proc, "--mask-suffix, --image-suffix, --extra-masks and "
                                "--drop-unpaired go with --images/--masks")


def test_predict_palette_masks_and_probability_maps(fitted, data, tmp_path):
    run, _ = fitted
    masks_out, proba_out = tmp_path / "masks", tmp_path / "proba"
    proc = run_cli("predict", str(run), "--data", str(data / "images"), "--out", str(masks_out))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("predict", str(run), "--data", str(data / "images"), "--out",
                   str(proba_out), "--proba")
    assert proc.returncode == 0, proc.stderr
    pngs, maps = sorted(masks_out.glob("*.png")), sorted(proba_out.glob("*.npy"))
    assert len(pngs) == len(maps) == 14
    palette = class_colors(3)
    for png, npy in zip(pngs, maps):
        assert png.stem == npy.stem
        prob = np.load(npy)
        assert prob.dtype == np.float32 and prob.shape == (3, 64, 64)
        np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-4)
        with Image.open(png) as img:
            assert img.mode == "P"
            rgb = np.array(img.convert("RGB"))
        mask = read_mask(png)  # pixel values are class ids
        np.testing.assert_array_equal(mask, prob.argmax(0))
        np.testing.assert_array_equal(rgb, palette[mask])  # and the palette shows them
    # The maps score like any model's output, with the ignore value given on the command line.
    proc = run_cli("score", "--pred", str(proba_out), "--gt", str(data / "masks"),
                   "--ignore-index", "255", "--json")
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout)
    assert scores["n_images"] == 14 and 0 <= scores["miou"] <= 1


def test_score_void_label_and_class_names(data, tmp_path):
    gt = data / "masks"
    # a perfect prediction, but class 2 marked void in the ground truth: it leaves the scores
    proc = run_cli("score", "--pred", str(gt), "--gt", str(gt), "--task", "multiclass",
                   "--void-label", "2", "--class-names", ",".join(NAMES))
    assert proc.returncode == 0, proc.stderr
    rows = {r[1]: " ".join(r[2:]) for r in map(str.split, proc.stdout.splitlines())
            if len(r) >= 3 and r[0].isdigit()}
    assert rows == {"background": "1.0000", "disc": "1.0000", "square": "nan (absent)"}, rows
    assert re.search(r"^miou\s+1\.0000$", proc.stdout, re.M), proc.stdout
    proc = run_cli("score", "--pred", str(gt), "--gt", str(gt), "--task", "multiclass",
                   "--class-names", "background,disc")
    assert_one_line_error(proc, "--class-names has 2 names but the ground truths hold class 2")
    # binary scores take the void label too: pixels of value 2 leave the pixel-wise scores.
    # A prediction holding 0, 1 and the void is refused (read as 8-bit, its 1s are 1/255:
    # this one scored IoU 0 and an MAE of 0.0004 that printed as 0.0000)
    proc = run_cli("score", "--pred", str(gt), "--gt", str(gt), "--task", "binary",
                   "--void-label", "2")
    assert_one_line_error(proc, "the prediction holds only 0, 1 and 2")
    pred = tmp_path / "pred"
    pred.mkdir()
    for mask in gt.iterdir():
        values = np.asarray(Image.open(mask))
        Image.fromarray(np.where(values == 2, 0, values).astype(np.uint8)).save(pred / mask.name)
    proc = run_cli("score", "--pred", str(pred), "--gt", str(gt), "--task", "binary",
                   "--void-label", "2")
    assert proc.returncode == 0, proc.stderr
    for metric in ("mae", "iou", "ber"):
        expected = "0.0000" if metric != "iou" else "1.0000"
        assert re.search(rf"^{metric}\s+{expected}$", proc.stdout, re.M), proc.stdout


def test_score_names_classes_from_a_classes_file_beside_the_ground_truths(data, tmp_path):
    """As evaluate and fit do, score reads classes.txt in or beside --gt (CamVid's layout:
    '<id> <name>' lines, the void last): the per-class lines carry the names, the void's
    dropped with --void-label; without it, a class named 'Unlabelled' is warned about."""
    root = tmp_path / "set"
    shutil.copytree(data / "masks", root / "masks")
    (root / "classes.txt").write_text("0 background\n1 disc\n2 Unlabelled\n")
    gt = root / "masks"
    proc = run_cli("score", "--pred", str(gt), "--gt", str(gt), "--task", "multiclass",
                   "--void-label", "2")
    assert proc.returncode == 0, proc.stderr
    rows = {r[1]: " ".join(r[2:]) for r in map(str.split, proc.stdout.splitlines())
            if len(r) >= 3 and r[0].isdigit()}
    assert rows == {"background": "1.0000", "disc": "1.0000"}, proc.stdout
    assert "warning" not in proc.stderr, proc.stderr
    proc = run_cli("score", "--pred", str(gt), "--gt", str(gt), "--task", "multiclass")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\s+2 Unlabelled\s+1\.0000$", proc.stdout, re.M), proc.stdout
    assert re.search(r"automask: warning: .*classes.txt names class 2 'Unlabelled'.*pass "
                     r"--void-label 2", proc.stderr), proc.stderr


def test_score_refuses_maps_of_no_numbers_in_one_line(tmp_path):
    """A complex or string .npy raised TypeError, which the command line printed as a
    traceback (exit 1)."""
    for folder in ("p", "g"):
        (tmp_path / folder).mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "g" / "a.png")
    for bad, needle in ((np.zeros((4, 4), np.complex64), "complex"),
                        (np.full((4, 4), "a"), "not numbers")):
        np.save(tmp_path / "p" / "a.npy", bad)
        proc = run_cli("score", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g"))
        assert_one_line_error(proc, "a.npy", needle)


def test_show_and_history_write_pictures(fitted, data, tmp_path):
    run, _ = fitted
    one = tmp_path / "one.png"
    proc = run_cli("show", str(run), "--images", str(data / "images"), "--masks",
                   str(data / "masks"), "--out", str(one), "--n", "2")
    assert proc.returncode == 0, proc.stderr
    both = tmp_path / "both.png"
    proc = run_cli("show", str(run), "--images", str(data / "images"), "--masks",
                   str(data / "masks"), "--out", str(both), "--n", "2",
                   "--models", "method=full,method=lora")
    assert proc.returncode == 0, proc.stderr
    with Image.open(one) as a, Image.open(both) as b:
        # 3 columns against 4 (image, truth, one per model), same rows
        assert a.width < b.width and abs(a.height - b.height) <= 2
        assert b.width / a.width == pytest.approx(4 / 3, rel=0.05)
    # the option repeated, a name each: the same picture
    again = tmp_path / "again.png"
    proc = run_cli("show", str(run), "--images", str(data / "images"), "--masks",
                   str(data / "masks"), "--out", str(again), "--n", "2",
                   "--models", "method=full", "--models", "method=lora")
    assert proc.returncode == 0, proc.stderr
    with Image.open(again) as c, Image.open(both) as b:
        assert c.size == b.size
    curves = tmp_path / "curves.png"
    proc = run_cli("history", str(run), "--out", str(curves))
    assert proc.returncode == 0, proc.stderr
    with Image.open(curves) as img:
        assert img.width > 200 and img.height > 100
    # a bare name is written as PNG with .png added, as matplotlib's savefig does
    proc = run_cli("history", str(run), "--out", str(tmp_path / "bare"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {tmp_path / 'bare.png'}", proc.stdout
    assert not (tmp_path / "bare").exists()
    with Image.open(tmp_path / "bare.png") as img:
        assert img.format == "PNG" and img.size == Image.open(curves).size


def test_show_and_history_bad_input(fitted, data, tmp_path):
    run, _ = fitted
    proc = run_cli("show", str(run), "--data", str(data / "images"), "--out",
                   str(tmp_path / "x.png"), "--models", "method=full,nope")
    assert_one_line_error(proc, "nope")
    proc = run_cli("history", str(tmp_path), "--out", str(tmp_path / "h.png"))
    assert_one_line_error(proc, "logs")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "h.png").exists()


def test_help_leaves_torch_unimported():
    probe = (
        "import contextlib, io, sys\n"
        "import automask.cli as cli\n"
        "for argv in (['--help'], ['fit', '--help'], ['show', '--help'], ['score', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        cli.main(argv)\n"
        "import automask\n"
        "print(sorted(m for m in ('torch', 'lightning', 'matplotlib', 'pandas')"
        " if m in sys.modules))\n"
    )
    out = python_stdout(probe)
    assert out.strip() == "[]", out
    proc = run_cli("--help")
    assert proc.returncode == 0 and "show" in proc.stdout and "history" in proc.stdout


def test_read_class_names_layouts(tmp_path):
    (tmp_path / "plain.txt").write_text("background\npolyp\n\n# comment\n")
    assert read_class_names(tmp_path / "plain.txt") == ["background", "polyp"]
    (tmp_path / "numbered.txt").write_text("1: road\n0: sky\n2,car park\n")
    assert read_class_names(tmp_path / "numbered.txt") == ["sky", "road", "car park"]
    (tmp_path / "gap.txt").write_text("0 sky\n2 car\n")
    with pytest.raises(DataValidationError, match=r"gap\.txt: class ids 1 have no name"):
        read_class_names(tmp_path / "gap.txt")
    (tmp_path / "mixed.txt").write_text("0 sky\nroad\n")
    with pytest.raises(DataValidationError, match=r"mixed\.txt line 2"):
        read_class_names(tmp_path / "mixed.txt")
    (tmp_path / "masks").mkdir()
    assert find_classes_file(tmp_path / "masks") is None
    (tmp_path / "classes.txt").write_text("a\nb\n")
    assert find_classes_file(tmp_path / "masks") == tmp_path / "classes.txt"


@pytest.mark.shared
def test_camvid_classes_txt():
    root = shared_path("data", "camvid")
    names = read_class_names(find_classes_file(root / "masks"))
    assert len(names) == 12 and names[0] == "Sky" and names[11] == "Unlabelled"


@pytest.mark.shared
def test_camvid_fit_inputs_drop_the_void_name():
    """--void-label 11 with CamVid's classes.txt: 11 class names, void passed to the fit."""
    from automask.cli import _fit_inputs, build_parser
    from automask.datasets.folders import found_beside

    root = shared_path("data", "camvid")
    args = build_parser().parse_args(
        ["fit", "--images", str(root / "images"), "--masks", str(root / "masks"),
         "--void-label", "11", "--path", "unused"])
    frame, names, hp, color_map = _fit_inputs(args)
    assert len(frame) == 96 and hp == {"data.void_label": 11} and color_map is None
    names, color_map = found_beside(frame, None, names, color_map, 11)  # as fit takes them
    assert color_map is None
    assert len(names) == 11 and names[0] == "Sky" and names[-1] == "Bicyclist"
    args = build_parser().parse_args(
        ["fit", "--images", str(root / "images"), "--masks", str(root / "masks"),
         "--void-label", "11", "--hp", "data.void_label=3", "--path", "unused"])
    with pytest.raises(Exception, match="--void-label 11 disagrees"):
        _fit_inputs(args)
