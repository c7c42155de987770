"""The segmenter and its heads with the inputs users really give, and the parameter summary.

Tiny backbone, random weights, 16-64 px inputs. Tests marked "guard" in their docstring
check behaviour that was already right.
"""
from __future__ import annotations

import pytest
import torch
from segment_anything import sam_model_registry

from automask.errors import ConfigError
from automask.models import BACKBONES, Prompt, build_segmenter, parameter_summary
from automask.models.backbones import get_spec
from automask.models.mask_classification import semantic_log_probs
from automask.models.summary import sam_parameter_count
from automask.peft import PEFT_METHODS, apply_peft

S = 64


def _model(num_classes: int = 1, head: str = "tokens", size: int = S):
    torch.manual_seed(0)
    return build_segmenter("tiny", num_classes=num_classes, input_size=size,
                           checkpoint="random", multiclass_head=head).eval()


def _count_encoder_runs(model) -> list:
    """A list that grows by one each time the patch embedding runs."""
    calls: list = []
    model.image_encoder.patch_embed.register_forward_hook(lambda *args: calls.append(1))
    return calls


# ------------------------------------------------------------------ images
@pytest.mark.parametrize("head", ["tokens", "mask_classification"])
@pytest.mark.parametrize("images, word", [
    (torch.zeros(1, 1, S, S), r"\(1, 1, 64, 64\)"),  # grayscale
    (torch.zeros(2, 4, S, S), r"\(2, 4, 64, 64\)"),  # RGBA
    (torch.zeros(1, 3, S, S, dtype=torch.uint8), "torch.uint8"),  # raw pixels
], ids=["gray", "rgba", "uint8"])
def test_images_the_model_cannot_take_are_refused_before_encoding(head, images, word):
    """A grayscale, RGBA or uint8 batch is a ValueError naming its shape or dtype, raised
    before the encoder runs (it was a bare conv2d RuntimeError from inside the encoder)."""
    model = _model(3 if head == "mask_classification" else 1, head)
    calls = _count_encoder_runs(model)
    with torch.no_grad(), pytest.raises(ValueError, match=word):
        model(images)
    if head == "mask_classification":
        with torch.no_grad(), pytest.raises(ValueError, match=word):
            model.forward_queries(images)
    assert calls == []


def test_memory_layouts_batches_and_grad_modes_give_the_same_logits():
    """Guard: channels_last, a non-contiguous view, one image alone, train mode (no
    dropout in SAM) and inference_mode give the contiguous eval batch's logits."""
    model = _model()
    images = torch.randn(2, S, S, 3, generator=torch.Generator().manual_seed(1))
    view = images.permute(0, 3, 1, 2)  # (B, 3, S, S), not contiguous
    assert not view.is_contiguous()
    with torch.no_grad():
        reference = model(view.contiguous())  # (2, 1, S, S)
        assert reference.shape == (2, 1, S, S)
        torch.testing.assert_close(model(view), reference, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            model(view.contiguous(memory_format=torch.channels_last)), reference,
            atol=1e-6, rtol=0)
        torch.testing.assert_close(model(view[1:]), reference[1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.train()(view), reference, atol=1e-6, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(view), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [16, 48])
def test_inputs_of_one_patch_or_a_part_window_give_full_size_finite_logits(size):
    """Guard: 16 px (one token, the decoder's map 4 x 4) and 48 px (3 x 3 tokens inside an
    8-token window) come out (B, C, S, S) and finite, for both multi-class heads."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    for num_classes, head in ((1, "tokens"), (3, "tokens"), (3, "mask_classification")):
        with torch.no_grad():
            out = _model(num_classes, head, size)(x)
        assert out.shape == (2, num_classes, size, size)
        assert torch.isfinite(out).all()


# ------------------------------------------------------------------ prompts
@pytest.mark.parametrize("prompt, word", [
    (Prompt(points=torch.tensor([[3.0, 4.0]])), "points need labels"),
    (Prompt(points=torch.tensor([[3.0, 4.0], [5.0, 6.0]]), labels=torch.tensor([1])),
     "2 points but 1 labels"),
    (Prompt(points=torch.tensor([3.0, 4.0, 5.0])), r"\(N, 2\).*3 numbers"),
    (Prompt(box=torch.tensor([1.0, 2.0, 30.0])), "4 numbers.*got 3"),
    (Prompt(labels=torch.tensor([1]), box=torch.tensor([1.0, 2.0, 30.0, 40.0])),
     "labels given without points"),
], ids=["no-labels", "label-count", "odd-coordinates", "box-3", "labels-only"])
def test_a_prompt_sam_cannot_take_names_its_image_before_encoding(prompt, word):
    """A malformed Prompt is a ValueError naming the image and the fault, raised before the
    encoder runs (it was a TypeError, IndexError or RuntimeError from SAM's prompt
    encoder after the whole batch was encoded; labels without points were dropped)."""
    model = _model()
    calls = _count_encoder_runs(model)
    with torch.no_grad(), pytest.raises(ValueError, match=f"prompt of image 1: .*{word}"):
        model(torch.zeros(2, 3, S, S), [None, prompt])
    assert calls == []


def test_well_formed_prompts_still_decode():
    """Guard: points with labels (tensors or lists) and a box list still pass the checks."""
    model = _model()
    prompts = [Prompt(points=[[3.0, 4.0], [20.0, 30.0]], labels=[1, 0]),
               Prompt(box=[1.0, 2.0, 30.0, 40.0]), None]
    with torch.no_grad():
        out = model(torch.randn(3, 3, S, S), prompts)
    assert out.shape == (3, 1, S, S) and torch.isfinite(out).all()


# ------------------------------------------------------------------ heads
@pytest.mark.parametrize("head", ["tokens", "mask_classification"])
def test_classes_cannot_be_set_after_a_peft_method(head):
    """set_num_classes after apply_peft is refused (its docstring says it is valid only
    before any PEFT method) and leaves the model binary; it used to add a head trained
    outside the method's choice, which a saved model rebuilt in the right order lacks."""
    model = apply_peft(_model(), "lora")
    tokens = model.mask_decoder.mask_tokens.weight
    with pytest.raises(ConfigError, match="before applying a PEFT method.*'lora'"):
        model.set_num_classes(3, head=head)
    assert model.num_classes == 1 and model.multiclass_head == "tokens"
    assert model.mask_decoder.mask_tokens.weight is tokens


def test_the_mask_classification_head_needs_two_classes():
    """set_mask_classification(1) is refused: it made a binary model whose one output map
    was a log-probability, sigmoid-thresholded by the binary pipeline."""
    model = _model()
    with pytest.raises(ConfigError, match="num_classes >= 2.*got 1"):
        model.set_mask_classification(1)
    assert model.num_classes == 1 and model.multiclass_head == "tokens"
    assert not hasattr(model.mask_decoder, "class_head")


@pytest.mark.parametrize("num_queries", [0, 2.5])
def test_a_bad_query_count_is_refused_before_the_checkpoint_is_looked_up(tmp_path, num_queries):
    """build_segmenter(num_queries=0) checked the count only after finding (or downloading)
    and loading the checkpoint: here a missing file was reported instead of the count."""
    with pytest.raises(ConfigError, match=f"num_queries must be an integer >= 1, got "
                                          f"{num_queries!r}"):
        build_segmenter("tiny", num_classes=3, input_size=S, checkpoint=tmp_path / "none.pth",
                        multiclass_head="mask_classification", num_queries=num_queries)


def _maskformer_scores(class_logits, mask_logits):
    """(B, K, H, W) float64 ``sum_q softmax(class_q)[k] * sigmoid(mask_q)``, the reference."""
    probs = class_logits.double().softmax(-1)[..., :-1]
    return torch.einsum("bqk,bqhw->bkhw", probs, mask_logits.double().sigmoid())


def test_semantic_inference_keeps_the_maskformer_argmax_where_every_mask_is_far_off():
    """Where every query's mask logit is below about -28, every class score is below
    1e-12; they were all clamped to 1e-12, so argmax gave class 0 whatever the queries
    said. MaskFormer's argmax (float64 reference) is kept, with the exact log-scores."""
    gen = torch.Generator().manual_seed(3)
    class_logits = torch.randn(2, 4, 6, generator=gen) * 3  # Q = 4 queries, K = 5 classes
    mask_logits = torch.randn(2, 4, 5, 7, generator=gen) * 4 - 40  # (B, Q, H, W), all < -20
    reference = _maskformer_scores(class_logits, mask_logits)  # (B, K, H, W)
    assert reference.max() < 1e-12  # the case: every score below the old floor
    out = semantic_log_probs(class_logits, mask_logits)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out.argmax(1), reference.argmax(1))
    torch.testing.assert_close(out.double(), reference.log(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.softmax(1).double(),
                               reference / reference.sum(1, keepdim=True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_semantic_inference_is_float32_under_bf16_autocast(num_classes):
    """semantic_log_probs casts to float32 for its mixture, but under CPU bf16 autocast
    (prediction with env.precision="bf16") einsum ran in bf16 anyway and returned bf16:
    now its result equals the float32 one, for K = 2 and K > 2."""
    gen = torch.Generator().manual_seed(4)
    class_logits = torch.randn(2, 7, num_classes + 1, generator=gen) * 2
    mask_logits = torch.randn(2, 7, 9, 11, generator=gen) * 4
    plain = semantic_log_probs(class_logits, mask_logits)
    torch.testing.assert_close(plain.double(), _maskformer_scores(class_logits,
                                                                  mask_logits).log(),
                               atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = semantic_log_probs(class_logits, mask_logits)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, atol=0, rtol=0)


def test_mask_classification_forward_under_bf16_autocast_is_finite_float32():
    """The mask-classification forward under CPU bf16 autocast: finite float32 log-probs
    close to the float32 forward's, whose softmax sums to 1 over classes."""
    model = _model(3, "mask_classification")
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        plain = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed, plain, atol=0.05, rtol=0)
    torch.testing.assert_close(mixed.softmax(1).sum(1), torch.ones(2, S, S))


# ------------------------------------------------------------------ backbones, summary
def test_an_unknown_backbone_lists_every_known_one():
    """Guard: the error names the bad value and every registered backbone."""
    with pytest.raises(ConfigError, match="'vit_g'") as info:
        get_spec("vit_g")
    assert all(repr(name) in str(info.value) for name in BACKBONES)


def test_tiny_is_vit_b_with_fewer_and_narrower_blocks():
    """Guard: ``tiny`` is built from the same segment-anything classes as ``vit_b``, with the
    same state-dict keys (its first 4 blocks), so every PEFT method sees the same layers."""
    def parts(name):
        with torch.device("meta"):
            return build_segmenter(name, input_size=256, checkpoint="random")

    tiny, vit_b = parts("tiny"), parts("vit_b")
    depth = BACKBONES["tiny"].depth
    for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
        assert type(getattr(tiny, name)) is type(getattr(vit_b, name)), name
    keep = {k for k in vit_b.state_dict()
            if not k.startswith("image_encoder.blocks.")
            or int(k.split(".")[2]) < depth}
    assert set(tiny.state_dict()) == keep
    assert {type(m) for m in tiny.modules()} == {type(m) for m in vit_b.modules()}


def test_sam_parameter_counts_are_segment_anythings_own():
    """Guard: the whole-model counts (93.74M, 312.34M, 641.09M) are those of
    segment-anything's own builders, counted on the meta device."""
    for name in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            reference = sum(p.numel() for p in sam_model_registry[name]().parameters())
        assert sam_parameter_count(name) == reference


@pytest.mark.parametrize("num_classes, head", [(1, "tokens"), (3, "mask_classification")])
def test_summary_counts_are_the_trainable_parameters_of_a_built_model(num_classes, head):
    """Guard: for every method, trainable / total / ratio of parameter_summary are what
    counting ``requires_grad`` on a built and adapted model gives."""
    table = parameter_summary("tiny", num_classes=num_classes,
                              multiclass_head=head).set_index("method")
    assert list(table.index) == list(PEFT_METHODS)
    for method in PEFT_METHODS:
        model = apply_peft(build_segmenter("tiny", num_classes=num_classes,
                                           input_size=BACKBONES["tiny"].pretrain_size,
                                           checkpoint="random", multiclass_head=head), method)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        row = table.loc[method]
        assert (row["trainable"], row["total"]) == (trainable, total), method
        assert row["ratio_pct"] == round(100.0 * trainable / total, 2), method


def test_summary_counts_classes_as_fit_does_two_are_binary():
    """params --num-classes 2 counted a 2-token head that no fit builds (fit(num_classes=2)
    is binary); classes are counted background included, as in fit."""
    one, two, three = (parameter_summary("tiny", methods=["lora"], num_classes=k)
                       for k in (1, 2, 3))
    assert two.equals(one)
    assert three["trainable"].item() > one["trainable"].item()
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 1, got 0"):
        parameter_summary("tiny", methods=["lora"], num_classes=0)


@pytest.mark.parametrize("kwargs, word", [
    ({"rnak": 4}, r"\['rnak'\].*'rnak' is no PEFT option"),
    ({"methods": ["bitfit"], "rank": 4}, r"\['rank'\].*'rank' is used by .*lora"),
    ({"methods": "lora"}, r"list of method names.*'lora'"),
], ids=["typo", "unused", "string"])
def test_summary_refuses_options_no_method_uses(kwargs, word):
    """A misspelt option (or one none of the methods uses) was dropped silently, so the
    table showed the defaults' counts; a string for ``methods`` was read letter by letter
    ("unknown PEFT method 'l'"). Both are ConfigErrors naming the value."""
    with pytest.raises(ConfigError, match=word):
        parameter_summary("tiny", **kwargs)
