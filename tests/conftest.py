"""Shared fixtures: the ../shared folder, a local HTTP server, an isolated cache."""
from __future__ import annotations

import functools
import gc
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _split_threads() -> None:
    """Under pytest-xdist, give each worker (and the processes it starts) its share of the
    cores, instead of every worker's torch starting one thread per core. Runs before any
    test module imports torch; an OMP_NUM_THREADS the user set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // workers))


_split_threads()


# The files that take longest (end-to-end fits, exports, fresh interpreters), longest first;
# seconds of one worker on a 2-core EPYC of family 23, 2026-12-07 (the CLI commands and
# the tutorials forked from tests/cli_process.py's server). pytest-xdist hands out whole
# files in collection order (setup.cfg: --no-loadscope-reorder; by default it orders them
# by their number of tests, which started the few long tests of test_tutorials.py and
# test_distributed.py last, the other worker idle meanwhile: 924 s, not 843 s). Any file
# not named keeps its place after these.
_LONGEST_FIRST = (
    "test_distributed.py",  # 148 s
    "test_export.py",  # 145 s
    "test_tutorials.py",  # 145 s
    "test_reliability_lifecycle.py",  # 122 s
    "test_cli.py",  # 94 s, 45 of them the README's demo in a fresh interpreter
    "test_segmentor.py",  # 55 s
    "test_audit_cli.py",  # 25 s
    "test_peft_methods.py",  # 21 s
    "test_frozen.py",  # 19 s
    "test_sam2.py",  # 19 s
)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Longest files first (see ``_LONGEST_FIRST``); a stable sort, so each file's tests,
    and the other files, keep their order."""
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_collection_finish(session) -> None:
    """Every test module, and with them torch and Lightning, is imported by now; their
    objects live until the run ends. ``gc.freeze`` takes them out of the collector's
    reach, so that its full collections stop walking them again and again (about half of
    the collector's time: tests/test_segmentor.py and test_peft_methods.py spent 3.05 s in
    it before, 1.55 s after)."""
    gc.freeze()


def shared_path(*parts: str) -> Path:
    """Path under ../shared; skips the test when absent, fails when CI requires it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"{path} is absent (the shared data folder sits beside the checkout)"
        if os.environ.get("AUTOMASK_REQUIRE_SHARED") == "1":
            pytest.fail(f"AUTOMASK_REQUIRE_SHARED=1 but {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own $AUTOMASK_HOME, so no test sees another's downloads."""
    monkeypatch.setenv("AUTOMASK_HOME", str(tmp_path_factory.mktemp("automask_home")))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def http_server():
    """Serve a folder on 127.0.0.1; yields ``serve(folder) -> base_url``."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def unwritable(monkeypatch):
    """``unwritable(folder)``: ``os.access`` says ``folder`` may not be written, as it says
    of a read-only folder to a user other than root (root may write anywhere, so a chmod
    alone proves nothing in a container)."""
    real_access = os.access
    locked: set[str] = set()

    def access(path, mode, **kwargs):
        if os.path.realpath(path) in locked and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return lambda folder: locked.add(os.path.realpath(folder))


def python_stdout(code: str) -> str:
    """What a fresh ``python -c code`` prints; its error output in the failure if it fails.
    For checks that need a process of their own (which modules an import loads)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def layer_norm_copies(encode, images) -> tuple[int, int]:
    """(layer norms run, copies made inside them) in one forward + backward of ``encode``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encode(images).float().mean().backward()
    norms = copies = 0
    for event in prof.events():
        if event.name in ("aten::native_layer_norm", "aten::native_layer_norm_backward"):
            norms += 1
        parent = event.cpu_parent
        while event.name == "aten::clone" and parent is not None:
            if parent.name.startswith("aten::native_layer_norm"):
                copies += 1
                break
            parent = parent.cpu_parent
    return norms, copies

