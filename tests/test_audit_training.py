"""Audit of losses and the training loop: void images, void batches, accumulation windows."""
from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from automask.config import OptimConfig
from automask.losses import IGNORE_INDEX, dice_loss, structure_loss
from automask.models import build_segmenter
from automask.peft import apply_peft
from automask.training.module import SegmentationModule

SIZE = 32


def _batch(n: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, SIZE, SIZE, generator=gen) > 0.5).long()  # (n, S, S)
    target[:, :, -5:] = IGNORE_INDEX  # some padding in every image
    return {"image": torch.randn(n, 3, SIZE, SIZE, generator=gen), "target": target,
            "resized_size": torch.tensor([[SIZE, SIZE]] * n)}


def _module(method: str = "lora", num_classes: int = 2, **segmenter) -> SegmentationModule:
    torch.manual_seed(0)
    outputs = 1 if num_classes == 2 else num_classes
    model = apply_peft(build_segmenter("tiny", num_classes=outputs, input_size=SIZE,
                                       checkpoint="random", **segmenter), method)
    task = "binary" if num_classes == 2 else "multiclass"
    return SegmentationModule(model, task=task, num_classes=num_classes,
                              optim=OptimConfig(grad_clip=0.0),
                              val_metric="iou" if task == "binary" else "miou")


@pytest.mark.parametrize("loss", [structure_loss, dice_loss])
def test_an_image_ignored_everywhere_does_not_dilute_the_batch_mean(loss):
    """Per-image losses: a batch [a, all-void] gives the loss and gradient of [a] alone."""
    gen = torch.Generator().manual_seed(1)
    target = torch.zeros(2, 40, 40, dtype=torch.long)
    target[0, 5:20, 8:30] = 1
    target[1] = IGNORE_INDEX
    logits = (torch.randn(2, 1, 40, 40, generator=gen) * 2).requires_grad_()
    both = loss(logits, target)
    (grad,) = torch.autograd.grad(both, logits)
    alone_logits = logits[:1].detach().clone().requires_grad_()
    alone = loss(alone_logits, target[:1])
    (alone_grad,) = torch.autograd.grad(alone, alone_logits)
    torch.testing.assert_close(both, alone)
    torch.testing.assert_close(grad[:1], alone_grad)
    assert not grad[1].any()


class _GradsAtStep(L.Callback):
    """The accumulated gradients each optimiser step sees (before clipping)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.model.named_parameters()
                           if p.grad is not None})


def _first_step_grads(batch: dict, batch_size: int, accumulate: int) -> dict:
    data = [{k: v[i] for k, v in batch.items()} for i in range(batch["image"].shape[0])]
    grab = _GradsAtStep()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[grab])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on workers and logging
        trainer.fit(_module(), torch.utils.data.DataLoader(data, batch_size=batch_size))
    return grab.grads[0]


@pytest.mark.parametrize("batch_size, accumulate", [(2, 2), (4, 2)])
def test_an_incomplete_accumulation_window_steps_with_its_images_mean(batch_size, accumulate):
    """A short last window (2 + 1 images, or a batch larger than the data) = one 3-image batch."""
    batch = _batch(3)
    accumulated = _first_step_grads(batch, batch_size, accumulate)
    single = _first_step_grads(batch, 3, 1)
    assert accumulated.keys() == single.keys()
    scale = max(g.abs().max() for g in single.values())
    for name, grad in single.items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-5 * scale, rtol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("case", ["conv_lora", "mask_classification"])
def test_a_batch_without_labelled_pixels_gives_zero_gradient(case):
    """An all-void batch trains nothing (Conv-LoRA's balancing, mask-classification CE)."""
    if case == "conv_lora":
        module = _module("conv_lora")
    else:
        module = _module("lora", num_classes=3, multiclass_head="mask_classification")
    module.train()
    batch = _batch(2)
    batch["target"].fill_(IGNORE_INDEX)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert grads  # the graph reached the trainable parameters
    moved = sorted(n for n, g in grads.items() if g.any())
    assert not moved, moved[:5]


def test_mask_classification_loss_skips_an_image_without_labelled_pixels():
    """The matched set loss of ``[a, void]`` is that of ``[a]``: a void image teaches nothing,
    not even "no object", and a batch of void images gives 0 with zero gradients."""
    from automask.models.mask_classification import MaskClassificationLoss

    gen = torch.Generator().manual_seed(0)
    loss_fn = MaskClassificationLoss(num_classes=3)
    class_logits = torch.randn(2, 5, 4, generator=gen, requires_grad=True)  # (B, Q, K + 1)
    mask_logits = torch.randn(2, 5, 8, 8, generator=gen, requires_grad=True)  # (B, Q, H, W)
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    target[1] = IGNORE_INDEX  # the second image is void everywhere
    both = loss_fn(class_logits, mask_logits, target)
    alone = loss_fn(class_logits[:1], mask_logits[:1], target[:1])
    torch.testing.assert_close(both, alone, rtol=1e-6, atol=0)
    both.backward()
    assert class_logits.grad[1].abs().max() == 0 and mask_logits.grad[1].abs().max() == 0
    assert class_logits.grad[0].abs().max() > 0  # the labelled image still trains

    class_logits.grad = None
    void = loss_fn(class_logits, mask_logits, torch.full_like(target, IGNORE_INDEX))
    void.backward()
    assert torch.isfinite(void) and void.item() == 0.0
    assert class_logits.grad.abs().max() == 0


def test_a_large_images_validation_windows_are_scored_as_one_image():
    """A large image is validated at native scale, a window per item: its windows are
    scored as one image (placed in their grid), not as images of their own. Scored one by
    one, every window without an object that the model leaves empty counted as a perfect
    image, and model selection kept an early model that predicted nothing (test IoU 0.000
    against 0.233 on Kvasir-SEG with the tiny preset, benchmarks/README.md)."""
    module = _module()
    S = 8  # windows of 8 x 8 pixels; a 2 x 2 grid of them (a 16 x 16 image)
    target = torch.zeros(16, 16, dtype=torch.long)
    target[2:6, 10:14] = 1  # the object lies in the top-right window only
    pred = torch.zeros(16, 16)  # the model predicts nothing anywhere
    pred[3:5, 11:13] = 1.0  # ... but for a quarter of the object
    boxes = [(0, 0), (0, 8), (8, 0), (8, 8)]
    # two batches split the image's windows; then a small image taken whole, perfect
    whole = torch.zeros(S, S, dtype=torch.long)
    whole[1:3, 1:3] = 1
    items = [(b, pred[t:t + S, c:c + S], target[t:t + S, c:c + S]) for b, (t, c) in
             enumerate(boxes)] + [(None, whole.float(), whole)]
    module.on_validation_epoch_start()
    for chunk in (items[:3], items[3:]):
        logits = torch.stack([torch.logit(p.clamp(1e-4, 1 - 1e-4))[None] for _, p, _ in chunk])
        batch = {"target": torch.stack([t for _, _, t in chunk]),
                 "resized_size": torch.tensor([[S, S]] * len(chunk)),
                 "index": torch.tensor([0 if b is not None else 1 for b, _, _ in chunk]),
                 "window": torch.tensor([(*boxes[b], S, S, int(b == 3)) if b is not None
                                         else (0, 0, 0, 0, 0) for b, _, _ in chunk])}
        module._update_metric(logits, batch)
    # scored in the step of the image's last window (callbacks read the metric before
    # on_validation_epoch_end)
    # the large image's IoU is 4 / 16 (a quarter of the object), the small one's 1
    assert float(module.val_metric.compute()) == pytest.approx((4 / 16 + 1.0) / 2)
    module.val_metric.reset()
    # without window boxes (the old scoring) the three empty windows counted as perfect
    module.val_metric.update([p for _, p, _ in items], [t for _, _, t in items])
    assert float(module.val_metric.compute()) == pytest.approx((1 + 1 + 4 / 16 + 1 + 1) / 5)
