"""Command-line audit: bad inputs and odd files that the command line mishandled.

Most checks call :func:`automask.cli.main` (or its parser) in this process: a subprocess
costs seconds to start, and argument handling is the same either way."""
from __future__ import annotations

import gc
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from automask import cli
from automask.errors import AutomaskError, ConfigError, DataValidationError, SavedModelError


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    """Three small binary masks (scored against themselves: perfect scores)."""
    root = tmp_path_factory.mktemp("audit_cli_masks")
    for i in range(3):
        mask = np.zeros((32, 40), np.uint8)
        mask[8:24, 4 + i:20 + i] = 255
        Image.fromarray(mask).save(root / f"m{i}.png")
    return root


def test_color_map_file_saved_with_a_bom_is_read(tmp_path):
    """Windows editors start UTF-8 files with a BOM; line 1 was refused as not numeric."""
    path = tmp_path / "colours.txt"
    path.write_text("0 0 0 0\n128,64,128,1\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert cli._read_color_map(str(path)) == ({(0, 0, 0): 0, (128, 64, 128): 1}, None)


@pytest.mark.parametrize("command", [["demo"], ["fit", "--train", "t.csv", "--path", "r"]])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_time_limit_must_be_a_positive_finite_number(command, value, capsys):
    """``demo --time-limit -1`` (or nan) ran a 30-second demo instead of refusing."""
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args([*command, "--time-limit", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--time-limit" in err and value in err, err
    args = cli.build_parser().parse_args([*command, "--time-limit", "12.5"])
    assert args.time_limit == 12.5


def test_show_refuses_model_and_models_together(capsys):
    """``show --model a --models b`` silently drew --models and ignored --model."""
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["show", "run", "--out", "x.png", "--model", "nope",
                                       "--models", "all"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--model" in err and "--models" in err, err


def test_metric_lists_accept_spaces_and_name_an_empty_entry(masks, capsys):
    """``--metrics "iou, dice"`` failed with: unknown metric ' dice'."""
    assert cli.main(["score", "--pred", str(masks), "--gt", str(masks),
                     "--metrics", "iou, dice"]) == 0
    out = capsys.readouterr().out
    assert {line.split()[0] for line in out.splitlines()} >= {"iou", "dice"}, out
    assert cli.main(["score", "--pred", str(masks), "--gt", str(masks),
                     "--metrics", "iou,"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("automask: error:") and "--metrics" in err and "'iou,'" in err, err


def test_score_prints_the_image_count_as_an_integer(masks, capsys):
    """``n_images`` printed as ``3.0000``, as though it were a score."""
    assert cli.main(["score", "--pred", str(masks), "--gt", str(masks)]) == 0
    rows = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert rows["n_images"] == str(len(list(masks.glob("*.png")))), rows
    assert rows["iou"] == "1.0000", rows


def test_boxes_given_a_folder_says_so(tmp_path):
    """``--boxes some_folder/`` said "file not found" about a folder that exists."""
    with pytest.raises(DataValidationError, match=r"--boxes .* is a folder, not a CSV"):
        cli._read_boxes(str(tmp_path), str(tmp_path), "image")


def test_hp_value_repeated_for_a_key_is_refused():
    """``--hp peft.method=lora --hp peft.method=lora`` trained one candidate, not two."""
    with pytest.raises(AutomaskError, match=r"--hp peft\.method repeats the value 'lora'"):
        cli._parse_hp(["peft.method=lora", "peft.method=full", "peft.method=lora"])
    with pytest.raises(AutomaskError, match=r"repeats the value 2"):
        cli._parse_hp(["optim.max_epochs=[1,2]", "optim.max_epochs=2"])
    # values that only compare equal (1 == True) are distinct; lists extend
    assert cli._parse_hp(["a=1", "a=true", "a=[2,3]"]) == {"a": [1, True, 2, 3]}


@pytest.fixture
def interrupted(tmp_path):
    """A run folder holding the record of an interrupted fit (tiny preset, no epoch done)
    and the CSV it was given."""
    import pandas as pd

    from automask import SemanticSegmentor
    from automask.datasets import make_synthetic
    from automask.training.plan import plan_fit
    from automask.training.state import FitState

    frame = make_synthetic(10, size=64, num_classes=2, seed=5, root=tmp_path / "data")
    train = tmp_path / "train.csv"
    pd.DataFrame({"image": frame["image"], "label": frame["label"]}).to_csv(train, index=False)
    run = tmp_path / "run"
    run.mkdir()
    hp = {"optim.max_epochs": 1, "model.input_size": 64}
    plan = plan_fit(SemanticSegmentor(path=run).get_params(), str(train), None, "tiny", hp,
                    None, None, None, None)
    FitState(run).start(plan.record, plan.frames)
    return run, train


def test_resume_checks_the_options_given_and_keeps_the_recorded_ones(interrupted, capsys):
    """``fit --resume --path RUN --hp ...`` ignored the --hp silently; ``fit --resume
    --train CSV`` compared the default preset against the recorded one and refused."""
    run, train = interrupted
    (run / ".automask_fit" / "checkpoints").mkdir(parents=True, exist_ok=True)
    epoch = run / ".automask_fit" / "checkpoints" / "default.ckpt"
    epoch.write_bytes(b"an epoch's checkpoint")  # progress a refused resume must keep
    assert cli.main(["fit", "--resume", "--path", str(run), "--hp", "optim.lr=0.5",
                     "--verbosity", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("automask: error: cannot resume") and "differs" in err, err
    assert "=True" not in err and "--overwrite" in err, err  # the command's option
    # refused before it trained: no word that it kept epochs, as if it had run some
    assert "completed epochs are kept" not in err and epoch.is_file()
    # the same options, refused for the damaged checkpoint (inside the training call):
    # the advice to resume would contradict the error
    assert cli.main(["fit", "--resume", "--path", str(run), "--verbosity", "0"]) == 2
    err = capsys.readouterr().err
    assert "epoch checkpoint of candidate 'default'" in err and "is unreadable" in err, err
    assert "completed epochs are kept" not in err and epoch.is_file()
    epoch.unlink()
    assert not (run / "automask.json").exists()
    # the data given again, the preset not: the recorded "tiny" is used, so it resumes
    assert cli.main(["fit", "--resume", "--train", str(train), "--path", str(run),
                     "--verbosity", "0"]) == 0, capsys.readouterr().err
    from automask import SemanticSegmentor

    seg = SemanticSegmentor.load(run)
    assert seg.config_.model.backbone == "tiny" and seg.config_.model.input_size == 64


def test_debug_is_taken_after_the_command_too():
    """``automask params --backbone vit_x --debug`` was refused as an unknown argument."""
    with pytest.raises(AutomaskError, match="vit_x"):  # the traceback, not a message
        cli.main(["params", "--backbone", "vit_x", "--debug"])
    assert cli.build_parser().parse_args(["--debug", "params"]).debug is True
    assert cli.build_parser().parse_args(["params"]).debug is False


def test_show_names_models_in_its_error(tmp_path, capsys):
    """An empty name in ``show --models`` was reported as a --class-names error (and only
    after the predictor had loaded)."""
    (tmp_path / "run").mkdir()  # a folder that is no predictor: loading it would fail
    assert cli.main(["show", str(tmp_path / "run"), "--data", "x.csv", "--out",
                     str(tmp_path / "x.png"), "--models", "a,,b"]) == 2
    err = capsys.readouterr().err
    assert "--models expects comma-separated names, got 'a,,b'" in err, err
    assert "--class-names" not in err and not (tmp_path / "x.png").exists()


def test_verbosity_outside_0_to_3_is_refused(capsys):
    """``--verbosity 7`` was taken silently (as 3; a negative one as 0)."""
    for value in ("7", "-1"):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args(["fit", "--path", "r", "--verbosity", value])
        assert exc.value.code == 2
        assert "--verbosity" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["fit", "--path", "r", "--verbosity", "3"]).verbosity == 3


@pytest.mark.parametrize("plan", ["{}", '{"call": [], "params": {}}'])
def test_resume_names_a_fit_record_that_is_not_one(tmp_path, capsys, plan):
    """A plan.json that is valid JSON but no fit record ended in a KeyError traceback."""
    state = tmp_path / ".automask_fit"
    state.mkdir()
    (state / "plan.json").write_text(plan)
    assert cli.main(["fit", "--resume", "--path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("automask: error: cannot resume") and "plan.json" in err, err
    assert "Traceback" not in err


def test_entry_point_returns_mains_status_and_freezes_objects_before_exit(monkeypatch):
    """``cli.run`` (the ``automask`` script, ``python -m automask``) gives back what
    :func:`cli.main` returned, or lets its ``SystemExit`` through, and in both cases moves
    every live object out of the collector's reach so that the interpreter's last
    collection has nothing to walk."""
    def usage_error():
        raise SystemExit(2)

    try:
        for fake, expected in ((lambda: 3, 3), (usage_error, SystemExit)):
            gc.unfreeze()
            monkeypatch.setattr(cli, "main", fake)
            if expected is SystemExit:
                with pytest.raises(SystemExit) as exc:
                    cli.run()
                assert exc.value.code == 2
            else:
                assert cli.run() == expected
            assert gc.get_freeze_count() > 1000  # pytest's and torch's objects at least
    finally:
        gc.freeze()  # as tests/conftest.py leaves the run: every live object frozen


def test_fit_option_errors_come_before_torch_is_imported(tmp_path):
    """``automask fit`` reads its options (folders, class names, --void-label, colour map)
    before it imports the library's training side: their errors come in about a second,
    not after the 5 s that torch and Lightning take to import."""
    cases = [
        (["--images", str(tmp_path / "none"), "--masks", str(tmp_path / "none2")], "none"),
        (["--images", str(tmp_path)], "--images and --masks go together"),
        (["--train", "x.csv", "--class-names", "a,,b"], "--class-names expects"),
        (["--train", "x.csv", "--void-label", "3", "--hp", "data.void_label=4"],
         "--void-label 3 disagrees"),
    ]
    for options, says in cases:
        _refused_before_import(["fit", *options, "--path", str(tmp_path / "run")], says)
    assert not (tmp_path / "run").exists()


def test_fit_option_errors_come_before_lightning_is_imported(tmp_path):
    """A preset or a hyperparameter key or value that fit would refuse, then a --train or
    --tuning CSV that is not there, is refused before Lightning, torchmetrics and
    scikit-learn load, and before segment-anything (whose torchvision imports
    torch._dynamo); resolving the options loads torch, for the PEFT registry. A bad option
    is named before a missing CSV, as fit does."""
    (tmp_path / "train.csv").write_text("image,label\na.png,a_mask.png\n")
    train = ["--train", str(tmp_path / "train.csv")]
    missing = str(tmp_path / "nope.csv")
    for options, says in ((["--train", missing, "--hp", "optim.lrr=1"],
                           "did you mean 'optim.lr'"),
                          (["--presets", "tiny_quality"], "unknown preset 'tiny_quality'"),
                          (["--train", missing], f"--train '{missing}' does not exist"),
                          (["--tuning", "nope.csv"], "--tuning 'nope.csv' does not exist")):
        _refused_before_import(["fit", *train, *options, "--path", str(tmp_path / "run")],
                               says, module=("lightning", "segment_anything", "torchvision"))
    assert not (tmp_path / "run").exists()


def test_data_option_errors_come_before_the_predictor_loads(tmp_path):
    """evaluate, show and leaderboard check how their data options go together before
    they load the predictor (torch, segment-anything and the weights); a run folder that
    is not there is still named first."""
    run = str(tmp_path)  # a folder: the options are checked before anything is read from it
    folders = ["--images", str(tmp_path), "--masks", str(tmp_path)]
    for argv, says in (
            (["evaluate", run], "no data: give --data CSV or --images DIR --masks DIR"),
            (["evaluate", run, "--data", "x.csv", *folders], "not both"),
            (["evaluate", run, "--images", str(tmp_path)], "--images and --masks go together"),
            (["evaluate", run, "--data", "x.csv", "--mask-suffix", "_m"],
             "--mask-suffix, --image-suffix, --extra-masks and --drop-unpaired go with"),
            (["show", run, "--out", str(tmp_path / "p.png")], "no data: give --data (CSV"),
            (["show", run, "--masks", str(tmp_path), "--out", str(tmp_path / "p.png")],
             "--images and --masks go together"),
            (["leaderboard", run, "--data", "x.csv", *folders], "not both"),
            (["evaluate", str(tmp_path / "none")], "none")):
        _refused_before_import(argv, says)
    assert list(tmp_path.iterdir()) == []


def test_score_names_a_missing_folder_before_torch_is_imported(tmp_path):
    """``automask score`` with a folder that is not there (or a file) says so at once,
    naming the option, instead of after importing torch and torchmetrics."""
    (tmp_path / "gt.csv").write_text("image,label\n")
    _refused_before_import(["score", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path)],
                          f"--pred '{tmp_path / 'nope'}' does not exist")
    _refused_before_import(["score", "--pred", str(tmp_path), "--gt", str(tmp_path / "gt.csv")],
                          f"--gt '{tmp_path / 'gt.csv'}' is a file")


def test_predict_names_bad_data_and_out_before_the_model_loads(tmp_path):
    """A --data that is not there or an --out that names a file is refused before the
    predictor's models load (Lightning not even imported); a run
    folder that is not there is still named first."""
    run = tmp_path / "run"
    run.mkdir()
    _refused_before_import(["predict", str(run), "--data", str(tmp_path / "nope.csv"), "--out",
                           str(tmp_path / "o")], "--data", module="lightning")
    (tmp_path / "a.png").write_bytes(b"")
    _refused_before_import(["predict", str(run), "--data", str(tmp_path / "a.png"), "--out",
                           str(tmp_path / "masks.png")], "looks like a file name",
                          module="lightning")
    with pytest.raises(SavedModelError, match="no such folder"):
        cli.main(["predict", str(tmp_path / "no_run"), "--data", "x.csv", "--out", "o",
                  "--debug"])


@pytest.mark.parametrize("command", [
    ["predict", "--data", "x.csv", "--out", "o"], ["evaluate", "--data", "x.csv"],
    ["show", "--data", "x.csv", "--out", "s.png"], ["leaderboard", "--data", "x.csv"],
    ["export", "--out", "m.onnx"], ["history", "--out", "h.png"]])
def test_a_run_folder_that_is_not_there_is_named_before_torch_is_imported(tmp_path, command):
    """Every command that reads a run folder names a missing one at once (it took 4-5 s of
    imports on a 2-core CPU), in the words loading it uses."""
    missing = tmp_path / "no_run"
    what = ("the run directory of a fit" if command[0] == "history"
            else "the folder of a saved automask predictor")
    _refused_before_import([command[0], str(missing), *command[1:]],
                          f"no such folder '{missing}': pass {what}")
    # "" is no folder (it named the working folder as missing, though it is there)
    _refused_before_import([command[0], "", *command[1:]],
                          f"the run folder is empty (''): pass {what}")


def _refused_before_import(argv: list[str], says: str,
                           module: str | tuple[str, ...] = "torch") -> None:
    """``cli.main(argv)`` in a fresh interpreter exits 2 with ``says`` in its message and
    without having imported ``module`` (or any of several)."""
    modules = (module,) if isinstance(module, str) else module
    code = ("import sys\nfrom automask import cli\n"
            "status = cli.main(sys.argv[1:])\n"
            f"print(status, any(m in sys.modules for m in {modules!r}))")
    proc = subprocess.run([sys.executable, "-c", code, *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], (argv, proc.stdout, proc.stderr)
    assert says in proc.stderr, (argv, proc.stderr)


def test_show_models_reads_candidate_names_with_commas_whole():
    """Candidates of several options are named ``method=lora,seed=1``: ``--models`` split
    on every comma named none of them."""
    from automask.cli import _model_names

    known = {"method=full,seed=0", "method=full,seed=1", "method=lora,seed=0", "method=lora"}
    assert _model_names(["method=full,seed=1,method=lora,seed=0"], known) == [
        "method=full,seed=1", "method=lora,seed=0"]
    assert _model_names(["method=lora", "method=full,seed=0"], known) == [
        "method=lora", "method=full,seed=0"]
    # an unknown part stays whole for the error to name; a known one after it is read
    assert _model_names(["nope,method=lora"], known) == ["nope", "method=lora"]


def test_fit_errors_name_the_command_options_not_python_arguments(interrupted, capsys):
    """``automask fit`` said "pass resume=True (--resume) ... or overwrite=True" and, for
    ``--path ""``, "pass None for a new folder", which the command line cannot pass."""
    run, train = interrupted
    assert cli.main(["fit", "--train", str(train), "--path", str(run),
                     "--verbosity", "0"]) == 2
    err = capsys.readouterr().err
    assert "holds an interrupted fit; pass --resume to continue it or --overwrite to " \
           "start again" in err and "=True" not in err, err
    assert cli.main(["fit", "--train", str(train), "--path", "file:///tmp/r",
                     "--verbosity", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("automask: error: --path 'file:///tmp/r' is a URL"), err
    assert cli.main(["fit", "--train", str(train), "--path", "", "--verbosity", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("automask: error: --path is empty ('')")
    assert "None" not in err, err
    # the Python API keeps its own words
    from automask import SemanticSegmentor

    with pytest.raises(ConfigError, match=r"pass resume=True \(--resume\)"):
        SemanticSegmentor(path=run, verbosity=0).fit(str(train), presets="tiny")


def test_an_empty_option_is_refused_not_read_as_the_working_folder(interrupted, capsys,
                                                                    tmp_path, monkeypatch):
    """``show RUN --data ""`` drew the working folder's pictures, ``predict --boxes ""``
    predicted without prompts, ``leaderboard --out ""`` wrote nothing: all with status 0."""
    run, train = interrupted
    monkeypatch.chdir(tmp_path)
    cases = [["show", str(run), "--data", "", "--out", "e.png"],
             ["predict", str(run), "--data", str(train), "--out", "o", "--boxes", " "],
             ["leaderboard", str(run), "--out", ""],
             ["fit", "--train", str(train), "--path", "r", "--color-map", ""]]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        option = argv[[i for i, a in enumerate(argv) if not a.strip()][0] - 1]
        assert err.startswith(f"automask: error: {option} is empty"), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run", "train.csv"]


def test_score_reads_the_classes_txt_beside_the_ground_truths_as_fit_does(tmp_path, capsys):
    """classes.txt named four classes of 0/1 ground truths: scored as binary (its names
    dropped); through a value map that swaps ids, the names stayed in file order (car's
    perfect score printed as road's)."""
    for sub in ("gt", "pred"):
        (tmp_path / sub).mkdir()
    truth = np.zeros((20, 20), np.uint8)
    truth[5:15, 5:15] = 1
    pred = truth.copy()
    pred[5:8, 5:15] = 0
    Image.fromarray(truth).save(tmp_path / "gt" / "0.png")
    Image.fromarray(pred).save(tmp_path / "pred" / "0.png")
    (tmp_path / "classes.txt").write_text("0 background\n1 road\n2 car\n3 person\n")
    argv = ["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json"]
    assert cli.main(argv) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert cli.main([*argv, "--class-names", "background,road,car,person"]) == 0
    assert from_file == json.loads(capsys.readouterr().out)
    assert len(from_file["iou_per_class"]) == 4 and "miou" in from_file
    # one name per mask value, the values renumbered by --color-map: names follow the ids
    swap = tmp_path / "swap"
    for sub in ("gt", "pred"):
        (swap / sub).mkdir(parents=True)
    truth = np.zeros((12, 12), np.uint8)
    truth[:, 4:8], truth[:, 8:] = 1, 2  # values: 0 bg, 1 car, 2 road
    pred = np.zeros_like(truth)  # class ids: car (value 1) is class 2, road class 1
    pred[:, 4:8] = 2  # car right, road missed
    Image.fromarray(truth).save(swap / "gt" / "0.png")
    Image.fromarray(pred).save(swap / "pred" / "0.png")
    (swap / "classes.txt").write_text("bg\ncar\nroad\n")
    (swap / "map.txt").write_text("0 0\n1 2\n2 1\n")  # value -> class id
    assert cli.main(["score", "--pred", str(swap / "pred"), "--gt", str(swap / "gt"),
                     "--color-map", str(swap / "map.txt")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"1 road\s+0\.0000", out) and re.search(r"2 car\s+1\.0000", out), out


def test_params_refuses_what_fit_refuses(capsys):
    """``params --num-classes 300`` counted a model no fit builds; ``--methods
    lora,,bitfit`` named an unknown method ''."""
    assert cli.main(["params", "--backbone", "tiny", "--num-classes", "300"]) == 2
    assert "--num-classes must be an integer in [1, 255]" in capsys.readouterr().err
    assert cli.main(["params", "--backbone", "tiny", "--methods", "lora,,bitfit"]) == 2
    assert "--methods expects comma-separated names, got 'lora,,bitfit'" in \
        capsys.readouterr().err
    assert cli.main(["params", "--backbone", "tiny", "--methods", "lora,bitfit",
                     "--json"]) == 0
    assert [row["method"] for row in json.loads(capsys.readouterr().out)] == ["lora", "bitfit"]


def test_score_of_probability_maps_beside_a_classes_txt_naming_a_void_offers_void_label(
        tmp_path, capsys):
    """A predict --proba folder (3 classes) scored against masks whose classes.txt lists
    3 classes and the void "Unlabelled" last: the error names the file's 4 names and
    offers --void-label 3 (it said only "expected num_classes=4"), which then scores."""
    for sub in ("gt", "pred"):
        (tmp_path / sub).mkdir()
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (10, 12)).astype(np.uint8)
    truth[:2] = 3  # the void
    Image.fromarray(truth).save(tmp_path / "gt" / "0.png")
    probs = rng.random((3, 10, 12)).astype(np.float32)
    np.save(tmp_path / "pred" / "0.npy", probs / probs.sum(0, keepdims=True))
    (tmp_path / "gt" / "classes.txt").write_text("sky\nroad\ncar\nUnlabelled\n")
    argv = ["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "the classes.txt beside --gt has 4 names but the score maps have 3 classes" in err
    assert "pass --void-label 3" in err
    assert cli.main([*argv, "--void-label", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["iou_per_class"]) == 3
