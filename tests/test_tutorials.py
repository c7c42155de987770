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
