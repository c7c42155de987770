"""The LightningModule: training step, loss, validation metric and optimiser."""
from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import GradClipAlgorithmType

from ..config import OptimConfig
from ..data.prompts import batch_prompts
from ..errors import ConfigError
from ..losses import build_loss, task_loss_name
from ..metrics import build_metrics
from ..peft import aux_loss
from ..peft.conv_lora import drop_unreached_expert_gradients
from . import distributed
from .embeddings import EmbeddingCache
from .optim import build_optimizer, lr_lambda
from .packing import pack_tensors, unpack_tensors


class NonFiniteLossError(RuntimeError):
    """The loss (or the validation output) became NaN or infinite; stops the candidate.

    :class:`SegmentationModule` does not raise it (an exception in one process of a
    distributed fit would leave the others waiting): it keeps its message in
    :attr:`SegmentationModule.stopped` and asks the Trainer to stop.
    """

    def __init__(self, epoch: int, step: int, where: str, value: float):
        self.epoch, self.step, self.where, self.value = epoch, step, where, value
        super().__init__(
            f"the {where} became {value} at epoch {epoch + 1}, step {step}: training "
            "diverged; "  # epochs counted from 1, as the progress lines count them
            "lower 'optim.lr', keep 'optim.grad_clip' on, or use 'env.precision=32'"
        )


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
    class_weight : Tensor, optional
        ``(K,)`` weights of the multi-class cross-entropy's classes (``optim.class_weights``,
        see :func:`automask.losses.class_weights`): the ``tokens`` head's cross-entropy,
        or the ``mask_classification`` head's matched loss.
    embedding_cache : EmbeddingCache, optional
        Image embeddings kept across epochs (only while the model's image encoder is
        frozen, see :mod:`automask.training.embeddings`): every batch gets the inputs'
        keys before it moves to the device (None for an image that will not come again),
        and training and validation steps take the kept embeddings instead of running the
        encoder again.

    Attributes
    ----------
    stopped : str or None
        Why training stopped early: the loss or the validation output became NaN or
        infinite (in any process of a distributed fit). The step that saw it updates
        nothing from that loss, the Trainer stops, and no later validation counts.
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
        class_weight: torch.Tensor | None = None,
        embedding_cache: EmbeddingCache | None = None,
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
            self.mask_loss = MaskClassificationLoss(num_classes, ignore_index=ignore_index,
                                                    class_weight=class_weight)
        assert class_weight is None or (task == "multiclass" and
                                        class_weight.shape == (num_classes,)), "plan checks"
        # moved with the module to its device; not saved (the predictor needs no loss)
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.val_metric_name = val_metric
        conventions = {"ignore_index": ignore_index}  # void pixels: see automask.metrics
        if task == "multiclass":
            conventions["num_classes"] = num_classes
        self.val_metric = build_metrics(task, [val_metric], **conventions)[val_metric]
        # A resume checkpoint holds the trainable weights only (see on_save_checkpoint).
        self.strict_loading = False
        self.stopped: str | None = None
        self._val_nonfinite = False
        # (row position, [(top, left, pred, target)]) of the large image whose windows
        # are being validated: scored as one sample once all are seen (_flush_windows)
        self._val_windows: tuple[int, list] | None = None
        self.embedding_cache = embedding_cache
        assert embedding_cache is None or model.encoder_is_frozen()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, C, S, S) logits

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.embedding_cache is not None and isinstance(batch, dict) and "image" in batch:
            # a module driven without a Trainer (tests, scripts) is training
            training = self._trainer is None or self.trainer.training
            batch["input_keys"] = self.embedding_cache.keys(
                batch["image"], batch.get("original_size"), training)
        return batch

    def _features(self, batch: dict):
        """The encoder's output for the batch from the embedding cache, or None (the
        model encodes the images itself)."""
        if self.embedding_cache is None or "input_keys" not in batch:
            return None
        return self.embedding_cache.features(self.model, batch["image"], batch["input_keys"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        features = self._features(batch)
        if self.mask_loss is not None:
            class_logits, mask_logits = self.model.forward_queries(batch["image"], features)
            task_loss = self.mask_loss(class_logits, mask_logits, batch["target"])
        else:
            prompts = batch_prompts(batch)  # None unless training with data.prompts
            logits = self.model(batch["image"], prompts, features)
            if self.class_weight is None:
                task_loss = self.loss_fn(logits, batch["target"])
            else:
                task_loss = self.loss_fn(logits, batch["target"], weight=self.class_weight)
        extra = aux_loss(self.model)
        # A batch without one labelled pixel (all void or padding) teaches nothing: the
        # auxiliary losses (Conv-LoRA's load balancing) and the mask-classification head's
        # no-object term would still give gradients, so the whole loss is multiplied by 0.
        # The factor is 1.0 otherwise (bit for bit the same loss), and no host sync.
        labelled = (batch["target"] != self.ignore_index).any().to(task_loss.dtype)
        loss = (task_loss + extra) * labelled
        finite = bool(torch.isfinite(loss.detach()))
        if distributed.any_process(not finite, loss.device):  # every process agrees
            value = float("nan") if finite else float(loss.detach())
            self._stop(NonFiniteLossError(self.current_epoch, self.global_step,
                                          "training loss", value))
            # A zero loss over every trainable parameter: a backward that DDP can reduce
            # (skipping the step is not allowed there). The weights restored afterwards
            # are the best epoch's, so this last update does not matter.
            return torch.stack([p.reshape(-1)[0] for p in self.parameters()
                                if p.requires_grad]).sum() * 0.0
        bs = batch["image"].shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=bs)
        if extra.requires_grad:
            self.log("train_aux_loss", extra, batch_size=bs)
        weight = self._window_weight(batch_idx, bs)
        return loss if weight == 1.0 else loss * weight

    def on_before_optimizer_step(self, optimizer) -> None:
        # Conv-LoRA's batched dispatch (on CUDA) gives the experts no sample reached a zero
        # gradient; as in the sparse dispatch they get none, so AdamW leaves them alone.
        drop_unreached_expert_gradients(self.model)

    def _window_weight(self, batch_idx: int, images: int) -> float:
        """Factor on a micro-batch's loss that makes an accumulated step the mean over the
        images of its accumulation window.

        Lightning divides every micro-batch's loss by ``accumulate_grad_batches``; that is
        the window's mean only when the window holds that many full batches. The last
        window of an epoch may hold fewer batches, or a smaller last batch (a batch size
        larger than the dataset included): without this factor its gradient would shrink
        by the missing share (half for one batch of a window of two). Exactly 1.0 for a
        full window, so full windows' arithmetic is untouched.
        """
        trainer = self._trainer
        acc = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        if trainer is None or acc == 1:
            return 1.0
        loader = trainer.train_dataloader
        batch_size = getattr(loader, "batch_size", None)
        sampler = getattr(loader, "sampler", None)
        total = trainer.num_training_batches  # batches this epoch (limit_train_batches applied)
        try:
            samples = len(sampler)
        except TypeError:  # no sampler, or one without a length: batch sizes unknown
            return 1.0
        if not batch_size or not math.isfinite(total) or samples < 1:
            return 1.0
        drop_last = bool(getattr(loader, "drop_last", False))
        batches = samples // batch_size if drop_last else -(-samples // batch_size)

        last = batch_size if drop_last else samples - (batches - 1) * batch_size

        def size(index: int) -> int:  # images in batch `index` of the epoch
            return last if index == batches - 1 else batch_size

        start = batch_idx - batch_idx % acc
        window = sum(size(i) for i in range(start, min(start + acc, int(total))))
        return acc * images / window if window > 0 else 1.0

    def _stop(self, error: NonFiniteLossError) -> None:
        if self.stopped is None:
            self.stopped = str(error)
        self.trainer.should_stop = True

    def on_validation_epoch_start(self) -> None:
        self._val_nonfinite = False
        self._val_windows = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.stopped is not None:  # the same in every process: nothing is logged
            return
        logits = self.model(batch["image"], None, self._features(batch)).float()
        if not torch.isfinite(logits).all():
            self._val_nonfinite = True  # decided across processes at the epoch's end
        else:
            self._update_metric(logits, batch)
        # Logged in every step of every process, so that the metric's reduction at the
        # epoch's end is reached by all of them.
        self.log(
            f"val_{self.val_metric_name}",
            self.val_metric,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=logits.shape[0],
        )

    def on_validation_epoch_end(self) -> None:
        self._flush_windows()  # windows of an image cut short (limit_val_batches)
        if self.stopped is None and distributed.any_process(self._val_nonfinite, self.device):
            self._stop(NonFiniteLossError(self.current_epoch, self.global_step,
                                          "validation output", float("nan")))

    def _update_metric(self, logits: torch.Tensor, batch: dict) -> None:
        preds, targets = [], []
        windows = batch.get("window")  # (B, 5): a large image's windows, or zeros
        if windows is not None:  # one transfer from the device for the batch
            windows, positions = windows.tolist(), batch["index"].tolist()
        for i in range(logits.shape[0]):
            h, w = (int(v) for v in batch["resized_size"][i])
            region = logits[i, :, :h, :w]  # (C, h, w): the image without its padding
            target = batch["target"][i, :h, :w]
            # void pixels (ignore_index) are left to the metric
            pred = torch.sigmoid(region[0]) if self.task == "binary" else region.argmax(0)
            if windows is not None and windows[i][2] > 0:
                self._gather_window(positions[i], windows[i], pred, target)
                if windows[i][4]:  # the image's last window: scored now, in this step
                    self._flush_windows()
                continue
            self._flush_windows()
            preds.append(pred)
            targets.append(target)
        if preds:
            self.val_metric.update(preds, targets)

    def _gather_window(self, position: int, box: list[int], pred: torch.Tensor,
                       target: torch.Tensor) -> None:
        """Keep a validation window of a large image (validated at native scale, a window
        per item) until its image's last window: they are adjacent in the loader's order,
        and one process sees them all (ShardSampler's groups). The metric is scored in
        the step that sees the last one, since callbacks may read it before
        ``on_validation_epoch_end``."""
        if self._val_windows is not None and self._val_windows[0] != position:
            self._flush_windows()
        if self._val_windows is None:
            self._val_windows = (position, [])
        self._val_windows[1].append((box[0], box[1], pred, target))

    def _flush_windows(self) -> None:
        """Score the windows kept by :meth:`_gather_window` as one sample: placed side by
        side in their grid order (a grid of ``tops x lefts``, each ``(h, w)``), they are
        the image when its grid is whole. Scored window by window, a per-image metric
        would count every window without an object that the model leaves empty as a
        perfect image, and select a model that predicts nothing."""
        if self._val_windows is None:
            return
        windows, self._val_windows = self._val_windows[1], None
        tops = sorted({top for top, _, _, _ in windows})
        lefts = sorted({left for _, left, _, _ in windows})
        h, w = windows[0][2].shape
        pred = windows[0][2].new_zeros((len(tops) * h, len(lefts) * w))
        target = windows[0][3].new_zeros((len(tops) * h, len(lefts) * w))
        for top, left, p, t in windows:
            assert p.shape == (h, w), (p.shape, h, w)  # a grid's windows share one size
            r, c = tops.index(top) * h, lefts.index(left) * w
            pred[r:r + h, c:c + w] = p
            target[r:r + h, c:c + w] = t
        self.val_metric.update([pred], [target])

    def configure_optimizers(self):
        # fused AdamW, unless a gradient scaler (16-mixed) must unscale before clipping:
        # Lightning leaves that to an optimiser that unscales inside its step, and refuses
        # to clip for it
        scaler = getattr(self.trainer.strategy.precision_plugin, "scaler", None)
        optimizer = build_optimizer(self.model, self.optim.lr, self.optim.weight_decay,
                                    fused=None if scaler is None else False,
                                    eps=self.optim.eps)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(round(self.optim.warmup_ratio * total))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total, warmup, self.optim.lr_schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Clip as Lightning does, also for the fused AdamW.

        Lightning's mixed-precision plugin refuses to clip for an optimiser that unscales
        gradients inside its step (fused AdamW), as it must under a gradient scaler. Without
        a scaler (bf16-mixed, 32) the gradients are not scaled, and clipping the optimiser's
        parameters here is what Lightning's own clipping does (norm or value).
        """
        if not gradient_clip_val or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                       gradient_clip_algorithm)
        assert getattr(self.trainer.strategy.precision_plugin, "scaler", None) is None, \
            "a fused optimiser under a gradient scaler"
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        if gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # ------------------------------------------------------- resume checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the weights that training changes, and the random generators' states; the
        small tensors packed into a few (:mod:`automask.training.packing`). Lightning calls
        this hook last, with everything else in the checkpoint."""
        keep = set(_saved_keys(self.model))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.removeprefix("model.") in keep}
        checkpoint["rng_states"] = _rng_states()
        pack_tensors(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Lightning calls this hook first, before it restores anything."""
        unpack_tensors(checkpoint)
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])


def _saved_keys(model: torch.nn.Module) -> list[str]:
    """Trainable parameters, or every entry for a randomly initialised backbone."""
    if getattr(model, "checkpoint_info", {}).get("source") == "random":
        return list(model.state_dict())
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _rng_states() -> dict:
    """Python, NumPy and torch generator states as plain values and tensors."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    assert kind == "MT19937", kind
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_states(states: dict) -> None:
    import random

    import numpy as np

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
