"""Several processes, one fit: who writes, what is shared, and how decisions agree.

A distributed fit runs the same ``fit`` call in every process: Lightning's DDP launcher
re-runs the user's script (or ``automask fit``) for each extra device, ``torchrun`` and
SLURM start every process themselves. Each process trains on its own share of the data
(:class:`automask.data.EpochSampler`, :class:`automask.data.ShardSampler`); gradients
and validation metrics are reduced across processes by DDP and torchmetrics.

Exactly one process, the global rank 0, writes the run directory: the lock, the resume
state, epoch checkpoints, logs and the predictor. The others keep what they need in
memory (a resumed fit reads the writer's checkpoint, which needs a filesystem shared by
the machines, as Lightning's own ``ckpt_path`` does). Decisions that must agree (skip a
candidate for lack of time, stop on a non-finite loss) are taken by rank 0 or reduced over
every process once the process group exists.
"""
from __future__ import annotations

import os
from typing import Any

import torch

# Environment variables that carry a process's rank: torchrun / torch elastic (RANK),
# Lightning's own launcher and multi-node launch (NODE_RANK, LOCAL_RANK), SLURM (SLURM_PROCID).
_RANK_VARIABLES = ("RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID")


def world_size(devices: int, num_nodes: int) -> int:
    """Processes of a fit on ``devices`` per machine and ``num_nodes`` machines."""
    return max(1, int(devices)) * max(1, int(num_nodes))


def is_writer(world: int) -> bool:
    """True in the one process of a fit that writes the run directory.

    With a world of one process every process is a writer (an independent fit).
    Otherwise the writer is global rank 0: the process whose launcher variables
    (``RANK``, ``NODE_RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``) are all 0 or absent; the
    process that Lightning's launcher starts first has none of them yet.
    """
    if world <= 1:
        return True
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "0").strip() or "0"
        if value.isdigit() and int(value) != 0:
            return False
    return True


def is_main_process() -> bool:
    """True in the process that writes a distributed fit's predictor (global rank 0),
    and in any process that is not part of a distributed run.

    A script launched on several devices runs in every process, past ``fit`` too; use it
    to do something once::

        seg.fit(train, hyperparameters={"env.devices": 4})
        if automask.is_main_process():
            print(seg.evaluate(test))
    """
    return is_writer(world=2)


def initialized() -> bool:
    """True once this process belongs to a process group of more than one process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` in every process (``value`` itself outside a process group)."""
    if not initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def any_process(flag: bool, device: torch.device | None = None) -> bool:
    """True in every process when ``flag`` is True in any of them."""
    if not initialized():
        return bool(flag)
    backend = torch.distributed.get_backend()
    device = device if device is not None and backend == "nccl" else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier() -> None:
    """Wait for every process of the group (nothing outside a process group)."""
    if initialized():
        torch.distributed.barrier()
