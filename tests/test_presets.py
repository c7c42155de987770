"""The paper's presets: the table's methods and the authors' per-dataset recipes."""
from __future__ import annotations

import pytest

from automask import SemanticSegmentor
from automask.config import resolve
from automask.datasets import BENCHMARKS, make_synthetic
from automask.errors import ConfigError
from automask.peft import PEFT_METHODS
from automask.presets import PAPER_DATASETS, PAPER_TABLE_METHODS, PRESETS

# The authors' script (AutoGluon examples/automm/Conv-LoRA/run_semantic_segmentation.py):
# dataset -> (validation metric, loss, epochs, learning rate).
AUTHORS = {
    "polyp": ("sm", "structure", 30, 1e-4),
    "isic2017": ("iou", "structure", 30, 1e-4),
    "camo": ("sm", "structure", 20, 1e-4),
    "sbu": ("ber_per_image", "balanced_bce", 10, 1e-4),  # their "ber": a per-image mean
    "leaf": ("iou", "structure", 30, 3e-4),
    "road": ("iou", "structure", 20, 3e-4),
}


def test_paper_table_lists_the_papers_methods_in_order():
    assert PAPER_TABLE_METHODS[0] == "scratch" and PAPER_TABLE_METHODS[-1] == "conv_lora"
    assert len(set(PAPER_TABLE_METHODS)) == len(PAPER_TABLE_METHODS) == 10
    methods = [cfg.peft.method for _, cfg in resolve("paper_table", {})]
    # Guarded: only the registered ones, in the paper's order.
    assert methods == [m for m in PAPER_TABLE_METHODS if m in PEFT_METHODS]
    assert {"decoder_only", "lora", "conv_lora"} <= set(methods) and "full" not in methods


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_dataset_presets_are_the_authors_settings(name):
    metric, loss, epochs, lr = AUTHORS[name]
    [(_, cfg)] = resolve(f"paper_{name}", {})
    [(_, paper)] = resolve("paper", {})
    assert (cfg.optim.select_metric, cfg.optim.loss, cfg.optim.max_epochs, cfg.optim.lr) == (
        metric, loss, epochs, lr)
    # Everything else is the paper's recipe.
    assert (cfg.model, cfg.peft, cfg.data, cfg.env) == (paper.model, paper.peft, paper.data,
                                                         paper.env)
    assert cfg.optim.effective_batch_size == paper.optim.effective_batch_size
    # the authors stretch every image whole to 1024 x 1024 (no native-scale crops or tiles)
    assert (paper.data.large_images, paper.data.resize) == ("resize", "square")
    assert paper.data.interpolation == "bicubic"  # the authors' torchvision Resize
    # AutoGluon's semantic-segmentation preset, kept by the authors' script: early stopping
    # after 10 validations without improvement, one validation per epoch
    assert (paper.optim.patience, paper.optim.val_check_interval) == (10, 1.0)
    table = resolve(f"paper_table_{name}", {})
    assert [c.peft.method for _, c in table] == [c.peft.method for _, c in
                                                 resolve("paper_table", {})]
    assert all(c.optim == cfg.optim for _, c in table)


def test_every_dataset_has_a_benchmark_and_two_presets():
    benchmark = {"polyp": "polyp", "isic2017": "isic2017", "camo": "camo_sem_seg",
                 "sbu": "SBU-shadow", "leaf": "leaf_disease_segmentation",
                 "road": "road_segmentation"}
    assert set(PAPER_DATASETS) == set(benchmark)
    assert set(benchmark.values()) == set(BENCHMARKS)
    for name in PAPER_DATASETS:
        assert f"paper_{name}" in PRESETS and f"paper_table_{name}" in PRESETS


def test_select_metric_is_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim\.select_metric'.*did you mean 'ber'"):
        resolve("paper_sbu", {"optim.select_metric": "bre"})
    frame = make_synthetic(4, size=64, seed=0, root=tmp_path / "data")
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="'optim.select_metric' cannot vary"):
        SemanticSegmentor(path=run, verbosity=0).fit(
            frame, presets="tiny", hyperparameters={"optim.select_metric": ["sm", "iou"]})
    with pytest.raises(ConfigError, match="'miou'"):
        SemanticSegmentor(path=run, verbosity=0).fit(
            frame, presets="tiny", hyperparameters={"optim.select_metric": "miou"})
    with pytest.raises(ConfigError, match=r"unknown eval_metric 'mIoU'; did you mean 'iou'\?"):
        SemanticSegmentor(path=run, verbosity=0, eval_metric="mIoU").fit(frame, presets="tiny")
    for empty in ("", " "):  # not the default in disguise
        with pytest.raises(ConfigError, match="eval_metric must be a metric name"):
            SemanticSegmentor(path=run, verbosity=0, eval_metric=empty).fit(frame, presets="tiny")
    assert not run.exists()
    with pytest.raises(ConfigError, match=r"'env\.seed'"):
        resolve("tiny", {"env.seed": -1})


def test_sbu_recipe_selects_by_ber_in_a_real_fit(tmp_path):
    frame = make_synthetic(8, size=64, seed=1, root=tmp_path / "data")
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
        frame, presets="paper_sbu",
        hyperparameters={"model.backbone": "tiny", "model.checkpoint": "random",
                         "model.input_size": 64, "optim.max_epochs": 2,
                         "optim.effective_batch_size": 2, "data.num_workers": 0})
    assert seg.eval_metric_ == "ber_per_image"  # the authors' BER (AutoGluon's, per image)
    info = seg.models_[seg.best_model_]
    assert info["config"].optim.loss == "balanced_bce"
    # BER is lower-is-better: the kept epoch has the lowest validation BER.
    history = [h["val_ber_per_image"] for h in info["history"]]
    assert len(history) == 2 and info["val_score"] == pytest.approx(min(history))
    assert "val_ber_per_image" in seg.leaderboard().columns
