"""tests/cli_process.py: a command or script forked from the server behaves as a fresh
``python -m automask`` or ``python script.py`` does (exit status, output, working
directory, environment, import path)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cli_process import run_automask, run_script


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


def test_a_forked_script_gives_what_a_fresh_interpreter_gives(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "helper.py").write_text("VALUE = 'from the script folder'\n")
    (scripts / "show.py").write_text(
        "import os, sys\n"
        "import helper  # found only when the script's folder leads sys.path\n"
        "print(__name__, sys.argv[1:], helper.VALUE, os.getcwd(), os.environ['AM_PROBE'])\n"
        "print(sorted(os.listdir('.')))  # the working directory is the caller's\n")
    # names the server imported are no globals of the script: this fails in both
    (scripts / "unimported.py").write_text("print(torch.zeros(1))\n")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "marker.txt").write_text("")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AM_PROBE": "caller's environment"}
    for name, args in (("show.py", ["a", "b c"]), ("unimported.py", [])):
        script = scripts / name
        want = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                              text=True, cwd=tmp_path / "work", env=env, timeout=300)
        got = run_script(script, *args, cwd=tmp_path / "work", env=env)
        assert (got.returncode, got.stdout) == (want.returncode, want.stdout), name
        assert got.stderr.splitlines()[-1:] == want.stderr.splitlines()[-1:], name
    assert got.returncode == 1 and "NameError: name 'torch'" in got.stderr
    shown = run_script(scripts / "show.py", "x", cwd=tmp_path / "work", env=env).stdout
    assert shown.splitlines() == [
        f"__main__ ['x'] from the script folder {tmp_path / 'work'} caller's environment",
        "['marker.txt']"]
