"""Hardware choices: accelerator, precision, input size and gradient accumulation; torch's
threads within a container's CPU quota.

``auto`` values in the configuration are resolved here, once per fit, and the resolved
values are what the saved predictor records.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from pathlib import Path

import torch

from .config import Config
from .errors import ConfigError

CPU_INPUT_SIZE = 256
GPU_INPUT_SIZE = 1024
_RAN_TORCH_THREADS = False  # this process ran a fit or a prediction (see fork_safe_threads)


def fork_safe_threads() -> None:
    """Note that this process runs a fit or a prediction with torch's CPU threads: a process
    forked from it from now on starts with one torch thread.

    torch's OpenMP runtime (GNU libgomp in the pip wheels) does not survive a fork once its
    thread team has run: the child's first multi-threaded operation waits forever for
    threads it does not have (pytorch/pytorch#17199). ``multiprocessing``'s default start
    on Linux before Python 3.14 is a fork, so a ``Pool`` of workers predicting with an
    inherited predictor would hang; with one thread each (what torch's DataLoader gives its
    workers) they run. Workers started with "spawn" or "forkserver" keep every thread.
    """
    global _RAN_TORCH_THREADS
    _RAN_TORCH_THREADS = True


def _one_thread_in_forked_child() -> None:
    if _RAN_TORCH_THREADS and torch.get_num_threads() > 1:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_one_thread_in_forked_child)


def cpu_quota(root: str = "/sys/fs/cgroup", own: str = "/proc/self/cgroup") -> float | None:
    """CPUs' worth of time this process's cgroup may use (a container's ``docker --cpus``,
    a Kubernetes CPU limit), the tightest over the cgroup and its ancestors; None when no
    quota is set or none can be read (not Linux).

    cgroup v2's ``cpu.max`` (``"150000 100000"`` is 1.5 CPUs, ``"max 100000"`` none) or v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none). A quota throttles time
    and leaves every core of the host visible, to ``os.sched_getaffinity`` and to torch.
    """
    try:
        lines = Path(own).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2 (``unified`` on a hybrid v1 / v2 host)
            mounts, files = [Path(root), Path(root, "unified")], ("cpu.max",)
        elif "cpu" in controllers.split(","):
            mounts = [Path(root, name) for name in dict.fromkeys((controllers, "cpu",
                                                                   "cpu,cpuacct"))]
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        steps = [part for part in path.strip("/").split("/") if part]
        for mount in mounts:  # the cgroup and its ancestors; a container's own is its root
            for depth in range(len(steps), -1, -1):
                folder = mount.joinpath(*steps[:depth])
                try:
                    values = [folder.joinpath(name).read_text().split() for name in files]
                    if len(values) == 1:  # cpu.max: "quota period"
                        quota, period = values[0]
                    else:
                        quota, period = values[0][0], values[1][0]
                    if quota not in ("max", "-1") and int(period) > 0:
                        limits.append(int(quota) / int(period))
                except (OSError, ValueError, IndexError):
                    continue
    return min(limits) if limits else None


_QUOTA_APPLIED = False  # threads_within_cpu_quota ran in this process
_USER_THREADS = False  # OMP_NUM_THREADS or MKL_NUM_THREADS was set when it first ran


def threads_within_cpu_quota() -> int | None:
    """Lower torch's CPU threads to this process's CPU quota, once per process: returns the
    thread count set, or None when nothing changed.

    torch starts a thread per core it sees, and in a container with a CPU quota it sees the
    host's: more threads than the quota serves, all throttled together. Measured on 2
    cores (``benchmarks/bench_cpu_quota.py``), a vit_b Conv-LoRA prediction at 512 px in
    float32 took 6.67 s with 4 threads in a cgroup of 1 CPU against 5.93 s with the 1 set
    here, and 3.67 s with 8 threads in a cgroup of 2 CPUs against 3.40 s with 2; on a
    larger host the threads run at once and are throttled harder. The count becomes
    ``floor(quota)`` (at least 1) where torch has more. ``OMP_NUM_THREADS`` or
    ``MKL_NUM_THREADS`` in the environment is the user's choice and is kept.
    """
    global _QUOTA_APPLIED, _USER_THREADS
    if _QUOTA_APPLIED:
        return None
    _QUOTA_APPLIED = True
    _USER_THREADS = bool(os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"))
    if _USER_THREADS:
        return None
    quota = cpu_quota()
    if quota is None:
        return None
    budget = max(1, math.floor(quota))
    if torch.get_num_threads() <= budget:
        return None
    torch.set_num_threads(budget)
    return budget


def ready_cpu_threads() -> None:
    """What a fit, a prediction or an export does before it runs torch on the CPU's threads:
    :func:`fork_safe_threads` and :func:`threads_within_cpu_quota`."""
    fork_safe_threads()
    threads_within_cpu_quota()


def share_cpu_quota(processes: int) -> int | None:
    """Lower torch's CPU threads to this process's share of the CPU quota, when
    ``processes`` processes of one fit run on this machine: returns the thread count set,
    or None when nothing changed.

    Lightning's DDP launcher gives each process ``cores // processes`` threads, and sets
    ``OMP_NUM_THREADS`` to that, where the user had not set it: cores of the host, not the
    quota (2 processes in a container of 4 CPUs on a 64-core host: 32 threads each). Called
    in every process of a fit once Lightning has set that up
    (:class:`automask.training.callbacks.ThreadsWithinQuota`), it makes the count
    ``floor(quota) // processes`` (at least 1) where it is higher, ``OMP_NUM_THREADS``
    too. Threads the user chose (``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the
    environment when this process's first fit or prediction began) are kept.
    """
    if not _QUOTA_APPLIED:  # notes whether the user set the threads
        threads_within_cpu_quota()
    if _USER_THREADS or processes <= 1:
        return None
    quota = cpu_quota()
    if quota is None:
        return None
    budget = max(1, math.floor(quota) // processes)
    if torch.get_num_threads() <= budget:
        return None
    torch.set_num_threads(budget)
    if "OMP_NUM_THREADS" in os.environ:  # Lightning's count, which its subprocesses read
        os.environ["OMP_NUM_THREADS"] = str(budget)
    return budget


def cuda_usable(accelerator: str) -> bool:
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def mps_usable() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def check_hardware(accelerator: str, devices: str) -> None:
    """Raise :class:`ConfigError` when ``env.accelerator``/``env.devices`` ask for hardware that
    this machine does not have (instead of a Lightning error once training starts).

    ``cuda`` needs a usable CUDA device, ``gpu`` a CUDA or Apple MPS one (as in Lightning),
    ``mps`` Apple's MPS; on a CUDA machine (``auto``, ``gpu`` or ``cuda``), a device count
    or id beyond the devices present is rejected as well.
    """
    cuda = torch.cuda.is_available()
    missing_gpu = accelerator == "gpu" and not (cuda or mps_usable())
    if (accelerator == "cuda" and not cuda) or missing_gpu:
        raise ConfigError(
            f"invalid value {accelerator!r} for 'env.accelerator': this machine has no usable "
            "GPU (torch.cuda.is_available() is False); use 'auto' or 'cpu'"
        )
    if accelerator == "mps" and not mps_usable():
        raise ConfigError(
            f"invalid value {accelerator!r} for 'env.accelerator': Apple's MPS backend is not "
            "available here; use 'auto' or 'cpu'"
        )
    if accelerator in ("auto", "gpu", "cuda") and cuda and devices not in ("auto", "-1"):
        present = torch.cuda.device_count()
        ids = [int(d) for d in devices.split(",") if d.strip()] if "," in devices else []
        wanted = max(ids) + 1 if ids else int(devices)
        if wanted > present:
            raise ConfigError(
                f"invalid value {devices!r} for 'env.devices': this machine has {present} "
                "CUDA device(s)"
            )


def check_cpu_devices(accelerator: str, devices: str) -> None:
    """Raise :class:`ConfigError` for GPU ids or ``-1`` in ``env.devices`` on a fit that runs
    on the CPU, where Lightning takes only a number of processes (and would fail later with
    a TypeError)."""
    cuda = torch.cuda.is_available()
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not cuda)
    if on_cpu and (devices == "-1" or "," in devices):
        raise ConfigError(
            f"invalid value {devices!r} for 'env.devices': this fit runs on the CPU "
            f"(env.accelerator={accelerator!r}, CUDA available: {cuda}), where 'env.devices' "
            "is a number of processes such as 1 or 2, or 'auto'"
        )


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bfloat16 matrix instructions (AVX512-BF16, AMX).

    On x86 the CPU's own flags decide: oneDNN's check also answers True on AVX512 CPUs
    without BF16 instructions (Skylake, Cascade Lake), where bf16 is emulated and slower
    than float32. Elsewhere (ARM) oneDNN's check is that of the native instructions.
    """
    import platform

    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        cpu = torch.cpu
        flags = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                         "_is_amx_tile_supported")]
        if all(callable(flag) for flag in flags):  # otherwise (older torch): oneDNN's check
            try:
                return any(bool(flag()) for flag in flags)
            except RuntimeError:
                return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_supports_bf16() -> bool:
    """True where the CUDA card computes in bfloat16 natively (compute capability 8.0 on,
    or ROCm); ``torch.cuda.is_bf16_supported()`` alone also answers True on older cards,
    which only emulate it."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no emulation and no argument
        return bool(torch.cuda.is_bf16_supported())


def auto_precision(accelerator: str) -> str:
    """bf16-mixed where supported natively, 16-mixed on older GPUs, else 32-true."""
    if cuda_usable(accelerator):
        return "bf16-mixed" if cuda_supports_bf16() else "16-mixed"
    if accelerator in ("auto", "cpu") and cpu_supports_bf16():
        return "bf16-mixed"
    return "32-true"


def check_precision(accelerator: str, precision: str) -> None:
    """Raise :class:`ConfigError` for ``env.precision="16-mixed"`` on a fit that runs on the
    CPU: Lightning would train in bf16 instead while the predictor recorded fp16 (and
    predicted in float32)."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not cuda_usable(accelerator))
    if precision == "16-mixed" and on_cpu:
        bf16 = "'bf16-mixed', " if cpu_supports_bf16() else ""
        raise ConfigError(
            f"invalid value {precision!r} for 'env.precision': fp16 mixed precision needs a "
            f"CUDA GPU and this fit runs on the CPU (env.accelerator={accelerator!r}, "
            f"torch.cuda.is_available() is {torch.cuda.is_available()}); use {bf16}'32' "
            "or 'auto'"
        )


def _device_count(devices: str, accelerator: str) -> int:
    if devices == "auto":
        return max(1, torch.cuda.device_count()) if cuda_usable(accelerator) else 1
    if "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if devices.lstrip("-").isdigit():
        n = int(devices)
        if n == -1:
            return max(1, torch.cuda.device_count())
        return max(1, n)
    return 1


def interactive() -> bool:
    """True in an interactive session (a REPL or a notebook kernel)."""
    import sys

    return hasattr(sys, "ps1") or "ipykernel" in sys.modules


def fit_world_size(cfg: Config) -> int:
    """Processes of a fit with ``cfg``: devices per machine times ``env.num_nodes``.

    ``env.devices="auto"`` means one device on a CPU and in an interactive session (which
    cannot start the other processes), every GPU otherwise.
    """
    cpu = cfg.env.accelerator == "cpu" or not cuda_usable(cfg.env.accelerator)
    one = cfg.env.devices == "auto" and (cpu or interactive())
    devices = 1 if one else _device_count(cfg.env.devices, cfg.env.accelerator)
    return devices * cfg.env.num_nodes


DDP_STRATEGIES = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def distributed_strategy(cfg: Config) -> str:
    """The Lightning strategy of a fit with ``cfg``; ConfigError for one automask cannot run.

    One process: ``env.strategy`` as given. Several (``env.devices`` x ``env.num_nodes``):
    DDP with processes started from the script itself, by ``torchrun`` or by SLURM
    (``auto`` and ``ddp`` become ``ddp``, or ``ddp_find_unused_parameters_true`` for a
    method that declares :attr:`~automask.peft.base.PeftMethod.unused_parameters`).
    Strategies that train in worker processes the calling process cannot see into
    (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) and sharded ones (FSDP, DeepSpeed) are
    refused, as is a multi-process fit from an interactive session (a notebook).
    """
    from .peft import get_method

    strategy = cfg.env.strategy
    if fit_world_size(cfg) <= 1:
        return strategy
    if strategy in ("auto", "ddp"):
        unused = get_method(cfg.peft.method).unused_parameters
        strategy = "ddp_find_unused_parameters_true" if unused else "ddp"
    if strategy not in DDP_STRATEGIES:
        raise ConfigError(
            f"invalid value {cfg.env.strategy!r} for 'env.strategy' with "
            f"{fit_world_size(cfg)} processes: automask trains several devices with DDP "
            f"('auto' or one of {', '.join(DDP_STRATEGIES)}), started from a script, "
            "torchrun or SLURM"
        )
    if interactive():
        raise ConfigError(
            f"a fit on {fit_world_size(cfg)} processes cannot start from an interactive "
            "session (DDP re-runs the script in each process): run it as a script "
            "(python train.py, torchrun, automask fit), or set 'env.devices' to 1"
        )
    return strategy


def resolve_env(cfg: Config) -> tuple[Config, dict]:
    """Fill ``auto`` values of ``cfg`` and compute the Trainer's hardware arguments.

    Raises :class:`ConfigError` first when the accelerator or devices asked for are not
    present (:func:`check_hardware`).

    Returns
    -------
    (Config, dict)
        The configuration with ``model.input_size`` and ``env.precision`` resolved, and a
        dict with ``accelerator``, ``devices``, ``strategy``, ``precision`` and
        ``accumulate`` (gradient-accumulation steps reaching ``optim.effective_batch_size``).
    """
    accelerator = cfg.env.accelerator
    check_hardware(accelerator, cfg.env.devices)
    check_cpu_devices(accelerator, cfg.env.devices)
    gpu = cuda_usable(accelerator)
    input_size = cfg.model.input_size or (GPU_INPUT_SIZE if gpu else CPU_INPUT_SIZE)
    precision = cfg.env.precision
    if precision == "auto":
        precision = auto_precision(accelerator)
    if precision == "32":
        precision = "32-true"
    check_precision(accelerator, precision)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not gpu and not mps_usable())
    if precision == "bf16-mixed" and on_cpu and not cpu_supports_bf16():
        warnings.warn(
            "'bf16-mixed' for 'env.precision' on this CPU, which has no bf16 products "
            "(AVX512-BF16 or AMX): bf16 is emulated here, many times slower than float32 "
            "(a vit_b prediction at 512 px took 9x as long); 'auto' or '32' trains in "
            "float32. (Predictions of this predictor on such a CPU run in float32.)",
            stacklevel=2)
    world = fit_world_size(cfg)
    per_step = cfg.optim.batch_size * world
    wanted = cfg.optim.effective_batch_size
    accumulate = max(1, math.ceil(wanted / per_step))
    if per_step * accumulate != wanted:  # whole steps only: the effective batch moves
        steps = (f"{world} processes x 'optim.batch_size' {cfg.optim.batch_size} = {per_step}"
                 if world > 1 else f"'optim.batch_size' {per_step}")
        warnings.warn(
            f"{steps} images per step cannot make 'optim.effective_batch_size' {wanted}: "
            f"the effective batch is {per_step * accumulate} ({accumulate} step(s) of "
            f"{per_step}); set the effective batch to a multiple of {per_step}, or scale "
            "'optim.lr' by the ratio (linearly is the usual rule)", stacklevel=2)
    strategy = distributed_strategy(cfg)
    devices = cfg.env.devices
    devices_arg: int | str = int(devices) if devices.lstrip("-").isdigit() else devices
    if accelerator == "cpu" or (accelerator == "auto" and not gpu):
        accelerator, devices_arg = "cpu", 1 if devices == "auto" else devices_arg
    elif devices == "auto" and world == 1:
        devices_arg = 1  # an interactive session on a machine with several GPUs
    resolved = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, input_size=input_size),
        env=dataclasses.replace(cfg.env, precision=precision),
    )
    env = {
        "accelerator": "gpu" if accelerator == "cuda" else accelerator,
        "devices": devices_arg,
        "strategy": strategy,
        "precision": precision,
        "accumulate": accumulate,
    }
    return resolved, env


def inference_precision(device: torch.device, precision: str) -> str:
    """The precision a prediction on ``device`` runs in, for a model fit in ``precision``.

    ``bf16-mixed`` stays bf16 where ``device`` has native bf16 products (a CPU with
    AVX512-BF16 or AMX, :func:`cpu_supports_bf16`; a CUDA card of compute capability 8.0
    on, :func:`cuda_supports_bf16`). Elsewhere bf16 is emulated, many times slower than
    float32 (a vit_b Conv-LoRA prediction at 512 px on an AVX2 CPU: 32.1 s against
    3.5 s), so a model fit on a GPU or a bf16 CPU predicts there in float32, the
    precision its weights are kept in. ``16-mixed`` is float16 on a CUDA device only.
    Anything else is ``32-true``.
    """
    if precision == "bf16-mixed":
        native = cuda_supports_bf16() if device.type == "cuda" else cpu_supports_bf16()
        return precision if native else "32-true"
    if precision == "16-mixed" and device.type == "cuda":
        return precision
    return "32-true"


def autocast_context(device: torch.device, precision: str):
    """Autocast for a prediction on ``device`` of a model fit in ``precision``
    (:func:`inference_precision`)."""
    precision = inference_precision(device, precision)
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
