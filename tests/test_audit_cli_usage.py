"""``score``/``score_folders`` refuse a non-integer ``ignore_index`` before
reading any file, and an argument a command does not take names that command's ``--help``.

Command-line checks run in a real subprocess (``sys.executable -m automask``)."""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from automask.metrics import score, score_folders
from test_cli import assert_one_line_error, run_cli


@pytest.fixture
def folders_with_a_broken_truth(tmp_path):
    """pred/{a,b}.png against gt/a.png and an empty (0-byte) gt/b.png."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    mask = np.zeros((12, 12), np.uint8)
    mask[3:9, 3:9] = 1
    for stem in ("a", "b"):
        Image.fromarray(mask).save(pred / f"{stem}.png")
    Image.fromarray(mask).save(gt / "a.png")
    (gt / "b.png").write_bytes(b"")
    return pred, gt


@pytest.mark.parametrize("bad", [2.5, 255.0, True, "255"])
def test_a_non_integer_ignore_index_is_refused_before_any_file_is_read(
        folders_with_a_broken_truth, bad):
    """The ignore_index is named, not the empty file a scoring would have stumbled on first
    (the files were read, and the empty one refused, before ignore_index was looked at)."""
    pred, gt = folders_with_a_broken_truth
    with pytest.raises(ValueError, match="empty file"):  # the files are read when it is valid
        score_folders(pred, gt, task="multiclass", ignore_index=255)
    with pytest.raises(ValueError, match=r"ignore_index must be an int .* got " + repr(bad)):
        score_folders(pred, gt, task="multiclass", ignore_index=bad)
    paths = [str(pred / "a.png"), str(pred / "b.png")], [str(gt / "a.png"), str(gt / "b.png")]
    with pytest.raises(ValueError, match=r"ignore_index must be an int .* got " + repr(bad)):
        score(*paths, task="multiclass", ignore_index=bad)


def test_an_argument_a_command_does_not_take_names_that_commands_help(tmp_path):
    """``automask predict RUN ... --path P`` (fit's option) is one line pointing at
    ``automask predict --help``, not at the top-level ``automask --help``; nothing is read
    or written."""
    proc = run_cli("predict", str(tmp_path / "run"), "--data", str(tmp_path / "d"), "--out",
                   str(tmp_path / "o"), "--path", "p")
    assert_one_line_error(proc, "unrecognized arguments: --path p",
                          "(see: automask predict --help)")
    proc = run_cli("score", "--pred", "p", "--gt", "g", "--bogus")
    assert_one_line_error(proc, "unrecognized arguments: --bogus", "automask score --help")
    proc = run_cli("nope")  # no command: the top-level help
    assert_one_line_error(proc, "'nope'", "(see: automask --help)")
    assert list(tmp_path.iterdir()) == []


def test_a_data_file_given_without_its_option_names_the_option(tmp_path):
    """``automask fit data.csv --path run`` (a positional CSV, as other tools take it) names
    ``--train`` rather than only calling the CSV unrecognized; nothing is written."""
    csv = tmp_path / "data.csv"
    csv.write_text("image,label\na.png,a_mask.png\n")
    proc = run_cli("fit", str(csv), "--path", str(tmp_path / "run"))
    assert_one_line_error(proc, f"unrecognized arguments: {csv}; give data files after their "
                          "option: fit --train CSV, or --images DIR --masks DIR",
                          "(see: automask fit --help)")
    proc = run_cli("evaluate", str(tmp_path / "run"), "--data", str(csv), str(tmp_path))
    assert_one_line_error(proc, "option: evaluate --data CSV, or --images DIR --masks DIR")
    proc = run_cli("fit", "--train", str(csv), "--path", str(tmp_path / "run"), "--bogus")
    assert_one_line_error(proc, "unrecognized arguments: --bogus (see: automask fit --help)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]


def test_a_data_folder_given_without_its_option_is_named_where_options_are_missing(tmp_path):
    """``automask predict RUN images/`` (the folder where ``--data`` goes): argparse reports
    the missing options first; the error adds the option the folder belongs to. The run
    directory, predict's own positional argument, is not taken for data."""
    (tmp_path / "run").mkdir()
    (tmp_path / "images").mkdir()
    proc = run_cli("predict", str(tmp_path / "run"), str(tmp_path / "images"))
    assert_one_line_error(proc, "the following arguments are required: --data, --out; give "
                          "data files after their option: predict --data (a CSV, an image "
                          "folder or an image file)", "(see: automask predict --help)")
    proc = run_cli("predict", str(tmp_path / "run"))  # nothing stray: no hint
    assert_one_line_error(proc, "required: --data, --out (see: automask predict --help)")
    proc = run_cli("predict", str(tmp_path / "run"), "--out", str(tmp_path / "images"))
    assert_one_line_error(proc, "required: --data (see: automask predict --help)")
    proc = run_cli("score", str(tmp_path / "images"), str(tmp_path / "images"))
    assert_one_line_error(proc, "required: --pred, --gt; give data files after their "
                          "option: score --pred and --gt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "run"]


def test_version_is_printed():
    """'automask --version' said 'the following arguments are required: command'."""
    import automask

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"automask {automask.__version__}"
