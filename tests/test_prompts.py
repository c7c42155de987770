"""Prompted segmentation: point / box prompts at prediction, prompts drawn for training.

A stand-in model that paints the box it receives checks the coordinate mapping end to end
(resize, pad, un-pad, resize back) on non-square images; a tiny SAM trained with
``data.prompts="box"`` checks that prompts reach the decoder while the prompt-free path
stays bit-identical to the forward that existed before prompts.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from automask import SemanticSegmentor
from automask.config import Config
from automask.data import SegmentationDataset, validate_frame
from automask.data.prompts import (
    BOX_JITTER,
    MAX_POINTS,
    ImagePrompt,
    check_prompts,
    map_box,
    map_points,
    sample_prompt,
)
from automask.data.transforms import AugmentConfig, geometry_for
from automask.datasets import make_synthetic, train_test_split
from automask.errors import ConfigError, DataValidationError
from automask.models import build_segmenter
from automask.models.segmenter import Prompt
from automask.prediction import as_frame, images_spec, iter_proba

from cli_process import run_automask

S = 64  # model input side used throughout
PROMPTED = {"optim.max_epochs": 2, "model.input_size": S, "data.prompts": "box",
            "data.prompt_rate": 1.0, "data.num_workers": 0}


def _cfg() -> Config:
    return Config.from_dict({"model.input_size": S, "env.eval_batch_size": 2,
                             "data.num_workers": 0, "env.accelerator": "cpu"})


def _spec(paths):
    frame, root = as_frame([str(p) for p in paths], "image")
    return images_spec(frame, "image", root)


def _write_image(path: Path, height: int, width: int, box=None) -> Path:
    """A grey image with a bright rectangle ``box = (x0, y0, x1, y1)`` (the object)."""
    image = np.full((height, width, 3), 60, dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        image[y0:y1, x0:x1] = 220
    Image.fromarray(image).save(path)
    return path


class BoxPainter(torch.nn.Module):
    """Logits +10 inside the box prompt it receives (model-input frame), -10 elsewhere.

    Without a prompt the whole map is -10, so the predicted mask at the original size is
    exactly where the mapped box lands after un-padding and resizing back.
    """

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Prompt | None] = []

    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        logits = torch.full((images.shape[0], 1, S, S), -10.0)  # (B, 1, S, S)
        centres = torch.arange(S, dtype=torch.float32) + 0.5  # pixel centres
        for i, prompt in enumerate(prompts or [None] * images.shape[0]):
            self.received.append(prompt)
            if prompt is not None and prompt.box is not None:
                x0, y0, x1, y1 = prompt.box.tolist()
                rows = (centres > y0) & (centres < y1)
                cols = (centres > x0) & (centres < x1)
                logits[i, 0, rows[:, None] & cols[None, :]] = 10.0
        return logits


# ------------------------------------------------------------------ coordinate mapping
@pytest.mark.parametrize("size", [(60, 150), (150, 60), (64, 64), (33, 200)])
def test_map_points_and_box_scale_each_axis_by_the_image_resize(size):
    geometry = geometry_for(size, S)
    (height, width), (new_h, new_w) = size, geometry.resized_size
    assert max(new_h, new_w) == S  # the longer side fills the input, the rest is padding
    coords = np.array([[0.0, 0.0], [width - 1, height - 1], [width / 3, height / 2]])
    expected = coords * [new_w / width, new_h / height]
    np.testing.assert_allclose(map_points(coords, geometry), expected, rtol=0, atol=1e-12)
    box = map_box([1, 2, width, height], geometry)
    np.testing.assert_allclose(box, [new_w / width, 2 * new_h / height, new_w, new_h],
                               rtol=0, atol=1e-9)
    assert box[2] <= S and box[3] <= S  # inside the resized region, never in the padding


def test_map_points_numbers_for_a_wide_image():
    geometry = geometry_for((60, 150), S)  # 150 -> 64, 60 -> int(25.6 + 0.5) = 26
    assert geometry.resized_size == (26, 64)
    np.testing.assert_allclose(map_points([[75, 30]], geometry), [[32.0, 13.0]])


@pytest.mark.parametrize("size", [(90, 150), (150, 70)])
def test_a_box_prompt_comes_back_as_the_box_region_at_the_original_size(tmp_path, size):
    """Box -> resize/pad -> model (paints the box) -> un-pad, resize back -> the same box."""
    height, width = size
    obj = (width // 5, height // 4, width // 2, (3 * height) // 4)  # x0, y0, x1, y1
    paths = [_write_image(tmp_path / "a.png", height, width, obj),
             _write_image(tmp_path / "b.png", height, width)]
    spec = _spec(paths)
    prompts = check_prompts(None, [obj, None], spec.frame.index, [size, size])
    model = BoxPainter()
    probs = dict(iter_proba(model, _cfg(), "binary", spec, prompts=prompts))
    mask = probs[0][0] > 0.5  # (H, W)
    assert mask.shape == size
    truth = np.zeros(size, dtype=bool)
    truth[obj[1]:obj[3], obj[0]:obj[2]] = True
    grown = np.zeros(size, dtype=bool)  # the box, one resize step (W / S pixels) larger
    step = int(np.ceil(max(size) / S))
    grown[max(obj[1] - step, 0):obj[3] + step, max(obj[0] - step, 0):obj[2] + step] = True
    assert not (mask & ~grown).any(), "the mask leaves the box region"
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9, iou
    assert not (probs[1][0] > 0.5).any()  # the row without a prompt is prompt-free
    assert model.received[1] is None


def test_prompted_images_take_the_whole_image_path_and_tiling_on_is_refused(tmp_path):
    size = (100, 300)  # longer side > 1.25 x S: "auto" tiles it without prompts
    paths = [_write_image(tmp_path / "big.png", *size, box=(10, 10, 60, 60)),
             _write_image(tmp_path / "big2.png", *size)]
    prompts = check_prompts(None, [(10, 10, 60, 60), None], [0, 1], [size, size])
    model = BoxPainter()
    out = list(iter_proba(model, _cfg(), "binary", _spec(paths), "auto", prompts))
    assert [pos for pos, _ in out] == [0, 1]
    assert all(prob.shape == (1, *size) for _, prob in out)
    assert model.received[0] is not None  # the prompted image: one whole-image forward
    windows = model.received[1:]  # the other one is tiled, exactly as without prompts
    assert len(windows) > 1 and all(p is None for p in windows)
    with pytest.raises(ConfigError, match="tiling='on' cannot be combined"):
        iter_proba(model, _cfg(), "binary", _spec(paths), "on", prompts)
    with pytest.raises(ConfigError, match="need a binary model"):
        iter_proba(model, _cfg(), "multiclass", _spec(paths), "auto", prompts)


# ------------------------------------------------------------------ model forward
def _prompt_free_reference(model, images: torch.Tensor) -> torch.Tensor:
    """The binary forward as it was before prompts existed (frozen copy, kept for this test)."""
    embeddings = model.encode(images)
    decoder = model.mask_decoder
    batch, dim, h, w = embeddings.shape
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = tokens.unsqueeze(0).expand(batch, -1, -1)
    dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    pos = model.prompt_encoder.get_dense_pe().expand(batch, -1, -1, -1)
    hs, src = decoder.transformer(embeddings + dense, pos, tokens)
    src = src.transpose(1, 2).reshape(batch, dim, h, w)
    upscaled = decoder.output_upscaling(src)
    mlps = decoder.output_hypernetworks_mlps
    hyper = torch.stack([mlps[i](hs[:, 1 + i]) for i in range(model.num_outputs_used)], dim=1)
    b, c, hh, ww = upscaled.shape
    low_res = (hyper @ upscaled.reshape(b, c, hh * ww)).reshape(b, -1, hh, ww)
    return F.interpolate(low_res, size=(S, S), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def random_sam():
    torch.manual_seed(0)
    model = build_segmenter("tiny", input_size=S, checkpoint="random", progress=False).eval()
    with torch.no_grad():  # random init gives a constant output (zero-initialised head)
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def test_prompt_free_forward_is_bit_identical_to_the_forward_before_prompts(random_sam,
                                                                            monkeypatch):
    images = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = _prompt_free_reference(random_sam, images)

        def refuse(*args, **kwargs):
            raise AssertionError("the prompt-free forward used the prompt encoder")

        monkeypatch.setattr(random_sam.prompt_encoder, "forward", refuse)
        assert torch.equal(random_sam(images), reference)
        assert torch.equal(random_sam(images, None), reference)
        assert torch.equal(random_sam(images, [None, None, None]), reference)


def test_prompts_change_only_the_prompted_images(random_sam):
    images = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(2))
    box_a = Prompt(box=torch.tensor([4.0, 4.0, 30.0, 40.0]))
    box_b = Prompt(box=torch.tensor([30.0, 20.0, 60.0, 60.0]))
    point = Prompt(points=torch.tensor([[10.0, 12.0], [50.0, 50.0]]),
                   labels=torch.tensor([1, 0]))
    with torch.no_grad():
        free = random_sam(images)
        with_a = random_sam(images, [box_a, None, point])
        with_b = random_sam(images, [box_b, None, point])
    assert with_a.shape == free.shape
    assert (with_a[0] - free[0]).abs().max() > 1e-3  # the box reaches the decoder
    assert (with_a[0] - with_b[0]).abs().max() > 1e-3  # another box, another mask
    assert (with_a[2] - free[2]).abs().max() > 1e-3  # points too
    torch.testing.assert_close(with_a[1], free[1], rtol=0, atol=1e-5)  # no prompt: as before


def test_prompts_need_a_binary_model_and_one_entry_per_image(random_sam):
    images = torch.zeros(2, 3, S, S)
    with pytest.raises(ValueError, match="got 1 prompts for 2 images"):
        random_sam(images, [Prompt(box=torch.tensor([0.0, 0.0, 9.0, 9.0]))])
    multi = build_segmenter("tiny", num_classes=3, input_size=S, checkpoint="random",
                            progress=False)
    with pytest.raises(ValueError, match="need a binary model; this one has 3 classes"):
        multi(images, [Prompt(box=torch.tensor([0.0, 0.0, 9.0, 9.0])), None])


def test_sam2_backbone_takes_prompts_too():
    pytest.importorskip("sam2", reason="SAM 2.1 prompts need the sam2 extra")
    torch.manual_seed(0)
    model = build_segmenter("sam2_tiny", input_size=S, checkpoint="random",
                            progress=False).eval()
    images = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        free = model(images)
        assert torch.equal(model(images, [None, None]), free)
        prompted = model(images, [Prompt(box=torch.tensor([4.0, 4.0, 30.0, 40.0])), None])
    assert (prompted[0] - free[0]).abs().max() > 1e-4
    torch.testing.assert_close(prompted[1], free[1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ training prompts
def test_sample_prompt_box_encloses_the_mask_within_the_jitter():
    target = np.zeros((40, 50), dtype=np.uint8)
    target[10:20, 5:35] = 1  # x0=5, y0=10, x1=35, y1=20 (edges)
    target[0, 0] = 255  # void is never sampled
    for seed in range(20):
        out = sample_prompt(target, "box", 1.0, np.random.default_rng(seed))
        assert int(out["prompt_kind"]) == 1
        x0, y0, x1, y1 = out["prompt_box"].tolist()
        slack_x, slack_y = BOX_JITTER * 30 + 1e-4, BOX_JITTER * 10 + 1e-4
        assert abs(x0 - 5) <= slack_x and abs(x1 - 35) <= slack_x
        assert abs(y0 - 10) <= slack_y and abs(y1 - 20) <= slack_y
        assert x1 > x0 and y1 > y0
    again = sample_prompt(target, "box", 1.0, np.random.default_rng(7))
    first = sample_prompt(target, "box", 1.0, np.random.default_rng(7))
    assert torch.equal(again["prompt_box"], first["prompt_box"])  # seeded


def test_sample_prompt_points_lie_on_the_mask_or_the_background():
    target = np.zeros((30, 30), dtype=np.uint8)
    target[5:15, 5:15] = 1
    target[20:, 20:] = 255
    counts = set()
    for seed in range(30):
        out = sample_prompt(target, "points", 1.0, np.random.default_rng(seed))
        assert int(out["prompt_kind"]) == 2
        labels = out["prompt_labels"].numpy()
        used = labels >= 0
        counts.add(int(used.sum()))
        assert labels[0] == 1 and used.sum() <= MAX_POINTS
        for (x, y), label in zip(out["prompt_points"].numpy()[used], labels[used]):
            assert target[int(y), int(x)] == label  # foreground on 1, background on 0
    assert counts == set(range(1, MAX_POINTS + 1))


def test_an_empty_mask_or_the_rate_gives_no_prompt():
    empty = np.zeros((20, 20), dtype=np.uint8)
    assert int(sample_prompt(empty, "box", 1.0, np.random.default_rng(0))["prompt_kind"]) == 0
    full = np.ones((20, 20), dtype=np.uint8)
    kinds = [int(sample_prompt(full, "box_or_points", 0.5,
                               np.random.default_rng(s))["prompt_kind"]) for s in range(60)]
    assert {0, 1, 2} <= set(kinds)  # none, box and points all occur


def test_dataset_prompts_come_from_the_augmented_mask_and_leave_the_augmentation_alone(
        tmp_path):
    frame = make_synthetic(4, size=(48, 80), num_classes=2, seed=3, root=tmp_path)
    spec = validate_frame(frame, image_col="image", label_col="label")
    aug = AugmentConfig(hflip=True, vflip=True, scale_range=(0.8, 1.2))
    plain = SegmentationDataset(spec, S, augment=aug, seed=5)
    prompted = SegmentationDataset(spec, S, augment=aug, seed=5, prompts="box")
    for position in range(len(spec)):
        a, b = plain[(position, 1)], prompted[(position, 1)]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
        assert "prompt_box" not in a
        rows, cols = np.nonzero(b["target"].numpy() == 1)
        if rows.size == 0:
            assert int(b["prompt_kind"]) == 0
            continue
        x0, y0, x1, y1 = b["prompt_box"].tolist()
        assert abs(x0 - cols.min()) <= BOX_JITTER * (cols.max() + 1 - cols.min()) + 1e-4
        assert abs(y1 - (rows.max() + 1)) <= BOX_JITTER * (rows.max() + 1 - rows.min()) + 1e-4


# ------------------------------------------------------------------ facade
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    frame = make_synthetic(16, size=(72, 100), num_classes=2, seed=1,
                           root=tmp_path_factory.mktemp("synthetic"))
    return train_test_split(frame, test_size=0.25, seed=0)


@pytest.fixture(scope="module")
def prompt_trained(synthetic, tmp_path_factory):
    train, _ = synthetic
    seg = SemanticSegmentor(path=tmp_path_factory.mktemp("run"), verbosity=0)
    return seg.fit(train, presets="tiny", hyperparameters=PROMPTED)


def _bbox(path) -> list[int]:
    rows, cols = np.nonzero(np.asarray(Image.open(path)) > 0)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def test_a_series_of_boxes_for_a_list_of_images_is_refused_not_paired_by_label(
        prompt_trained, synthetic):
    """``predict_proba(test["image"].tolist(), boxes=test["box"])`` on a shuffled split
    paired the box labelled 3 with the list's fourth image: every row wrong, no word."""
    _, test = synthetic
    test = test.iloc[:4].sample(frac=1, random_state=3)
    test["box"] = [_bbox(p) for p in test["label"]]
    assert list(test.index) != sorted(test.index)
    by_row = prompt_trained.predict_proba(test, boxes=test["box"])  # paired by the index
    assert all(np.array_equal(a, b) for a, b in zip(
        prompt_trained.predict_proba(test["image"], boxes=test["box"]), by_row))
    paths = test["image"].tolist()
    with pytest.raises(DataValidationError, match=r"boxes is a Series with an index of its "
                                                  r"own .* pass the DataFrame .* or "
                                                  r"boxes\.tolist\(\)"):
        prompt_trained.predict_proba(paths, boxes=test["box"])
    in_order = prompt_trained.predict_proba(paths, boxes=test["box"].tolist())
    assert all(np.array_equal(a, b) for a, b in zip(in_order, by_row))
    # numbered by position already: taken as it is
    assert all(np.array_equal(a, b) for a, b in zip(prompt_trained.predict_proba(
        paths, boxes=test["box"].reset_index(drop=True)), by_row))


def test_prompt_trained_model_answers_the_box(prompt_trained, synthetic):
    _, test = synthetic
    test = test.iloc[:3]
    assert prompt_trained.config_.data.prompts == "box"
    around = [_bbox(p) for p in test["label"]]
    elsewhere = [[0, 0, 20, 20]] * len(test)
    free = prompt_trained.predict_proba(test)
    with_box = prompt_trained.predict_proba(test, boxes=around)
    other_box = prompt_trained.predict_proba(test, boxes=elsewhere)
    for f, a, b in zip(free, with_box, other_box):
        assert a.shape == f.shape and a.dtype == np.float32
        assert np.abs(a - b).max() > 1e-4  # the mask changes with the box
        assert np.abs(a - f).max() > 1e-4
    again = prompt_trained.predict_proba(test, boxes=around)
    for a, b in zip(with_box, again):
        np.testing.assert_array_equal(a, b)
    masks = prompt_trained.predict(test, boxes=around)
    for m, a in zip(masks, with_box):
        np.testing.assert_array_equal(m, (a > 0.5).astype(np.uint8))


def test_a_column_of_boxes_and_rows_of_nans_are_prompts_too(prompt_trained, synthetic):
    """boxes=df["box"] was refused ("got a Series"), and an (N, 4) array from x0..y1 columns
    with a NaN row for "no box" was refused as not finite."""
    _, test = synthetic
    test = test.iloc[:3].copy()
    around = [_bbox(p) for p in test["label"]]
    test["box"] = [around[0], None, around[2]]
    want = prompt_trained.predict_proba(test, boxes=[around[0], None, around[2]])
    for a, b in zip(prompt_trained.predict_proba(test, boxes=test["box"]), want):
        np.testing.assert_array_equal(a, b)
    array = np.array([around[0], [np.nan] * 4, around[2]], dtype=np.float64)
    for a, b in zip(prompt_trained.predict_proba(test, boxes=array), want):
        np.testing.assert_array_equal(a, b)
    # the same rows as lists (the array's .tolist()): the NaN row is no box there too
    for a, b in zip(prompt_trained.predict_proba(test, boxes=array.tolist()), want):
        np.testing.assert_array_equal(a, b)


def test_prompt_free_predict_is_unchanged_by_prompts(prompt_trained, synthetic):
    _, test = synthetic
    free = prompt_trained.predict_proba(test)
    none_prompts = prompt_trained.predict_proba(test, points=[None] * len(test),
                                                boxes={})
    for a, b in zip(free, none_prompts):
        np.testing.assert_array_equal(a, b)
    net = prompt_trained._model(None)  # same weights through the pre-prompt forward
    image = torch.from_numpy(np.zeros((1, 3, S, S), dtype=np.float32))
    with torch.no_grad():
        assert torch.equal(net(image), _prompt_free_reference(net, image))


def test_points_and_dict_forms(prompt_trained, synthetic):
    _, test = synthetic
    test = test.iloc[:2]
    box = _bbox(test["label"].iloc[0])
    by_index = prompt_trained.predict_proba(test, boxes={test.index[0]: box})
    by_list = prompt_trained.predict_proba(test, boxes=[box, None])
    for a, b in zip(by_index, by_list):
        np.testing.assert_array_equal(a, b)
    centre = [[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]]
    pts = prompt_trained.predict_proba(test, points=[(centre, [1]), None])
    assert np.abs(pts[0] - by_list[0]).max() > 1e-4
    np.testing.assert_array_equal(pts[1], by_list[1])
    boxes = [box, _bbox(test["label"].iloc[1])]
    by_array = prompt_trained.predict_proba(test, boxes=np.array(boxes, dtype=np.float32))
    for a, b in zip(by_array, prompt_trained.predict_proba(test, boxes=boxes)):
        np.testing.assert_array_equal(a, b)  # an (N, 4) array: one box per row


def test_old_predictor_without_the_prompt_keys_loads_and_predicts_the_same(
        prompt_trained, synthetic):
    _, test = synthetic
    before = prompt_trained.predict_proba(test.iloc[:2])
    path = Path(prompt_trained.path_)
    version = json.loads((path / "automask.json").read_text())["current"]
    meta_path = path / version / "predictor.json"
    meta = json.loads(meta_path.read_text())
    for record in meta["models"].values():
        assert record["config"]["data.prompts"] == "box"
        del record["config"]["data.prompts"], record["config"]["data.prompt_rate"]
    meta_path.write_text(json.dumps(meta))
    old = SemanticSegmentor.load(path)
    assert old.config_.data.prompts is None  # the default for predictors saved before
    for a, b in zip(before, old.predict_proba(test.iloc[:2])):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ bad inputs
BAD = [
    ({"boxes": [[0, 0, 5, 5]]}, r"boxes has 1 entries but the data has 2 image\(s\)"),
    ({"points": "x"}, r"points must be a list .* got a str"),
    ({"boxes": {"nope": [0, 0, 5, 5]}}, r"keys that are not in the data's index: \['nope'\]"),
    ({"boxes": [[0, 0, 5], None]}, r"row 0: a box must be \(x0, y0, x1, y1\), shape \(4,\)"),
    ({"boxes": [None, [9, 0, 5, 5]]}, r"row 1: box \[9.0, 0.0, 5.0, 5.0\] must have x1 > x0"),
    ({"boxes": [[0, 0, 101, 5], None]}, r"row 0: box .* outside the 100x72 \(W x H\) image"),
    ({"boxes": [None, [-1, 0, 5, 5]]}, r"row 1: box \[-1.0, 0.0, 5.0, 5.0\] has a negative "
                                       r"coordinate; x0 and y0 must be >= 0"),
    ({"boxes": [[0, 0, float("nan"), 5], None]}, r"row 0: box .* not finite"),
    ({"points": [([[1, 2]], [1]), ([1, 2, 3], [1])]},
     r"row 1: point coordinates must have shape \(N, 2\)"),
    ({"points": [([[1, 2], [3, 4]], [1]), None]}, r"row 0: point labels must have shape \(2,\)"),
    ({"points": [None, ([[1, 2]], [2])]}, r"row 1: point labels must be 1 .* got 2"),
    ({"points": [([[100, 2]], [1]), None]}, r"row 0: point \(100, 2\) is outside the 100x72"),
    ({"points": [([[1, -1]], [0]), None]}, r"row 0: point \(1, -1\) is outside"),
    ({"points": [[[1, 2]], None]}, r"row 0: points must be a \(coords, labels\) pair"),
    # text or flags read as numbers would be a file's columns left unparsed
    ({"boxes": [("1", "2", "30", "40"), None]}, r"row 0: box \('1', .* is not numeric"),
    ({"boxes": [None, (True, 2, 30, 40)]}, r"row 1: box \(True, .* is not numeric"),
    ({"boxes": [None, np.array([0, 0, 1, 1], bool)]}, r"row 1: box .* is not numeric"),
    ({"points": [([["1", 2]], [1]), None]}, r"row 0: point coordinates .* not numeric"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_prompts_are_refused_before_any_work(prompt_trained, synthetic, kwargs, message,
                                                 monkeypatch):
    _, test = synthetic
    data = test.iloc[:2].reset_index(drop=True)  # index 0, 1: rows named by position

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded before the prompts were checked")

    monkeypatch.setattr(prompt_trained, "_model", no_work)
    with pytest.raises(DataValidationError, match=message):
        prompt_trained.predict(data, **kwargs)


def test_prompts_refused_with_tiling_on_or_a_multiclass_model(prompt_trained, synthetic,
                                                              monkeypatch):
    _, test = synthetic
    box = {test.index[0]: [0, 0, 10, 10]}
    with pytest.raises(ConfigError, match="tiling='on'"):
        prompt_trained.predict(test, boxes=box, tiling="on")
    monkeypatch.setattr(prompt_trained, "task_", "multiclass")
    with pytest.raises(ConfigError, match="need a binary model; this model is multi-class"):
        prompt_trained.predict_proba(test, boxes=box)


def test_prompts_with_no_entry_are_the_prompt_free_prediction(prompt_trained, synthetic):
    """boxes={} or [None, ...] (built from an empty dict) is no prompt at all, so it goes
    with tiling='on' as a prompt-free call does; a bad tiling is still named."""
    _, test = synthetic
    expected = prompt_trained.predict_proba(test, tiling="on")
    # a column of boxes with missing values, as pandas keeps it, is no prompt there
    for empty in ({}, [None] * len(test), [float("nan")] * len(test), [pd.NA] * len(test)):
        got = prompt_trained.predict_proba(test, boxes=empty, points=empty, tiling="on")
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="tiling must be one of"):
        prompt_trained.predict_proba(test, boxes={}, tiling="yes")


def test_fit_refuses_prompts_for_multiclass_data_before_any_folder(tmp_path):
    frame = make_synthetic(6, size=(40, 40), num_classes=3, seed=0, root=tmp_path / "data")
    run = tmp_path / "run"
    seg = SemanticSegmentor(path=run, verbosity=0)
    with pytest.raises(ConfigError, match=r"'data.prompts'='box' needs a binary task"):
        seg.fit(frame, presets="tiny", hyperparameters={"data.prompts": "box"})
    assert not run.exists()


def test_prompt_keys_are_checked():
    with pytest.raises(ConfigError, match="'data.prompts'"):
        Config.from_dict({"data.prompts": "boxes"})
    with pytest.raises(ConfigError, match="'data.prompt_rate'"):
        Config.from_dict({"data.prompt_rate": 0.0})
    assert Config().data.prompts is None
    assert Config.from_dict({"data.prompts": "none"}).data.prompts is None  # --hp spelling
    assert Config.from_dict(Config().to_dict()) == Config()  # the default round-trips


def test_check_prompts_returns_original_pixel_prompts():
    [first, second] = check_prompts([([[1, 2]], [1]), None], {"b": (0, 0, 4, 4)},
                                    ["a", "b"], [(10, 10), (10, 10)])
    assert isinstance(first, ImagePrompt) and first.box is None
    np.testing.assert_array_equal(first.points, [[1.0, 2.0]])
    np.testing.assert_array_equal(first.labels, [1])
    np.testing.assert_array_equal(second.box, [0, 0, 4, 4])
    # point labels may be flags; a missing value is no prompt
    [third, fourth] = check_prompts([([[1, 2]], [True]), np.nan], [None, pd.NA], ["a", "b"],
                                    [(10, 10), (10, 10)])
    np.testing.assert_array_equal(third.labels, [1])
    assert fourth is None


# ------------------------------------------------------------------ command line
def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_automask(*args)  # forked from a process that imported the libraries


def test_cli_predict_boxes_csv_matches_the_api(prompt_trained, synthetic, tmp_path):
    _, test = synthetic
    test = test.iloc[:3]
    data = tmp_path / "data.csv"
    test[["image"]].to_csv(data, index=False)
    boxes = [_bbox(p) for p in test["label"].iloc[:2]]
    table = tmp_path / "boxes.csv"
    rows = [{"image": img, "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3]}
            for img, b in zip(test["image"].iloc[:2], boxes)]
    rows.append({"image": test["image"].iloc[2]})  # an empty row: no box, as a NaN row
    pd.DataFrame(rows).to_csv(table, index=False)
    assert table.read_text().splitlines()[-1].endswith(",,,,")
    out = tmp_path / "masks"
    proc = _run_cli("predict", str(prompt_trained.path_), "--data", str(data), "--out",
                    str(out), "--boxes", str(table))
    assert proc.returncode == 0, proc.stderr
    expected = prompt_trained.predict(test, boxes=[*boxes, None])
    for image, mask in zip(test["image"], expected):
        written = np.asarray(Image.open(out / f"{Path(image).stem}.png"))
        np.testing.assert_array_equal(written > 0, mask == 1)
    probs = tmp_path / "probs"
    proc = _run_cli("predict", str(prompt_trained.path_), "--data", str(data), "--out",
                    str(probs), "--boxes", str(table), "--proba")
    assert proc.returncode == 0, proc.stderr
    expected = prompt_trained.predict_proba(test, boxes=[*boxes, None])
    for image, prob in zip(test["image"], expected):
        np.testing.assert_allclose(np.load(probs / f"{Path(image).stem}.npy"), prob,
                                   rtol=0, atol=1e-6)


def test_cli_predict_boxes_bad_input_exits_2_and_writes_nothing(prompt_trained, synthetic,
                                                                tmp_path):
    _, test = synthetic
    data = tmp_path / "data.csv"
    test[["image"]].iloc[:2].to_csv(data, index=False)
    table = tmp_path / "boxes.csv"
    pd.DataFrame([{"image": test["image"].iloc[1], "x0": 5, "y0": 5, "x1": 500,
                   "y1": 20}]).to_csv(table, index=False)
    out = tmp_path / "masks"
    # the box is the CSV's row 0, matched to the image of --data's row 1: the CSV's is named
    for proba in ([], ["--proba"]):
        proc = _run_cli("predict", str(prompt_trained.path_), "--data", str(data), "--out",
                        str(out), "--boxes", str(table), *proba)
        assert proc.returncode == 2
        assert (f"--boxes {str(table)!r}: row 0 ({test['image'].iloc[1]!r}): box "
                "[5.0, 5.0, 500.0, 20.0] is outside the 100x72") in proc.stderr, proc.stderr
        assert not out.exists()


def test_training_step_feeds_the_sampled_prompts_to_the_model(tmp_path, monkeypatch):
    from automask.config import OptimConfig
    from automask.data.dataset import collate_samples
    from automask.training.module import SegmentationModule

    frame = make_synthetic(4, size=(48, 80), num_classes=2, seed=4, root=tmp_path)
    spec = validate_frame(frame, image_col="image", label_col="label")
    dataset = SegmentationDataset(spec, S, seed=0, prompts="box_or_points")
    batch = collate_samples([dataset[(i, 0)] for i in range(len(dataset))])
    model = build_segmenter("tiny", input_size=S, checkpoint="random", progress=False)
    seen = []
    original = model.forward_prompted

    def record(images, prompts, features=None):
        seen.extend(prompts)
        return original(images, prompts, features)

    monkeypatch.setattr(model, "forward_prompted", record)
    module = SegmentationModule(model, task="binary", num_classes=2, optim=OptimConfig(),
                                val_metric="iou")
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    kinds = batch["prompt_kind"].tolist()
    assert len(seen) == len(kinds) and any(kinds)
    for kind, prompt, box in zip(kinds, seen, batch["prompt_box"]):
        assert (prompt is None) == (kind == 0)
        if kind == 1:
            assert torch.equal(prompt.box, box) and prompt.points is None
        if kind == 2:
            assert prompt.box is None and bool((prompt.labels >= 0).all())
