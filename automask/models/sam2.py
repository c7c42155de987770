"""SAM 2.1 backbones (Hiera image encoders) as prompt-free semantic segmenters.

Needs the optional ``sam2`` package (``pip install 'automask[sam2]'``), imported only when a
SAM 2.1 model is built. The modules are the sam2 package's own classes (``Hiera``,
``FpnNeck``, ``ImageEncoder``, ``PromptEncoder``, ``MaskDecoder``), built directly with the
numbers of its ``configs/sam2.1/*.yaml`` (no hydra), so state-dict keys are those of the
official checkpoints once their ``sam_prompt_encoder.`` / ``sam_mask_decoder.`` prefixes are
renamed; the video-only parts (memory attention, memory encoder, object pointers) are
dropped on load.

The forward is SAM 2's image path without prompts (binary models also take point / box
prompts, encoded by SAM 2's prompt encoder as in :class:`~automask.models.SamSegmenter`)::

    Hiera trunk -> FPN neck -> levels at strides 4, 8, 16 (the stride-32 level only feeds
    the top-down path) -> stride 16 + no_mem_embed = image embedding; strides 4 and 8 go
    through the decoder's conv_s0 / conv_s1 -> mask decoder with no sparse prompts and the
    "no mask" dense embedding, high-resolution features added while upscaling -> logits at
    stride 4, upsampled to the input size.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import CheckpointError, ConfigError
from .mask_classification import NUM_QUERIES
from .segmenter import MULTICLASS_HEADS, Prompt, SamSegmenter

INSTALL_HINT = "pip install 'automask[sam2]'"
_OFFICIAL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"


@dataclass(frozen=True)
class Sam2Spec:
    """Architecture of one SAM 2.1 backbone and the location of its official weights.

    Attributes
    ----------
    name : str
        Registry key.
    embed_dim, num_heads : int
        Width and heads of Hiera's first stage (both double at every stage change).
    stages : tuple of int
        Blocks per stage (4 stages, strides 4, 8, 16, 32).
    global_att_blocks : tuple of int
        Blocks attending over the whole grid; the others attend within windows.
    window_spec : tuple of int
        Window side per stage, in tokens.
    window_pos_embed_bkg_spatial_size : tuple of int
        Size of the background position table, interpolated to the grid at run time.
    d_model : int
        Channels of the FPN neck, the image embedding and the mask decoder.
    decoder_mlp_dim, decoder_heads, iou_head_hidden_dim, mask_in_chans : int
        Mask-decoder and prompt-encoder sizes (SAM's).
    patch_size : int
        Total stride of the encoder: input sizes must be a multiple of it (32).
    pretrain_size : int
        Input size of the official checkpoints (1024).
    url, sha256, filename : str or None
        Official checkpoint URL, its pinned SHA-256 and the cache file name; ``None`` for
        ``sam2_tiny`` (random init, for tests).
    """

    name: str
    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14)
    d_model: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    patch_size: int = 32
    pretrain_size: int = 1024
    url: str | None = None
    sha256: str | None = None
    filename: str | None = None

    @property
    def channel_list(self) -> list[int]:
        """Trunk output channels from the lowest to the highest resolution (the neck's order)."""
        return [self.embed_dim * 2 ** i for i in range(len(self.stages) - 1, -1, -1)]


# Architectures: sam2 1.1.0's configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml (Hiera defaults where
# a config sets nothing). URLs: the sam2 repository's checkpoints/download_ckpts.sh.
# SHA-256 values: the Git LFS digests Hugging Face shows for the same files; tiny from
# Meta's own model page (huggingface.co/facebook/sam2.1-hiera-tiny), all four from the
# public copy huggingface.co/camenduru/sam2-1-hiera (commit cdd35a4, identical tiny digest),
# the large one also from several independent uploads. A download that does not match is
# refused and nothing is kept.
SAM2_BACKBONES: dict[str, Sam2Spec] = {
    "sam2_tiny": Sam2Spec(
        name="sam2_tiny", embed_dim=16, num_heads=1, stages=(1, 1, 2, 1),
        global_att_blocks=(3,), window_spec=(4, 2, 4, 2),
        window_pos_embed_bkg_spatial_size=(4, 4), d_model=32, decoder_mlp_dim=64,
        decoder_heads=2, iou_head_hidden_dim=32, mask_in_chans=4, pretrain_size=128,
    ),
    "sam2.1_hiera_t": Sam2Spec(
        name="sam2.1_hiera_t", embed_dim=96, num_heads=1, stages=(1, 2, 7, 2),
        global_att_blocks=(5, 7, 9), window_pos_embed_bkg_spatial_size=(7, 7),
        url=_OFFICIAL + "sam2.1_hiera_tiny.pt", filename="sam2.1_hiera_tiny.pt",
        sha256="7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
    ),
    "sam2.1_hiera_s": Sam2Spec(
        name="sam2.1_hiera_s", embed_dim=96, num_heads=1, stages=(1, 2, 11, 2),
        global_att_blocks=(7, 10, 13), window_pos_embed_bkg_spatial_size=(7, 7),
        url=_OFFICIAL + "sam2.1_hiera_small.pt", filename="sam2.1_hiera_small.pt",
        sha256="6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
    ),
    "sam2.1_hiera_b+": Sam2Spec(
        name="sam2.1_hiera_b+", embed_dim=112, num_heads=2, stages=(2, 3, 16, 3),
        global_att_blocks=(12, 16, 20),
        url=_OFFICIAL + "sam2.1_hiera_base_plus.pt", filename="sam2.1_hiera_base_plus.pt",
        sha256="a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
    ),
    "sam2.1_hiera_l": Sam2Spec(
        name="sam2.1_hiera_l", embed_dim=144, num_heads=2, stages=(2, 6, 36, 4),
        global_att_blocks=(23, 33, 43), window_spec=(8, 4, 16, 8),
        window_pos_embed_bkg_spatial_size=(7, 7),
        url=_OFFICIAL + "sam2.1_hiera_large.pt", filename="sam2.1_hiera_large.pt",
        sha256="2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
    ),
}


def is_sam2_backbone(backbone: object) -> bool:
    """Whether ``backbone`` names a SAM 2.1 (Hiera) backbone."""
    return isinstance(backbone, str) and backbone in SAM2_BACKBONES


def require_sam2(backbone: str):
    """Import the sam2 package, or raise one :class:`ConfigError` naming the extra."""
    try:
        import sam2.modeling.backbones.hieradet as hieradet
        import sam2.modeling.backbones.image_encoder as image_encoder
        import sam2.modeling.position_encoding as position_encoding
        import sam2.modeling.sam.mask_decoder as mask_decoder
        import sam2.modeling.sam.prompt_encoder as prompt_encoder
        import sam2.modeling.sam.transformer as transformer
    except ImportError as exc:
        raise ConfigError(
            f"backbone {backbone!r} needs the optional sam2 package, which is not installed "
            f"({exc}); install it with: {INSTALL_HINT}"
        ) from None
    return hieradet, image_encoder, position_encoding, prompt_encoder, mask_decoder, transformer


class _HostLinspace(TorchFunctionMode):
    """Run ``torch.linspace`` on the CPU: Hiera reads its drop-path rates with ``.item()``,
    which fails when the model is built on the meta device (parameter counts)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def build_sam2_parts(spec: Sam2Spec, input_size: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The sam2 package's image encoder, prompt encoder and mask decoder for ``spec``.

    Laid out as ``SAM2Base`` lays them out (``image_encoder``, ``sam_prompt_encoder``,
    ``sam_mask_decoder``), with SAM 2.1's decoder flags: high-resolution features, object
    score token and MLP head, sigmoid IoU head.
    """
    hieradet, image_encoder, position_encoding, prompt_encoder, mask_decoder, transformer = (
        require_sam2(spec.name))
    with _HostLinspace():
        trunk = hieradet.Hiera(
            embed_dim=spec.embed_dim, num_heads=spec.num_heads, stages=tuple(spec.stages),
            global_att_blocks=tuple(spec.global_att_blocks),
            window_spec=tuple(spec.window_spec),
            window_pos_embed_bkg_spatial_size=tuple(spec.window_pos_embed_bkg_spatial_size),
        )
    neck = image_encoder.FpnNeck(
        position_encoding=position_encoding.PositionEmbeddingSine(
            num_pos_feats=spec.d_model, normalize=True, scale=None, temperature=10000),
        d_model=spec.d_model, backbone_channel_list=spec.channel_list,
        fpn_top_down_levels=[2, 3], fpn_interp_model="nearest",
    )
    encoder = image_encoder.ImageEncoder(trunk=trunk, neck=neck, scalp=1)
    grid = input_size // 16  # the image embedding is the stride-16 level
    prompts = prompt_encoder.PromptEncoder(
        embed_dim=spec.d_model, image_embedding_size=(grid, grid),
        input_image_size=(input_size, input_size), mask_in_chans=spec.mask_in_chans,
    )
    decoder = mask_decoder.MaskDecoder(
        num_multimask_outputs=3,
        transformer=transformer.TwoWayTransformer(
            depth=2, embedding_dim=spec.d_model, mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_heads),
        transformer_dim=spec.d_model, iou_head_depth=3,
        iou_head_hidden_dim=spec.iou_head_hidden_dim, use_high_res_features=True,
        iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
    )
    return encoder, prompts, decoder


# PEFT methods on Hiera: those that wrap layers or mark parameters work as on SAM; those
# that extend the isotropic ViT through the encoder hook are refused.
SUPPORTED_METHODS = ("scratch", "decoder_only", "bitfit", "adapter", "lora", "conv_lora", "full")
UNSUPPORTED_METHODS = ("vpt", "lst", "sam_adapter", "ssf")


class Sam2Segmenter(SamSegmenter):
    """SAM 2.1 as a semantic segmenter: images (B, 3, S, S) in, logits (B, C, S, S) out.

    Same interface as :class:`~automask.models.SamSegmenter` (binary = the single-mask
    token 0; K classes = K copies of mask token / hypernetwork MLP 0), on the sam2
    package's modules. ``S`` is a multiple of 32; Hiera interpolates its position tables.

    Parameters
    ----------
    image_encoder, prompt_encoder, mask_decoder : nn.Module
        The sam2 package's modules (see :func:`build_sam2_parts`).
    backbone : str
        Registry name of the backbone.
    input_size : int
        Side of the square input.
    checkpoint_info : dict, optional
        ``{"backbone", "source", "path", "sha256"}`` of the loaded weights.

    Attributes
    ----------
    no_mem_embed : nn.Parameter
        (1, 1, D) embedding SAM 2 adds to the stride-16 features of a single image (its
        "no memory" token); frozen except under ``full``/``scratch``.

    Notes
    -----
    The methods built on the PEFT encoder hook and SAM's patch embedding (``vpt``, ``lst``,
    ``sam_adapter``, ``ssf``) are refused with a :class:`ConfigError`: Hiera changes width
    and resolution between stages, so per-block prompts, ladders and embedding-level
    scales designed for SAM's isotropic ViT do not apply as published.
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module,
                 mask_decoder: nn.Module, *, backbone: str, input_size: int,
                 checkpoint_info: dict | None = None) -> None:
        super().__init__(image_encoder, prompt_encoder, mask_decoder, backbone=backbone,
                         input_size=input_size, checkpoint_info=checkpoint_info)
        dim = mask_decoder.transformer_dim
        weight = mask_decoder.iou_token.weight
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, dim, device=weight.device,
                                                     dtype=weight.dtype))
        if weight.device.type != "meta":
            nn.init.trunc_normal_(self.no_mem_embed, std=0.02)

    # SAM's MLP layer names -> Hiera's (sam2's MLP keeps its Linears in ``layers``), so that
    # the adapter's default targets and LoRA targets written for SAM find their layers.
    target_aliases = {"mlp.lin1": "mlp.layers.0", "mlp.lin2": "mlp.layers.1",
                      "lin1": "mlp.layers.0", "lin2": "mlp.layers.1"}

    def set_mask_classification(self, num_classes: int, num_queries: int = NUM_QUERIES) -> None:
        """Refused: SAM 2.1's decoder here has the ``tokens`` head only (its forward decodes
        one logit map per class, not mask queries)."""
        raise ConfigError(
            f"multi-class head 'mask_classification' is not available on the SAM 2.1 "
            f"backbone {self.backbone!r}; use 'tokens'"
        )

    def check_peft_method(self, method: str) -> None:
        """Refuse the methods built on SAM's isotropic ViT (called by ``apply_peft``)."""
        if method in UNSUPPORTED_METHODS:
            raise ConfigError(
                f"PEFT method {method!r} is not supported on the SAM 2.1 Hiera backbone "
                f"{self.backbone!r}: it extends SAM's single-width ViT encoder (patch "
                f"embedding, equal-width blocks), which Hiera does not have; use one of "
                f"{', '.join(SUPPORTED_METHODS)}"
            )

    def set_encoder_hook(self, hook: nn.Module) -> None:
        """Refused: see the class notes (``check_peft_method`` refuses such methods first)."""
        raise ConfigError(
            f"{type(hook).__name__} extends SAM's ViT encoder through the encoder hook, which "
            f"the SAM 2.1 Hiera backbone {self.backbone!r} does not support"
        )

    def unused_parameter_names(self) -> list[str]:
        """Parameters the prompt-free forward never uses (see ``SamSegmenter``).

        Also SAM 2's object-score head; the object-score token itself takes part in the
        decoder's attention and is used.
        """
        unused = super().unused_parameter_names()
        unused += [n for n, _ in self.named_parameters()
                   if n.startswith("mask_decoder.pred_obj_score_head.")]
        return unused

    def encoder_parts(self) -> list[nn.Module | nn.Parameter]:
        """The image encoder, the "no memory" embedding and the mask decoder's two
        convolutions of the high-resolution features (trainable under ``decoder_only``)."""
        decoder = self.mask_decoder
        return [self.image_encoder, self.no_mem_embed, decoder.conv_s0, decoder.conv_s1]

    def forward(self, images: torch.Tensor,
                prompts: Sequence[Prompt | None] | None = None,
                features: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """Logits (B, C, S, S) for normalised, padded images (B, 3, S, S).

        ``prompts``: as in :meth:`SamSegmenter.forward` (binary only); SAM 2's prompt
        encoder has SAM's interface, so prompted decoding is the base class's.
        ``features``: :meth:`encode`'s output for these images, computed earlier.
        """
        self.check_images(images)  # (B, 3, S, S) floating point, else ValueError
        if prompts is not None and any(p is not None for p in prompts):
            return self.forward_prompted(images, prompts, features)
        if features is None:
            features = self.encode(images)
        low_res = self.decode(features)  # (B, C, S/4, S/4)
        return F.interpolate(low_res, size=(self.input_size, self.input_size),
                             mode="bilinear", align_corners=False)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embedding (B, D, S/16, S/16), high-res s0 (B, D/8, S/4, S/4), s1 (B, D/4, S/8, S/8).

        The sam2 package's ``ImageEncoder`` and ``SAM2Base.forward_image`` step by step
        (the neck's sine position encodings, unused here, are not computed). With
        :attr:`gradient_checkpointing` set and gradients enabled, each Hiera block is
        recomputed in the backward pass.
        """
        trunk, neck = self.image_encoder.trunk, self.image_encoder.neck
        x = trunk.patch_embed(images)  # (B, S/4, S/4, C), a permuted view of (B, C, ...)
        x = (x + trunk._get_pos_embed(x.shape[1:3])).contiguous()  # see SamSegmenter.encode
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        levels = []  # trunk outputs at strides 4, 8, 16, 32
        for index, block in enumerate(trunk.blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if index in trunk.stage_ends:
                levels.append(x.permute(0, 3, 1, 2))
        # FpnNeck.forward without the position encodings: top-down from stride 32.
        last = len(neck.convs) - 1
        out: list[torch.Tensor | None] = [None] * len(levels)
        prev = None
        for i in range(last, -1, -1):
            lateral = neck.convs[last - i](levels[i])
            if i in neck.fpn_top_down_levels and prev is not None:
                top_down = F.interpolate(prev.to(dtype=torch.float32), scale_factor=2.0,
                                         mode=neck.fpn_interp_model,
                                         align_corners=(None if neck.fpn_interp_model == "nearest"
                                                        else False), antialias=False)
                prev = lateral + top_down
                if neck.fuse_type == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            out[i] = prev
        scalp = self.image_encoder.scalp
        features = out[: len(out) - scalp] if scalp > 0 else out  # strides 4, 8, 16
        decoder = self.mask_decoder
        embedding = features[-1] + self.no_mem_embed.reshape(1, -1, 1, 1)
        return embedding, decoder.conv_s0(features[0]), decoder.conv_s1(features[1])

    def decode(self, features: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               sparse: torch.Tensor | None = None) -> torch.Tensor:
        """Low-resolution logits (B, C, S/4, S/4) from :meth:`encode`'s features.

        ``sparse``: prompt tokens (B, N, D) appended to the output tokens, as in SAM 2's
        ``MaskDecoder.predict_masks``; None (prompt-free) appends nothing.
        """
        embeddings, feat_s0, feat_s1 = features
        decoder = self.mask_decoder
        batch, dim, h, w = embeddings.shape
        # Output tokens as in SAM 2.1: [obj_score, iou, mask_0..mask_{T-1}], then the
        # sparse prompts.
        tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight,
                            decoder.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(batch, -1, -1)  # (B, 2+T, D)
        if sparse is not None:
            tokens = torch.cat([tokens, sparse], dim=1)  # (B, 2+T+N, D)
        src = embeddings + self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        pos = self.prompt_encoder.get_dense_pe().expand(batch, -1, -1, -1)  # (B, D, h, w)
        hs, src = decoder.transformer(src, pos, tokens)  # (B, 2+T, D), (B, h*w, D)
        src = src.transpose(1, 2).reshape(batch, dim, h, w)
        dc1, ln1, act1, dc2, act2 = decoder.output_upscaling
        upscaled = act1(ln1(dc1(src) + feat_s1))  # (B, D/4, 2h, 2w)
        upscaled = act2(dc2(upscaled) + feat_s0)  # (B, D/8, 4h, 4w)
        mlps = decoder.output_hypernetworks_mlps
        hyper = torch.stack([mlps[i](hs[:, 2 + i]) for i in range(self.num_outputs_used)],
                            dim=1)  # (B, C, D/8)
        b, c, hh, ww = upscaled.shape
        return (hyper @ upscaled.reshape(b, c, hh * ww)).reshape(b, -1, hh, ww)


# ---------------------------------------------------------------------------- weights
_RENAME = (("sam_prompt_encoder.", "prompt_encoder."), ("sam_mask_decoder.", "mask_decoder."))

VIDEO_MODULES = frozenset({
    "memory_attention", "memory_encoder", "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr",
    "obj_ptr_proj", "obj_ptr_tpos_proj", "mask_downsample", "no_obj_embed_spatial",
})
"""Top-level entries of ``SAM2Base``'s state dict (SAM 2 and 2.1) used only on videos: they
are dropped on load. Any other key the image model lacks is an error, never ignored."""


def read_sam2_state_dict(path: str | os.PathLike,
                         sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The image-model tensors of a SAM 2.1 checkpoint, with automask's key names.

    Official files are ``{"model": state_dict}`` read with ``torch.load(weights_only=True,
    map_location="cpu")``; a plain state dict, a ``.safetensors`` file and a training
    script's checkpoint are accepted too (read and unwrapped as by
    :func:`~automask.models.checkpoint.read_state_dict`, which also verifies ``sha256``).
    ``sam_prompt_encoder.`` and ``sam_mask_decoder.`` become ``prompt_encoder.`` and
    ``mask_decoder.``; the video parts (:data:`VIDEO_MODULES`: memory attention and
    encoder, object pointers, temporal encodings) are dropped. Other keys are kept, so that
    a strict load reports them.

    Raises
    ------
    CheckpointError
        Unreadable file (empty, truncated, text, refused pickle; the message says which),
        or not a mapping of named tensors.
    """
    from .checkpoint import read_state_dict

    state = read_state_dict(path, sha256=sha256, what="a SAM 2.1 checkpoint")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.split(".", 1)[0] in VIDEO_MODULES:
            continue
        for old, new in _RENAME:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


_SAM1_ENCODER_PREFIXES = ("image_encoder.patch_embed.", "image_encoder.blocks.",
                          "image_encoder.neck.")
"""Image-encoder keys of segment-anything (SAM 1) ViT checkpoints; Hiera's are under
``image_encoder.trunk.`` and ``image_encoder.neck.convs.``."""


def _is_sam1_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` has SAM 1's ViT image encoder instead of SAM 2's Hiera trunk."""
    keys = list(state)
    has_trunk = any(k.startswith("image_encoder.trunk.") for k in keys)
    return not has_trunk and any(k.startswith(_SAM1_ENCODER_PREFIXES) for k in keys)


def load_sam2_weights(model: Sam2Segmenter, path: str | os.PathLike,
                      sha256: str | None = None) -> None:
    """Load a SAM 2.1 checkpoint into ``model`` strictly (``sha256``: verified first).

    Raises
    ------
    CheckpointError
        Unreadable file, a SAM 1 (segment-anything ViT) checkpoint (named as such), or
        missing / unexpected / mis-shaped tensors (summarised per module, with the SAM 2.1
        backbone the file was made for when it can be told). Nothing is loaded then.

    Notes
    -----
    A ``model`` built on the meta device (as :func:`build_sam2_segmenter` builds one for a
    checkpoint) takes the file's tensors as its own, as
    :func:`~automask.models.checkpoint.load_sam_weights` does for SAM.
    """
    from .checkpoint import _identify, load_strict, raise_if_mismatched

    state = read_sam2_state_dict(path, sha256=sha256)
    if _is_sam1_state(state):
        found = _identify(state)
        which = f" of {found[1]!r}" if found is not None and found[1] else ""
        raise CheckpointError(
            f"{str(path)!r} does not fit backbone {model.backbone!r}: it is a SAM 1 "
            f"(segment-anything ViT) checkpoint{which}, whose image encoder has "
            "'image_encoder.blocks' and no Hiera 'image_encoder.trunk'; a SAM 2.1 backbone "
            "needs a SAM 2.1 checkpoint (e.g. sam2.1_hiera_tiny.pt), or use this file with a "
            "SAM backbone (vit_b, vit_l, vit_h); nothing was loaded"
        )
    target = model.state_dict()
    raise_if_mismatched(state, target, path, model)
    try:
        load_strict(model, state, target)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{str(path)!r} does not fit backbone {model.backbone!r}: {str(exc).strip()[:2000]}"
        ) from exc


def build_sam2_segmenter(
    backbone: str,
    num_classes: int = 1,
    input_size: int = 1024,
    checkpoint: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    multiclass_head: str = "tokens",
    sha256: str | None = None,
) -> Sam2Segmenter:
    """Build a prompt-free SAM 2.1 segmenter (see :func:`~automask.models.build_segmenter`).

    ``sha256`` is the SHA-256 the checkpoint must have (passed to the resolver); the only
    multi-class head on Hiera is ``"tokens"`` (one mask token and MLP per class). A binary
    model (``num_classes=1``) takes SAM 2's single-mask output whatever ``multiclass_head``
    names, as on SAM.

    Raises
    ------
    ConfigError
        The sam2 package is missing (the message names ``automask[sam2]``), bad
        ``num_classes``, an ``input_size`` that is not a positive multiple of 32, or another
        multi-class head with ``num_classes >= 2``.
    CheckpointError
        No weights available, unverifiable download or checkpoint not matching.
    """
    from .checkpoint import locate_checkpoint

    spec = SAM2_BACKBONES[backbone]
    require_sam2(backbone)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0 \
            or input_size % spec.patch_size:
        near = ""
        if isinstance(input_size, int) and not isinstance(input_size, bool) and input_size > 0:
            low = input_size // spec.patch_size * spec.patch_size
            near = (f" (nearest: {low} or {low + spec.patch_size})" if low
                    else f" (nearest: {spec.patch_size})")
        raise ConfigError(
            f"input_size must be a positive multiple of {spec.patch_size} for SAM 2.1 "
            f"backbone {backbone!r} (Hiera's stride), got {input_size!r}{near}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if multiclass_head not in MULTICLASS_HEADS:
        raise ConfigError(f"multi-class head must be one of {MULTICLASS_HEADS}, "
                          f"got {multiclass_head!r}")
    # Binary tasks always use the single-mask output, whatever the head (the paper presets
    # name "mask_classification" for every task): only K >= 2 needs the tokens head.
    if num_classes >= 2 and multiclass_head != "tokens":
        raise ConfigError(
            f"multi-class head {multiclass_head!r} is not available on the SAM 2.1 backbone "
            f"{backbone!r}; use 'tokens'"
        )
    resolved = locate_checkpoint(backbone, checkpoint, sha256=sha256, progress=progress)
    info = {"backbone": backbone, "source": resolved.source,
            "path": str(resolved.path) if resolved.path else None, "sha256": resolved.sha256}
    # With a checkpoint every parameter and buffer comes from the file (a strict load):
    # built on the meta device, the model takes the file's tensors, with no random
    # initialisation to overwrite (as build_segmenter builds SAM).
    with torch.device("meta") if resolved.path is not None else contextlib.nullcontext():
        model = Sam2Segmenter(*build_sam2_parts(spec, input_size), backbone=backbone,
                              input_size=input_size, checkpoint_info=info)
    if resolved.path is not None:
        load_sam2_weights(model, resolved.path)
    model.set_num_classes(num_classes)  # binary, or K >= 2 with the tokens head
    return model
