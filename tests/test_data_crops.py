"""Training and validation on native-scale crops of images much larger than the input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import automask.data.dataset as dataset_mod
import automask.tiling as tiling_mod
from automask.config import Config, DataConfig, resolve
from automask.data import (
    IGNORE_INDEX,
    PIXEL_MEAN,
    PIXEL_STD,
    AugmentConfig,
    SampleCache,
    SegmentationDataModule,
    SegmentationDataset,
    validate_frame,
)
from automask.data.crops import crops_image, grid_boxes, random_crop
from automask.data.transforms import nearest_indices
from automask.errors import ConfigError

S = 32  # model input side; the large images are 4 x S
BIG = 4 * S
LINE_COLS = list(range(5, BIG, 12))  # vertical lines, alternately 1 and 2 px wide
LINE_WIDTHS = [1 + k % 2 for k in range(len(LINE_COLS))]


def _coords_image(height: int, width: int) -> np.ndarray:
    """Red = column, green = row (exact for sides up to 256), blue = 255 on the lines."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    image[..., 1] = np.arange(height, dtype=np.uint8)[:, None]
    for col, width_px in zip(LINE_COLS, LINE_WIDTHS):
        image[:, col:col + width_px, 2] = 255
    return image


def _line_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    for col, width_px in zip(LINE_COLS, LINE_WIDTHS):
        mask[:, col:col + width_px] = 255  # {0, 255}: binary foreground
    return mask


def _spec(root: Path, images: list[np.ndarray], masks: list[np.ndarray], **kwargs):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, mask) in enumerate(zip(images, masks)):
        Image.fromarray(image).save(root / f"img{i}.png")
        Image.fromarray(mask).save(root / f"img{i}_mask.png")
        rows.append({"image": str(root / f"img{i}.png"), "label": str(root / f"img{i}_mask.png")})
    return validate_frame(pd.DataFrame(rows), **kwargs)


def _pixels(item: dict) -> np.ndarray:
    """Un-normalised ``(h, w, 3)`` pixel values of an item's content (padding cut off)."""
    height, width = item["resized_size"].tolist()
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    values = (item["image"][:, :height, :width] * std + mean).permute(1, 2, 0).numpy()
    return values


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """``(start, length)`` of the runs of non-zero values in a 1-D array."""
    padded = np.concatenate([[0], (row != 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), (edges[1::2] - edges[0::2]).tolist()))


@pytest.fixture
def big_spec(tmp_path):
    return _spec(tmp_path / "big", [_coords_image(BIG, BIG)] * 3, [_line_mask(BIG, BIG)] * 3)


# ------------------------------------------------------------------- training crops
def test_training_items_are_native_scale_crops_with_thin_lines_intact(big_spec):
    ds = SegmentationDataset(big_spec, S, augment=AugmentConfig(hflip=False),
                             large_images="auto", seed=1)
    mask = _line_mask(BIG, BIG) // 255
    corners = set()
    for epoch in range(4):
        for pos in range(len(ds)):
            item = ds[(pos, epoch)]
            assert item["image"].shape == (3, S, S) and item["target"].shape == (S, S)
            assert item["resized_size"].tolist() == [S, S]
            assert item["original_size"].tolist() == [BIG, BIG]
            pixels = _pixels(item)
            np.testing.assert_allclose(pixels, pixels.round(), atol=1e-3)
            pixels = pixels.round().astype(int)
            left, top = pixels[0, 0, 0], pixels[0, 0, 1]
            # an exact slice: no resampling at all
            ramp = np.arange(S)
            np.testing.assert_array_equal(pixels[..., 0], np.broadcast_to(left + ramp, (S, S)))
            np.testing.assert_array_equal(pixels[..., 1].T, np.broadcast_to(top + ramp, (S, S)))
            assert set(np.unique(pixels[..., 2]).tolist()) <= {0, 255}
            target = item["target"].numpy()
            np.testing.assert_array_equal(target, mask[top:top + S, left:left + S])
            # the lines keep their 1-2 px width (a line cut by the crop border can only
            # get narrower); every crop holds whole lines of both widths
            runs = _runs(target[S // 2])
            inner = {length for start, length in runs if 0 < start and start + length < S}
            assert {length for _, length in runs} <= {1, 2} and inner == {1, 2}, runs
            corners.add((top, left))
    assert len(corners) > 6, "crop positions should vary with position and epoch"


def test_resize_mode_shrinks_the_same_image(big_spec):
    """The old behaviour stays reachable, and it is what the crop test rules out."""
    item = SegmentationDataset(big_spec, S, large_images="resize")[0]
    assert item["resized_size"].tolist() == [S, S]
    blue = _pixels(item)[..., 2].round()
    assert ((blue > 0) & (blue < 255)).any(), "shrinking 4x blends the lines"


def test_crop_draws_are_deterministic_per_position_and_epoch(big_spec):
    aug = AugmentConfig(hflip=True, scale_range=(0.5, 2.0), rotate_degrees=10, color_jitter=0.2)
    a = SegmentationDataset(big_spec, S, augment=aug, large_images="auto", seed=3)
    b = SegmentationDataset(big_spec, S, augment=aug, large_images="auto", seed=3,
                            cache=SampleCache(64))
    for key in [(0, 0), (1, 0), (0, 1), (2, 5)]:
        x, y = a[key], b[key]
        for name in x:
            torch.testing.assert_close(x[name], y[name], rtol=0, atol=0)
    assert not torch.equal(a[(0, 0)]["image"], a[(0, 1)]["image"])


def test_zoom_is_applied_around_native_scale():
    image = _coords_image(BIG, BIG)
    ids = np.arange(BIG * BIG, dtype=np.int32).reshape(BIG, BIG)  # unique source ids
    for zoom, side in [(1.0, S), (2.0, S // 2), (0.5, 2 * S), (0.8, 40)]:
        out_image, out_ids = random_crop(image, ids, S, zoom, np.random.default_rng(7))
        expected_size = min(S, round(side * zoom))
        assert out_image.shape == (expected_size, expected_size, 3)
        assert out_ids.shape == (expected_size, expected_size)
        # the mask is resampled with the same nearest rule as the resize path: every
        # value is a source value, picked at nearest_indices(side, size) in the window
        picks = nearest_indices(side, expected_size)
        first_row, first_col = divmod(int(out_ids.min()), BIG)
        rows = first_row - picks[0] + picks
        cols = first_col - picks[0] + picks
        np.testing.assert_array_equal(out_ids, ids[rows[:, None], cols[None, :]])
    with pytest.raises(ValueError, match="zoom"):
        random_crop(image, ids, S, 0.0, np.random.default_rng(0))


def test_void_label_survives_crops(tmp_path, monkeypatch):
    image = _coords_image(BIG, BIG)
    mask = np.zeros((BIG, BIG), dtype=np.uint8)
    mask[:, BIG // 2:] = 1
    mask[::3, ::5] = 2
    mask[:, 40:80][mask[:, 40:80] == 0] = 9  # void (data.void_label) in a wide band
    spec = _spec(tmp_path / "void", [image], [mask], void_label=9)
    assert spec.task == "multiclass"
    lut = spec.target_lut(0, mask)
    want = lut[mask]
    assert (want == IGNORE_INDEX).any()
    plain = SegmentationDataset(spec, S, augment=AugmentConfig(hflip=False), large_images="crop")
    for epoch in range(6):
        item = plain[(0, epoch)]
        left, top = (int(v) for v in _pixels(item)[0, 0, :2].round())
        np.testing.assert_array_equal(item["target"].numpy(), want[top:top + S, left:left + S])
    crops = []
    monkeypatch.setattr(dataset_mod, "random_crop",
                        lambda *a: crops.append(random_crop(*a)) or crops[-1])
    zoomed = SegmentationDataset(spec, S, augment=AugmentConfig(hflip=False,
                                                                scale_range=(0.5, 1.7)),
                                 large_images="crop")
    seen_void = False
    for epoch in range(8):
        item = zoomed[(0, epoch)]
        raw = crops[-1][1]
        assert set(np.unique(raw).tolist()) <= {0, 1, 2, 9}  # nearest only: no blended values
        height, width = item["resized_size"].tolist()
        np.testing.assert_array_equal(item["target"][:height, :width].numpy(), lut[raw])
        seen_void |= bool((item["target"] == IGNORE_INDEX)[:height, :width].any())
    assert seen_void and len(crops) == 8
    # binary masks: 255 in a {0, 1} mask is void
    binary = np.zeros((BIG, BIG), dtype=np.uint8)
    binary[:, 60:] = 1
    binary[:, 50:70] = 255
    spec = _spec(tmp_path / "bvoid", [image], [binary])
    grid = SegmentationDataset(spec, S, large_images="auto", crops="grid")
    want = spec.target_lut(0, binary)[binary]
    assert (want == IGNORE_INDEX).any()
    for item in (grid[i] for i in range(len(grid))):
        left, top = (int(v) for v in _pixels(item)[0, 0, :2].round())
        np.testing.assert_array_equal(item["target"].numpy(), want[top:top + S, left:left + S])


# ------------------------------------------------------------------- small images
def test_small_images_keep_the_resize_path_bit_identical(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(40, 56), (72, 72), (S + 8, S), (S, S)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    masks = [(rng.random((h, w)) > 0.7).astype(np.uint8) * 255 for h, w in sizes]
    spec = _spec(tmp_path / "small", images, masks)
    size = 64  # 72 / 64 = 1.125: "auto" resizes, "crop" crops
    aug = AugmentConfig(hflip=True, vflip=True, scale_range=(0.7, 1.4), rotate_degrees=15,
                        color_jitter=0.3)
    old = SegmentationDataset(spec, size, augment=aug, seed=2)  # default: resize
    auto = SegmentationDataset(spec, size, augment=aug, seed=2, large_images="auto")
    for epoch in range(3):
        for pos in range(len(spec)):
            x, y = old[(pos, epoch)], auto[(pos, epoch)]
            assert x.keys() == y.keys()
            for name in x:
                assert torch.equal(x[name], y[name]), (pos, epoch, name)
    grid = SegmentationDataset(spec, size, large_images="auto", crops="grid")
    assert len(grid) == len(spec)
    plain = SegmentationDataset(spec, size)
    for pos in range(len(spec)):
        assert all(torch.equal(grid[pos][k], plain[pos][k]) for k in plain[pos])
    # the control: under "crop" the 72 x 72 image is cropped, not resized
    crop = SegmentationDataset(spec, size, augment=aug, seed=2, large_images="crop")
    assert not torch.equal(crop[(1, 0)]["image"], old[(1, 0)]["image"])
    assert crop.is_cropped(1) and not auto.is_cropped(1) and not crop.is_cropped(0)


def test_the_switch_is_the_tiling_rule(monkeypatch):
    size = (72, 72)
    assert not crops_image(size, 64, "auto")
    assert crops_image(size, 64, "crop") and not crops_image(size, 64, "resize")
    monkeypatch.setattr(tiling_mod, "AUTO_RATIO", 1.1)  # one constant, not a copy
    assert crops_image(size, 64, "auto") and tiling_mod.use_tiles(size, 64, "auto")
    assert not crops_image((64, 64), 64, "crop")


# ------------------------------------------------------------------- validation grid
def test_validation_grid_scores_every_pixel_at_native_scale(tmp_path):
    height, width = 2 * S + 10, 2 * S  # 3 x 2 windows, the last row aligned to the border
    spec = _spec(tmp_path / "grid", [_coords_image(height, width), _coords_image(20, 24)],
                 [_line_mask(height, width), _line_mask(20, 24)])
    assert grid_boxes((height, width), S) == [
        (top, left, S, S) for top in (0, S, height - S) for left in (0, S)]
    assert grid_boxes((20, 24), S) == [(0, 0, 20, 24)]
    ds = SegmentationDataset(spec, S, large_images="auto", crops="grid")
    assert len(ds) == 6 + 1
    seen = np.zeros((height, width), dtype=int)
    mask = _line_mask(height, width) // 255
    for i in range(6):
        item = ds[i]
        assert int(item["index"]) == 0 and item["resized_size"].tolist() == [S, S]
        left, top = (int(v) for v in _pixels(item)[0, 0, :2].round())
        np.testing.assert_array_equal(item["target"].numpy(), mask[top:top + S, left:left + S])
        seen[top:top + S, left:left + S] += 1
    assert (seen >= 1).all() and seen.sum() == 6 * S * S
    assert int(ds[6]["index"]) == 1  # the small image: resized as before
    # each item names its window, so that validation scores an image's windows as one
    assert [ds[i]["window"].tolist() for i in range(7)] == [
        [top, left, S, S, int(top == height - S and left == S)]
        for top in (0, S, height - S) for left in (0, S)] + [[0, 0, 0, 0, 0]]
    assert ds.item_positions() == [0] * 6 + [1]
    assert "window" not in SegmentationDataset(spec, S, large_images="auto")[(0, 0)]
    # the DataModule validates on the grid and trains on one crop per image
    dm = SegmentationDataModule(spec, input_size=S, batch_size=4, tuning_spec=spec,
                                num_workers=0, cache_memory_mb=16)
    assert len(dm.val_dataloader().dataset) == 7 and len(dm.train_dataloader().dataset) == 2
    dm = SegmentationDataModule(spec, input_size=S, batch_size=4, tuning_spec=spec,
                                num_workers=0, large_images="resize")
    assert len(dm.val_dataloader().dataset) == 2


def test_a_large_grid_is_thinned_evenly_to_bound_validation():
    starts = [0, 256, 512, 768, 1024, 1244]  # a 1500 px side at S = 256: 6 windows
    boxes = grid_boxes((1500, 1500), 256)
    assert len(boxes) == 9 and len(grid_boxes((1500, 1500), 256, per_side=None)) == 36
    tops = sorted({b[0] for b in boxes})
    assert tops == sorted({b[1] for b in boxes}) == [0, 512, 1244]
    assert set(tops) <= set(starts) and all(b[2:] == (256, 256) for b in boxes)
    assert len(grid_boxes((1500, 1500), 1024)) == 4  # within the limit: the whole grid
    assert len(grid_boxes((3000, 4000), 1024)) == 9  # 3 x 4 grid -> 3 x 3
    assert len(grid_boxes((500, 3000), 256, per_side=5)) == 2 * 5
    with pytest.raises(ValueError, match="per_side"):
        grid_boxes((500, 500), 256, per_side=0)


def test_a_thinned_grid_takes_in_the_windows_holding_the_object():
    """A road crossing only the strips between the evenly spread windows (rows 256-511 and
    768-1243 of a 1500 px tile at S = 256): validated on those windows, an empty
    prediction scored as perfect. The windows holding the most road replace up to 4 of
    the sample's emptiest; 9 windows still, spread ones kept for false positives."""
    road = np.zeros((1500, 1500), bool)
    road[300:310, :] = True  # a horizontal road in the window row starting at 256
    road[:, 900:905] = True  # a vertical one in the column starting at 768
    spread = grid_boxes((1500, 1500), 256)
    assert not any(road[t:t + h, c:c + w].any() for t, c, h, w in spread)
    calls = []

    def objects():
        calls.append(1)
        return road

    boxes = grid_boxes((1500, 1500), 256, objects=objects)
    assert len(boxes) == 9 and len(set(boxes)) == 9 and boxes == sorted(boxes)
    held = [int(road[t:t + h, c:c + w].sum()) for t, c, h, w in boxes]
    assert sum(v > 0 for v in held) == 4 and len(set(boxes) & set(spread)) == 5
    best = sorted((int(road[t:t + 256, c:c + 256].sum()) for t in (0, 256, 512, 768, 1024, 1244)
                   for c in (0, 256, 512, 768, 1024, 1244)), reverse=True)
    assert sorted(held, reverse=True)[:4] == best[:4]  # the grid's 4 fullest windows
    # an object already in the sample, an empty mask, no mask: the even spread as it was
    inside = np.zeros((1500, 1500), bool)
    inside[10:20, 10:20] = True
    inside[600:700, 600:700] = True
    assert grid_boxes((1500, 1500), 256, objects=lambda: inside) == spread
    assert grid_boxes((1500, 1500), 256, objects=lambda: np.zeros((1500, 1500), bool)) == spread
    assert grid_boxes((1500, 1500), 256, objects=lambda: None) == spread
    assert len(calls) == 1
    grid_boxes((500, 500), 256, objects=objects)  # not thinned: the mask is not read
    assert len(calls) == 1


def test_validation_windows_of_a_binary_task_hold_its_object(tmp_path):
    """Through the dataset: a 7 x 7 window grid (S = 32) thinned to 3 x 3, the object in
    a window row the even spread skips, read from its 0/255 mask; a multi-class task keeps
    the even spread."""
    size = 7 * S
    mask = np.zeros((size, size), np.uint8)
    mask[40:50, :] = 255  # rows 40-49: the window row starting at 32 (kept rows 0, 96, 192)
    spec = _spec(tmp_path / "thin", [_coords_image(size, size)], [mask])
    ds = SegmentationDataset(spec, S, large_images="auto", crops="grid")
    assert len(ds) == 9
    targets = [ds[i]["target"].numpy() for i in range(9)]
    assert sum(int((t == 1).sum()) for t in targets) > 0
    multi = _spec(tmp_path / "multi", [_coords_image(size, size)], [(mask > 0).astype(np.uint8)
                                                                    * 2], num_classes=3)
    ds = SegmentationDataset(multi, S, large_images="auto", crops="grid")
    assert [ds[i]["window"].tolist()[:2] for i in range(9)] == [
        [t, c] for t in (0, 96, 192) for c in (0, 96, 192)]  # multi-class: evenly spread


# ------------------------------------------------------------------- sample cache
def test_cache_keeps_native_and_resized_entries_apart(big_spec, tmp_path, monkeypatch):
    calls = []
    real = dataset_mod.read_image
    monkeypatch.setattr(dataset_mod, "read_image",
                        lambda p, **kw: calls.append(kw) or real(p, **kw))
    cache = SampleCache(memory_mb=0, directory=tmp_path / "cache")  # disk only: mmap path
    resized = SegmentationDataset(big_spec, S, cache=cache, large_images="resize")
    crops = SegmentationDataset(big_spec, S, cache=cache, large_images="auto",
                                augment=AugmentConfig(hflip=False))
    first_resized = resized[0]
    first_crop = crops[(0, 0)]
    assert len(calls) == 2, "a resized entry must not stand in for a native one"
    assert calls[1].get("min_size") is None, "crops decode at full resolution"
    again = crops[(0, 0)]
    assert len(calls) == 2 and cache.hits_disk == 1
    for name in first_crop:
        assert torch.equal(first_crop[name], again[name])
    assert torch.equal(resized[0]["image"], first_resized["image"]) and len(calls) == 2
    hit = cache.get(sorted(cache.directory.glob("*.image.npy"))[0].name.split(".")[0], mmap=True)
    assert hit is not None
    sizes = {hit[0].shape[:2]} | {
        np.load(p, mmap_mode="r").shape[:2] for p in cache.directory.glob("*.image.npy")}
    assert sizes == {(BIG, BIG), (S, S)}


# ------------------------------------------------------------------- configuration
@pytest.mark.parametrize("bad", ["shrink", "Auto", "", 3, None])
def test_config_key_rejects_bad_values(bad, big_spec):
    with pytest.raises(ConfigError, match=r"'data\.large_images'") as info:
        DataConfig(large_images=bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(ConfigError, match=r"'data\.large_images'"):
        SegmentationDataset(big_spec, S, large_images=bad)
    with pytest.raises(ConfigError, match=r"'data\.large_images'"):
        SegmentationDataModule(big_spec, input_size=S, batch_size=2, large_images=bad)


def test_config_key_accepts_the_modes_and_defaults_to_auto():
    assert DataConfig().large_images == "auto"
    for mode in ("auto", "crop", "resize"):
        [(_, cfg)] = resolve(None, {"data.large_images": mode})
        assert cfg.data.large_images == mode
    with pytest.raises(ConfigError, match="did you mean 'crop'"):
        resolve(None, {"data.large_images": "crops"})
    assert Config.from_dict({"data.large_images": "resize"}).data.large_images == "resize"


# ------------------------------------------------------------------- end to end
@pytest.mark.parametrize("mode", ["auto", "resize"])
def test_tiny_fit_on_large_images_trains_on_crops(tmp_path, monkeypatch, mode):
    from automask import SemanticSegmentor

    seen = {"random": 0, "grid": 0}
    real = SegmentationDataset._crop_item

    def spy(self, position, epoch, box):
        seen["grid" if box is not None else "random"] += 1
        return real(self, position, epoch, box)

    monkeypatch.setattr(SegmentationDataset, "_crop_item", spy)
    images = [_coords_image(BIG, BIG)] * 4
    masks = [_line_mask(BIG, BIG)] * 4
    spec = _spec(tmp_path / "fit", images, masks)
    hp = {"optim.max_epochs": 1, "model.input_size": S, "data.num_workers": 0,
          "env.accelerator": "cpu"}
    if mode != "auto":  # the default must be "auto"; "resize" must reach the DataModule
        hp["data.large_images"] = mode
    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0).fit(
        spec.frame, presets="tiny", hyperparameters=hp)
    if mode == "auto":
        assert seen["random"] >= 3 and seen["grid"] >= 9, seen  # a val image: 3 x 3 windows
    else:
        assert seen == {"random": 0, "grid": 0}
    prob = seg.predict_proba(spec.frame.iloc[:1])[0]
    assert prob.shape == (BIG, BIG) and np.isfinite(prob).all()


def test_a_narrow_image_is_cropped_along_its_long_side_and_padded(tmp_path):
    spec = _spec(tmp_path / "narrow", [_coords_image(20, 5 * S)], [_line_mask(20, 5 * S)])
    ds = SegmentationDataset(spec, S, augment=AugmentConfig(hflip=False), large_images="auto")
    item = ds[(0, 0)]
    assert item["resized_size"].tolist() == [20, S]  # full height, S columns, native scale
    assert (item["target"][20:] == IGNORE_INDEX).all() and (item["image"][:, 20:] == 0).all()
    left = int(_pixels(item)[0, 0, 0].round())
    np.testing.assert_array_equal(item["target"][:20].numpy(),
                                  (_line_mask(20, 5 * S) // 255)[:, left:left + S])
    assert len(SegmentationDataset(spec, S, large_images="auto", crops="grid")) == 3
