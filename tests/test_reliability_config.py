"""Configuration errors come from config resolution, before any work, and name key and value;
a preset's random weights never carry over to a real backbone without notice."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from automask import SemanticSegmentor
from automask.config import check_time_limit, resolve
from automask.data import AugmentConfig
from automask.data.transforms import augment
from automask.datasets import make_synthetic
from automask.errors import ConfigError
from automask.hardware import resolve_env

NAN, INF = float("nan"), float("inf")

BAD_VALUES = [
    ("optim.lr", NAN),
    ("optim.lr", INF),
    ("optim.lr", "nan"),  # as the command line passes it
    ("optim.weight_decay", INF),
    ("optim.grad_clip", NAN),
    ("optim.warmup_ratio", NAN),
    ("optim.val_check_interval", INF),
    ("data.holdout_frac", NAN),
    ("data.scale_min", NAN),
    ("data.scale_max", INF),
    ("data.rotate_degrees", NAN),
    ("data.color_jitter", NAN),
    ("data.color_jitter", 1.0),
    ("env.devices", "abc"),
    ("env.devices", "0"),
    ("env.devices", "-2"),
    ("env.devices", "1,a"),
    ("env.strategy", "ddpp"),
    ("env.strategy", "horovod"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_value_is_a_config_error_naming_key_and_value(key, value):
    with pytest.raises(ConfigError) as info:
        resolve("tiny", {key: value})
    message = str(info.value)
    assert repr(key) in message, message
    shown = repr(float(value)) if key.startswith(("optim", "data")) else repr(value)
    assert shown in message, message


@pytest.mark.parametrize(
    ("key", "value"),
    [("env.devices", "auto"), ("env.devices", "2"), ("env.devices", "-1"),
     ("env.devices", "0,1"), ("env.devices", "1,"), ("env.strategy", "ddp"),
     ("env.strategy", "ddp_find_unused_parameters_true"), ("env.strategy", "fsdp"),
     ("data.color_jitter", 0.99), ("optim.grad_clip", 0.0)],
)
def test_valid_values_pass(key, value):
    [(_, cfg)] = resolve("tiny", {key: value})
    section, name = key.split(".")
    assert str(getattr(getattr(cfg, section), name)) == str(value)


def test_color_jitter_range_matches_what_the_data_pipeline_accepts():
    """The largest accepted strength runs; 1.0 (refused by resolve) fails in the pipeline."""
    [(_, cfg)] = resolve("tiny", {"data.color_jitter": 0.999})
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out, _ = augment(image, None, AugmentConfig(color_jitter=cfg.data.color_jitter),
                     np.random.default_rng(0))
    assert out.shape == image.shape
    with pytest.raises(ValueError):
        AugmentConfig(color_jitter=1.0)


@pytest.mark.parametrize("value", [NAN, INF, -INF, 0, -5, "soon", True])
def test_check_time_limit_rejects(value):
    with pytest.raises(ConfigError) as info:
        check_time_limit(value)
    assert "'time_limit'" in str(info.value)


def test_check_time_limit_accepts():
    assert check_time_limit(None) is None
    assert check_time_limit(30) == 30.0
    assert check_time_limit("2.5") == 2.5


needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@needs_no_cuda
@pytest.mark.parametrize("accelerator", ["cuda"] + (
    [] if torch.backends.mps.is_available() else ["gpu", "mps"]))
def test_missing_accelerator_fails_in_resolve_and_resolve_env(accelerator):
    with pytest.raises(ConfigError, match="'env.accelerator'") as info:
        resolve("tiny", {"env.accelerator": accelerator})
    assert repr(accelerator) in str(info.value)
    [(_, cfg)] = resolve("tiny", {"env.accelerator": accelerator}, for_fit=False)
    with pytest.raises(ConfigError, match="'env.accelerator'"):
        resolve_env(cfg)


@needs_no_cuda
def test_saved_gpu_config_still_loads_on_a_cpu_machine():
    from automask.config import Config

    [(_, cfg)] = resolve("tiny", {"env.accelerator": "gpu"}, for_fit=False)
    assert Config.from_dict(cfg.to_dict()).env.accelerator == "gpu"


@needs_no_cuda
def test_fit_with_a_missing_gpu_fails_before_any_folder(tmp_path):
    frame = make_synthetic(4, size=(32, 32), num_classes=2, seed=0, root=tmp_path / "data")
    run = tmp_path / "run"
    seg = SemanticSegmentor(path=run, verbosity=0)
    with pytest.raises(ConfigError, match="'env.accelerator'"):
        seg.fit(frame, presets="tiny", hyperparameters={"env.accelerator": "cuda"})
    with pytest.raises(ConfigError, match="'optim.lr'"):
        seg.fit(frame, presets="tiny", hyperparameters={"optim.lr": NAN})
    assert not run.exists()


# --- random weights --------------------------------------------------------------------------
def test_tiny_preset_random_weights_stay_with_the_tiny_backbone(caplog):
    with caplog.at_level(logging.WARNING, logger="automask"):
        [(_, cfg)] = resolve("tiny", {"model.backbone": "vit_b"})
    assert cfg.model.backbone == "vit_b"
    assert cfg.model.checkpoint is None  # pretrained: cache, then the official download
    assert "random" not in caplog.text
    [(_, own)] = resolve("tiny")
    assert (own.model.backbone, own.model.checkpoint) == ("tiny", "random")


def test_candidates_over_backbones_each_get_their_weights():
    configs = dict(resolve("tiny", {"model.backbone": ["tiny", "vit_l"]}))
    assert configs["backbone=tiny"].model.checkpoint == "random"
    assert configs["backbone=vit_l"].model.checkpoint is None


def test_random_weights_on_a_real_backbone_when_asked_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="automask"):
        [(_, cfg)] = resolve("tiny", {"model.backbone": "vit_b", "model.checkpoint": "random"})
    assert cfg.model.checkpoint == "random"
    assert "randomly initialised" in caplog.text and "vit_b" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="automask"):
        resolve("tiny")  # the tiny backbone is random by design: no notice
        resolve(None, {"model.backbone": "vit_b", "model.checkpoint": "random"}, for_fit=False)
    assert "randomly initialised" not in caplog.text


def test_user_checkpoint_path_is_kept(tmp_path):
    path = str(tmp_path / "sam_vit_b.pth")
    [(_, cfg)] = resolve("tiny", {"model.backbone": "vit_b", "model.checkpoint": path})
    assert cfg.model.checkpoint == path


def test_finite_check_covers_every_float_field_of_owned_sections():
    """Guards new float fields: each one of optim and data rejects NaN by name."""
    import dataclasses

    from automask.config import DataConfig, EnvConfig, ModelConfig, OptimConfig

    checked = 0
    for section, cls in (("model", ModelConfig), ("optim", OptimConfig), ("data", DataConfig),
                         ("env", EnvConfig)):
        for f in dataclasses.fields(cls):
            if isinstance(f.default, float) and not isinstance(f.default, bool):
                with pytest.raises(ConfigError, match=f"'{section}.{f.name}'"):
                    cls(**{f.name: math.nan})
                checked += 1
    assert checked >= 10


def test_more_cuda_devices_than_present_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for devices in ("4", "1,2"):
        with pytest.raises(ConfigError, match="'env.devices'") as info:
            resolve("tiny", {"env.accelerator": "gpu", "env.devices": devices})
        assert repr(devices) in str(info.value)
    for devices in ("2", "0,1", "-1", "auto"):
        [(_, cfg)] = resolve("tiny", {"env.accelerator": "cuda", "env.devices": devices})
        assert cfg.env.devices == devices


@pytest.mark.parametrize("hp, needle", [
    ({"optim.lr": [1e-3, 0.001]}, "'optim.lr' repeats the value 0.001 (candidates [0] and [1]"),
    ({"peft.method": ["lora", "conv_lora", "lora"]},
     "'peft.method' repeats the value 'lora' (candidates [0] and [2]"),
    ({"optim.max_epochs": [1, 2, 1.0]}, "'optim.max_epochs' repeats the value 1.0"),
])
def test_a_candidate_list_repeating_a_value_is_refused(hp, needle, tmp_path):
    """A list asking for two candidates with the same value trained one, without a word
    (the command line already refused a repeated --hp value)."""
    with pytest.raises(ConfigError) as err:
        resolve("tiny", hp)
    assert needle in str(err.value) and "give each candidate's value once" in str(err.value)
    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0)
    frame = make_synthetic(4, size=32, root=tmp_path / "data")
    with pytest.raises(ConfigError, match="repeats the value"):
        seg.fit(frame, presets="tiny", hyperparameters=hp)
    assert not (tmp_path / "run").exists()  # refused before any folder


def test_distinct_candidate_values_and_crossed_methods_still_train_each_once():
    names = [n for n, _ in resolve("tiny", {"optim.lr": [1e-3, 2e-3]})]
    assert names == ["lr=0.001", "lr=0.002"]
    # a rank list crossed with a method without rank: duplicates merged, as before
    names = [n for n, _ in resolve("tiny", {"peft.rank": [2, 4],
                                            "peft.method": ["lora", "bitfit"]})]
    assert names == ["method=lora,rank=2", "method=lora,rank=4", "method=bitfit"]


def test_candidates_scored_on_other_validation_images_or_one_weights_file_are_refused(
        tmp_path):
    """A list of holdout fractions validated each candidate on other images, and the best was
    picked across them; two names that differ only in punctuation shared one weights file."""
    frame = make_synthetic(6, size=32, root=tmp_path / "data")
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0)
    with pytest.raises(ConfigError, match=r"'data.holdout_frac' cannot vary across "
                                          r"candidates \(\[0.2, 0.6\]\).*pass tuning_data"):
        seg.fit(frame, presets="tiny", hyperparameters={"data.holdout_frac": [0.2, 0.6]})
    with pytest.raises(ConfigError, match="would save their weights to the same file "
                                          "'checkpoint_a_b.pth.safetensors'"):
        seg.fit(frame, presets="tiny",
                hyperparameters={"model.checkpoint": ["a/b.pth", "a_b.pth"]})
    assert not (tmp_path / "run").exists()  # refused before any folder


def test_presets_none_is_the_default_preset(tmp_path):
    """As AutoGluon reads it: not the bare dataclass defaults, which no preset table shows."""
    frame = make_synthetic(6, size=32, root=tmp_path / "data")
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        frame, presets=None,
        hyperparameters={"model.backbone": "tiny", "model.checkpoint": "random",
                         "model.input_size": 32, "optim.max_epochs": 1,
                         "data.num_workers": 0})
    [(_, default)] = resolve("medium_quality", {
        "model.backbone": "tiny", "model.checkpoint": "random", "model.input_size": 32,
        "optim.max_epochs": 1, "data.num_workers": 0})
    used = seg.models_[seg.best_model_]["config"].to_dict()
    assert {k: v for k, v in used.items() if k != "env.precision"} == {
        k: v for k, v in default.to_dict().items() if k != "env.precision"}  # 'auto' resolved
    assert resolve(None, {})[0][1].optim.patience != default.optim.patience
