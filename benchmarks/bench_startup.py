"""Benchmark: start-up time of the command line.

Times ``python -m automask --help`` and ``python -m automask <command> --help`` for each
subcommand in fresh subprocesses (median of ``--repeat`` runs, 5 by default), and reports
whether torch was imported (``-X importtime`` is not needed: a child prints
``"torch" in sys.modules`` after parsing).

Then a command that loads torch, Lightning and torchmetrics: ``automask score`` on a
folder of one 64x64 mask against itself, run as the ``automask`` script runs it
(``automask.cli.run``: the garbage collector's final pass skipped by ``gc.freeze``) and as
``sys.exit(main())`` (before), alternating, with the import time alone for reference.

Then the commands on a saved predictor (a ``tiny`` one fitted for one epoch on 8
synthetic 64x64 images; ``--predictor``): predict, evaluate, score, show, history and
params, median of ``--repeat`` fresh processes each, and which of Lightning, torchmetrics
and matplotlib each one imported (only ``fit`` needs Lightning; the metrics need
torchmetrics; pictures need matplotlib). Set ``PYTHONPATH`` to another checkout's root to
time that version with the same script.

Run from the repository root::

    python benchmarks/bench_startup.py [--repeat 5] [--commands fit predict] [--predictor]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = ["fit", "predict", "evaluate", "leaderboard", "params", "score", "demo", "show",
            "history"]


def time_help(args: list[str], repeat: int) -> float:
    """Median wall-clock seconds of ``python -m automask *args`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "automask", *args],
                              capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"automask {' '.join(args)} failed: {proc.stderr[-500:]}")
    return statistics.median(times)


def time_score(repeat: int) -> None:
    """``automask score`` (torch, Lightning, torchmetrics loaded) through ``cli.run`` and
    through ``sys.exit(main())``, alternating; and ``import automask.segmentor`` alone."""
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        masks = Path(tmp) / "masks"
        masks.mkdir()
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        Image.fromarray(mask).save(masks / "a.png")
        argv = ["score", "--pred", str(masks), "--gt", str(masks)]
        forms = {
            "automask score (cli.run: gc.freeze at exit)": ["-m", "automask", *argv],
            "automask score (sys.exit(main()), before)": [
                "-c", "import sys; from automask.cli import main; sys.exit(main())", *argv],
            "import automask.segmentor, exit (no command)": [
                "-c", "import automask.segmentor"],
        }
        times: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(repeat):
            for name, args in forms.items():
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
                times[name].append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed: {proc.stderr[-500:]}")
        for name, values in times.items():
            print(f"{name:<46}{statistics.median(values):.2f} s (median of {repeat})")


HEAVY = ("lightning", "torchmetrics", "matplotlib")


def time_saved_predictor(repeat: int) -> None:
    """Each command that reads a saved predictor, timed as the ``automask`` script runs,
    and the heavy libraries it imported (one more run through ``cli.main``)."""
    import numpy as np
    from PIL import Image

    wrapper = ("import sys; from automask.cli import main; rc = main(sys.argv[1:]); "
               f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules]); sys.exit(rc)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        for folder in ("images", "masks"):
            (root / folder).mkdir()
        for i in range(8):
            mask = np.zeros((64, 64), np.uint8)
            y, x = rng.integers(8, 40, size=2)
            mask[y:y + 20, x:x + 20] = 255
            image = np.repeat(mask[..., None] // 2 + rng.integers(0, 60, (64, 64, 1),
                                                                   dtype=np.uint8), 3, axis=2)
            Image.fromarray(image).save(root / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / "masks" / f"{i}.png")
        data = ["--images", str(root / "images"), "--masks", str(root / "masks")]
        run = str(root / "run")
        subprocess.run([sys.executable, "-m", "automask", "fit", *data, "--presets", "tiny",
                        "--hp", "optim.max_epochs=1", "--path", run, "--verbosity", "0"],
                       check=True, capture_output=True)
        commands = {
            "predict": lambda k: ["predict", run, "--data", str(root / "images"),
                                  "--out", str(root / f"pred{k}")],
            "evaluate": lambda k: ["evaluate", run, *data],
            "score": lambda k: ["score", "--pred", str(root / "masks"),
                                "--gt", str(root / "masks")],
            "show": lambda k: ["show", run, *data, "--out", str(root / f"show{k}.png")],
            "history": lambda k: ["history", run, "--out", str(root / f"history{k}.png")],
            "params": lambda k: ["params", "--backbone", "tiny"],
        }
        for name, argv in commands.items():
            times = []
            for k in range(repeat):
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "automask", *argv(k)],
                                      capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise SystemExit(f"automask {name} failed: {proc.stderr[-500:]}")
            proc = subprocess.run([sys.executable, "-c", wrapper, *argv("probe")],
                                  capture_output=True, text=True)
            heavy = next((line[6:] for line in proc.stdout.splitlines()
                          if line.startswith("HEAVY ")), f"? (exit {proc.returncode})")
            print(f"automask {name:<12}{statistics.median(times):.2f} s (median of {repeat}); "
                  f"imported {heavy}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--commands", nargs="*", default=None,
                        help="subcommands to time as well (default: all that exist)")
    parser.add_argument("--predictor", action="store_true",
                        help="only the commands on a saved predictor (skips the --help runs)")
    args = parser.parse_args()
    if args.predictor:
        time_saved_predictor(args.repeat)
        return
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - t0
    print(f"python -c pass                     {bare:.3f} s (interpreter start, one run)")
    print(f"automask --help                    {time_help(['--help'], args.repeat):.3f} s "
          f"(median of {args.repeat})")
    help_text = subprocess.run([sys.executable, "-m", "automask", "--help"],
                               capture_output=True, text=True).stdout
    commands = args.commands if args.commands is not None else [
        c for c in COMMANDS if c in help_text]
    for command in commands:
        seconds = time_help([command, "--help"], args.repeat)
        print(f"automask {command + ' --help':<26}{seconds:.3f} s")
    probe = ("import sys, contextlib, io\nimport automask.cli as c\n"
             "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
             "    c.main(['--help'])\nprint('torch imported:', 'torch' in sys.modules)")
    print(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip())
    time_score(args.repeat)


if __name__ == "__main__":
    main()
