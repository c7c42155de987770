"""Hardware and precision choices on simulated machines, and pictures of awkward inputs.

Other machines are simulated by monkeypatching torch's detection functions (CUDA, the
card's bf16 support, the CPU's instruction flags), so these run on any CPU."""
from __future__ import annotations

import os
import platform
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from automask import plots
from automask.config import resolve
from automask.errors import ConfigError, DataValidationError
from automask.hardware import (
    auto_precision,
    autocast_context,
    cpu_supports_bf16,
    inference_precision,
    resolve_env,
)


@pytest.fixture
def one_old_card(monkeypatch):
    """A machine with one CUDA card of compute capability 7.0 (a V100): bf16 emulated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 0))
    # as torch answers on such a card: True only when emulation counts
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_precision_is_fp16_on_a_card_that_only_emulates_bf16(one_old_card, monkeypatch):
    """auto precision: bf16 only on cards that run it natively, fp16 on older ones."""
    assert auto_precision("auto") == auto_precision("gpu") == "16-mixed"
    [(_, cfg)] = resolve("tiny", {"env.precision": "16-mixed"}, for_fit=False)
    assert resolve_env(cfg)[1]["precision"] == "16-mixed"  # asked for on a GPU: kept
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert auto_precision("auto") == "bf16-mixed"


def test_cpu_bf16_needs_the_avx512_bf16_or_amx_flags(cpu_only, monkeypatch):
    """auto precision on an x86 CPU: bf16 only with AVX512-BF16 or AMX, not on plain AVX512."""
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    # oneDNN's own check answers True on any AVX512 CPU (bf16 emulated there)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not cpu_supports_bf16()
    assert auto_precision("auto") == auto_precision("cpu") == "32-true"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_supports_bf16() and auto_precision("cpu") == "bf16-mixed"


def test_a_prediction_keeps_bf16_only_where_the_device_computes_it(one_old_card, monkeypatch):
    """A predictor fit in bf16 predicts in bf16 on a device with native bf16 products and
    in float32 elsewhere (a GPU fit used on a laptop CPU: emulated bf16 is many times
    slower); fp16 on a CUDA device only; float32 stays float32."""
    import automask.hardware as hardware

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    assert inference_precision(cpu, "bf16-mixed") == "32-true"
    assert inference_precision(cuda, "bf16-mixed") == "32-true"  # compute capability 7.0
    assert inference_precision(cuda, "16-mixed") == "16-mixed"
    assert inference_precision(cpu, "16-mixed") == "32-true"
    with autocast_context(cpu, "bf16-mixed"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert inference_precision(cpu, "bf16-mixed") == inference_precision(
        cuda, "bf16-mixed") == "bf16-mixed"
    for precision in ("32-true", "32"):
        assert inference_precision(cpu, precision) == inference_precision(
            cuda, precision) == "32-true"
    with autocast_context(cpu, "bf16-mixed"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast_context(cpu, "32-true"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("accelerator", ["auto", "cpu"])
def test_bf16_asked_for_on_a_cpu_that_emulates_it_warns(cpu_only, monkeypatch, accelerator):
    """env.precision='bf16-mixed' on a CPU without bf16 products: kept (it was asked for)
    with a warning naming the value and what to use; none where the CPU has them."""
    import automask.hardware as hardware

    [(_, cfg)] = resolve("tiny", {"env.precision": "bf16-mixed", "env.accelerator": accelerator},
                         for_fit=False)
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    with pytest.warns(UserWarning, match="'bf16-mixed' for 'env.precision'.*emulated") as info:
        assert resolve_env(cfg)[1]["precision"] == "bf16-mixed"
    assert "'32'" in str(info[0].message)
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_env(cfg)[1]["precision"] == "bf16-mixed"
    [(_, auto)] = resolve("tiny", {"env.accelerator": accelerator}, for_fit=False)
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_env(auto)[1]["precision"] == "32-true"  # 'auto' chose: no warning


@pytest.mark.parametrize("accelerator", ["auto", "cpu"])
def test_fp16_on_a_cpu_fit_is_refused_naming_the_value(cpu_only, accelerator):
    """env.precision='16-mixed' on a CPU: ConfigError, not a silent bf16 fit."""
    [(_, cfg)] = resolve("tiny", {"env.precision": "16-mixed", "env.accelerator": accelerator},
                         for_fit=False)
    with pytest.raises(ConfigError, match="'env.precision'") as info:
        resolve_env(cfg)
    assert "'16-mixed'" in str(info.value) and "CPU" in str(info.value)


@pytest.mark.parametrize("devices", ["3", "0,2"])
def test_more_gpus_than_present_with_auto_accelerator_is_refused(one_old_card, devices):
    """env.devices beyond the cards present: ConfigError naming it, also with accelerator auto."""
    with pytest.raises(ConfigError, match="'env.devices'") as info:
        resolve("tiny", {"env.devices": devices})
    assert repr(devices) in str(info.value) and "1 CUDA" in str(info.value)


@pytest.mark.parametrize("accelerator", ["auto", "cpu"])
@pytest.mark.parametrize("devices", ["-1", "0,1"])
def test_gpu_ids_on_a_cpu_fit_are_refused(cpu_only, accelerator, devices):
    """env.devices as GPU ids or -1 on a CPU fit: ConfigError, not Lightning's TypeError."""
    [(_, cfg)] = resolve("tiny", {"env.devices": devices, "env.accelerator": accelerator},
                         for_fit=False)
    with pytest.raises(ConfigError, match="'env.devices'") as info:
        resolve_env(cfg)
    assert repr(devices) in str(info.value) and "CPU" in str(info.value)
    [(_, cfg)] = resolve("tiny", {"env.devices": "2", "env.accelerator": accelerator,
                              "optim.batch_size": 4})
    assert resolve_env(cfg)[1]["devices"] == 2  # a count of CPU processes stays allowed


def test_an_effective_batch_that_whole_steps_cannot_make_is_warned_about():
    """6 with 4 per step became 8, 2 with 4 per step became 4, in silence."""
    def accumulate(batch, effective):
        [(_, cfg)] = resolve("tiny", {"env.accelerator": "cpu", "optim.batch_size": batch,
                                      "optim.effective_batch_size": effective})
        return resolve_env(cfg)[1]["accumulate"]

    with pytest.warns(UserWarning, match=r"'optim.effective_batch_size' 6: the effective "
                                         r"batch is 8 \(2 step\(s\) of 4\)"):
        assert accumulate(4, 6) == 2
    with pytest.warns(UserWarning, match=r"'optim.effective_batch_size' 2: the effective "
                                         r"batch is 4 \(1 step\(s\) of 4\)"):
        assert accumulate(4, 2) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # multiples: nothing to say
        assert (accumulate(2, 8), accumulate(4, 4), accumulate(1, 3)) == (4, 1, 3)


def _image(h=37, w=53):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)


@pytest.mark.parametrize("kind", ["gray", "gray1", "rgba", "float01"])
def test_grayscale_rgba_and_float_images_are_overlaid_like_rgb(kind):
    """plot_masks draws grayscale, RGBA and [0, 1] float images as their RGB equivalent."""
    rgb = _image()
    grey = np.repeat(rgb[..., :1], 3, axis=-1)
    image, expected = {"gray": (rgb[..., 0], grey), "gray1": (rgb[..., :1], grey),
                       "rgba": (np.dstack([rgb, rgb[..., :1]]), rgb),
                       "float01": (rgb / 255.0, rgb)}[kind]
    mask = (np.arange(37 * 53).reshape(37, 53) % 3 == 0).astype(np.uint8)
    fig = plots.plot_masks([image], {"p": [mask]}, [mask], task="binary")
    ref = plots.plot_masks([expected], {"p": [mask]}, [mask], task="binary")
    for ax, want in zip(fig.axes, ref.axes):
        np.testing.assert_array_equal(ax.images[0].get_array(), want.images[0].get_array())


def test_mask_of_another_size_or_an_empty_image_is_a_named_error():
    """A mask whose size differs from its image, or an empty image: DataValidationError."""
    image, mask = _image(), np.zeros((37, 53), np.uint8)
    with pytest.raises(DataValidationError, match=r"'p' mask of image 0 is \(30, 53\)"):
        plots.plot_masks([image], {"p": [mask[:30]]}, [mask], task="binary")
    with pytest.raises(DataValidationError, match="'ground truth' mask of image 0"):
        plots.plot_masks([image], {"p": [mask]}, [mask[:, :50]], task="binary")
    with pytest.raises(DataValidationError, match="image 0 has shape"):
        plots.plot_masks([np.zeros((0, 0, 3), np.uint8)], {"p": [mask[:0, :0]]}, None,
                         task="binary")


def test_class_ids_beyond_the_class_names_are_still_drawn():
    """Multi-class ids past the names given are coloured and listed, void apart."""
    mask = (np.arange(37 * 53).reshape(37, 53) % 5).astype(np.uint8)
    mask[:4] = 255
    fig = plots.plot_masks([_image()], {"p": [mask]}, None, task="multiclass",
                           class_names=["bg", "a"])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["0 bg", "1 a", "class 2", "class 3", "class 4", "ignored"]


def test_bad_save_paths_fail_by_name_before_any_work(tmp_path, monkeypatch):
    """A path that is a folder, under a file, or of an unknown format fails before drawing."""
    monkeypatch.setattr(plots, "blend", lambda *a, **k: pytest.fail("drew before the check"))
    (tmp_path / "file").write_text("x")
    mask = np.zeros((37, 53), np.uint8)
    for path, why in [(tmp_path, "is a folder"), (tmp_path / "file" / "x.png", "is a file"),
                      (tmp_path / "x.nope", "unknown format 'nope'")]:
        with pytest.raises(DataValidationError, match=why) as info:
            plots.plot_masks([_image()], {"p": [mask]}, None, task="binary", path=path)
        assert str(path) in str(info.value)
        with pytest.raises(DataValidationError, match=why):  # before any prediction
            plots.plot_predictions(object(), None, path=path)
        with pytest.raises(DataValidationError, match=why):  # before reading the logs
            plots.plot_history(tmp_path / "no_run", path=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing half-written


def test_a_picture_named_without_a_suffix_is_written_as_png_with_it_added(tmp_path):
    """As matplotlib's ``savefig``: ``path="preds"`` writes ``preds.png``, nothing else."""
    mask = np.zeros((37, 53), np.uint8)
    mask[5:20, 10:30] = 1
    plots.plot_masks([_image()], {"p": [mask]}, [mask], task="binary", path=tmp_path / "preds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.png"]
    with Image.open(tmp_path / "preds.png") as img:
        assert img.format == "PNG" and img.width > 100
    assert plots.check_path(tmp_path / "a.b" / "c") == tmp_path / "a.b" / "c.png"


# ------------------------------------------------------------------- a container's CPU quota
def _cgroups(tmp_path, own: str, files: dict[str, str]) -> tuple[str, str]:
    """A cgroup tree under ``tmp_path/fs`` and a ``/proc/self/cgroup`` naming ``own``."""
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    (tmp_path / "cgroup").write_text(own)
    return str(tmp_path / "fs"), str(tmp_path / "cgroup")


@pytest.mark.parametrize("own,files,expected", [
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, docker --cpus 1.5
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # no limit
    # a pod's limit on an ancestor binds the container's cgroup below it
    ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/cpu.max": "200000 100000",
                                "kubepods/pod1/c1/cpu.max": "max 100000"}, 2.0),
    ("0::/a\n", {"unified/a/cpu.max": "50000 100000"}, 0.5),  # v2 beside v1 (hybrid)
    # cgroup v1 without a cgroup namespace: the host's path, the container's own folder
    # mounted as the controller's root
    ("4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n",
     {"cpu,cpuacct/cpu.cfs_quota_us": "250000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
     2.5),
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ("0::/\n", {"cpu.max": "garbage"}, None),
    ("0::/\n", {}, None),
    ("not a cgroup line\n", {"cpu.max": "100000 100000"}, None),
])
def test_cpu_quota_reads_cgroup_v1_and_v2(tmp_path, own, files, expected):
    from automask.hardware import cpu_quota

    root, proc = _cgroups(tmp_path, own, files)
    assert cpu_quota(root=root, own=proc) == expected
    assert cpu_quota(root=root, own=str(tmp_path / "absent")) is None  # not Linux


def test_torch_threads_come_down_to_the_quota_once_unless_the_user_set_them(monkeypatch):
    """torch counts the host's cores; under a quota of 1.5 CPUs the threads become 1, once
    per process, and OMP_NUM_THREADS / MKL_NUM_THREADS set by the user are kept."""
    import automask.hardware as hardware
    from automask.data.loaders import default_num_workers

    previous = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(hardware, "cpu_quota", lambda *a, **k: 1.5)
        monkeypatch.setattr(hardware, "_QUOTA_APPLIED", False)
        monkeypatch.setattr(hardware, "_USER_THREADS", False)  # restored afterwards
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert hardware.threads_within_cpu_quota() is None and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(hardware, "_QUOTA_APPLIED", False)
        assert hardware.threads_within_cpu_quota() == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)  # the user's count after the first fit: kept
        assert hardware.threads_within_cpu_quota() is None and torch.get_num_threads() == 2
        monkeypatch.setattr(hardware, "_QUOTA_APPLIED", False)
        monkeypatch.setattr(hardware, "cpu_quota", lambda *a, **k: None)
        assert hardware.threads_within_cpu_quota() is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    # loader workers: none under a quota below 4 CPUs, whatever the affinity shows
    import automask.data.loaders as loaders

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)

    monkeypatch.setattr(loaders, "cpu_quota", lambda *a, **k: None)
    assert default_num_workers() == 4
    monkeypatch.setattr(loaders, "cpu_quota", lambda *a, **k: 2.5)
    assert default_num_workers() == 0
    monkeypatch.setattr(loaders, "cpu_quota", lambda *a, **k: 6.0)
    assert default_num_workers() == 4


def test_each_ddp_process_gets_its_share_of_the_quota(monkeypatch):
    """Lightning's DDP launcher sets each process's threads from the host's cores (and
    OMP_NUM_THREADS with them); the fit's callback brings them down to floor(quota) //
    processes, at least 1, unless the user had set the threads before the first fit."""
    from types import SimpleNamespace

    import automask.hardware as hardware
    from automask.training.callbacks import ThreadsWithinQuota

    def trainer(processes):
        strategy = SimpleNamespace(num_processes=processes) if processes else SimpleNamespace()
        return SimpleNamespace(strategy=strategy)

    previous = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "cpu_quota", lambda *a, **k: 4.5)
    monkeypatch.setattr(hardware, "_USER_THREADS", False)  # restored afterwards
    try:
        # the user's environment as the fit began: nothing set
        monkeypatch.setattr(hardware, "_QUOTA_APPLIED", False)
        torch.set_num_threads(4)
        assert hardware.threads_within_cpu_quota() is None  # 4 threads fit in 4.5 CPUs
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # Lightning's launcher: host cores // 2
        torch.set_num_threads(3)
        ThreadsWithinQuota().setup(trainer(2), None, "fit")
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        torch.set_num_threads(3)
        ThreadsWithinQuota().setup(trainer(8), None, "fit")
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        torch.set_num_threads(3)
        ThreadsWithinQuota().setup(trainer(None), None, "fit")  # one process: left alone
        assert torch.get_num_threads() == 3
        assert hardware.share_cpu_quota(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(hardware, "cpu_quota", lambda *a, **k: None)
        torch.set_num_threads(3)
        assert hardware.share_cpu_quota(2) is None and torch.get_num_threads() == 3
        # the user set OMP_NUM_THREADS before the first fit: kept in every process
        monkeypatch.setattr(hardware, "cpu_quota", lambda *a, **k: 4.5)
        monkeypatch.setattr(hardware, "_QUOTA_APPLIED", False)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        ThreadsWithinQuota().setup(trainer(2), None, "fit")
        assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    finally:
        torch.set_num_threads(previous)
