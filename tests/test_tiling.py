"""Sliding-window prediction of images larger than the model input."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from automask import SemanticSegmentor
from automask.config import Config
from automask.data.transforms import PIXEL_MEAN, PIXEL_STD
from automask.datasets import make_synthetic
from automask.errors import ConfigError
from automask.models import build_segmenter
from automask.peft import apply_peft
from automask.prediction import as_frame, images_spec, iter_proba
from automask.tiling import (
    AUTO_RATIO,
    blend_weights,
    check_tiling,
    tiled_proba,
    use_tiles,
    window_grid,
    window_starts,
)

from cli_process import run_automask

S = 64  # model input side used throughout


def _cfg(batch: int = 3) -> Config:
    return Config.from_dict({"model.input_size": S, "env.eval_batch_size": batch,
                             "data.num_workers": 0, "env.accelerator": "cpu"})


def _spec(paths):
    frame, root = as_frame([str(p) for p in paths], "image")
    return images_spec(frame, "image", root)


def _write(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


class PixelModel(torch.nn.Module):
    """Per-pixel logits of the red channel at full input resolution: 8 * (red - 128) / std.

    Its output at a pixel depends on that pixel only, so a tiled prediction must equal
    the prediction of the whole image, and a bright line is found iff it stays bright.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 1, S, S)
        self.calls.append(int(x.shape[0]))
        red = x[:, :1] * PIXEL_STD[0] + PIXEL_MEAN[0]  # back to 0..255 (0 on padding)
        return 8.0 * (red - 128.0) / PIXEL_STD[0]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = build_segmenter("tiny", num_classes=3, input_size=S, checkpoint="random",
                            progress=False)
    model = apply_peft(model, "lora").eval()
    with torch.no_grad():  # random init gives a constant output (zero-initialised head)
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


# --------------------------------------------------------------------- grid and weights
@pytest.mark.parametrize("size", [(64, 64), (65, 64), (200, 130), (512, 700), (30, 500)])
def test_windows_cover_every_pixel_and_stay_inside(size):
    height, width = size
    count = np.zeros(size, dtype=np.int64)
    for top, left in window_grid(size, S, 0.25):
        assert top >= 0 and left >= 0
        assert top + S <= max(height, S) and left + S <= max(width, S)
        count[top:top + S, left:left + S] += 1
    assert (count >= 1).all()
    starts = window_starts(700, S, 0.25)
    assert starts[0] == 0 and starts[-1] == 700 - S
    assert max(np.diff(starts)) == 48  # stride = 64 * (1 - 0.25)
    assert window_starts(40, S, 0.25) == [0]


def test_blend_weights_positive_with_the_peak_in_the_centre():
    w = blend_weights(S)
    assert w.shape == (S, S) and w.dtype == np.float32
    edge = 0.5 / 31.5  # pixel centre 0.5 px from the edge, 31.5 px at the centre
    assert w.min() > 0 and w.min() == pytest.approx(edge**2, rel=1e-5)
    assert w.max() == pytest.approx(1.0) and w[S // 2, S // 2] == w.max()
    assert w[0, 0] < w[0, S // 2] < w[S // 2, S // 2]
    np.testing.assert_array_equal(w, w.T)
    # summed over a grid, every pixel of the image gets a positive weight
    total = np.zeros((300, 170), dtype=np.float64)
    for top, left in window_grid((300, 170), S):
        total[top:top + S, left:left + S] += w
    assert total.min() > 0


def test_tiling_rule_and_bad_values():
    assert [check_tiling(m) for m in ("auto", "on", "off")] == ["auto", "on", "off"]
    for bad in ("yes", "ON", None, 1):
        with pytest.raises(ConfigError, match="tiling must be one of"):
            check_tiling(bad)
    big = int(AUTO_RATIO * S) + 1
    assert use_tiles((big, 10), S, "auto") and not use_tiles((int(AUTO_RATIO * S), 10), S, "auto")
    assert use_tiles((S + 1, 10), S, "on") and not use_tiles((S, S), S, "on")
    assert not use_tiles((5000, 5000), S, "off")


def test_iter_proba_rejects_a_bad_tiling_before_any_work(tmp_path):
    model = PixelModel()
    spec = _spec([_write(tmp_path / "a.png", np.zeros((S, S, 3), np.uint8))])
    with pytest.raises(ConfigError, match="'sometimes'"):
        iter_proba(model, _cfg(), "binary", spec, tiling="sometimes")
    assert model.calls == []


# --------------------------------------------------------------------- blending
def test_tiled_equals_whole_image_for_a_per_pixel_model_and_batches_are_bounded():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(200, 150, 3), dtype=np.uint8)
    model = PixelModel()
    got = tiled_proba(lambda x: torch.sigmoid(model(x)), image, S, batch_size=3,
                      device=torch.device("cpu"))
    expected = torch.sigmoid(8.0 * (torch.from_numpy(image[:, :, 0]).float() - 128.0)
                             / PIXEL_STD[0])
    assert got.shape == (1, 200, 150)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)
    n_windows = len(window_grid((200, 150), S))
    assert n_windows == 12  # 4 rows x 3 columns of windows
    assert sum(model.calls) == n_windows and max(model.calls) <= 3
    assert model.calls == [3, 3, 3, 3]


def test_windows_per_forward_never_exceed_eval_batch_size(tmp_path):
    rng = np.random.default_rng(1)
    path = _write(tmp_path / "big.png", rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    for batch in (1, 2, 5):
        model = PixelModel()
        [(pos, prob)] = list(iter_proba(model, _cfg(batch), "binary", _spec([path]), "on"))
        assert pos == 0 and prob.shape == (1, 300, 260)
        assert max(model.calls) <= batch
        assert sum(model.calls) == len(window_grid((300, 260), S))


# --------------------------------------------------------------------- real tiny model
def test_on_equals_the_plain_path_for_images_no_larger_than_the_input(tmp_path, tiny_model):
    rng = np.random.default_rng(2)
    paths = [_write(tmp_path / f"{i}.png", rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
             for i, hw in enumerate([(S, 48), (40, 40), (S, S)])]
    spec = _spec(paths)
    off = list(iter_proba(tiny_model, _cfg(), "multiclass", spec, "off"))
    on = list(iter_proba(tiny_model, _cfg(), "multiclass", spec, "on"))
    assert [i for i, _ in on] == [0, 1, 2]
    assert all(p.std() > 1e-3 for _, p in off)  # the model's output varies over the image
    for (_, a), (_, b) in zip(off, on):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # the window code itself: an S x 48 image is one window, equal to the plain path
    with torch.inference_mode():
        single = tiled_proba(lambda x: tiny_model(x).softmax(1), np.asarray(Image.open(paths[0])),
                             S, batch_size=2, device=torch.device("cpu"))
    np.testing.assert_allclose(single.numpy(), off[0][1], atol=1e-5, rtol=0)


def test_mixed_rows_keep_their_order_and_sizes(tmp_path, tiny_model):
    rng = np.random.default_rng(3)
    sizes = [(150, 90), (40, 50), (S, S), (100, 210)]
    paths = [_write(tmp_path / f"{i}.png", rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
             for i, hw in enumerate(sizes)]
    spec = _spec(paths)
    off = list(iter_proba(tiny_model, _cfg(), "multiclass", spec, "off"))
    on = list(iter_proba(tiny_model, _cfg(), "multiclass", spec, "on"))
    assert [i for i, _ in on] == [0, 1, 2, 3]
    for (_, a), (_, b), hw in zip(off, on, sizes):
        assert a.shape == b.shape == (3, *hw)
        np.testing.assert_allclose(b.sum(0), 1.0, atol=1e-5)  # blended softmax stays one
    for k in (1, 2):  # not larger than the input: plain path
        np.testing.assert_allclose(on[k][1], off[k][1], atol=1e-6, rtol=0)
    for k in (0, 3):  # tiled: computed at another scale
        assert not np.allclose(on[k][1], off[k][1], atol=1e-3)
    # "auto" tiles only the image whose longer side exceeds AUTO_RATIO * S (210 > 80)
    auto = list(iter_proba(tiny_model, _cfg(), "multiclass", spec, "auto"))
    np.testing.assert_allclose(auto[3][1], on[3][1], atol=1e-6, rtol=0)
    np.testing.assert_allclose(auto[0][1], on[0][1], atol=1e-6, rtol=0)  # 150 > 80 too


# --------------------------------------------------------------------- thin structures
def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred & truth).sum() / max((pred | truth).sum(), 1))


def test_thin_lines_survive_tiling_but_not_shrinking(tmp_path):
    rng = np.random.default_rng(4)
    size = 640  # 10 x the input: shrinking divides a 2-px line's contrast by ~5
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    truth = np.zeros((size, size), dtype=bool)
    for k, width in enumerate([1, 2, 3, 2, 1, 3]):
        row = 40 + k * 97
        truth[row:row + width, 20:size - 20] = True  # horizontal lines
        col = 60 + k * 91
        truth[15:size - 15, col:col + width] = True  # vertical lines
    image[truth] = 250
    path = _write(tmp_path / "lines.png", image)
    spec = _spec([path])
    scores = {}
    for mode in ("off", "on"):
        [(_, prob)] = list(iter_proba(PixelModel(), _cfg(4), "binary", spec, mode))
        assert prob.shape == (1, size, size)
        scores[mode] = _iou(prob[0] > 0.5, truth)
    assert scores["on"] > 0.95, scores
    assert scores["off"] < 0.2, scores


# --------------------------------------------------------------------- facade and CLI
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_automask(*args)  # forked from a process that imported the libraries


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling_fit")
    frame = make_synthetic(8, size=S, num_classes=2, seed=5, root=root / "data")
    seg = SemanticSegmentor(label="label", path=root / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters={"optim.max_epochs": 1, "model.input_size": S},
    )
    big = make_synthetic(1, size=(150, 210), num_classes=2, seed=6, root=root / "big")
    return seg, root / "run", big


def test_segmentor_tiling_keyword(fitted):
    seg, _, big = fitted
    on = seg.predict_proba(big, tiling="on")[0]
    off = seg.predict_proba(big, tiling="off")[0]
    assert on.shape == off.shape == (150, 210)
    assert not np.allclose(on, off, atol=1e-3)
    np.testing.assert_array_equal(seg.predict(big, tiling="on")[0], (on > 0.5).astype(np.uint8))
    scores = seg.evaluate(big, metrics=["iou"], tiling="on")
    assert 0.0 <= scores["iou"] <= 1.0
    with pytest.raises(ConfigError, match="'maybe'"):
        seg.predict(big, tiling="maybe")


def test_cli_predict_tile_writes_masks_at_the_original_size(fitted, tmp_path):
    _, run, big = fitted
    folder = Path(big["image"].iloc[0]).parent
    out = tmp_path / "masks"
    proc = run_cli("predict", str(run), "--data", str(folder), "--out", str(out), "--tile", "on")
    assert proc.returncode == 0, proc.stderr
    [written] = sorted(out.iterdir())
    mask = np.asarray(Image.open(written))
    assert mask.shape == (150, 210) and set(np.unique(mask)) <= {0, 255}
    expected = SemanticSegmentor.load(run).predict(big, tiling="on")[0]
    np.testing.assert_array_equal(mask // 255, expected)

    bad = run_cli("predict", str(run), "--data", str(folder), "--out", str(tmp_path / "x"),
                  "--tile", "sometimes")
    assert bad.returncode == 2, (bad.returncode, bad.stderr)
    lines = [line for line in bad.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("automask: error:"), bad.stderr
    assert "'sometimes'" in lines[0] and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def by_rule(tmp_path_factory):
    """Predictors trained with data.large_images "resize" and "crop" (on small images)."""
    root = tmp_path_factory.mktemp("tiling_rules")
    frame = make_synthetic(8, size=S, num_classes=2, seed=5, root=root / "data")
    fits = {rule: SemanticSegmentor(label="label", path=root / rule, verbosity=0).fit(
        frame, presets="tiny", hyperparameters={"optim.max_epochs": 1, "model.input_size": S,
                                                "data.large_images": rule})
        for rule in ("resize", "crop")}
    big = make_synthetic(1, size=(150, 210), num_classes=2, seed=6, root=root / "big")
    near = make_synthetic(1, size=(70, 70), num_classes=2, seed=7, root=root / "near")
    return fits, big, near


def test_auto_tiling_follows_the_rule_the_model_was_trained_with(fitted, by_rule):
    """tiling="auto" predicts an image at the scale its kind was trained at: resized for a
    model trained on resized images (the paper presets), windows for every image larger
    than the input for one trained on crops, the 1.25 x rule by default; "on" and "off"
    stay the caller's choice."""
    default, _, _ = fitted
    fits, big, near = by_rule
    assert 1 < 70 / S < AUTO_RATIO < 210 / S  # `near` is tiled only under "on"

    def same(seg, data, tiling) -> bool:
        auto = seg.predict_proba(data)[0]
        return np.array_equal(auto, seg.predict_proba(data, tiling=tiling)[0])

    for seg, data, tiling, other in [(fits["resize"], big, "off", "on"),
                                     (fits["crop"], near, "on", "off"),
                                     (default, near, "off", "on"),
                                     (default, big, "on", "off")]:
        assert same(seg, data, tiling), (seg.config_.data.large_images, data.shape, tiling)
        assert not same(seg, data, other), (seg.config_.data.large_images, tiling, other)
    # prompts under "auto" are taken by a crop-trained model ("on" refuses them)
    prompted = fits["crop"].predict_proba(near, boxes=[[5, 5, 40, 40]])[0]
    assert prompted.shape == (70, 70)
    assert not np.array_equal(prompted, fits["crop"].predict_proba(near)[0])


def test_exported_metadata_states_the_trained_tiling_rule(tiny_model):
    from automask.export import preprocessing_metadata

    rules = {rule: preprocessing_metadata(tiny_model, large_images=rule)["large_images"]
             for rule in ("auto", "crop", "resize")}
    assert "resizes every image, as the model was trained" in rules["resize"]
    assert f"larger than {S} (the model was trained on native-scale crops" in rules["crop"]
    assert f"exceeds {AUTO_RATIO:g} x {S}" in rules["auto"]
    assert preprocessing_metadata(tiny_model)["large_images"] == rules["auto"]  # the default


def test_a_tiled_image_gone_or_replaced_after_the_check_is_named_by_its_row(tmp_path,
                                                                          tiny_model):
    """The tiled path reads as the plain one does: a file deleted, or replaced by one of
    another size, since the data was checked is a DataValidationError naming its row."""
    from automask.errors import DataValidationError

    rng = np.random.default_rng(4)
    paths = [_write(tmp_path / f"{i}.png", rng.integers(0, 256, (150, 90, 3), dtype=np.uint8))
             for i in range(2)]
    spec = _spec(paths)
    paths[1].unlink()
    stream = iter_proba(tiny_model, _cfg(), "multiclass", spec, "on")
    assert next(stream)[1].shape == (3, 150, 90)
    with pytest.raises(DataValidationError, match=r"row 1 .*1\.png: the file is gone"):
        next(stream)
    _write(paths[1], rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    with pytest.raises(DataValidationError, match=r"row 1 .*120x90 \(H x W\) now but was 150x90"):
        list(iter_proba(tiny_model, _cfg(), "multiclass", spec, "on"))
