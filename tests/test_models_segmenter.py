"""The segmenter against segment-anything's own modules, and parameter parity with the paper."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT

from automask.errors import ConfigError
from automask.models import BACKBONES, build_segmenter, count_parameters, parameter_summary

def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def test_full_model_count_is_segment_anythings_own():
    """The denominator behind the paper's table: SAM vit_h as segment-anything builds it.

    (Every method's count against the paper: tests/test_peft_methods.py.)
    """
    table = parameter_summary("vit_h", methods=["full", "scratch"]).set_index("method")
    with torch.device("meta"):
        sam = sam_model_registry["vit_h"]()
    reference = sum(p.numel() for p in sam.parameters())
    assert table.loc["full", "trainable"] == table.loc["scratch", "trainable"] == reference


def test_parameter_summary_subset_and_options():
    table = parameter_summary("vit_b", methods=["lora"], rank=4)
    assert table["method"].tolist() == ["lora"]
    base = parameter_summary("vit_b", methods=["decoder_only"])["trainable"].item()
    # LoRA adds r * (C + 3C) per block: 12 blocks of width 768
    assert table["trainable"].item() - base == 12 * 4 * (768 + 3 * 768)


def test_count_parameters():
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == (6, 8)


@pytest.mark.parametrize("batch", [1, 2])
def test_binary_forward_equals_sam_single_mask_output(batch):
    torch.manual_seed(0)
    seg = build_segmenter("tiny", input_size=128, checkpoint="random").eval()
    _randomise(seg)
    x = torch.randn(batch, 3, 128, 128)
    with torch.no_grad():
        logits = seg(x)
        assert logits.shape == (batch, 1, 128, 128)
        for i in range(batch):  # segment-anything's own path, one image at a time
            emb = seg.image_encoder(x[i : i + 1])
            sparse, dense = seg.prompt_encoder(points=None, boxes=None, masks=None)
            masks, _ = seg.mask_decoder(
                image_embeddings=emb,
                image_pe=seg.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            expected = F.interpolate(masks, size=(128, 128), mode="bilinear", align_corners=False)
            torch.testing.assert_close(logits[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_multiclass_starts_from_mask_token_zero():
    torch.manual_seed(0)
    seg = build_segmenter("tiny", num_classes=3, input_size=128, checkpoint="random").eval()
    decoder = seg.mask_decoder
    assert decoder.mask_tokens.weight.shape[0] == 3 and len(decoder.output_hypernetworks_mlps) == 3
    with torch.no_grad():
        logits = seg(torch.randn(2, 3, 128, 128))
    assert logits.shape == (2, 3, 128, 128)
    # identical tokens and MLPs at init -> identical class maps
    torch.testing.assert_close(logits[:, 0], logits[:, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 0], logits[:, 2], atol=1e-5, rtol=1e-5)
    # copies, not shared modules
    assert decoder.output_hypernetworks_mlps[0].layers[0].weight is not \
        decoder.output_hypernetworks_mlps[1].layers[0].weight


def test_tiny_is_sam_image_encoder_design():
    spec = BACKBONES["tiny"]
    seg = build_segmenter("tiny", input_size=256, checkpoint="random")
    reference = ImageEncoderViT(
        img_size=256, patch_size=16, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=4, out_chans=spec.prompt_embed_dim,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
        window_size=spec.window_size, global_attn_indexes=spec.global_attn_indexes,
    )
    ours = {k: v.shape for k, v in seg.image_encoder.state_dict().items()}
    assert ours == {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"backbone": "vit_x"}, "vit_x"),
        ({"input_size": 100}, "100"),
        ({"input_size": 0}, "0"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_build_rejects_bad_arguments(kwargs, word):
    args = {"backbone": "tiny", "checkpoint": "random", **kwargs}
    with pytest.raises(ConfigError, match=word):
        build_segmenter(**args)


def test_wrong_image_size_is_rejected():
    seg = build_segmenter("tiny", input_size=128, checkpoint="random")
    with pytest.raises(ValueError, match="128"):
        seg(torch.zeros(1, 3, 64, 64))


def test_random_checkpoint_info():
    seg = build_segmenter("tiny", input_size=64, checkpoint="random")
    assert seg.checkpoint_info == {"backbone": "tiny", "source": "random", "path": None,
                                   "sha256": None}
    assert (seg.backbone, seg.num_classes, seg.input_size) == ("tiny", 1, 64)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from automask.peft import apply_peft, aux_loss

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = apply_peft(build_segmenter("tiny", input_size=64, checkpoint="random"),
                           "conv_lora")
        with torch.no_grad():  # a non-zero update, and gates that route somewhere
            for name, param in model.named_parameters():
                if "lora_B" in name or "w_gate" in name or "w_noise" in name:
                    param.normal_(0, 0.5)
        model.train()
        model.gradient_checkpointing = checkpointing
        calls = []
        # count the block's runs by its first norm's calls (forward hooks do not see
        # recomputes; the block itself is not called where automask skips its padding)
        norm = model.image_encoder.blocks[0].norm1
        norm_forward = norm.forward
        norm.forward = lambda x, f=norm_forward, c=calls: c.append(1) or f(x)
        torch.manual_seed(1)  # same gate noise in both runs
        logits = model(torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
        loss = logits.square().mean() + aux_loss(model)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    assert any("experts" in n for n in grads_a) and any("w_gate" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "conv_lora"])
def test_encoder_layer_norms_copy_nothing(method):
    # segment-anything's patch embedding is a permuted view; kept so, every residual sum
    # inherits its layout and every block's layer norms copy their input, forward and backward.
    from automask.peft import apply_peft
    from conftest import layer_norm_copies

    torch.manual_seed(0)
    seg = build_segmenter("tiny", input_size=128, checkpoint="random")
    apply_peft(seg, method)
    norms, copies = layer_norm_copies(seg.train().encode, torch.randn(1, 3, 128, 128))
    # norm1 and norm2, forward and backward (the first norm1's input needs no gradient)
    assert norms == 4 * len(seg.image_encoder.blocks) - 1
    assert copies == 0


def test_model_path_leaves_pandas_and_scipy_unimported():
    # building and training a segmenter needs neither: they load with parameter_summary and
    # the multi-class head's first matching (about 60 MiB of resident memory and their
    # import time for a process that only builds and runs the model, as the peer worker of
    # benchmarks/ does)
    probe = (
        "import sys\n"
        "import automask.models, automask.peft, automask.losses, automask.hardware\n"
        "import automask.models.mask_classification, automask.models.frozen\n"
        "print(sorted(m for m in ('pandas', 'scipy') if m in sys.modules))\n"
        "from automask.models import parameter_summary\n"
        "assert len(parameter_summary('tiny', methods=['lora'])) == 1\n"
        "print(sorted(m for m in ('pandas',) if m in sys.modules))\n"
    )
    from conftest import python_stdout

    out = python_stdout(probe)
    assert out.split("\n")[:2] == ["[]", "['pandas']"], out
