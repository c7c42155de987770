"""Model-space geometry and its inverse, checked against segment_anything's own code."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from segment_anything.modeling.sam import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from automask.data import (
    IGNORE_INDEX,
    PIXEL_MEAN,
    PIXEL_STD,
    AugmentConfig,
    geometry_for,
    restore,
    restore_batch,
)
from automask.data.transforms import (
    augment,
    normalize_pad,
    pad_target,
    resize_image,
    resize_nearest,
)

# Random sizes, including odd, very elongated and single-pixel ones.
_RNG = np.random.default_rng(1234)
SIZES = [(1, 1), (3, 500), (500, 3), (1, 7), (17, 1), (255, 257), (64, 64)] + [
    tuple(int(v) for v in _RNG.integers(1, 300, size=2)) for _ in range(8)
]


def _fake_sam(input_size):
    """Just enough of a Sam instance for its preprocess/postprocess_masks methods."""
    return SimpleNamespace(
        image_encoder=SimpleNamespace(img_size=input_size),
        pixel_mean=torch.tensor(PIXEL_MEAN).view(-1, 1, 1),
        pixel_std=torch.tensor(PIXEL_STD).view(-1, 1, 1),
    )


@pytest.mark.parametrize("size", SIZES + [(1348, 1070), (421, 423)])
@pytest.mark.parametrize("input_size", [1024, 256])
def test_geometry_matches_resize_longest_side(size, input_size):
    geo = geometry_for(size, input_size)
    ref = ResizeLongestSide.get_preprocess_shape(size[0], size[1], input_size)
    # SAM's rule can give a 0-pixel side for extreme aspect ratios; ours clamps to 1.
    assert geo.resized_size == (max(1, ref[0]), max(1, ref[1]))
    assert geo.original_size == tuple(size) and geo.input_size == input_size
    assert max(geo.resized_size) == input_size


@pytest.mark.parametrize("size", [(37, 50), (300, 120), (5, 300)])
def test_resize_and_normalise_match_sam_preprocess(size):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    input_size = 128
    geo = geometry_for(size, input_size)
    ref_resized = ResizeLongestSide(input_size).apply_image(image)
    ours = resize_image(image, geo.resized_size)
    np.testing.assert_array_equal(ours, ref_resized)
    x = torch.as_tensor(ref_resized).permute(2, 0, 1).float()
    ref = Sam.preprocess(_fake_sam(input_size), x)
    torch.testing.assert_close(normalize_pad(ours, input_size), ref)


@pytest.mark.parametrize("size", SIZES)
def test_mask_round_trip_is_exact(size):
    """Ground truth -> model space (nearest) -> restore(nearest) gives it back unchanged."""
    input_size = 512
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    mask = rng.integers(0, 5, size=size).astype(np.uint8)
    geo = geometry_for(size, input_size)
    model_space = pad_target(resize_nearest(mask, geo.resized_size), input_size)  # (S, S)
    assert model_space.shape == (input_size, input_size)
    h, w = geo.resized_size
    assert (model_space[h:, :] == IGNORE_INDEX).all() and (model_space[:, w:] == IGNORE_INDEX).all()
    back = restore(model_space[None], geo, mode="nearest")[0]
    assert back.shape == size
    np.testing.assert_array_equal(back.numpy(), mask)
    # 2-D input works too
    np.testing.assert_array_equal(restore(model_space, geo, mode="nearest").numpy(), mask)


@pytest.mark.parametrize("size", SIZES + [(700, 300)])
def test_probabilities_restore_like_sam_postprocess(size):
    input_size = 256
    geo = geometry_for(size, input_size)
    probs = torch.rand(2, input_size, input_size, generator=torch.Generator().manual_seed(0))
    out = restore(probs, geo)
    assert out.shape == (2, *size) and out.dtype == torch.float32
    ref = Sam.postprocess_masks(_fake_sam(input_size), probs[None], geo.resized_size, size)[0]
    torch.testing.assert_close(out, ref)
    # low-resolution decoder logits (S/4) go through the same path as SAM's
    low = torch.randn(1, input_size // 4, input_size // 4)
    ref_low = Sam.postprocess_masks(_fake_sam(input_size), low[None], geo.resized_size, size)[0]
    torch.testing.assert_close(restore(low, geo), ref_low)


def test_restore_constant_probability_stays_constant():
    geo = geometry_for((3, 500), 1024)
    out = restore(torch.full((1, 1024, 1024), 0.25), geo)
    torch.testing.assert_close(out, torch.full((1, 3, 500), 0.25))


def test_restore_batch_matches_per_sample():
    sizes = [(30, 50), (50, 30), (3, 90)]
    geos = [geometry_for(s, 64) for s in sizes]
    maps = torch.rand(3, 2, 64, 64)
    out = restore_batch(
        maps,
        torch.tensor([g.original_size for g in geos]),
        torch.tensor([g.resized_size for g in geos]),
    )
    for o, m, g in zip(out, maps, geos):
        assert o.shape == (2, *g.original_size)
        torch.testing.assert_close(o, restore(m, g))


def test_restore_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        restore(torch.zeros(1, 8, 8), geometry_for((8, 8), 8), mode="bicubic")


def _sample(h=40, w=60):
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy // 20 + xx // 20) % 3).astype(np.uint8)
    image = np.dstack([mask * 80, mask * 40 + 10, xx * 4]).astype(np.uint8)
    return image, mask


def test_augment_is_deterministic_under_seed():
    image, mask = _sample()
    cfg = AugmentConfig(hflip=True, vflip=True, scale_range=(0.7, 1.4), rotate_degrees=15,
                        color_jitter=0.3)
    a = augment(image, mask, cfg, np.random.default_rng([7, 3, 1]))
    b = augment(image, mask, cfg, np.random.default_rng([7, 3, 1]))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    outs = {
        augment(image, mask, cfg, np.random.default_rng([7, 3, e]))[1].tobytes()
        for e in range(6)
    }
    assert len(outs) > 1


def test_augment_keeps_image_and_mask_aligned():
    """Without colour jitter, every mask pixel still agrees with its image pixel."""
    image, mask = _sample()
    cfg = AugmentConfig(hflip=True, vflip=True, scale_range=(0.6, 1.5))
    for seed in range(10):
        img, msk = augment(image, mask, cfg, np.random.default_rng(seed))
        assert img.shape[:2] == msk.shape and img.shape[0] <= 40 and img.shape[1] <= 60
        # red channel encodes the class (0, 80, 160). Away from class edges (uniform 5x5
        # neighbourhood in the mask) bilinear resampling must give exactly that level.
        win = np.lib.stride_tricks.sliding_window_view(msk, (5, 5))
        interior = (win.min(axis=(2, 3)) == win.max(axis=(2, 3)))
        red = img[2:-2, 2:-2, 0]
        centre = msk[2:-2, 2:-2]
        assert interior.mean() > 0.2
        np.testing.assert_array_equal(red[interior], centre[interior].astype(np.int64) * 80)


def test_augment_masks_use_nearest_only():
    image, mask = _sample()
    cfg = AugmentConfig(scale_range=(0.5, 1.7), rotate_degrees=30)
    for seed in range(8):
        _, msk = augment(image, mask, cfg, np.random.default_rng(seed))
        assert set(np.unique(msk)) <= {0, 1, 2, IGNORE_INDEX}


def test_augment_rotation_fills_with_ignore():
    image, mask = _sample()
    cfg = AugmentConfig(hflip=False, rotate_degrees=45)
    _, msk = augment(image, mask, cfg, np.random.default_rng(0))
    assert (msk == IGNORE_INDEX).any()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"hflip": "yes"}, "hflip"),
        ({"scale_range": (1.2, 0.8)}, "scale_range"),
        ({"scale_range": (0.0, 1.0)}, "scale_range"),
        ({"rotate_degrees": -5}, "rotate_degrees"),
        ({"color_jitter": 1.5}, "color_jitter"),
    ],
)
def test_augment_config_validates(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**kwargs)


@pytest.mark.parametrize("size", SIZES)
def test_square_resize_stretches_to_the_input_and_maps_back(size):
    """data.resize="square" (the paper's authors' rule): every image fills the S x S input,
    nothing is padded, and a prediction maps back to the image's own size."""
    geo = geometry_for(size, 64, "square")
    assert geo.resized_size == (64, 64) and geo.original_size == tuple(size)
    assert geometry_for(size, 64).resized_size == geometry_for(size, 64,
                                                               "longest_side").resized_size
    maps = torch.rand(2, 64, 64)
    back = restore(maps, geo)
    assert back.shape == (2, *size)
    expected = torch.nn.functional.interpolate(maps[None], size=tuple(size), mode="bilinear",
                                               align_corners=False)[0]
    torch.testing.assert_close(back, expected)  # the whole map: no padding cropped


def test_a_square_dataset_item_is_stretched_unpadded_and_cached_apart(tmp_path):
    from PIL import Image

    from automask.data import SampleCache, SegmentationDataset
    from automask.data.validation import validate_frame
    from automask.datasets import make_synthetic

    frame = make_synthetic(1, size=(30, 90), num_classes=2, seed=2, root=tmp_path / "d")
    spec = validate_frame(frame)
    cache = SampleCache(memory_mb=16)
    square = SegmentationDataset(spec, 64, cache=cache, resize="square")[0]
    kept = SegmentationDataset(spec, 64, cache=cache)[0]  # same cache: its own entry
    assert square["resized_size"].tolist() == [64, 64]
    assert kept["resized_size"].tolist() == [21, 64]
    pad = normalize_pad(np.zeros((1, 1, 3), np.uint8), 64)[:, -1, -1]  # the padding value
    assert not torch.equal(square["image"][:, -1, -1], pad)  # content reaches the corner
    torch.testing.assert_close(kept["image"][:, -1, -1], torch.zeros(3))
    assert (square["target"] != IGNORE_INDEX).all()
    assert (kept["target"][21:] == IGNORE_INDEX).all()
    mask = np.asarray(Image.open(frame["label"][0]))  # (30, 90)
    assert np.array_equal(square["target"].numpy() > 0, resize_nearest(mask, (64, 64)) > 0)
    with pytest.raises(ValueError, match="resize must be one of"):
        SegmentationDataset(spec, 64, resize="stretch")
    with pytest.raises(ValueError, match="interpolation must be one of"):
        SegmentationDataset(spec, 64, interpolation="lanczos")
    with pytest.raises(ValueError, match="'stretch'"):
        geometry_for((30, 90), 64, "stretch")


@pytest.mark.parametrize("resize", ["longest_side", "square"])
def test_a_bicubic_dataset_item_is_pillows_bicubic_resize_and_cached_apart(resize, tmp_path):
    """data.interpolation="bicubic": the whole image goes through Pillow's BICUBIC filter
    (as the authors' torchvision Resize does to a PIL image; SAM's own is bilinear), for
    shrinking and enlarging; a bilinear item of the same image in the same cache is another
    entry, and the mask is still resized by nearest neighbour."""
    from PIL import Image

    from automask.data import SampleCache, SegmentationDataset
    from automask.data.validation import validate_frame
    from automask.datasets import make_synthetic

    for side, (h, w) in ((64, (30, 90)), (128, (30, 90))):  # shrink, enlarge
        frame = make_synthetic(1, size=(h, w), num_classes=2, seed=3, root=tmp_path / f"{side}")
        spec = validate_frame(frame)
        cache = SampleCache(memory_mb=16)
        bicubic = SegmentationDataset(spec, side, cache=cache, resize=resize,
                                      interpolation="bicubic")[0]
        bilinear = SegmentationDataset(spec, side, cache=cache, resize=resize)[0]
        rh, rw = bicubic["resized_size"].tolist()
        pil = Image.open(frame["image"][0]).convert("RGB")
        expected = normalize_pad(np.asarray(pil.resize((rw, rh), Image.Resampling.BICUBIC)),
                                 side)
        torch.testing.assert_close(bicubic["image"], expected)
        assert not torch.equal(bicubic["image"], bilinear["image"])
        assert torch.equal(bicubic["target"], bilinear["target"])
