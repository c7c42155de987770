"""SAM 2.1 (Hiera) backbones: parity with the sam2 package, PEFT, checkpoints, a real fit.

Needs the ``sam2`` extra. Without it the module is skipped with a reason, except when
``AUTOMASK_REQUIRE_SAM2=1`` (set by CI, which installs the extra): then it fails.
"""
from __future__ import annotations

import copy
import hashlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

if os.environ.get("AUTOMASK_REQUIRE_SAM2") == "1":
    import sam2  # noqa: F401  (the extra is required here: a missing package fails)
else:
    pytest.importorskip("sam2", reason="SAM 2.1 tests need the sam2 extra: "
                                       "pip install 'automask[sam2]'")

from automask import SemanticSegmentor  # noqa: E402
from automask.datasets import make_synthetic, train_test_split  # noqa: E402
from automask.errors import CheckpointError, ConfigError  # noqa: E402
from automask.models import build_segmenter, parameter_summary  # noqa: E402
from automask.models.checkpoint import env_name  # noqa: E402
from automask.models.sam2 import SAM2_BACKBONES, Sam2Segmenter  # noqa: E402
from automask.peft import apply_peft, aux_loss  # noqa: E402
from automask.peft.conv_lora import ConvLoRALinear  # noqa: E402
from automask.saving import rebuild_model  # noqa: E402
from automask.utils import cache_dir  # noqa: E402

from cli_process import run_automask

SIZE = 64
TINY = "sam2_tiny"
METHODS = ["decoder_only", "bitfit", "adapter", "lora", "conv_lora", "full", "scratch"]


def _tiny(num_classes: int = 1, size: int = SIZE, seed: int = 0) -> Sam2Segmenter:
    torch.manual_seed(seed)
    seg = build_segmenter(TINY, num_classes=num_classes, input_size=size, checkpoint="random")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial weights everywhere (Hiera zero-inits position tables)
        for param in seg.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return seg


def _images(batch: int = 2, size: int = SIZE, seed: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _loss(logits: torch.Tensor, model) -> torch.Tensor:
    target = (torch.arange(logits.shape[-1]) % 3 == 0).float().expand_as(logits)
    if logits.shape[1] > 1:
        return F.cross_entropy(logits, target[:, 0].long()) + aux_loss(model)
    return F.binary_cross_entropy_with_logits(logits, target) + aux_loss(model)


def _wake_zero_inits(seg) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in seg.parameters():
            if param.requires_grad and not param.abs().sum() > 0:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _package_forward(seg: Sam2Segmenter, images: torch.Tensor) -> torch.Tensor:
    """The sam2 package's own image path (SAM2Base.forward_image, SAM2ImagePredictor's
    no_mem_embed, MaskDecoder.forward with empty prompts), one image at a time."""
    outs = []
    for image in images.split(1):
        backbone = seg.image_encoder(image)  # the package's ImageEncoder.forward
        fpn = backbone["backbone_fpn"]
        feat_s0 = seg.mask_decoder.conv_s0(fpn[0])
        feat_s1 = seg.mask_decoder.conv_s1(fpn[1])
        embed = fpn[2] + seg.no_mem_embed.reshape(1, -1, 1, 1)
        sparse, dense = seg.prompt_encoder(points=None, boxes=None, masks=None)
        masks, _, _, _ = seg.mask_decoder(
            image_embeddings=embed, image_pe=seg.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=False, repeat_image=False, high_res_features=[feat_s0, feat_s1])
        outs.append(F.interpolate(masks, size=image.shape[-2:], mode="bilinear",
                                  align_corners=False))
    return torch.cat(outs)


# ------------------------------------------------------------------------ the model
@pytest.mark.parametrize("size", [64, 96])
def test_forward_equals_the_sam2_package_image_path(size):
    seg = _tiny(size=size).eval()
    x = _images(size=size)
    with torch.no_grad():
        ours, theirs = seg(x), _package_forward(seg, x)
    assert ours.shape == (2, 1, size, size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["decoder_only", "bitfit", "adapter", "lora", "conv_lora",
                                    "full"])
def test_methods_start_as_the_frozen_model(method):
    seg = _tiny().eval()
    reference = copy.deepcopy(seg)
    apply_peft(seg, method).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(seg(x), reference(x), atol=0, rtol=0)
    assert seg.peft_method == method


def test_trunk_layer_norms_copy_nothing():
    # Hiera's patch embedding and position table are permuted views: kept so, the blocks of
    # the first stage (the largest maps) copy their layer norms' inputs forward and backward.
    from conftest import layer_norm_copies

    seg = _tiny()
    apply_peft(seg, "lora")
    norms, copies = layer_norm_copies(lambda x: seg.train().encode(x)[0], _images())
    assert norms >= 3 * len(seg.image_encoder.trunk.blocks)
    assert copies == 0


def test_conv_lora_sees_each_attention_window_as_a_grid():
    seg = apply_peft(_tiny(), "conv_lora")
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
             for m in seg.modules() if isinstance(m, ConvLoRALinear)]
    seg(_images(batch=1))
    for hook in hooks:
        hook.remove()
    trunk = seg.image_encoder.trunk
    assert len(shapes) == len(trunk.blocks)
    for block, shape in zip(trunk.blocks, shapes):
        assert len(shape) == 4  # (windows, h, w, C)
        if block.window_size > 0:  # windowed block: one grid per window
            assert shape[1] == shape[2] == block.window_size, (block.window_size, shape)


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient(method, num_classes):
    options = {"num_experts": 3} if method == "conv_lora" else {}  # fewer experts to cover
    seg = apply_peft(_tiny(num_classes), method, **options).train()
    _wake_zero_inits(seg)
    routed = [m for m in seg.modules() if isinstance(m, ConvLoRALinear)]
    seen = {id(m): [0] * m.num_experts for m in routed}
    torch.manual_seed(1)
    for _ in range(40):  # conv_lora: until the noisy gate has routed to every expert
        _loss(seg(_images(seed=len(seen))), seg).backward()
        for m in routed:
            seen[id(m)] = [a + b for a, b in zip(seen[id(m)], m.expert_counts)]
        if all(all(c > 0 for c in s) for s in seen.values()):
            break
    assert all(all(c > 0 for c in s) for s in seen.values()), seen
    no_grad = {n for n, p in seg.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    assert trainable
    if method in ("full", "scratch"):
        assert no_grad == set(seg.unused_parameter_names())
    else:
        assert trainable.isdisjoint(no_grad), sorted(trainable & no_grad)
        assert all(p.grad is None for p in seg.parameters() if not p.requires_grad)
        assert not any(n.startswith("mask_decoder.iou_prediction_head") for n in trainable)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        seg = apply_peft(_tiny(seed=2), "conv_lora").train()
        _wake_zero_inits(seg)
        seg.gradient_checkpointing = checkpointing
        torch.manual_seed(5)
        _loss(seg(_images()), seg).backward()
        return {n: p.grad.clone() for n, p in seg.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method", ["lora", "conv_lora", "bitfit", "adapter"])
def test_trainable_weights_round_trip(method):
    seg = apply_peft(_tiny(num_classes=3), method)
    _wake_zero_inits(seg)
    with torch.no_grad():  # stands for training: every trainable tensor moves
        for param in seg.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    seg.eval()
    x = _images()
    with torch.no_grad():
        first = seg(x)
    blob = save({n: p.detach().contiguous() for n, p in seg.named_parameters() if p.requires_grad})
    other = apply_peft(_tiny(num_classes=3), method).eval()
    with torch.no_grad():
        assert not torch.equal(other(x), first)  # the file carries what differs
        state = dict(other.named_parameters())
        for name, value in load(blob).items():
            state[name].copy_(value)
        torch.testing.assert_close(other(x), first, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["vpt", "lst", "sam_adapter", "ssf"])
def test_vit_only_methods_are_refused_naming_the_backbone(method):
    seg = _tiny()
    with pytest.raises(ConfigError, match=f"{method}.*{TINY}"):
        apply_peft(seg, method)
    assert seg.peft_method is None and all(p.requires_grad for p in seg.parameters())


def test_input_size_must_be_a_multiple_of_32():
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_segmenter(TINY, input_size=80, checkpoint="random")


def test_only_the_token_head_is_offered():
    from automask.models.sam2 import build_sam2_segmenter

    with pytest.raises(ConfigError, match="mask_classification.*sam2_tiny"):
        build_sam2_segmenter(TINY, num_classes=3, input_size=SIZE, checkpoint="random",
                             multiclass_head="mask_classification")


def test_missing_extra_gives_one_error_naming_it():
    code = ("import sys; sys.modules['sam2'] = None\n"
            "from automask.errors import ConfigError\n"
            "from automask.models import build_segmenter\n"
            "build_segmenter('vit_b', input_size=64, checkpoint='random')  # core still works\n"
            "try:\n"
            "    build_segmenter('sam2.1_hiera_t', input_size=64, checkpoint='random')\n"
            "except ConfigError as exc:\n"
            "    print('ERR', exc)\n")
    from conftest import python_stdout

    out = python_stdout(code)
    assert "ERR" in out and "pip install 'automask[sam2]'" in out


# ------------------------------------------------------------------------ checkpoints
def _official_file(seg: Sam2Segmenter, path) -> None:
    """Write ``seg``'s weights as SAM 2.1 ships them: {"model": ...} with SAM2Base's key
    names, video-only tensors included."""
    state = {}
    for key, value in seg.state_dict().items():
        key = key.replace("prompt_encoder.", "sam_prompt_encoder.", 1) if key.startswith(
            "prompt_encoder.") else key
        key = key.replace("mask_decoder.", "sam_mask_decoder.", 1) if key.startswith(
            "mask_decoder.") else key
        state[key] = value.clone()
    state["maskmem_tpos_enc"] = torch.randn(7, 1, 1, 64)
    state["memory_attention.layers.0.linear1.weight"] = torch.randn(8, 32)
    state["obj_ptr_proj.layers.0.weight"] = torch.randn(32, 32)
    torch.save({"model": state}, path)


@pytest.fixture
def official(tmp_path):
    seg = _tiny(seed=7)
    path = tmp_path / "served" / "sam2_tiny_official.pt"
    path.parent.mkdir()
    _official_file(seg, path)
    return seg, path, hashlib.sha256(path.read_bytes()).hexdigest()


def _same_outputs(a, b) -> None:
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=0, rtol=0)


def test_official_format_by_path(official):
    seg, path, digest = official
    loaded = build_segmenter(TINY, input_size=SIZE, checkpoint=path)
    assert loaded.checkpoint_info == {"backbone": TINY, "source": "file", "path": str(path),
                                      "sha256": digest}
    _same_outputs(loaded, seg)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_a_model_from_a_file_takes_its_tensors_without_a_random_initialisation(
        official, num_classes):
    """Built on the meta device and given the file's tensors: torch's global generator is
    not drawn from (Hiera's random initialisation would draw from it), every parameter is
    a trainable float32 CPU tensor with memory of its own, and the model computes what one
    initialised at random and then loaded computes, binary or with K classes."""
    from automask.models.sam2 import build_sam2_parts, load_sam2_weights

    seg, path, _ = official
    torch.manual_seed(11)
    before = torch.get_rng_state()
    model = build_segmenter(TINY, num_classes=num_classes, input_size=SIZE, checkpoint=path)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu"
               for p in model.parameters())
    state = model.state_dict()
    storages = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(storages)) == len(storages)
    reference = Sam2Segmenter(*build_sam2_parts(SAM2_BACKBONES[TINY], SIZE), backbone=TINY,
                              input_size=SIZE)
    load_sam2_weights(reference, path)
    reference.set_num_classes(num_classes)
    assert list(state) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key
    _same_outputs(model, reference)


def test_official_format_by_download_then_cache(official, http_server, monkeypatch):
    seg, path, digest = official
    assert env_name("sam2.1_hiera_b+") == "SAM2_1_HIERA_BPLUS"
    monkeypatch.setenv(f"AUTOMASK_SAM_URL_{env_name(TINY)}",
                       f"{http_server(path.parent)}/{path.name}")
    monkeypatch.setenv(f"AUTOMASK_SAM_SHA256_{env_name(TINY)}", digest)
    downloaded = build_segmenter(TINY, input_size=SIZE, progress=False)
    assert downloaded.checkpoint_info["source"] == "download"
    cached = cache_dir() / "checkpoints" / f"{TINY}--{path.name}"  # a mirror's file
    assert cached.read_bytes() == path.read_bytes()
    _same_outputs(downloaded, seg)
    again = build_segmenter(TINY, input_size=SIZE, progress=False)
    assert again.checkpoint_info["source"] == "cache" and again.checkpoint_info["sha256"] == digest
    _same_outputs(again, seg)


def test_download_with_wrong_sha_keeps_nothing(official, http_server, monkeypatch):
    _, path, _ = official
    monkeypatch.setenv(f"AUTOMASK_SAM_URL_{env_name(TINY)}",
                       f"{http_server(path.parent)}/{path.name}")
    monkeypatch.setenv(f"AUTOMASK_SAM_SHA256_{env_name(TINY)}", "0" * 64)
    with pytest.raises(CheckpointError, match="SHA-256"):
        build_segmenter(TINY, input_size=SIZE, progress=False)
    folder = cache_dir() / "checkpoints"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_offline_error_names_the_three_ways(monkeypatch):
    monkeypatch.setenv(f"AUTOMASK_SAM_URL_{env_name('sam2.1_hiera_b+')}",
                       "http://127.0.0.1:9/sam2.1_hiera_base_plus.pt")  # closed port
    with pytest.raises(CheckpointError) as err:
        build_segmenter("sam2.1_hiera_b+", input_size=SIZE, progress=False)
    message = str(err.value)
    assert "(1) pass" in message and "(2) place that file in the cache" in message
    assert "(3) let automask download" in message
    assert "sam2.1_hiera_base_plus.pt" in message and "SAM2_1_HIERA_BPLUS" in message
    assert "official SAM 2.1 .pt file" in message and "segment-anything" not in message


@pytest.mark.parametrize("images, word", [
    (torch.zeros(1, 1, SIZE, SIZE), r"\(1, 1, 64, 64\)"),  # grayscale
    (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), "torch.uint8"),  # raw pixels
], ids=["gray", "uint8"])
def test_images_hiera_cannot_take_are_refused_with_their_shape_or_dtype(images, word):
    """A grayscale or uint8 batch is a ValueError naming it, as for SAM's ViT, not an
    error from inside Hiera's patch embedding."""
    seg = build_segmenter(TINY, input_size=SIZE, checkpoint="random").eval()
    with torch.no_grad(), pytest.raises(ValueError, match=word):
        seg(images)


def test_a_checkpoint_of_another_backbone_is_refused(tmp_path):
    path = tmp_path / "sam1_tiny.pth"
    torch.save(build_segmenter("tiny", input_size=SIZE, checkpoint="random").state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit backbone 'sam2_tiny'"):
        build_segmenter(TINY, input_size=SIZE, checkpoint=path)


def test_official_sam2_1_keys_load_strictly(tmp_path):
    """The sam2 package's own SAM2Base for sam2.1_hiera_t (built by its hydra config)
    loads into our sam2.1_hiera_t segmenter, every image-model tensor equal."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    official_model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None,
                                device="cpu", apply_postprocessing=False)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official_model.state_dict()}, path)
    seg = build_segmenter("sam2.1_hiera_t", input_size=SIZE, checkpoint=path)
    ours = seg.state_dict()
    theirs = official_model.state_dict()
    for key, value in ours.items():
        source = key
        for a, b in (("prompt_encoder.", "sam_prompt_encoder."),
                     ("mask_decoder.", "sam_mask_decoder.")):
            if key.startswith(a):
                source = b + key[len(a):]
        torch.testing.assert_close(value, theirs[source], atol=0, rtol=0, msg=key)


# ------------------------------------------------------------------------ parameter counts
def test_lora_counts_follow_hiera_widths():
    table = parameter_summary("sam2.1_hiera_l", methods=["decoder_only", "lora", "full"])
    rows = table.set_index("method")["trainable"]
    spec = SAM2_BACKBONES["sam2.1_hiera_l"]
    rank, expected, dim = 3, 0, spec.embed_dim
    for stage, blocks in enumerate(spec.stages):
        for _ in range(blocks):
            dim_out = spec.embed_dim * 2 ** stage
            expected += rank * (dim + 3 * dim_out)  # A: dim -> r, B: r -> 3 * dim_out
            dim = dim_out
    assert rows["lora"] - rows["decoder_only"] == expected
    assert rows["full"] == table["total"].iloc[0]


def test_params_cli_lists_the_supported_methods():
    out = run_automask("params", "--backbone", "sam2.1_hiera_b+", timeout=300)
    assert out.returncode == 0, out.stderr
    methods = [line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip()]
    assert methods == ["scratch", "decoder_only", "bitfit", "adapter", "lora", "conv_lora",
                       "full"]


# ------------------------------------------------------------------------ a real fit
def test_fit_predict_save_load(tmp_path):
    frame = make_synthetic(16, size=(64, 80), num_classes=2, seed=1, root=tmp_path / "data")
    train, test = train_test_split(frame, test_size=0.25, seed=0)
    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0).fit(
        train, presets="tiny",
        hyperparameters={"model.backbone": TINY, "model.checkpoint": "random",
                         "model.input_size": 64, "peft.method": "lora",
                         "optim.max_epochs": 2, "optim.batch_size": 4})
    masks = seg.predict(test)
    assert len(masks) == len(test) and all(m.shape == (64, 80) for m in masks)
    scores = seg.evaluate(test)
    assert 0.0 <= scores["iou"] <= 1.0
    loaded = SemanticSegmentor.load(tmp_path / "run")
    model = rebuild_model(loaded, loaded.best_model_)
    assert isinstance(model, Sam2Segmenter) and model.peft_method == "lora"
    for a, b in zip(masks, loaded.predict(test)):
        np.testing.assert_array_equal(a, b)


def test_paper_head_on_sam2_multiclass_fails_before_any_folder(tmp_path):
    """The paper presets use the mask-classification head, which SAM 2.1 lacks."""
    from automask import SemanticSegmentor
    from automask.datasets import make_synthetic
    from automask.errors import ConfigError

    frame = make_synthetic(6, size=64, num_classes=3, seed=0, root=tmp_path / "data")
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"multiclass_head.*sam2_tiny.*'tokens'"):
        SemanticSegmentor(path=run, verbosity=0).fit(
            frame, presets="tiny", hyperparameters={
                "model.backbone": "sam2_tiny", "model.multiclass_head": "mask_classification"})
    assert not run.exists()


def test_a_paper_table_preset_on_sam2_fails_before_any_folder(tmp_path):
    """paper_table's vpt, lst, sam_adapter and ssf need SAM's ViT: on a SAM 2.1 backbone
    the fit is refused at once, naming a candidate of such a method, not after training the
    supported candidates that come before it in the table."""
    from automask import SemanticSegmentor
    from automask.datasets import make_synthetic
    from automask.errors import ConfigError

    frame = make_synthetic(6, size=64, num_classes=2, seed=0, root=tmp_path / "data")
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"'vpt' is not supported on the SAM 2.1 backbone "
                                          r"'sam2_tiny'"):
        SemanticSegmentor(path=run, verbosity=0).fit(
            frame, presets="paper_table", hyperparameters={
                "model.backbone": "sam2_tiny", "model.input_size": 64,
                "optim.max_epochs": 1})
    assert not run.exists()


def test_sam2_decoder_only_trains_part_of_what_encode_computes():
    """SAM 2's ``encode`` also runs the mask decoder's two high-resolution convolutions,
    which train under ``decoder_only``: its features are not fixed, so nothing is kept."""
    model = build_segmenter(TINY, input_size=SIZE, checkpoint="random", progress=False)
    apply_peft(model, "decoder_only")
    assert model.mask_decoder.conv_s0.weight.requires_grad
    assert not model.encoder_is_frozen()
    model.mask_decoder.conv_s0.requires_grad_(False)
    model.mask_decoder.conv_s1.requires_grad_(False)
    assert model.encoder_is_frozen()
