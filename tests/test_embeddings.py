"""Image embeddings reused while the encoder is frozen (automask.training.embeddings)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from automask import SemanticSegmentor
from automask.config import OptimConfig
from automask.data import AugmentConfig
from automask.datasets import make_synthetic
from automask.models import SamSegmenter, build_segmenter
from automask.peft import apply_peft
from automask.plots import read_history
from automask.training.embeddings import EmbeddingCache, input_key, why_training_varies
from automask.training.module import SegmentationModule

S = 64


def _model(method="decoder_only", seed=0):
    torch.manual_seed(seed)
    model = build_segmenter("tiny", input_size=S, checkpoint="random", progress=False)
    apply_peft(model, method)
    return model.train()


def _images(n, seed=0):
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def test_input_key_tells_apart_values_shape_and_dtype():
    image = _images(1)[0]
    assert input_key(image) == input_key(image.clone())
    assert input_key(image) != input_key(image.flip(-1))  # a flipped version is another input
    assert input_key(image) != input_key(image.reshape(3, S // 2, 2 * S))  # same bytes
    doubled = image.double()
    assert input_key(doubled) != input_key(image)
    assert input_key(image[:, :, ::2]) == input_key(image[:, :, ::2].contiguous())  # strides


def test_kept_features_are_the_encoders_output_and_the_batch_is_reassembled_in_order():
    model = _model()
    images = _images(3)
    keys = [input_key(x) for x in images]
    cache = EmbeddingCache(memory_mb=64)
    with torch.no_grad():
        first = cache.features(model, images, keys)  # all missing: the encoder's own output
        assert torch.equal(first, model.encode(images))
        assert (cache.hits, cache.misses, len(cache)) == (0, 3, 3)
        again = cache.features(model, images, keys)  # all kept
        assert torch.equal(again, first) and cache.hits == 3
        # two kept, one new in the middle: the new one is encoded alone
        new = _images(1, seed=1)
        mixed_images = torch.stack([images[2], new[0], images[0]])
        mixed = cache.features(model, mixed_images,
                               [keys[2], input_key(new[0]), keys[0]])
        assert torch.equal(mixed[0], first[2]) and torch.equal(mixed[2], first[0])
        assert torch.equal(mixed[1], model.encode(new)[0])
    assert (cache.hits, cache.misses, len(cache)) == (5, 4, 4)
    row_bytes = first[0].numel() * first.element_size()
    assert cache.used_bytes == 4 * row_bytes


def test_nothing_is_kept_beyond_the_budget():
    model = _model()
    images = _images(4)
    keys = [input_key(x) for x in images]
    with torch.no_grad():
        row_bytes = model.encode(images[:1]).numel() * 4
        cache = EmbeddingCache(memory_mb=2.5 * row_bytes / 2**20)  # room for two rows
        first = cache.features(model, images, keys)
        assert len(cache) == 2 and cache.used_bytes == 2 * row_bytes
        again = cache.features(model, images, keys)  # the other two are encoded again
    assert cache.hits == 2 and cache.misses == 6
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="memory_mb"):
        EmbeddingCache(-1)


def test_a_training_step_on_kept_embeddings_has_the_same_loss_and_gradients():
    """The step that reads the embeddings back matches a module that runs the encoder."""
    batch = {"image": _images(2, seed=3),
             "target": (torch.rand(2, S, S, generator=torch.Generator().manual_seed(4)) > 0.5
                        ).long()}
    runs = []
    for cache in (EmbeddingCache(64), None):
        module = SegmentationModule(_model(seed=7), task="binary", num_classes=2,
                                    optim=OptimConfig(), val_metric="iou",
                                    embedding_cache=cache)
        module.log = lambda *args, **kwargs: None
        steps = []
        for _ in range(2):  # the second step of the cached module reads the kept rows
            with torch.no_grad():  # the decoder changes between the steps, as in training
                for p in module.model.mask_decoder.parameters():
                    p.add_(0.01)
            loss = module.training_step(module.on_before_batch_transfer(dict(batch), 0), 0)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in module.named_parameters()
                     if p.grad is not None}
            module.zero_grad()
            steps.append((loss.detach(), grads))
        runs.append(steps)
        if cache is not None:
            assert (cache.hits, cache.misses) == (2, 2)
    for (loss_c, grads_c), (loss, grads) in zip(*runs):
        assert torch.equal(loss_c, loss)
        assert grads_c.keys() == grads.keys() and len(grads) > 10
        scale = max(float(g.abs().max()) for g in grads.values())
        for name in grads:
            if name.endswith("k_proj.bias"):
                # zero in exact arithmetic (a shift common to all of a query's scores does
                # not change its softmax): what is left is rounding noise, which depends on
                # where the tensors sit in memory
                assert float(grads[name].abs().max()) < 1e-6 * scale, name
                assert float(grads_c[name].abs().max()) < 1e-6 * scale, name
            else:
                assert torch.equal(grads_c[name], grads[name]), name


def test_encoder_is_frozen_only_when_nothing_it_computes_with_changes():
    model = _model()
    assert isinstance(model, SamSegmenter) and model.encoder_is_frozen()
    assert not _model("lora").encoder_is_frozen()
    assert not _model("vpt").encoder_is_frozen()  # its hook adds prompt tokens
    model.image_encoder.neck[0].weight.requires_grad_(True)
    assert not model.encoder_is_frozen()
    # a random layer in the frozen encoder makes its output differ from call to call in
    # training, whatever the mode the model is in when asked
    model = _model().eval()
    model.image_encoder.blocks[0].mlp.lin2 = torch.nn.Sequential(
        model.image_encoder.blocks[0].mlp.lin2, torch.nn.Dropout(0.1))
    assert not model.encoder_is_frozen()


def test_why_training_varies_names_the_continuous_augmentation():
    assert why_training_varies(None) is None
    assert why_training_varies(AugmentConfig(hflip=True, vflip=True)) is None
    assert "scal" in why_training_varies(AugmentConfig(scale_range=(0.8, 1.2)))
    assert "rotation" in why_training_varies(AugmentConfig(rotate_degrees=10))
    assert "jitter" in why_training_varies(AugmentConfig(color_jitter=0.2))


def test_keys_leave_out_the_images_that_will_not_come_again():
    images = _images(3)
    # (H, W): resized / a random crop in training ("auto": longer side > 1.25 S) / resized
    sizes = torch.tensor([[40, 48], [S, 2 * S], [S + 8, S]])
    cache = EmbeddingCache(64, input_size=S, large_images="auto")
    train = cache.keys(images, sizes, training=True)
    assert train[0] == input_key(images[0]) and train[2] == input_key(images[2])
    assert train[1] is None
    assert cache.keys(images, sizes, training=False) == [input_key(x) for x in images]
    assert cache.keys(images, sizes, training=True) == train
    resized = EmbeddingCache(64, input_size=S, large_images="resize")
    assert None not in resized.keys(images, sizes, training=True)
    varying = EmbeddingCache(64, input_size=S, training_repeats=False)
    assert varying.keys(images, sizes, training=True) == [None] * 3
    assert None not in varying.keys(images, sizes, training=False)  # validation repeats
    model = _model()
    with torch.no_grad():
        first = cache.features(model, images, train)
        cache.features(model, images, train)
    assert len(cache) == 2 and (cache.hits, cache.misses) == (2, 4)
    assert torch.equal(first, model.encode(images))


def _count_encodes(monkeypatch):
    calls = []
    original = SamSegmenter.encode

    def encode(self, images):
        calls.append((self.training, images.shape[0]))
        return original(self, images)

    monkeypatch.setattr(SamSegmenter, "encode", encode)
    return calls


def test_a_decoder_only_fit_encodes_each_image_once(tmp_path, monkeypatch):
    """Real fits, without augmentation: the first epoch (and its validation) encodes every
    image; the later epochs encode nothing, and train as the fit that encodes every time.
    With random scaling only the validation images are encoded once."""
    frame = make_synthetic(10, size=(48, 56), seed=2, root=tmp_path / "data")
    hp = {"model.input_size": S, "peft.method": "decoder_only", "optim.max_epochs": 3,
          "optim.batch_size": 4, "optim.effective_batch_size": 4, "data.hflip": False,
          "data.vflip": False, "data.num_workers": 0, "env.precision": "32"}
    runs = {"kept": {"data.embedding_cache_mb": 1024},
            "off": {"data.embedding_cache_mb": 0},
            "scaled": {"data.scale_min": 0.8, "data.scale_max": 1.2}}
    histories, counts = {}, {}
    for name, extra in runs.items():
        calls = _count_encodes(monkeypatch)
        seg = SemanticSegmentor(path=tmp_path / name, verbosity=0, seed=0).fit(
            frame, presets="tiny", hyperparameters={**hp, **extra})
        counts[name] = (sum(n for training, n in calls if training), sum(n for _, n in calls))
        histories[name] = read_history(seg.path_)["default"]
        monkeypatch.undo()
    # the 8 training images, and the 2 validation images once, not in each of the 3
    # epochs (after the fit, the prediction speed is measured on them in every fit)
    assert counts["kept"][0] == 8 and counts["off"][0] == 3 * 8
    assert counts["off"][1] - counts["kept"][1] == 2 * (8 + 2)
    assert counts["scaled"][0] == 3 * 8  # new training images in every epoch
    assert counts["off"][1] - counts["scaled"][1] == 2 * 2
    a, b = histories["kept"], histories["off"]
    for key in ("train_loss", "val_iou"):
        values_a, values_b = a[key].dropna().to_numpy(), b[key].dropna().to_numpy()
        assert len(values_a) == len(values_b) > 0, key
        # the kept embeddings were computed in other batches than they are used in: the
        # matrix kernels may round them differently, nothing more
        np.testing.assert_allclose(values_a, values_b, rtol=1e-4, atol=1e-6, err_msg=key)


def test_prompted_training_steps_take_kept_embeddings_too(tmp_path):
    """Prompts change the decoder's tokens only: a prompted step on kept embeddings gives
    the loss of a step that runs the encoder."""
    from automask.data import SegmentationDataset, validate_frame
    from automask.data.dataset import collate_samples

    frame = make_synthetic(4, size=(48, 56), seed=5, root=tmp_path)
    dataset = SegmentationDataset(validate_frame(frame), S, seed=0, prompts="box_or_points")
    batch = collate_samples([dataset[(i, 0)] for i in range(len(dataset))])
    assert batch["prompt_kind"].tolist().count(0) < len(dataset)  # some images prompted
    losses = []
    for cache in (EmbeddingCache(64, input_size=S), None):
        module = SegmentationModule(_model(seed=9), task="binary", num_classes=2,
                                    optim=OptimConfig(), val_metric="iou",
                                    embedding_cache=cache)
        module.log = lambda *args, **kwargs: None
        with torch.no_grad():
            steps = [module.training_step(module.on_before_batch_transfer(dict(batch), 0), 0)
                     for _ in range(2)]
        losses.append(steps)
        if cache is not None:
            assert (cache.hits, cache.misses) == (4, 4)
    for cached, recomputed in zip(*losses):
        assert torch.equal(cached, recomputed)
