"""One process of a distributed fit, for tests/test_distributed.py (not a test module).

``python ddp_worker.py SPEC.json`` runs ``SemanticSegmentor.fit`` as a user's script does;
Lightning's DDP launcher re-runs this same command for the other local ranks. Spies
wrapped around automask's own functions record, per process, what it trained on and what
it wrote, into ``<out>/rank<R>.json``:

- ``seen``: ``[candidate, epoch, sample positions]`` of every training batch;
- ``steps``: per candidate, the optimiser steps taken, gradient accumulation and world size;
- ``digests``: per candidate, a SHA-256 of its trainable weights after the fit (replicas
  of one DDP model must agree);
- ``writes``: calls of the functions that write the predictor and the weights files.

``crash_after_epoch``: every process exits (status 3) once that epoch's resume checkpoint
is written, as a killed job would. ``nan``: ``{"candidate", "rank", "after"}`` makes the
loss NaN in that one process from its ``after``-th training batch of that candidate on.
``in_memory``: the training images and masks are given as numpy arrays, not paths.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    import automask
    from automask import saving
    from automask.training import callbacks, module, recipe
    from automask.training.module import SegmentationModule

    log: dict = {"seen": [], "steps": [], "digests": {}, "writes": []}
    current = {"name": None}

    train_step = SegmentationModule.training_step
    nan = spec.get("nan") or {}
    poison = {"on": False, "batches": 0}

    def spy_step(self, batch, batch_idx):
        log["seen"].append([current["name"], self.current_epoch, batch["index"].tolist()])
        poison["on"] = False
        if current["name"] == nan.get("candidate") and self.global_rank == nan["rank"]:
            poison["batches"] += 1
            poison["on"] = poison["batches"] > nan["after"]
        return train_step(self, batch, batch_idx)

    aux_loss = module.aux_loss

    def poisoned_aux_loss(model):
        value = aux_loss(model)
        return value + float("nan") if poison["on"] else value

    train_candidate = recipe.train_candidate

    def spy_candidate(name, *args, **kwargs):
        current["name"] = name
        outcome = train_candidate(name, *args, **kwargs)
        if outcome.model is not None:
            h = hashlib.sha256()
            for key, p in sorted(outcome.model.named_parameters()):
                if p.requires_grad:
                    h.update(key.encode())
                    h.update(p.detach().float().cpu().numpy().tobytes())
            log["digests"][name] = h.hexdigest()
        return outcome

    on_train_end = SegmentationModule.on_train_end

    def spy_train_end(self):
        t = self.trainer
        log["steps"].append({"candidate": current["name"], "global_step": t.global_step,
                             "epochs": t.current_epoch, "accumulate": t.accumulate_grad_batches,
                             "world": t.world_size, "batch_size": t.train_dataloader.batch_size})
        return on_train_end(self)

    save_predictor, write_weights = saving.save_predictor, saving.write_weights

    def spy_save(*args, **kwargs):
        log["writes"].append("save_predictor")
        return save_predictor(*args, **kwargs)

    def spy_write(model, folder, name):
        log["writes"].append(f"write_weights:{name}")
        return write_weights(model, folder, name)

    epoch_end = callbacks.EpochCheckpoint.on_train_epoch_end

    def spy_epoch_end(self, trainer, pl_module):
        epoch_end(self, trainer, pl_module)
        if trainer.current_epoch == spec.get("crash_after_epoch"):
            trainer.strategy.barrier()
            _dump(out, log)
            os._exit(3)

    SegmentationModule.training_step = spy_step
    module.aux_loss = poisoned_aux_loss
    SegmentationModule.on_train_end = spy_train_end
    recipe.train_candidate = spy_candidate
    saving.save_predictor = spy_save
    saving.write_weights = spy_write
    callbacks.EpochCheckpoint.on_train_epoch_end = spy_epoch_end

    seg = automask.SemanticSegmentor(path=spec["run"], verbosity=spec.get("verbosity", 1),
                                     eval_metric=spec.get("eval_metric"))
    tuning = pd.read_csv(spec["tuning"]) if spec.get("tuning") else None
    train = pd.read_csv(spec["train"])
    if spec.get("in_memory"):  # the training pictures as arrays, read by each process
        import numpy as np
        from PIL import Image

        for col in ("image", "label"):
            train[col] = pd.Series([np.asarray(Image.open(p)) for p in train[col]],
                                   dtype=object)
    seg.fit(train, tuning, presets="tiny",
            hyperparameters=spec["hyperparameters"],
            time_limit=spec.get("time_limit"), resume=spec.get("resume", False))
    log["best_model"] = seg.best_model_
    log["path"] = str(seg.path_)
    log["val_scores"] = {k: r.val_score for k, r in seg.models_.items()}
    log["stopped"] = {k: r.stopped for k, r in seg.models_.items()}
    if tuning is not None:  # every process can predict with any model, not only the last one
        first = next(iter(seg.models_))
        log["predicted"] = [int(m.sum()) for m in seg.predict(tuning.iloc[:2], model=first)]
    log["history"] = {k: [h["epoch"] for h in r.history] for k, r in seg.models_.items()}
    _dump(out, log)


def _dump(out: Path, log: dict) -> None:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else \
        int(os.environ.get("LOCAL_RANK", 0))
    log["rank"] = rank
    (out / f"rank{rank}.json").write_text(json.dumps(log))


if __name__ == "__main__":
    main()
