"""The tutorials run as written (synthetic data, tiny preset), so the docs cannot rot.

Each runs as ``python tutorial.py`` would, forked from a process that imported the
libraries already (``tests/cli_process.py``; ``tests/test_cli_process.py`` checks that a
script run so gives what a fresh interpreter gives)."""
from __future__ import annotations

from pathlib import Path

import pytest
from cli_process import run_script

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.py"))


def test_every_tutorial_is_listed_in_the_index():
    index = (TUTORIALS[0].parent / "README.md").read_text()
    assert TUTORIALS and all(f"`{t.name}`" in index for t in TUTORIALS)


@pytest.mark.slow
@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(script, tmp_path):
    proc = run_script(script, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iou" in proc.stdout


@pytest.mark.parametrize("name, args", [("01_three_line_fit.py", ["only_images"]),
                                        ("05_export.py", ["a", "b", "c"]),
                                        ("06_prompts.py", ["only_images"]),
                                        ("07_multiclass.py", ["only_images"])])
def test_a_tutorial_given_the_wrong_arguments_stops_with_its_usage(name, args, tmp_path):
    """Arguments that are not the data a tutorial takes stop it with its usage, rather
    than running on synthetic data the user did not ask for."""
    proc = run_script(TUTORIALS[0].parent / name, *args, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "usage: python" in proc.stderr and "IMAGES_DIR MASKS_DIR" in proc.stderr
    assert "iou" not in proc.stdout and not any(tmp_path.iterdir())
