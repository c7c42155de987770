"""The LightningModule: training step, loss, validation metric and optimiser."""
from __future__ import annotations

import lightning as L
import torch

from ..config import OptimConfig
from ..errors import ConfigError
from ..losses import build_loss
from ..metrics import build_metrics
from ..peft import aux_loss
from .optim import build_optimizer, lr_lambda


def task_loss_name(loss: str, task: str) -> str:
    """The loss ``optim.loss`` names; ``auto`` is ``structure`` (binary) or ``ce_dice``."""
    if loss == "auto":
        return "structure" if task == "binary" else "ce_dice"
    return loss


class SegmentationModule(L.LightningModule):
    """Trains a SAM segmenter with a task loss plus the adapters' auxiliary losses.

    Parameters
    ----------
    model : SamSegmenter
        Segmenter with its PEFT method applied (only adapter and decoder weights trainable).
    task : {"binary", "multiclass"}
        Binary: one logit map, sigmoid. Multi-class: one map per class, softmax.
    num_classes : int
        Classes including background (2 for binary).
    optim : OptimConfig
        Learning rate, schedule, loss name and weight decay.
    val_metric : str
        Name of the validation metric in :data:`automask.metrics.METRICS`, logged as
        ``val_<name>``; computed on the device, on each image's unpadded region at the
        model's resolution.
    ignore_index : int
        Target value excluded from the loss and the metric (padding, void).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        task: str,
        num_classes: int,
        optim: OptimConfig,
        val_metric: str,
        ignore_index: int = 255,
    ):
        super().__init__()
        assert task in ("binary", "multiclass"), task
        self.model = model
        self.task = task
        self.optim = optim
        self.ignore_index = ignore_index
        self.loss_fn = build_loss(task_loss_name(optim.loss, task), task)
        self.mask_loss = None  # the mask-classification head trains with its matched loss
        if task == "multiclass" and getattr(model, "multiclass_head", "tokens") != "tokens":
            from ..models.mask_classification import MaskClassificationLoss

            if optim.loss != "auto":
                raise ConfigError(f"invalid value {optim.loss!r} for 'optim.loss': the "
                                  f"mask_classification head trains with its matched loss; "
                                  f"use 'auto'")
            self.mask_loss = MaskClassificationLoss(num_classes, ignore_index=ignore_index)
        self.val_metric_name = val_metric
        conventions = {"num_classes": num_classes, "ignore_index": ignore_index}
        if task == "binary":
            conventions = {}  # binary metrics take {0, 1} targets; void is handled per step
        self.val_metric = build_metrics(task, [val_metric], **conventions)[val_metric]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, C, S, S) logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.mask_loss is not None:
            class_logits, mask_logits = self.model.forward_queries(batch["image"])
            task_loss = self.mask_loss(class_logits, mask_logits, batch["target"])
        else:
            logits = self.model(batch["image"])
            task_loss = self.loss_fn(logits, batch["target"])
        extra = aux_loss(self.model)
        loss = task_loss + extra
        bs = batch["image"].shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=bs)
        if extra.requires_grad:
            self.log("train_aux_loss", extra, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.model(batch["image"]).float()
        preds, targets = [], []
        for i in range(logits.shape[0]):
            h, w = (int(v) for v in batch["resized_size"][i])
            region = logits[i, :, :h, :w]  # (C, h, w): the image without its padding
            target = batch["target"][i, :h, :w]
            if self.task == "binary":
                # Void pixels become true negatives on both sides: they leave IoU and Dice
                # (the validation metrics that select models) unchanged.
                keep = target != self.ignore_index
                preds.append(torch.sigmoid(region[0]) * keep)
                target = target * keep
            else:
                preds.append(region.argmax(0))
            targets.append(target)
        self.val_metric.update(preds, targets)
        self.log(
            f"val_{self.val_metric_name}",
            self.val_metric,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=logits.shape[0],
        )

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim.lr, self.optim.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(round(self.optim.warmup_ratio * total))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total, warmup, self.optim.lr_schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
