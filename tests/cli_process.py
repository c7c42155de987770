"""``python -m automask ...`` in a process of its own, forked from one that has imported
the libraries already.

A fresh ``python -m automask`` spends 5-7 s of a 2-core machine importing torch,
torchvision, Lightning, torchmetrics, scikit-learn and pandas before its command starts,
and the suite runs about a hundred commands. :func:`run_automask` sends each command to
a server process (one per pytest process, started on first use) that imported them
once; the server forks, and the child runs ``automask/__main__.py`` as ``python -m``
does (``runpy``), in its own working directory and environment, with its own standard
streams, and ends with the command's exit status. Everything after the imports is the
command's own: the same process boundary, files, exit codes and output as a fresh
interpreter gives. :func:`run_script` runs a Python script (the tutorials) the same way.

What a fork cannot show, fresh interpreters check elsewhere: which modules a command
imports (``tests/test_audit_cli.py``, ``tests/test_lazy.py``), start-up itself and the
README's ``automask demo`` (``tests/test_cli.py``), and signals (``tests/test_reliability_*``).

Run as a script, this file is the server: JSON requests on stdin, replies on stdout
(``ready``; then per request the child's pid and, when it has ended, its exit status).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import runpy
import select
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

# what the commands import; the server imports them before its first fork
PRELOAD = ("torch", "torchvision", "lightning", "torchmetrics", "sklearn.base", "pandas",
           "segment_anything", "PIL.Image", "automask.cli")


# ----------------------------------------------------------------------- the server
def _exit_code(code: object) -> int:
    """The exit status Python gives ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(request: dict, replies: int) -> None:
    """Run one command in the forked child; never returns."""
    code = 1
    try:
        os.close(replies)
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request.get("script")
        if script is None:  # `python -m automask ARGS`
            sys.path[0] = os.getcwd()  # `python -m` puts its working directory first
            sys.argv = ["-m", *request["args"]]  # runpy sets argv[0] to the module's file
        else:  # `python SCRIPT ARGS`: the script's folder first on the path
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            sys.argv = [script, *request["args"]]
        try:
            if script is None:
                runpy.run_module("automask", run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:  # an uncaught error: a traceback and status 1, as python gives
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a stream the command closed: nothing to flush
                stream.flush()
        os._exit(code)


def serve() -> None:
    """Import :data:`PRELOAD`, then fork a child per request until stdin closes."""
    import importlib

    replies = os.dup(1)
    os.dup2(2, 1)  # whatever an import prints goes to stderr, not into the replies
    for name in PRELOAD:
        importlib.import_module(name)
    os.write(replies, b"ready\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, replies)
        os.write(replies, f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        os.write(replies, f"{os.waitstatus_to_exitcode(status)}\n".encode())


# ----------------------------------------------------------------------- the client
class _Server:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.buffer = b""
        line = self.read_line(timeout=300)
        if line != "ready":
            raise RuntimeError(f"the automask command server did not start: {line!r}")

    def read_line(self, timeout: float | None) -> str | None:
        """The next reply line; None when ``timeout`` passes first."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the automask command server ended "
                                   f"(status {self.proc.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


_server: _Server | None = None
_lock = threading.Lock()


def run_automask(*args: str, cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, timeout: float = 600,
                 stdout=None) -> subprocess.CompletedProcess:
    """``subprocess.run([python, "-m", "automask", *args], capture_output=True,
    text=True, ...)``, the command forked from the server.

    ``env`` defaults to this process's environment with ``PYTHONUNBUFFERED=1``; ``stdout``
    may be an open text file, which receives the command's output (``.stdout`` is then
    None, as with ``subprocess.run``). Raises ``subprocess.TimeoutExpired`` after killing a
    command that runs past ``timeout`` seconds.
    """
    return _run(None, args, cwd=cwd, env=env, timeout=timeout, stdout=stdout)


def run_script(script: str | os.PathLike, *args: str, cwd: str | os.PathLike | None = None,
               env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run([python, script, *args], capture_output=True, text=True, ...)``,
    forked from the server as :func:`run_automask` is: the script runs as ``__main__``
    with its own folder first on ``sys.path``; the libraries it imports are the server's
    already imported modules, and a name it uses without importing fails as it would in a
    fresh interpreter."""
    return _run(os.path.abspath(script), args, cwd=cwd, env=env, timeout=timeout, stdout=None)


def _run(script: str | None, args, *, cwd, env, timeout, stdout) -> subprocess.CompletedProcess:
    global _server
    args = [str(a) for a in args]
    cmd = [sys.executable, *(["-m", "automask"] if script is None else [script]), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"} if env is None else dict(env)
    with _lock, tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        if _server is None or _server.proc.poll() is not None:
            _server = _Server()
        request = {"script": script, "args": args, "cwd": os.fspath(cwd or os.getcwd()),
                   "env": env, "stdout": str(out), "stderr": str(err)}
        pid = None
        try:
            _server.proc.stdin.write(json.dumps(request).encode() + b"\n")
            _server.proc.stdin.flush()
            pid = int(_server.read_line(timeout=60))
            status = _server.read_line(timeout=timeout)
        except BaseException:  # Ctrl-C, a dead server: end both; the next call starts anew
            if pid is not None:
                _kill(pid)
            _server.proc.kill()
            _server.proc.wait()
            _server = None
            raise
        if status is None:
            _kill(pid)
            _server.read_line(timeout=60)
            raise subprocess.TimeoutExpired(cmd, timeout, output=out.read_text(),
                                            stderr=err.read_text())
        text = out.read_text()
        if stdout is not None:
            stdout.write(text)
            stdout.flush()
            text = None
        return subprocess.CompletedProcess(cmd, int(status), text, err.read_text())


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.kill(pid, 9)


def _close() -> None:
    if _server is not None and _server.proc.poll() is None:
        _server.close()


if __name__ == "__main__":
    serve()
else:
    atexit.register(_close)
