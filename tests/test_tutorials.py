"""The tutorials run as written (synthetic data, tiny preset), so the docs cannot rot."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.py"))


def test_every_tutorial_is_listed_in_the_index():
    index = (TUTORIALS[0].parent / "README.md").read_text()
    assert TUTORIALS and all(f"`{t.name}`" in index for t in TUTORIALS)


@pytest.mark.slow
@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(script, tmp_path):
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iou" in proc.stdout
