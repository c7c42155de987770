"""The paper's multi-class head: mask classification on SAM's mask decoder.

Instead of one mask token and one hypernetwork MLP per class (the ``tokens`` head), the
decoder runs :data:`NUM_QUERIES` mask queries that all share hypernetwork MLP 0; a linear
class head turns each query's output token into K + 1 logits (the K classes and "no
object"). Training matches queries to the ground-truth class masks of each image
(Hungarian matching) and supervises the matched pairs, MaskFormer-style; inference mixes
the query masks by their class probabilities.

This is the head of the Conv-LoRA authors' code (AutoGluon multimodal: SAM for
multi-class semantic segmentation with its Mask2Former loss). Its facts, kept here:

- queries: mask-token copies of SAM's pretrained mask token 0, all decoded by MLP 0. The
  authors' multi-class (Trans10k) tests use 10 queries; automask uses 7
  (:data:`NUM_QUERIES`), the most that reproduces the paper's printed Trans10k #Params
  (10 would print Conv-LoRA as 4.03M, not 4.02M);
- class head: one ``Linear(transformer_dim, K + 1)`` on each query's output token;
- matching cost: 1.0 x class (minus the predicted probability of the target class)
  + 5.0 x mask sigmoid BCE + 5.0 x mask Dice: transformers' ``Mask2FormerLoss`` as the
  authors ran it, whose matcher had the class cost fixed at 1.0 (transformers issue
  38559, 2025; later releases, and so AutoGluon 1.6.3, take ``class_weight``, 2.0, as
  Mask2Former's own configs do);
- loss: cross-entropy over K + 1 with the no-object class weighted 0.1, plus the matched
  masks' sigmoid BCE and Dice, summed with weight 1 each (the authors sum the three
  unweighted loss terms);
- inference: ``sum_q softmax(class_q)[k] * sigmoid(mask_q)`` for the K real classes.

Where automask differs: mask losses and costs use every labelled pixel at the input
resolution instead of 12544 sampled points, and ignore (void/padding) pixels are left out
of both (the authors' data code keeps a mask for the ignore value).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_QUERIES = 7
"""Mask queries of the head: the most that keeps the paper's Trans10k #Params (see above)."""
NO_OBJECT_WEIGHT = 0.1
"""Cross-entropy weight of the "no object" class."""
COST_CLASS, COST_MASK, COST_DICE = 1.0, 5.0, 5.0
"""Weights of the matching cost's class, mask-BCE and Dice terms."""
LOSS_CLASS, LOSS_MASK, LOSS_DICE = 1.0, 1.0, 1.0
"""Weights of the loss's cross-entropy, mask-BCE and Dice terms."""


def make_class_head(transformer_dim: int, num_classes: int, *, device=None,
                    dtype=None) -> nn.Linear:
    """``Linear(transformer_dim, num_classes + 1)``: logits of the K classes, then no-object."""
    return nn.Linear(transformer_dim, num_classes + 1, device=device, dtype=dtype)


def semantic_log_probs(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class scores (B, K, H, W) from query outputs, as log-probabilities.

    ``scores[k] = sum_q softmax(class_logits_q)[k] * sigmoid(mask_logits_q)`` over the K
    real classes (no-object dropped): MaskFormer's semantic inference. The log of the
    scores is returned, so ``softmax(dim=1)`` of the result gives the scores normalised
    over classes and ``argmax(dim=1)`` the MaskFormer prediction.

    Computed in float32, also under autocast. Each pixel's sigmoids are scaled by their
    largest one before the sum and the log of that scale is added back afterwards, so
    that scores far below 1 (every query's mask logit very negative) keep their order
    instead of underflowing to one floor value.

    Parameters
    ----------
    class_logits : Tensor
        (B, Q, K + 1) class logits of the queries.
    mask_logits : Tensor
        (B, Q, H, W) mask logits of the queries.

    Returns
    -------
    Tensor
        (B, K, H, W) float32 ``log(scores)``, always finite (a score that underflows
        even after the scaling is taken as the smallest normal float32 times the scale).
    """
    with torch.autocast(class_logits.device.type, enabled=False):
        probs = class_logits.float().softmax(-1)[..., :-1]  # (B, Q, K)
        log_masks = F.logsigmoid(mask_logits.float())  # (B, Q, H, W)
        top = log_masks.amax(1, keepdim=True)  # (B, 1, H, W)
        scaled = torch.einsum("bqk,bqhw->bkhw", probs, (log_masks - top).exp_())  # (B, K, H, W)
        return scaled.clamp_min(torch.finfo(torch.float32).tiny).log() + top


def image_targets(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """One image's class masks over its labelled pixels.

    Parameters
    ----------
    target : Tensor
        (H, W) class ids, ``ignore_index`` on void and padding.

    Returns
    -------
    classes : Tensor
        (M,) int64: the classes present, ascending.
    masks : Tensor
        (M, N) float32: 1 where the labelled pixel belongs to the class; N labelled pixels.
    valid : Tensor
        (H * W,) bool: which pixels are labelled.
    """
    flat = target.reshape(-1)
    valid = flat != ignore_index
    labels = flat[valid]  # (N,)
    classes = torch.unique(labels)  # (M,)
    masks = (labels.unsqueeze(0) == classes.unsqueeze(1)).float()  # (M, N)
    return classes, masks, valid


def _pairwise_bce(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(Q, M) mean sigmoid BCE of each prediction (Q, N) against each mask (M, N)."""
    pos = F.softplus(-logits)  # BCE where the label is 1
    neg = F.softplus(logits)  # BCE where the label is 0
    return (pos @ masks.T + neg @ (1.0 - masks).T) / logits.shape[1]


def _pairwise_dice(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(Q, M) Dice loss (smoothed by 1) of each prediction (Q, N) against each mask (M, N)."""
    probs = logits.sigmoid()
    inter = probs @ masks.T
    total = probs.sum(-1, keepdim=True) + masks.sum(-1).unsqueeze(0)
    return 1.0 - (2.0 * inter + 1.0) / (total + 1.0)


@torch.no_grad()
def hungarian_match(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    classes: torch.Tensor,
    masks: torch.Tensor,
    *,
    cost_class: float = COST_CLASS,
    cost_mask: float = COST_MASK,
    cost_dice: float = COST_DICE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign queries to one image's ground-truth masks at the lowest total cost.

    Parameters
    ----------
    class_logits : Tensor
        (Q, K + 1) class logits.
    mask_logits : Tensor
        (Q, N) mask logits on the image's labelled pixels.
    classes, masks : Tensor
        (M,) classes and (M, N) masks from :func:`image_targets`.
    cost_class, cost_mask, cost_dice : float
        Weights of ``-p(class)``, the mean sigmoid BCE and the Dice loss in the cost.

    Returns
    -------
    (queries, targets) : tuple of Tensor
        int64 index vectors of length ``min(Q, M)``: query ``queries[i]`` is matched to
        mask ``targets[i]``.
    """
    if classes.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=class_logits.device)
        return empty, empty
    logits = mask_logits.float()
    probs = class_logits.float().softmax(-1)  # (Q, K + 1)
    cost = (cost_class * -probs[:, classes]
            + cost_mask * _pairwise_bce(logits, masks)
            + cost_dice * _pairwise_dice(logits, masks))  # (Q, M)
    cost = torch.nan_to_num(cost, nan=0.0, posinf=1e10, neginf=-1e10)
    from scipy.optimize import linear_sum_assignment  # scipy loads with the first match

    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    device = class_logits.device
    return (torch.as_tensor(np.asarray(rows), dtype=torch.int64, device=device),
            torch.as_tensor(np.asarray(cols), dtype=torch.int64, device=device))


_NO_TARGET = -100  # class target of the queries of an image without labelled pixels


class MaskClassificationLoss(nn.Module):
    """Matched set loss of the mask-classification head.

    For each image, queries are matched to the classes present (:func:`hungarian_match`);
    the loss is ``LOSS_CLASS x`` cross-entropy over K + 1 classes (unmatched queries
    target no-object, weighted ``no_object_weight``) ``+ LOSS_MASK x`` mean sigmoid BCE
    ``+ LOSS_DICE x`` Dice of the matched masks, the mask terms summed over matched pairs
    and divided by the number of ground-truth masks in the batch. Ignore pixels take no
    part in the costs or the mask terms, and an image without a labelled pixel takes no part
    in the loss at all (a batch ``[a, void]`` gives what ``[a]`` gives). With
    ``class_weight``, a ground-truth mask of class ``c`` counts ``w_c`` times in every
    term: its query's cross-entropy (as ``F.cross_entropy(weight=...)`` weighs it) and its
    mask terms, which are divided by the sum of the matched masks' weights.

    Parameters
    ----------
    num_classes : int
        K, classes including background.
    ignore_index : int
        Target value of void and padding pixels.
    no_object_weight : float
        Cross-entropy weight of the no-object class.
    class_weight : Tensor, optional
        (K,) weight of each class (``optim.class_weights``); 1 for every class when None.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255,
                 no_object_weight: float = NO_OBJECT_WEIGHT,
                 class_weight: torch.Tensor | None = None):
        super().__init__()
        assert num_classes >= 2, num_classes
        assert class_weight is None or class_weight.shape == (num_classes,), class_weight
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        weight = torch.ones(num_classes + 1)
        if class_weight is not None:
            weight[:-1] = class_weight
        weight[-1] = no_object_weight
        self.register_buffer("class_weight", weight, persistent=False)

    def forward(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        """Scalar loss.

        Parameters
        ----------
        class_logits : Tensor
            (B, Q, K + 1) class logits.
        mask_logits : Tensor
            (B, Q, H, W) mask logits at the target's resolution.
        target : Tensor
            (B, H, W) class ids, ``ignore_index`` where unlabelled.
        """
        batch, queries, _ = class_logits.shape
        assert mask_logits.shape[:2] == (batch, queries), (mask_logits.shape, queries)
        assert mask_logits.shape[-2:] == target.shape[-2:], (mask_logits.shape, target.shape)
        class_target = torch.full((batch, queries), self.num_classes, dtype=torch.int64,
                                  device=class_logits.device)  # no-object by default
        bce = mask_logits.new_zeros((), dtype=torch.float32)
        dice = mask_logits.new_zeros((), dtype=torch.float32)
        mass = mask_logits.new_zeros((), dtype=torch.float32)  # sum of the masks' weights
        num_masks = 0
        for i in range(batch):
            classes, masks, valid = image_targets(target[i], self.ignore_index)
            assert classes.numel() == 0 or int(classes.max()) < self.num_classes, classes
            num_masks += classes.numel()
            if classes.numel() == 0:  # void everywhere: no class to learn either
                class_target[i] = _NO_TARGET
                continue
            logits = mask_logits[i].reshape(queries, -1)[:, valid].float()  # (Q, N)
            rows, cols = hungarian_match(class_logits[i], logits, classes, masks)
            class_target[i, rows] = classes[cols]
            pred, gt = logits[rows], masks[cols]  # (m, N)
            weight = self.class_weight[classes[cols]]  # (m,) each mask's class weight
            bce = bce + (weight * F.binary_cross_entropy_with_logits(
                pred, gt, reduction="none").mean(1)).sum()
            dice = dice + (weight * _dice_per_mask(pred, gt)).sum()
            mass = mass + weight.sum()
        if num_masks:
            ce = F.cross_entropy(class_logits.float().transpose(1, 2), class_target,
                                 weight=self.class_weight, ignore_index=_NO_TARGET)
        else:  # every image void everywhere: 0 with a graph (cross_entropy would give NaN)
            ce = class_logits.float().sum() * 0.0
        # no masks, or only masks of weight 0: their terms are 0, divided by 1 (not 0 / 0)
        denom = torch.where(mass > 0, mass, torch.ones_like(mass))
        return LOSS_CLASS * ce + LOSS_MASK * bce / denom + LOSS_DICE * dice / denom


def _dice_per_mask(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(m,) Dice loss (smoothed by 1) of matched predictions (m, N) and masks (m, N)."""
    probs = logits.sigmoid()
    inter = (probs * masks).sum(-1)
    return 1.0 - (2.0 * inter + 1.0) / (probs.sum(-1) + masks.sum(-1) + 1.0)
