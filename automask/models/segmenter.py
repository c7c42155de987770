"""Grad-enabled SAM segmenter and its builder; prompt-free by default.

segment-anything's ``Sam.forward`` runs under ``torch.no_grad`` and expects prompts, so the
segmenter calls the three submodules itself: image encoder -> mask decoder with no sparse
prompts and the pretrained "no mask" dense embedding -> logits upsampled to the input size.
Binary models also take optional per-image point / box prompts (:class:`Prompt`): SAM's
prompt encoder turns them into sparse tokens that join the decoder's output tokens.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from torch import nn

from ..errors import ConfigError
from .backbones import build_sam_parts, get_spec
from .blocks import block_forward
from .checkpoint import load_sam_weights, locate_checkpoint
from .mask_classification import NUM_QUERIES, make_class_head, semantic_log_probs

MULTICLASS_HEADS = ("tokens", "mask_classification")


class Prompt(NamedTuple):
    """Prompts of one image, in the padded model-input frame (pixels of the ``S x S`` input).

    Attributes
    ----------
    points : Tensor or None
        (N, 2) float x, y.
    labels : Tensor or None
        (N,) 1 = foreground, 0 = background (given with ``points``).
    box : Tensor or None
        (4,) float x0, y0, x1, y1.

    Notes
    -----
    Coordinates are what SAM's prompt encoder takes: the original pixel coordinates scaled
    by the resize of the image (see :func:`automask.data.prompts.map_points`); the padding
    at the bottom and right moves nothing.
    """

    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    box: torch.Tensor | None = None


class SamSegmenter(nn.Module):
    """SAM as a semantic segmenter: images in, per-class logits out.

    Parameters
    ----------
    image_encoder, prompt_encoder, mask_decoder : nn.Module
        segment-anything's modules (state-dict keys as in the official checkpoints).
    backbone : str
        Registry name of the backbone.
    input_size : int
        Side of the square, normalised and padded input images, a multiple of 16.
    checkpoint_info : dict, optional
        ``{"backbone", "source", "path", "sha256"}`` describing the loaded weights.

    Attributes
    ----------
    num_classes : int
        1 for binary segmentation (one logit map); K >= 2 for K classes, background
        included (one logit map per class, softmax over classes).
    multiclass_head : {"tokens", "mask_classification"}
        Which multi-class head :meth:`set_num_classes` set up (``"tokens"`` when binary).
    gradient_checkpointing : bool
        Recompute each encoder block in the backward pass instead of keeping its
        activations (see :meth:`encode`). False by default.

    Notes
    -----
    Binary mode is SAM's single-mask output: the decoder transformer runs on
    ``[iou_token, mask_token_0..3]`` as in SAM and the output of mask token 0 goes through
    hypernetwork MLP 0. :meth:`set_num_classes` with K >= 2 replaces the mask tokens by K
    copies of pretrained token 0 and the hypernetwork MLPs by K copies of MLP 0. The IoU
    head is never used. With ``head="mask_classification"`` it sets up the paper's head
    instead (see :mod:`automask.models.mask_classification` and :meth:`forward_queries`).
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        *,
        backbone: str,
        input_size: int,
        checkpoint_info: dict | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.backbone = backbone
        self.input_size = input_size
        self.num_classes = 1
        self.checkpoint_info = dict(checkpoint_info or {"backbone": backbone, "source": "random",
                                                        "path": None, "sha256": None})
        self.peft_method: str | None = None
        self.gradient_checkpointing = False
        self.multiclass_head = "tokens"
        self.encoder_hook: nn.Module | None = None  # see set_encoder_hook

    def set_encoder_hook(self, hook: nn.Module) -> None:
        """Install the encoder's extension point (one per model; see :meth:`encode`).

        ``hook`` is an :class:`automask.peft.EncoderHook`: a module with ``on_embed``,
        ``before_block``, ``after_block`` and ``on_neck``. It is a submodule, so its
        parameters are counted, trained and saved like any other.
        """
        if self.encoder_hook is not None:
            raise ConfigError("this model already has an encoder hook")
        self.encoder_hook = hook

    # ------------------------------------------------------------------ classes
    def set_num_classes(self, num_classes: int, head: str = "tokens",
                        num_queries: int = NUM_QUERIES) -> None:
        """Switch to ``num_classes`` outputs (K >= 2 copies pretrained mask token/MLP 0).

        Only valid on a freshly built (binary) segmenter, before any PEFT method.
        ``head`` (K >= 2 only): ``"tokens"``, one mask token and MLP per class, or
        ``"mask_classification"``, ``num_queries`` mask tokens sharing MLP 0 plus a class
        head ``mask_decoder.class_head`` with K + 1 outputs (:meth:`set_mask_classification`).
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self._check_head_unset()
        if head not in MULTICLASS_HEADS:
            raise ConfigError(f"multi-class head must be one of {MULTICLASS_HEADS}, got {head!r}")
        if num_classes == 1:
            return
        if head == "mask_classification":
            self.set_mask_classification(num_classes, num_queries)
            return
        decoder = self.mask_decoder
        self._copy_mask_token0(num_classes)
        mlp0 = decoder.output_hypernetworks_mlps[0]
        decoder.output_hypernetworks_mlps = nn.ModuleList(
            copy.deepcopy(mlp0) for _ in range(num_classes)
        )
        decoder.num_mask_tokens = num_classes
        self.num_classes = num_classes

    def set_mask_classification(self, num_classes: int, num_queries: int = NUM_QUERIES) -> None:
        """Set up the paper's mask-classification head for ``num_classes`` classes.

        ``num_queries`` copies of pretrained mask token 0, all decoded by hypernetwork MLP 0
        (MLPs 1-3 are dropped), and ``mask_decoder.class_head``, a
        ``Linear(transformer_dim, num_classes + 1)`` (last output: no object).
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"the mask-classification head needs num_classes >= 2 (an "
                              f"integer), got {num_classes!r}")
        if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
            raise ConfigError(f"num_queries must be an integer >= 1, got {num_queries!r}")
        self._check_head_unset()
        decoder = self.mask_decoder
        token0 = self._copy_mask_token0(num_queries)
        decoder.output_hypernetworks_mlps = nn.ModuleList([decoder.output_hypernetworks_mlps[0]])
        decoder.class_head = make_class_head(token0.shape[0], num_classes,
                                             device=token0.device, dtype=token0.dtype)
        decoder.num_mask_tokens = num_queries
        self.num_classes = num_classes
        self.multiclass_head = "mask_classification"

    def _check_head_unset(self) -> None:
        """Raise ConfigError unless this is a binary segmenter without a PEFT method.

        A PEFT method decides what trains (and wraps layers) for the head it found; a head
        changed afterwards would train parts that no rebuilt model (classes set first, then
        the method) has.
        """
        if self.num_classes != 1:
            raise ConfigError(f"num_classes was already set to {self.num_classes}")
        if self.peft_method is not None:
            raise ConfigError(
                f"set the number of classes before applying a PEFT method: PEFT method "
                f"{self.peft_method!r} is already applied to this model (build the segmenter "
                "with num_classes=K, then apply the method)"
            )

    def _copy_mask_token0(self, count: int) -> torch.Tensor:
        """Replace the decoder's mask tokens by ``count`` copies of pretrained token 0.

        Returns token 0 (D,), whose device and dtype the new head parts take.
        """
        decoder = self.mask_decoder
        token0 = decoder.mask_tokens.weight.detach()[0]
        # from the copies, not initialised at random first: nothing drawn from torch's generator
        decoder.mask_tokens = nn.Embedding.from_pretrained(
            token0.expand(count, -1).clone(), freeze=False)
        return token0

    @property
    def num_outputs_used(self) -> int:
        """How many decoder mask tokens / hypernetwork MLPs produce the logits."""
        if self.multiclass_head == "mask_classification":
            return 1  # every query goes through MLP 0
        return self.num_classes

    def unused_parameter_names(self) -> list[str]:
        """Parameters that never receive a gradient in the prompt-free forward.

        They are the IoU prediction head, the hypernetwork MLPs whose mask token is not
        used (1..3 in binary mode), and the prompt encoder's point/box embeddings and mask
        downscaling. Under the ``full`` method they stay trainable but get no gradient, so
        distributed training needs ``find_unused_parameters=True`` (or freezing them).
        """
        unused = []
        used_mlps = self.num_outputs_used
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if name.startswith("mask_decoder.iou_prediction_head."):
                unused.append(name)
            elif name.startswith("mask_decoder.output_hypernetworks_mlps.") and int(
                parts[2]
            ) >= used_mlps:
                unused.append(name)
            elif name.startswith("prompt_encoder.") and not name.startswith(
                "prompt_encoder.no_mask_embed."
            ):
                unused.append(name)
        return unused

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor,
                prompts: Sequence[Prompt | None] | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, C, S, S) for normalised, padded images (B, 3, S, S).

        Under the mask-classification head: log-probabilities whose softmax over C is
        MaskFormer's semantic inference (see :func:`semantic_log_probs`).

        ``prompts`` (binary models only): one :class:`Prompt` or None per image. Without
        prompts (None, or None for every image) this is the prompt-free forward, unchanged;
        otherwise see :meth:`forward_prompted`.

        ``features``: what :meth:`encode` returns for these images, computed earlier (the
        image embeddings kept by :class:`automask.training.embeddings.EmbeddingCache`);
        the encoder is then skipped. Only valid while :meth:`encoder_is_frozen` holds.
        """
        self.check_images(images)
        if prompts is not None and any(p is not None for p in prompts):
            return self.forward_prompted(images, prompts, features)
        if self.multiclass_head == "mask_classification":
            return semantic_log_probs(*self.forward_queries(images, features))  # (B, K, S, S)
        embeddings = self.encode(images) if features is None else features  # (B, D, S/16, S/16)
        low_res = self.decode(embeddings)  # (B, C, S/4, S/4)
        return F.interpolate(
            low_res, size=(self.input_size, self.input_size), mode="bilinear",
            align_corners=False,
        )

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError unless ``images`` is a float batch (B, 3, S, S) of this model.

        The model takes RGB images already normalised and padded (as
        :func:`automask.data.transforms.normalize_pad` makes them): 3 channels, floating
        point. A grayscale or RGBA batch, or uint8 pixels, is refused here with what was
        expected, instead of failing inside the patch embedding's convolution.
        """
        size = self.input_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(
                f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}"
                " (repeat a grayscale image to 3 channels, drop an alpha channel)"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"expected normalised floating-point images, got dtype {images.dtype}: "
                "subtract automask.data.PIXEL_MEAN and divide by PIXEL_STD first"
            )

    # ------------------------------------------------------------------ prompts
    def forward_prompted(self, images: torch.Tensor, prompts: Sequence[Prompt | None],
                         features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, 1, S, S) of a binary model for images (B, 3, S, S) and their prompts.

        The encoder runs on the whole batch. Images without a prompt are decoded together,
        as in the prompt-free forward; each prompted image is decoded on its own, with its
        prompt's sparse tokens (SAM's prompt encoder, :meth:`embed_prompt`) appended to the
        output tokens, so that images with different numbers of points need no padding
        tokens. The dense embedding stays the "no mask" one.

        Raises
        ------
        ValueError
            A multi-class model (prompts ask for one object: binary only), not one
            prompt per image, or a prompt SAM cannot take (see :meth:`embed_prompt`); raised
            before the encoder runs.
        """
        if self.num_classes != 1:
            raise ValueError(
                f"prompts need a binary model; this one has {self.num_classes} classes (a "
                "prompt selects one object, a multi-class model labels every pixel)"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        for i, prompt in enumerate(prompts):  # every prompt checked before the encoder runs
            if prompt is not None:
                _check_prompt(prompt, f"prompt of image {i}")
        if features is None:  # (B, D, h, w), or SAM 2's (embedding, s0, s1)
            features = self.encode(images)
        free = [i for i, p in enumerate(prompts) if p is None]
        out: list[torch.Tensor | None] = [None] * len(prompts)
        if free:
            for i, low in zip(free, self.decode(_take(features, free))):
                out[i] = low  # (1, 4h, 4w)
        for i, prompt in enumerate(prompts):
            if prompt is not None:
                sparse = self.embed_prompt(prompt)  # (1, N, D)
                out[i] = self.decode(_take(features, [i]), sparse)[0]
        low_res = torch.stack(out)  # (B, 1, 4h, 4w)
        return F.interpolate(
            low_res, size=(self.input_size, self.input_size), mode="bilinear",
            align_corners=False,
        )

    def embed_prompt(self, prompt: Prompt) -> torch.Tensor:
        """Sparse prompt tokens (1, N, D) of one image: SAM's prompt encoder, as SAM calls it.

        Points alone get SAM's padding point (label -1), as in ``SamPredictor``; points and
        a box together do not. Coordinates are in the input frame (see :class:`Prompt`).

        Raises
        ------
        ValueError
            No points and no box, points without one label each (or labels without
            points), or a box of other than 4 numbers.
        """
        _check_prompt(prompt, "prompt")
        device = self.mask_decoder.iou_token.weight.device
        points = boxes = None
        if prompt.points is not None:
            coords = torch.as_tensor(prompt.points, dtype=torch.float32, device=device)
            labels = torch.as_tensor(prompt.labels, dtype=torch.int64, device=device)
            points = (coords.reshape(1, -1, 2), labels.reshape(1, -1))  # (1, N, 2), (1, N)
        if prompt.box is not None:
            boxes = torch.as_tensor(prompt.box, dtype=torch.float32,
                                    device=device).reshape(1, 4)  # (1, 4)
        sparse, _ = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        return sparse.to(self.mask_decoder.iou_token.weight.dtype)

    def encoder_parts(self) -> list[nn.Module | nn.Parameter]:
        """The modules and parameters :meth:`encode` computes with."""
        return [self.image_encoder]

    def encoder_is_frozen(self) -> bool:
        """Whether :meth:`encode` stays a fixed function of the image while training.

        True when none of the :meth:`encoder_parts` trains, no encoder hook (PEFT on the
        encoder) is installed, and nothing in them is random or batch-dependent in
        training (dropout or drop-path with a non-zero rate, batch norm), whatever the
        current mode. Then an image's features can be computed once and reused
        (``decoder_only``; see :class:`automask.training.embeddings.EmbeddingCache`).
        """
        if self.encoder_hook is not None:
            return False
        for part in self.encoder_parts():
            if isinstance(part, nn.Parameter):
                if part.requires_grad:
                    return False
                continue
            if any(p.requires_grad for p in part.parameters()):
                return False
            for m in part.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    return False
                rate = m.p if isinstance(m, nn.Dropout) else getattr(m, "drop_prob", None)
                if isinstance(rate, (int, float)) and rate > 0:
                    return False
        return True

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, D, S/16, S/16): segment-anything's encoder, step by step.

        The PEFT extension point (:attr:`encoder_hook`, when set) is called after the
        patch and position embeddings, before and after every block, and before the neck
        (see :class:`automask.peft.EncoderHook`). With :attr:`gradient_checkpointing` set
        and gradients enabled, each transformer block's activations are recomputed in the
        backward pass instead of kept (random state included, so Conv-LoRA's noisy gates
        route the same way twice): less memory for about one more forward of the encoder.
        Only the blocks are recomputed, never the hook's calls.
        """
        encoder = self.image_encoder
        hook = self.encoder_hook
        ctx: dict = {}
        x = encoder.patch_embed(images)  # (B, S/16, S/16, E), a permuted view of (B, E, ...)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        # Stored in (B, H, W, E) order once: each addition after this keeps its inputs'
        # layout, and a layer norm copies a permuted input forward and backward (2 x 2 copies
        # of the token map per block, 4-6% of a vit_b step on a CPU).
        x = x.contiguous()
        if hook is not None:
            x = hook.on_embed(x, images, ctx)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        # buffers the blocks share in a forward pass without gradients, on a CPU (an
        # accelerator's allocator caches blocks itself): see blocks.mlp_forward
        scratch = {} if x.device.type == "cpu" and not torch.is_grad_enabled() else None
        for index, block in enumerate(encoder.blocks):
            if hook is not None:
                x = hook.before_block(index, x, ctx)
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block_forward, block, x,
                                                      use_reentrant=False)
            else:
                x = block_forward(block, x, scratch)  # = block(x), less work (models/blocks.py)
            if hook is not None:
                x = hook.after_block(index, x, ctx)
        if hook is not None:
            x = hook.on_neck(x, ctx)
        return encoder.neck(x.permute(0, 3, 1, 2))

    def decode(self, embeddings: torch.Tensor,
               sparse: torch.Tensor | None = None) -> torch.Tensor:
        """Low-resolution logits (B, C, 4h, 4w) from image embeddings (B, D, h, w).

        ``sparse``: prompt tokens (B, N, D) appended to the output tokens, as in SAM's
        ``MaskDecoder.predict_masks``; None (prompt-free) appends nothing.
        """
        decoder = self.mask_decoder
        batch, dim, h, w = embeddings.shape
        # Output tokens as in SAM: [iou, mask_0, ..., mask_{T-1}], then the sparse prompts.
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(batch, -1, -1)  # (B, 1+T, D)
        if sparse is not None:
            tokens = torch.cat([tokens, sparse], dim=1)  # (B, 1+T+N, D)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = embeddings + dense  # (B, D, h, w)
        pos = self.prompt_encoder.get_dense_pe().expand(batch, -1, -1, -1)  # (B, D, h, w)
        hs, src = decoder.transformer(src, pos, tokens)  # (B, 1+T, D), (B, h*w, D)
        src = src.transpose(1, 2).reshape(batch, dim, h, w)
        upscaled = decoder.output_upscaling(src)  # (B, D/8, 4h, 4w)
        mlps = decoder.output_hypernetworks_mlps
        hyper = torch.stack(
            [mlps[i](hs[:, 1 + i]) for i in range(self.num_outputs_used)], dim=1
        )  # (B, C, D/8)
        b, c, hh, ww = upscaled.shape
        return (hyper @ upscaled.reshape(b, c, hh * ww)).reshape(b, -1, hh, ww)

    def forward_queries(self, images: torch.Tensor, features: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask-classification head outputs for images (B, 3, S, S) (``features``: as in
        :meth:`forward`).

        Returns
        -------
        class_logits : Tensor
            (B, Q, K + 1): per query, logits of the K classes and of no-object.
        mask_logits : Tensor
            (B, Q, S, S): per query, mask logits upsampled to the input size.
        """
        assert self.multiclass_head == "mask_classification", self.multiclass_head
        self.check_images(images)
        class_logits, low_res = self.decode_queries(
            self.encode(images) if features is None else features)
        masks = F.interpolate(low_res, size=(self.input_size, self.input_size),
                              mode="bilinear", align_corners=False)
        return class_logits, masks

    def decode_queries(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (B, Q, K + 1) and mask logits (B, Q, 4h, 4w) from embeddings."""
        decoder = self.mask_decoder
        batch, dim, h, w = embeddings.shape
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(batch, -1, -1)  # (B, 1+Q, D)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        pos = self.prompt_encoder.get_dense_pe().expand(batch, -1, -1, -1)  # (B, D, h, w)
        hs, src = decoder.transformer(embeddings + dense, pos, tokens)  # (B, 1+Q, D), (B, hw, D)
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(batch, dim, h, w))
        queries = hs[:, 1:1 + decoder.num_mask_tokens]  # (B, Q, D)
        hyper = decoder.output_hypernetworks_mlps[0](queries)  # (B, Q, D/8)
        b, c, hh, ww = upscaled.shape  # (B, D/8, 4h, 4w)
        masks = (hyper @ upscaled.reshape(b, c, hh * ww)).reshape(b, -1, hh, ww)
        return decoder.class_head(queries), masks

    def extra_repr(self) -> str:
        return (f"backbone={self.backbone!r}, num_classes={self.num_classes}, "
                f"input_size={self.input_size}, peft_method={self.peft_method!r}")


def _check_prompt(prompt: Prompt, where: str) -> None:
    """Raise ValueError, naming ``where``, for a prompt SAM's prompt encoder cannot take."""
    if prompt.points is None and prompt.box is None:
        raise ValueError(f"{where}: a Prompt needs points or a box")
    if prompt.points is None and prompt.labels is not None:
        raise ValueError(f"{where}: labels given without points")
    if prompt.points is not None:
        count = torch.as_tensor(prompt.points).numel()
        if count % 2:
            raise ValueError(f"{where}: points must be (N, 2) x, y pairs; got {count} numbers")
        if prompt.labels is None:
            raise ValueError(f"{where}: points need labels (1 = foreground, 0 = background)")
        labels = torch.as_tensor(prompt.labels).numel()
        if labels != count // 2:
            raise ValueError(f"{where}: {count // 2} points but {labels} labels")
    if prompt.box is not None and torch.as_tensor(prompt.box).numel() != 4:
        raise ValueError(f"{where}: a box is 4 numbers (x0, y0, x1, y1); got "
                         f"{torch.as_tensor(prompt.box).numel()}")


def _take(features, index: list[int]):
    """Rows ``index`` of an encoder output: a tensor (B, ...) or a tuple of them (SAM 2)."""
    if isinstance(features, torch.Tensor):
        return features[index]
    return tuple(f[index] for f in features)


def build_segmenter(
    backbone: str = "vit_b",
    num_classes: int = 1,
    input_size: int = 1024,
    checkpoint: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    multiclass_head: str = "tokens",
    sha256: str | None = None,
    num_queries: int | None = None,
) -> SamSegmenter:
    """Build a prompt-free SAM segmenter, loading its weights.

    Parameters
    ----------
    backbone : str
        ``"tiny"``, ``"vit_b"``, ``"vit_l"`` or ``"vit_h"``; or a SAM 2.1 backbone
        (``"sam2.1_hiera_t"``, ``_s``, ``_b+``, ``_l``, ``"sam2_tiny"``; needs
        ``automask[sam2]``, input sizes a multiple of 32).
    num_classes : int
        1 for binary segmentation, K >= 2 for K classes (background included).
    input_size : int
        Side of the square input, a positive multiple of 16. Position tables of a
        checkpoint made for another size are resized on load.
    checkpoint : str, os.PathLike or None
        See :func:`~automask.models.resolve_checkpoint`; ``"random"`` for random init.
    progress : bool
        Show a progress bar while downloading.
    multiclass_head : {"tokens", "mask_classification"}
        Head for ``num_classes >= 2`` (see :meth:`SamSegmenter.set_num_classes`).
    sha256 : str, optional
        The SHA-256 the checkpoint must have (a saved predictor's record); checked on the
        file's bytes before anything deserialises them.
    num_queries : int, optional
        Mask queries of the ``mask_classification`` head; None: :data:`NUM_QUERIES`.

    Returns
    -------
    SamSegmenter
        In training mode, every parameter trainable (apply a PEFT method next).

    Raises
    ------
    ConfigError
        Unknown backbone, bad ``num_classes``, ``input_size``, ``multiclass_head`` or
        ``num_queries``; raised before any checkpoint is looked up.
    CheckpointError
        No weights available, unverifiable download or checkpoint not matching.
    """
    from .sam2 import build_sam2_segmenter, is_sam2_backbone

    if num_queries is not None and (isinstance(num_queries, bool)
                                    or not isinstance(num_queries, int) or num_queries < 1):
        raise ConfigError(f"num_queries must be an integer >= 1, got {num_queries!r}")
    if is_sam2_backbone(backbone):  # SAM 2.1 Hiera backbones (optional sam2 package)
        return build_sam2_segmenter(backbone, num_classes, input_size, checkpoint,
                                    progress=progress, multiclass_head=multiclass_head,
                                    sha256=sha256)
    spec = get_spec(backbone)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0 \
            or input_size % spec.patch_size:
        raise ConfigError(
            f"input_size must be a positive multiple of {spec.patch_size}, got {input_size!r}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if multiclass_head not in MULTICLASS_HEADS:
        raise ConfigError(f"multi-class head must be one of {MULTICLASS_HEADS}, "
                          f"got {multiclass_head!r}")
    resolved = locate_checkpoint(backbone, checkpoint, sha256=sha256, progress=progress)
    info = {"backbone": backbone, "source": resolved.source,
            "path": str(resolved.path) if resolved.path else None, "sha256": resolved.sha256}
    # With a checkpoint, every parameter and buffer comes from the file (a strict load), so
    # the model is built on the meta device and takes the file's tensors: no random
    # initialisation to overwrite (0.7 s of a vit_b build on 2 CPU cores), no copy.
    with torch.device("meta") if resolved.path is not None else contextlib.nullcontext():
        parts = build_sam_parts(spec, input_size)
        model = SamSegmenter(*parts, backbone=backbone, input_size=input_size,
                             checkpoint_info=info)
    if resolved.path is not None:
        load_sam_weights(model, resolved.path)
    model.set_num_classes(num_classes, head=multiclass_head,
                          num_queries=NUM_QUERIES if num_queries is None else num_queries)
    return model
