"""automask against AutoGluon MultiModal 1.6.3 (SAM + Conv-LoRA), interleaved in one run.

Uses the peer harness in ``../shared/peers`` (``driver.py`` and ``ag_worker.py``, imported
and started from there, never copied) with automask's own worker,
``benchmarks/peer_worker_automask.py``. For each configuration group (conv_lora training
at 1024 and 512 px, conv_lora inference at 1024 px; vit_b, batch 1, random weights) four
persistent workers are built: automask and AutoGluon, each in fp32 and under bf16 autocast.
Then ``--warmup`` untimed and ``--rounds`` timed rounds run one step of every worker in
turn, the order rotated each round, so that each ratio compares steps taken within one
round. Printed: seconds per step, per-round ratios automask / AutoGluon and their median
for fp32 vs fp32, bf16 vs bf16 and each library's default precision (automask: bf16 where
the CPU has native bf16, else fp32; AutoGluon: fp32 on CPU), and peak RSS of the default
workers. On a CPU without native bf16 only the fp32 workers run unless ``--precisions``
asks for bf16 (emulated there, many times slower, and neither library's choice).

AutoGluon runs in its own environment (``../shared/peers/README.md`` says how to build
it); point ``--ag-python`` or ``AG_PY`` at its interpreter. Without it the script prints
why and exits 0. Run from the repository root::

    python -m benchmarks.compare_peers --ag-python ../agenv/bin/python --rounds 3 --warmup 1
    python -m benchmarks.compare_peers --groups train512 --rounds 2   # a short check

The driver waits for a quiet CPU before each step and redoes a step whose CPU utilisation
shows another process took the cores; on a shared machine ``--max-wait`` and
``--util-min`` bound that (defaults: 20 s, 1.6 CPU-seconds per second).

Both workers return glibc's free memory to the OS after each step (``malloc_trim``), so
each step faults its pages in again (11-14% of automask's 512 px step,
``benchmarks/bench_trim.py``). ``--no-trim`` switches that off in both, AutoGluon's
through ``benchmarks/peer_worker_ag_no_trim.py`` (the harness's ``ag_worker.py``, run as
it is): the steps a fit takes.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "peer_worker_automask.py"
GROUPS = {
    "train1024": ("train", 1024),
    "train512": ("train", 512),
    "infer1024": ("infer", 1024),
}
AG_DEFAULT = "fp32"  # AutoGluon's precision on a CPU (its default)


def load_driver(peers_dir: Path):
    """Import the harness's ``driver.py`` from ``peers_dir`` as a module."""
    spec = importlib.util.spec_from_file_location("peers_driver", peers_dir / "driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def automask_default() -> str:
    """``"bf16"`` or ``"fp32"``: what automask's ``fit`` picks on this CPU."""
    sys.path.insert(0, str(ROOT))
    from automask.hardware import auto_precision

    return "bf16" if auto_precision("cpu") == "bf16-mixed" else "fp32"


def spec(lib: str, peft: str, dtype: str, mode: str, size: int) -> str:
    return f"{lib}:{peft}:{dtype}:{mode}:{size}"


def run_group(driver, name: str, args: argparse.Namespace, logdir: Path) -> dict:
    """Run one configuration group through the driver; returns its JSON summary."""
    mode, size = GROUPS[name]
    specs = [spec(lib, args.peft, dtype, mode, size)
             for dtype in args.precisions for lib in ("ag", "am")]
    out = logdir / f"{name}.json"
    argv = ["driver.py", "--rounds", str(args.rounds), "--warmup", str(args.warmup),
            "--out", str(out), "--logdir", str(logdir / name)]
    for s in specs:
        argv += ["--w", s]
    print(f"\n== {name}: {', '.join(specs)}", flush=True)
    saved = sys.argv
    sys.argv = argv
    try:
        driver.main()
    finally:
        sys.argv = saved
    return json.loads(out.read_text())


def ratio_row(summary: dict, am: str, ag: str) -> tuple[float, list[float]]:
    """Median and per-round ratios automask / AutoGluon of two workers' step times."""
    rounds = [a / b for a, b in zip(summary["times"][am], summary["times"][ag])]
    return statistics.median(rounds), rounds


def report(results: dict[str, dict], args: argparse.Namespace, am_default: str) -> str:
    """The issue's table (markdown) from the groups' summaries."""
    lines = [
        f"automask / AutoGluon, time per step (vit_b, batch 1, {args.peft}; median of "
        f"{args.rounds} rounds after {args.warmup} warm-up; per-round ratios in brackets). "
        f"Defaults: automask {am_default}, AutoGluon {AG_DEFAULT}.",
        "",
        "| configuration | fp32 vs fp32 | bf16 vs bf16 | each default | peak RSS, defaults "
        "(automask / AutoGluon) |",
        "|---|---|---|---|---|",
    ]
    for name, summary in results.items():
        mode, size = GROUPS[name]
        cells = []
        for am_dtype, ag_dtype in (("fp32", "fp32"), ("bf16", "bf16"), (am_default, AG_DEFAULT)):
            am = spec("am", args.peft, am_dtype, mode, size)
            ag = spec("ag", args.peft, ag_dtype, mode, size)
            if am not in summary["times"] or ag not in summary["times"]:
                cells.append("not run")  # --precisions left it out
                continue
            med, rounds = ratio_row(summary, am, ag)
            per_round = ", ".join(f"{r:.2f}" for r in rounds)
            cells.append(f"{med:.2f} ({summary['median'][am]:.2f} s vs "
                         f"{summary['median'][ag]:.2f} s) [{per_round}]")
        am = spec("am", args.peft, am_default, mode, size)
        ag = spec("ag", args.peft, AG_DEFAULT, mode, size)
        rss = summary["peak_rss_mib"]
        cells.append(f"{rss[am] / 1024:.2f} / {rss[ag] / 1024:.2f} GiB "
                     f"({rss[am] / rss[ag]:.2f}x)")
        label = f"{args.peft} {'train' if mode == 'train' else 'inference'}, {size} px"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the groups and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ag-python", default=os.environ.get("AG_PY"),
                        help="python of the AutoGluon environment (default: $AG_PY)")
    parser.add_argument("--peers-dir",
                        default=os.environ.get("PEERS_DIR", str(ROOT.parent / "shared" / "peers")),
                        help="the peer harness (default: ../shared/peers beside the checkout)")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--peft", default="conv_lora", choices=["conv_lora", "lora"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"],
                        help="workers' precisions (default: fp32 and bf16 on a CPU with native "
                             "bf16 products; fp32 alone on one without, where bf16 is "
                             "emulated and neither library picks it)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-wait", type=float, default=20.0,
                        help="longest wait (s) for a quiet CPU before each step")
    parser.add_argument("--util-min", type=float, default=1.6,
                        help="CPU-seconds per second below which a step is redone (<= 2 times)")
    parser.add_argument("--out", help="write every group's summary to this JSON file")
    parser.add_argument("--no-trim", action="store_true",
                        help="no malloc_trim between steps in either worker (AutoGluon's "
                             "through benchmarks/peer_worker_ag_no_trim.py, which runs the "
                             "harness's ag_worker.py): steps on the pages the step before "
                             "freed, as in a fit (benchmarks/bench_trim.py)")
    args = parser.parse_args(argv)

    peers = Path(args.peers_dir)
    if not (peers / "driver.py").exists() or not (peers / "ag_worker.py").exists():
        print(f"skipped: the peer harness (driver.py, ag_worker.py) is not in {peers}; "
              "pass --peers-dir", file=sys.stderr)
        return 0
    if not args.ag_python or not Path(args.ag_python).exists():
        print("skipped: no AutoGluon environment; build it as ../shared/peers/README.md shows "
              "and pass --ag-python PATH or set AG_PY", file=sys.stderr)
        return 0

    driver = load_driver(peers)
    driver.PY = {"ag": str(Path(args.ag_python).absolute()), "am": sys.executable}
    driver.SCRIPT = {"ag": str(peers / "ag_worker.py"), "am": str(WORKER)}
    if args.no_trim:  # read by both workers, which the driver starts with this environment
        os.environ["PEER_NO_TRIM"], os.environ["PEERS_DIR"] = "1", str(peers.absolute())
        driver.SCRIPT["ag"] = str(ROOT / "benchmarks" / "peer_worker_ag_no_trim.py")
    driver.UTIL_MIN = args.util_min
    driver.wait_quiet = functools.partial(driver.wait_quiet, max_wait=args.max_wait)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    am_default = automask_default()
    if args.precisions is None:
        args.precisions = ["fp32", "bf16"] if am_default == "bf16" else ["fp32"]

    results = {}
    with tempfile.TemporaryDirectory(prefix="compare_peers_") as tmp:
        for name in args.groups:
            results[name] = run_group(driver, name, args, Path(tmp))
            if args.out:  # after every group: a long run stopped early keeps what it has
                Path(args.out).write_text(json.dumps(results, indent=1))
            print(report({name: results[name]}, args, am_default), flush=True)
    print()
    print(report(results, args, am_default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
