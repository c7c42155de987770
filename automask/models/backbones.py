"""Registry of SAM backbones: the three official ViTs plus a tiny one for tests.

``BACKBONES`` maps a name to a :class:`BackboneSpec`, the numbers segment-anything's own
builders use (``build_sam.py``) plus where the official weights live. :func:`build_sam_parts`
turns a spec into segment-anything's three modules for a given input size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

_OFFICIAL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture of one SAM backbone and the location of its official weights.

    Attributes
    ----------
    name : str
        Registry key.
    embed_dim, depth, num_heads : int
        Image-encoder ViT width, number of blocks and attention heads.
    global_attn_indexes : tuple of int
        Blocks that attend over the whole token grid; all others use windows.
    window_size : int
        Side of the attention windows, in tokens.
    patch_size : int
        Side of a patch in pixels (the token grid is ``input_size // patch_size``).
    prompt_embed_dim : int
        Channels of the image embedding and of the mask-decoder transformer.
    decoder_mlp_dim, decoder_heads, decoder_depth : int
        Mask-decoder two-way transformer sizes.
    iou_head_hidden_dim : int
        Hidden width of the (frozen, unused) IoU prediction head.
    mask_in_chans : int
        Hidden channels of the prompt encoder's mask downscaling (unused here).
    pretrain_size : int
        Input size the official checkpoint was trained at; its position tables fit it.
    url, sha256, filename : str or None
        Official checkpoint URL, its pinned SHA-256 and the cache file name; ``None`` for
        backbones without published weights (``tiny``).
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    decoder_depth: int = 2
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    pretrain_size: int = 1024
    url: str | None = None
    sha256: str | None = None
    filename: str | None = None


# SHA-256 values: the digests of the files at the official URLs, as pinned by published
# projects that verify them (e.g. micro-sam's model registry); the short suffix in each
# file name is not a SHA-256 prefix.
BACKBONES: dict[str, BackboneSpec] = {
    "tiny": BackboneSpec(
        name="tiny",
        embed_dim=96,
        depth=4,
        num_heads=3,
        global_attn_indexes=(1, 3),
        window_size=8,
        prompt_embed_dim=64,
        decoder_mlp_dim=256,
        decoder_heads=4,
        iou_head_hidden_dim=64,
        mask_in_chans=8,
        pretrain_size=256,
    ),
    "vit_b": BackboneSpec(
        name="vit_b",
        embed_dim=768,
        depth=12,
        num_heads=12,
        global_attn_indexes=(2, 5, 8, 11),
        url=_OFFICIAL + "sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        filename="sam_vit_b_01ec64.pth",
    ),
    "vit_l": BackboneSpec(
        name="vit_l",
        embed_dim=1024,
        depth=24,
        num_heads=16,
        global_attn_indexes=(5, 11, 17, 23),
        url=_OFFICIAL + "sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        filename="sam_vit_l_0b3195.pth",
    ),
    "vit_h": BackboneSpec(
        name="vit_h",
        embed_dim=1280,
        depth=32,
        num_heads=16,
        global_attn_indexes=(7, 15, 23, 31),
        url=_OFFICIAL + "sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        filename="sam_vit_h_4b8939.pth",
    ),
}


def get_spec(backbone: str) -> BackboneSpec:
    """Spec of ``backbone``; raises :class:`~automask.errors.ConfigError` for unknown names.

    SAM 2.1 names (``sam2.1_hiera_*``, ``sam2_tiny``) give their
    :class:`~automask.models.sam2.Sam2Spec`, which carries the same checkpoint fields.
    """
    from ..errors import ConfigError
    from .sam2 import SAM2_BACKBONES

    if isinstance(backbone, str) and backbone in SAM2_BACKBONES:
        return SAM2_BACKBONES[backbone]
    try:
        return BACKBONES[backbone]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown backbone {backbone!r}; choose one of "
            f"{sorted(BACKBONES) + list(SAM2_BACKBONES)}"
        ) from None


def build_image_encoder(spec: BackboneSpec, input_size: int) -> ImageEncoderViT:
    """segment-anything's ViT image encoder for ``spec`` at ``input_size`` pixels."""
    return ImageEncoderViT(
        depth=spec.depth,
        embed_dim=spec.embed_dim,
        img_size=input_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec.num_heads,
        patch_size=spec.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size,
        out_chans=spec.prompt_embed_dim,
    )


def build_sam_parts(
    spec: BackboneSpec, input_size: int
) -> tuple[ImageEncoderViT, PromptEncoder, MaskDecoder]:
    """segment-anything's image encoder, prompt encoder and mask decoder for ``spec``.

    The modules are laid out exactly as segment-anything's ``_build_sam`` lays them out,
    so their state-dict keys are those of the official checkpoints.
    """
    grid = input_size // spec.patch_size
    image_encoder = build_image_encoder(spec, input_size)
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(input_size, input_size),
        mask_in_chans=spec.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth,
            embedding_dim=spec.prompt_embed_dim,
            mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_heads,
        ),
        transformer_dim=spec.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=spec.iou_head_hidden_dim,
    )
    return image_encoder, prompt_encoder, mask_decoder
