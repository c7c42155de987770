"""Optimiser groups, the learning-rate schedule, hardware resolution and the fit callbacks."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from automask.config import resolve
from automask.errors import ConfigError
from automask.hardware import CPU_INPUT_SIZE, resolve_env
from automask.models import build_segmenter
from automask.peft import apply_peft
from automask.training import BestTrainableWeights, build_optimizer, lr_lambda


def _tiny(method="conv_lora"):
    model = build_segmenter("tiny", input_size=64, checkpoint="random")
    return apply_peft(model, method)


def test_optimizer_holds_trainable_parameters_only_and_decays_matrices_only():
    model = _tiny()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    in_opt = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(in_opt) == trainable
    for pid, decay in in_opt.items():
        name = names[pid]
        no_decay = (name.endswith((".bias", "iou_token.weight", "mask_tokens.weight"))
                    or ".norm" in name or "pos" in name.rsplit(".", 1)[-1]
                    or "output_upscaling.1." in name)  # SAM's LayerNorm2d in the upscaler
        assert decay == (0.0 if no_decay else 0.05), name
    assert any(d == 0.05 for d in in_opt.values()) and any(d == 0 for d in in_opt.values())


def test_optimizer_eps_comes_from_the_config_and_the_paper_presets_take_the_authors(
        tmp_path, monkeypatch):
    import automask.training.module as module
    from automask import SemanticSegmentor
    from automask.config import Config
    from automask.datasets import make_synthetic

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("eps"))
        return build_optimizer(*args, **kwargs)
    monkeypatch.setattr(module, "build_optimizer", spy)
    frame = make_synthetic(4, size=32, root=tmp_path / "data")
    SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters={"optim.max_epochs": 1, "model.input_size": 32,
                                                "optim.eps": 3e-7})
    assert seen == [3e-7]
    model = _tiny()
    assert {g["eps"] for g in build_optimizer(model, 1e-3, 0.05).param_groups} == {1e-8}
    assert {g["eps"] for g in build_optimizer(model, 1e-3, 0.05, eps=1e-6).param_groups} == {
        1e-6}
    [(_, paper)] = resolve("paper", {})
    assert paper.optim.eps == 1e-6 and Config().optim.eps == 1e-8


def test_a_fit_resizes_training_and_validation_images_by_data_interpolation(
        tmp_path, monkeypatch):
    """data.interpolation reaches every dataset of a fit (training and validation) and the
    predictor's prediction; the default stays bilinear."""
    import automask.data.datamodule as datamodule
    import automask.data.loaders as loaders
    from automask import SemanticSegmentor
    from automask.config import Config
    from automask.datasets import make_synthetic

    seen = []

    class Spy(datamodule.SegmentationDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append((self.augment is not None, self.interpolation))
    monkeypatch.setattr(datamodule, "SegmentationDataset", Spy)  # training, validation
    monkeypatch.setattr(loaders, "SegmentationDataset", Spy)  # prediction
    frame = make_synthetic(4, size=(24, 40), root=tmp_path / "data")
    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters={"optim.max_epochs": 1, "model.input_size": 32,
                                                "data.interpolation": "bicubic"})
    assert (True, "bicubic") in seen and (False, "bicubic") in seen  # training, validation
    assert {mode for _, mode in seen} == {"bicubic"}
    seen.clear()
    seg.predict(frame.head(1))
    assert seen == [(False, "bicubic")]
    assert Config().data.interpolation == "bilinear"
    with pytest.raises(ConfigError, match="data.interpolation"):
        resolve("tiny", {"data.interpolation": "lanczos"})
    with pytest.raises(ConfigError, match=r"'optim\.eps'"):
        Config.from_dict({"optim.eps": 0})


def test_optimizer_is_fused_and_steps_as_the_plain_loop():
    """The fused AdamW (chosen where torch has fused kernels for the parameters' device):
    three steps move every parameter as torch's for-loop AdamW with the same groups does,
    to 1e-6; parameters without a gradient (experts no sample reached) stay put."""
    fused_model, loop_model = _tiny(), _tiny()
    loop_model.load_state_dict(fused_model.state_dict())
    before = {n: p.detach().clone() for n, p in fused_model.named_parameters()}
    fused = build_optimizer(fused_model, lr=1e-2, weight_decay=0.05)
    from torch.optim.optimizer import _get_fused_kernels_supported_devices
    if "cpu" not in _get_fused_kernels_supported_devices():  # before torch 2.4
        pytest.skip("this torch has no fused AdamW for CPUs")
    assert all(group["fused"] for group in fused.param_groups)
    loop = torch.optim.AdamW([{**g, "params": [dict(loop_model.named_parameters())[n]
                                                for n in _names(fused_model, g["params"])],
                               "fused": None, "foreach": False} for g in fused.param_groups])
    generator = torch.Generator().manual_seed(0)
    trainable = [n for n, p in fused_model.named_parameters() if p.requires_grad]
    skipped = trainable[-1]
    for _ in range(3):
        for name in trainable:
            grad = torch.randn(dict(fused_model.named_parameters())[name].shape,
                               generator=generator)
            for model in (fused_model, loop_model):
                param = dict(model.named_parameters())[name]
                param.grad = None if name == skipped else grad.clone()
        fused.step()
        loop.step()
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(dict(fused_model.named_parameters())[skipped], before[skipped])
    assert not torch.equal(dict(fused_model.named_parameters())[trainable[0]],
                           before[trainable[0]])


@pytest.mark.parametrize("precision,algorithm", [("bf16-mixed", "norm"), ("32-true", "value")])
def test_fit_clips_gradients_with_the_fused_optimizer(monkeypatch, precision, algorithm):
    """Through a Lightning fit (which refuses to clip for an optimiser that unscales inside
    its step): the fused AdamW is used, and the gradients it steps with are clipped to
    ``grad_clip`` (total norm, or each value)."""
    import warnings

    import lightning as L

    from automask.config import OptimConfig
    from automask.training.module import SegmentationModule

    clip = 1e-3 if algorithm == "norm" else 1e-6
    seen: list[tuple[bool, float]] = []
    step = torch.optim.AdamW.step

    def recording_step(self, closure=None):
        if closure is not None:  # Lightning's closure: forward, backward, clipping
            with torch.enable_grad():
                closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        size = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                      for g in grads]))
                if algorithm == "norm" else max(g.abs().max() for g in grads))
        seen.append((bool(self.defaults["fused"]), float(size)))
        return step(self)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    module = SegmentationModule(_tiny(), task="binary", num_classes=2,
                                optim=OptimConfig(lr=1e-3, grad_clip=clip), val_metric="iou")
    gen = torch.Generator().manual_seed(3)
    data = [{"image": torch.randn(3, 64, 64, generator=gen),
             "target": (torch.rand(64, 64, generator=gen) > 0.5).long(),
             "resized_size": torch.tensor([64, 64])} for _ in range(2)]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, precision=precision,
                        gradient_clip_val=clip, gradient_clip_algorithm=algorithm,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on workers and logging
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))
    assert len(seen) == 2
    for fused, size in seen:
        assert fused
        assert size <= clip * (1 + 1e-4)
    assert max(size for _, size in seen) > clip * 0.5  # clipped down to, not far below


def _names(model, params):
    ids = {id(p) for p in params}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_full_training_does_not_decay_position_tables():
    model = _tiny("full")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decay}
    assert "image_encoder.pos_embed" not in names
    assert not any("rel_pos" in n for n in names)
    assert "image_encoder.blocks.0.attn.qkv.weight" in names


def test_vpt_prompt_tokens_are_not_decayed():
    model = _tiny("vpt")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    prompts = [(n, p) for n, p in model.named_parameters() if n.endswith(".prompts")]
    assert prompts and all(p.ndim == 2 for _, p in prompts)
    assert {decay[id(p)] for _, p in prompts} == {0.0}
    assert any(d == 0.05 for d in decay.values())  # the decoder's matrices still are


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    fn = lr_lambda(total_steps=100, warmup_steps=10, schedule=schedule)
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)
    assert fn(10) == pytest.approx(1.0)
    if schedule == "constant":
        assert fn(99) == 1.0
    else:
        assert fn(55) == pytest.approx(0.5)
        assert fn(100) == pytest.approx(0.0, abs=1e-12)
        values = [fn(s) for s in range(10, 101)]
        assert all(a >= b for a, b in zip(values, values[1:]))


def test_resolve_env_fills_auto_values_on_this_cpu():
    [(_, cfg)] = resolve("medium_quality", {"env.accelerator": "cpu", "optim.batch_size": 3,
                                            "optim.effective_batch_size": 8})
    resolved, env = resolve_env(cfg)
    assert resolved.model.input_size == CPU_INPUT_SIZE
    assert env["accelerator"] == "cpu" and env["devices"] == 1
    assert env["accumulate"] == math.ceil(8 / 3)
    assert resolved.env.precision in ("bf16-mixed", "32-true")
    assert env["precision"] == resolved.env.precision


def test_resolve_env_accounts_for_devices_and_nodes_and_unused_parameters(monkeypatch):
    # a machine with 2 GPUs (resolve and resolve_env reject an accelerator that is absent)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    [(_, cfg)] = resolve("paper", {"env.devices": "2", "env.num_nodes": 2,
                                   "env.accelerator": "gpu", "peft.method": "full"})
    _, env = resolve_env(cfg)
    assert env["accumulate"] == 1  # batch 1 x 4 processes = effective batch 4
    assert env["devices"] == 2
    assert env["strategy"] == "ddp_find_unused_parameters_true"
    [(_, cfg)] = resolve("paper", {"env.devices": "0,1", "env.accelerator": "gpu"})
    _, env = resolve_env(cfg)  # Conv-LoRA: experts the router did not pick get no gradient
    assert env["accumulate"] == 2 and env["strategy"] == "ddp_find_unused_parameters_true"
    [(_, cfg)] = resolve("paper", {"env.devices": "0,1", "env.accelerator": "gpu",
                                   "peft.method": "lora"})
    assert resolve_env(cfg)[1]["strategy"] == "ddp"
    [(_, cfg)] = resolve("paper", {"env.devices": "1", "env.accelerator": "gpu"})
    assert resolve_env(cfg)[1]["strategy"] == "auto"  # one process: Lightning's choice
    # in a notebook "auto" devices is one GPU (DDP cannot start from there); 2 is refused
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    [(_, cfg)] = resolve("paper", {"env.accelerator": "gpu"})
    _, env = resolve_env(cfg)
    assert env["devices"] == 1 and env["strategy"] == "auto"
    with pytest.raises(ConfigError, match="interactive session"):
        resolve_env(resolve("paper", {"env.accelerator": "gpu", "env.devices": "2"})[0][1])


def test_best_weights_callback_restores_the_best_copy():
    model = _tiny("lora")

    class Trainer:
        sanity_checking = False
        current_epoch = 0
        global_step = 0
        callback_metrics: dict = {}

    class Module:
        pass

    module = Module()
    module.model = model
    best = BestTrainableWeights("val_iou", higher_is_better=True)
    trainer = Trainer()
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    for epoch, (score, fill) in enumerate([(0.5, 1.0), (0.7, 2.0), (0.6, 3.0)]):
        with torch.no_grad():
            param.fill_(fill)
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"val_iou": torch.tensor(score)}
        best.on_validation_end(trainer, module)
    assert best.best_score == pytest.approx(0.7) and best.best_epoch == 1
    assert len(best.history) == 3
    best.restore(model)
    assert torch.all(param == 2.0)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not set(frozen) & set(best.best_state)


def test_progress_callbacks_keep_one_state_at_every_verbosity(capsys):
    """A resume checkpoint holds the epoch lines' state whatever the verbosity, so a fit
    interrupted at one verbosity and resumed at another finds the same callbacks (Lightning
    warns about checkpointed callbacks the trainer lacks); at verbosity 0 nothing prints."""
    from automask.training.progress import EpochLines, progress_callbacks

    quiet, loud = progress_callbacks("a", 0), progress_callbacks("a", 1)
    assert [c.state_key for c in quiet] == [c.state_key for c in loud] == ["EpochLines"]
    assert isinstance(quiet[0], EpochLines) and quiet[0].silent and not loud[0].silent
    quiet[0]._write("a line")
    loud[0]._write("another line")
    assert capsys.readouterr().out == "another line\n"


def test_resumed_epoch_lines_and_fit_clock_count_the_time_before_the_interruption():
    """A resumed fit's lines show the seconds trained before the interruption plus its own
    (their eta comes from this process's epochs), and the candidate's training time adds
    the checkpointed seconds; both states round-trip through ``state_dict``."""
    from types import SimpleNamespace

    from automask.training.callbacks import FitClock
    from automask.training.progress import EpochLines

    lines = EpochLines("a", monitor="val_iou", silent=True)
    lines.load_state_dict({"best": 0.8, "best_epoch": 3, "elapsed": 125.0})
    trainer = SimpleNamespace(current_epoch=4, max_epochs=10, callbacks=[],
                              callback_metrics={"val_iou": torch.tensor(0.5)},
                              sanity_checking=False, is_global_zero=True)
    lines.on_train_start(trainer, None)
    line = lines._line(trainer)
    assert "best 0.8000 (epoch 3)" in line and "elapsed 2m05s" in line, line
    assert lines.state_dict()["elapsed"] >= 125.0
    clock = FitClock()
    clock.load_state_dict({"seconds": 40.0})
    clock.on_train_start(trainer, None)
    assert clock.state_dict()["seconds"] >= 40.0
    clock.on_train_end(trainer, None)
    assert 40.0 <= clock.seconds < 60.0
    fresh = FitClock()  # a fit that did not resume starts from 0
    fresh.on_train_start(trainer, None)
    fresh.on_train_end(trainer, None)
    assert 0.0 <= fresh.seconds < 20.0
