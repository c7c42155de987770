"""Hugging Face transformers' SAM checkpoints, renamed to segment-anything's layout.

``SamModel.save_pretrained`` (the ``model.safetensors`` or ``pytorch_model.bin`` of
``facebook/sam-vit-base``, ``-large``, ``-huge`` and of models fine-tuned from them, such as
MedSAM's ``wanglab/medsam-vit-base``) stores the same tensors as the official ``.pth``
files under other names: ``vision_encoder.layers.3.layer_norm1`` for
``image_encoder.blocks.3.norm1``, ``mask_embed.conv2`` for ``mask_downscaling.3``, an MLP
head's ``proj_in`` / ``layers.k`` / ``proj_out`` for ``layers.0`` / ``layers.k+1`` /
``layers.N-1``. The tensors themselves (the fused ``qkv``, the relative-position tables, the
positional Gaussian matrix) are laid out alike, so renaming is exact.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

_PREFIX = "vision_encoder."

# (pattern, replacement) on a key whose "vision_encoder." is already "image_encoder.";
# the first that matches renames it, keys that none matches keep their name.
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r) for p, r in [
        (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
        (r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
        (r"^image_encoder\.layers\.", "image_encoder.blocks."),
        (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
        (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
        (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
        (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
        (r"^prompt_encoder\.shared_embedding\.positional_embedding$",
         "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
        (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
        (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
        (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
        (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
        (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
        (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
        (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.",
         r"mask_decoder.transformer.layers.\1.norm\2."),
        (r"^mask_decoder\.transformer\.layer_norm_final_attn\.",
         "mask_decoder.transformer.norm_final_attn."),
        (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
        (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
        (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    ]
]
# the decoder's MLP heads: proj_in, layers.0 .. layers.{n-1}, proj_out (n + 2 linears)
_HEAD = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\."
                   r"(proj_in|proj_out|layers\.(\d+))\.(.+)$")
# the prompt encoder's copy of the image's positional matrix, which SamModel ties to it
_SHARED = "shared_image_embedding.positional_embedding"
_PE = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def hf_weights_file(folder: Path) -> Path | None:
    """The weights file of a transformers SAM model folder (``save_pretrained``'s, or a
    snapshot in the Hugging Face cache: ``config.json`` of ``model_type`` "sam" beside
    ``model.safetensors`` or ``pytorch_model.bin``), else None."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") != "sam":
        return None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def is_hf_sam(state: Mapping[str, object]) -> bool:
    """Whether ``state`` has transformers' ``SamModel`` names (SAM 1's ViT as
    ``vision_encoder.patch_embed.projection``; ``Sam2Model`` keeps its Hiera under
    ``vision_encoder.backbone.*``)."""
    return _PREFIX + "patch_embed.projection.weight" in state


def from_hf_sam(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a ``SamModel`` state dict) under segment-anything's names.

    The positional matrix that ``SamModel`` keeps twice (``shared_image_embedding`` and
    the prompt encoder's, tied) becomes segment-anything's one
    ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``, from whichever copy
    the file holds. Keys of no known module keep their name, so that a load reports them.
    """
    hidden: dict[str, int] = {}  # MLP head -> its number of hidden linears (layers.k)
    for key in state:
        match = _HEAD.match(key)
        if match and match[3] is not None:
            hidden[match[1]] = max(hidden.get(match[1], 0), int(match[3]) + 1)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == _SHARED:
            continue
        new = "image_encoder." + key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        head = _HEAD.match(new)
        if head:
            name, part, index, rest = head[1], head[2], head[3], head[4]
            position = (0 if part == "proj_in" else  # SAM's heads have one hidden layer
                        hidden.get(name, 1) + 1 if part == "proj_out" else int(index) + 1)
            new = f"{name}.layers.{position}.{rest}"
        else:
            for pattern, replacement in _RENAMES:
                if pattern.match(new):
                    new = pattern.sub(replacement, new, count=1)
                    break
        out[new] = value
    if _PE not in out and _SHARED in state:
        out[_PE] = state[_SHARED]
    return out
