#!/usr/bin/env python3
"""The peer harness's AutoGluon worker (``../shared/peers/ag_worker.py``, imported from the
harness and run as it is) with glibc's ``malloc_trim`` between steps switched off.

``benchmarks/compare_peers.py --no-trim`` starts it in place of ``ag_worker.py``, and
automask's worker (``peer_worker_automask.py``) skips its trim under the same switch
(``PEER_NO_TRIM=1``), so that both libraries step as a fit does: on the pages the step
before freed, not on pages faulted in again after every step (``benchmarks/bench_trim.py``).
Everything else (the model, the step, the protocol, the figures) is the harness's.
"""
from __future__ import annotations

import os
import sys
import types


def main() -> None:
    peers = os.environ.get("PEERS_DIR")
    if not peers or not os.path.exists(os.path.join(peers, "ag_worker.py")):
        sys.exit("PEERS_DIR must name the peer harness's folder (ag_worker.py)")
    sys.path.insert(0, peers)
    import ag_worker  # noqa: E402  (the harness's worker, not a copy)

    if os.environ.get("PEER_NO_TRIM") == "1":
        ag_worker.LIBC = types.SimpleNamespace(malloc_trim=lambda pad: 0)
    ag_worker.main()


if __name__ == "__main__":
    main()
