"""Out of memory in training: one retry with gradient checkpointing, or a clear error.

The model's encoder raises the error an accelerator raises (``torch.OutOfMemoryError``)
whenever it runs a training forward without gradient checkpointing, as on a card too small
for the backbone at that input size.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from automask import SemanticSegmentor
from automask.datasets import make_synthetic
from automask.models import SamSegmenter

HP = {"optim.max_epochs": 2, "model.input_size": 64, "optim.batch_size": 4}


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    return make_synthetic(12, size=64, num_classes=2, seed=3,
                          root=tmp_path_factory.mktemp("data"))


@pytest.fixture
def small_card(monkeypatch):
    """Training forwards without checkpointing fail; returns the checkpointing flag of
    every encoder call."""
    calls: list[bool] = []
    encode = SamSegmenter.encode

    def limited(self, images):
        calls.append(self.gradient_checkpointing)
        if self.training and torch.is_grad_enabled() and not self.gradient_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB "
                                         "(simulated)")
        return encode(self, images)

    monkeypatch.setattr(SamSegmenter, "encode", limited)
    return calls


def test_fit_retries_with_gradient_checkpointing(train, tmp_path, small_card):
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0)
    with pytest.warns(UserWarning, match="ran out of memory without gradient checkpointing"):
        seg.fit(train, presets="tiny", hyperparameters=HP)
    record = seg.models_[seg.best_model_]
    assert record.config.env.gradient_checkpointing is True  # the record says what ran
    assert record.epochs == 2 and len(record.history) == 2
    assert small_card[0] is False and small_card[-1] is True
    assert small_card.count(False) == 1  # one failed try, then checkpointing throughout
    loaded = SemanticSegmentor.load(seg.path_)  # the saved predictor is whole
    assert loaded.models_[loaded.best_model_].config.env.gradient_checkpointing is True
    assert len(loaded.predict(train.iloc[:2])) == 2


def test_the_retry_trains_as_a_fit_with_checkpointing_from_the_start(train, tmp_path,
                                                                     small_card):
    with pytest.warns(UserWarning, match="training it again"):
        retried = SemanticSegmentor(path=tmp_path / "a", verbosity=0, seed=5).fit(
            train, presets="tiny", hyperparameters=HP)
    chosen = SemanticSegmentor(path=tmp_path / "b", verbosity=0, seed=5).fit(
        train, presets="tiny", hyperparameters={**HP, "env.gradient_checkpointing": True})
    histories = [s.models_[s.best_model_].history for s in (retried, chosen)]
    assert histories[0] == histories[1] and len(histories[0]) == 2
    a, b = (s.predict_proba(train.iloc[:3]) for s in (retried, chosen))
    for x, y in zip(a, b):  # same seed, same draws: the same model
        assert np.array_equal(x, y)


def test_without_the_fallback_the_error_says_what_to_change(train, tmp_path, small_card):
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0)
    with pytest.raises(torch.OutOfMemoryError) as info:
        seg.fit(train, presets="tiny",
                hyperparameters={**HP, "env.checkpointing_on_oom": False})
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "env.gradient_checkpointing=True" in notes and "optim.batch_size" in notes
    assert small_card == [False]  # no second try


def test_out_of_memory_with_checkpointing_is_not_retried(train, tmp_path, monkeypatch):
    calls = []
    encode = SamSegmenter.encode

    def tiny_card(self, images):  # even checkpointed training does not fit
        calls.append(self.gradient_checkpointing)
        if self.training and torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return encode(self, images)

    monkeypatch.setattr(SamSegmenter, "encode", tiny_card)
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0)
    with pytest.raises(torch.OutOfMemoryError) as info:
        seg.fit(train, presets="tiny",
                hyperparameters={**HP, "env.gradient_checkpointing": True})
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "optim.batch_size" in notes and "env.gradient_checkpointing=True" not in notes
    assert calls == [True]


def test_a_later_out_of_memory_resumes_from_the_last_epoch(train, tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = []
    encode = SamSegmenter.encode

    def bigger_later(self, images):  # fits in epoch 0, not once epoch 0 is saved
        saved = any(run.glob(".automask_fit/checkpoints/*.ckpt"))
        calls.append((self.gradient_checkpointing, saved))
        if self.training and torch.is_grad_enabled() and saved and not self.gradient_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return encode(self, images)

    monkeypatch.setattr(SamSegmenter, "encode", bigger_later)
    seg = SemanticSegmentor(path=run, verbosity=0)
    with pytest.warns(UserWarning, match="training it again"):
        seg.fit(train, presets="tiny", hyperparameters={**HP, "optim.max_epochs": 3})
    record = seg.models_[seg.best_model_]
    assert record.epochs == 3 and [row["epoch"] for row in record.history] == [0, 1, 2]
    epoch0 = [c for c in calls if not c[1]]  # epoch 0 ran once, without checkpointing
    assert epoch0 and not any(flag for flag, _ in epoch0)
    after = calls[len(epoch0):]
    assert after[0] == (False, True) and all(flag for flag, _ in after[1:])
