"""tests/cli_process.py: a command forked from the server behaves as a fresh
``python -m automask`` does (exit status, output, working directory, environment)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cli_process import run_automask


def fresh(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "automask", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_a_forked_command_gives_what_a_fresh_interpreter_gives(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            mask = (rng.random((16, 16)) > 0.5).astype(np.uint8) * 255
            Image.fromarray(mask).save(tmp_path / folder / f"{i}.png")
    # COLUMNS: argparse wraps --help to it, so the help shows whose environment it read
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "50"}
    cases = (  # relative paths: the working directory is the command's
        ["score", "--pred", "pred", "--gt", "gt", "--json"],
        ["fit", "--help"],
        ["score", "--pred", "pred", "--gt", "missing"],  # a one-line error, status 2
        ["params", "--backbone", "vit_x"],
    )
    for args in cases:
        want = fresh(*args, cwd=tmp_path, env=env)
        got = run_automask(*args, cwd=tmp_path, env=env)
        assert (got.returncode, got.stdout, got.stderr) == (
            want.returncode, want.stdout, want.stderr), args
    assert want.returncode == 2 and "vit_x" in want.stderr
    help_lines = run_automask("fit", "--help", env=env).stdout.splitlines()
    assert len(help_lines) > 10 and max(map(len, help_lines)) <= 50
    assert '"iou"' in run_automask(*cases[0], cwd=tmp_path).stdout


def test_output_to_a_file_and_a_timeout(tmp_path):
    with open(tmp_path / "out.txt", "w") as fh:
        proc = run_automask("--help", stdout=fh)
    assert proc.returncode == 0 and proc.stdout is None
    assert "usage: automask" in (tmp_path / "out.txt").read_text()
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):  # killed, and the server goes on
        run_automask("demo", "--path", str(tmp_path / "demo"), timeout=2)
    assert time.monotonic() - start < 60
    assert run_automask("params", "--backbone", "vit_x").returncode == 2
