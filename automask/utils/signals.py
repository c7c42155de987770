"""SIGTERM handled as Ctrl-C while files are written.

``docker stop``, SLURM's time limit and systemd end a process with SIGTERM, whose default
action kills it at once: a prediction writing masks left half of them (and a temporary
file) behind, where Ctrl-C's ``KeyboardInterrupt`` runs the cleanup that removes them.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``KeyboardInterrupt`` in the main thread.

    Only where SIGTERM has its default action (an application's own handler stays) and
    only in the main thread (the one Python delivers signals to); the default action
    comes back when the block ends.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
