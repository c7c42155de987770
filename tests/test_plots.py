"""Pictures (automask.plots), palette masks, and what a fit prints.

The overlay tests render known masks, read the PNG back and check the colour of each
region where the masks put it."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from automask import SemanticSegmentor
from automask import plots
from automask.data import read_mask
from automask.data.io import class_colors, write_mask
from automask.datasets import make_synthetic, train_test_split


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def _colour_at(fig, ax, pixels: np.ndarray, x: float, y: float) -> np.ndarray:
    """RGB of the saved PNG at data point (x, y) of ``ax`` (figure drawn by savefig)."""
    dx, dy = ax.transData.transform((x, y))
    height = pixels.shape[0]
    return pixels[int(round(height - dy)), int(round(dx))].astype(int)


def _expected(grey: int, colour) -> np.ndarray:
    return plots.blend(np.full((1, 1, 3), grey, np.uint8), [(np.ones((1, 1), bool), colour)])[0, 0]


def test_binary_overlay_puts_tp_fp_fn_colours_where_the_masks_say(tmp_path):
    image = np.full((100, 100, 3), 120, np.uint8)
    truth = np.zeros((100, 100), np.uint8)
    truth[:, :50] = 1                       # left half is foreground
    pred = np.zeros((100, 100), np.uint8)
    pred[:50, :] = 1                        # top half predicted
    path = tmp_path / "binary.png"
    fig = plots.plot_masks([image], {"prediction": [pred]}, [truth], task="binary",
                           names=["a"], path=path)
    pixels = _png(path)
    _, gt_ax, pred_ax = fig.axes
    regions = {  # (x, y) of each quadrant's centre -> colour
        (25, 25): plots.TP_COLOR, (75, 25): plots.FP_COLOR,
        (25, 75): plots.FN_COLOR, (75, 75): None,
    }
    for (x, y), colour in regions.items():
        want = np.full(3, 120) if colour is None else _expected(120, colour)
        got = _colour_at(fig, pred_ax, pixels, x, y)
        assert np.abs(got - want).max() <= 2, ((x, y), got, want)
    assert np.abs(_colour_at(fig, gt_ax, pixels, 25, 50)
                  - _expected(120, plots.TRUTH_COLOR)).max() <= 2
    assert np.abs(_colour_at(fig, gt_ax, pixels, 75, 50) - 120).max() <= 2
    # the three colours differ from each other and from the truth colour
    colours = {plots.TP_COLOR, plots.FP_COLOR, plots.FN_COLOR, plots.TRUTH_COLOR}
    assert len(colours) == 4
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["ground truth", "TP (correct)", "FP (false alarm)", "FN (missed)"]
    assert [ax.get_title() for ax in fig.axes] == ["image a", "ground truth", "prediction"]


def test_multiclass_overlay_uses_the_palette_and_names_the_classes(tmp_path):
    image = np.full((60, 90, 3), 200, np.uint8)
    truth = np.zeros((60, 90), np.uint8)
    truth[:, 30:60], truth[:, 60:] = 1, 2
    truth[:10, :] = 255                     # ignored strip at the top
    pred = np.full((60, 90), 2, np.uint8)
    path = tmp_path / "multi.png"
    fig = plots.plot_masks([image], {"prediction": [pred]}, [truth], task="multiclass",
                           class_names=["sky", "road", "car"], path=path)
    pixels = _png(path)
    palette = class_colors(3)
    _, gt_ax, pred_ax = fig.axes
    for x, cls in ((15, 0), (45, 1), (75, 2)):
        got = _colour_at(fig, gt_ax, pixels, x, 35)
        assert np.abs(got - _expected(200, palette[cls])).max() <= 2, (cls, got)
        got = _colour_at(fig, pred_ax, pixels, x, 35)
        assert np.abs(got - _expected(200, palette[2])).max() <= 2, (cls, got)
    got = _colour_at(fig, gt_ax, pixels, 45, 4)
    assert np.abs(got - _expected(200, plots.IGNORE_COLOR)).max() <= 2
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert labels == {"0 sky", "1 road", "2 car", "ignored"}


def _installed_fonts():
    from matplotlib import font_manager

    default = font_manager.findfont(font_manager.FontProperties())
    others = {e.name: e.fname for e in font_manager.fontManager.ttflist
              if not e.name.startswith("Last Resort")}
    return plots._charmap(default), {n: plots._charmap(f) for n, f in others.items()}


def test_names_the_default_font_lacks_are_drawn_with_an_installed_font_that_has_them(
        tmp_path, recwarn):
    """A class name with a character matplotlib's default font (DejaVu Sans) lacks but an
    installed font (matplotlib's own STIX and DejaVu Math fonts) has: its text asks for such
    a font after the default, and nothing warns."""
    default, others = _installed_fonts()
    extra = sorted(c for c in others["STIXGeneral"] - default
                   if chr(c).isprintable() and not chr(c).isspace())
    assert extra, "STIXGeneral has no character DejaVu Sans lacks"
    name = "road " + chr(extra[0])
    truth = np.zeros((20, 30), np.uint8)
    truth[:, 15:] = 1
    fig = plots.plot_masks([np.zeros((20, 30, 3), np.uint8)], {"p": [truth]}, [truth],
                           task="multiclass", class_names=["sky", name], names=[name],
                           path=tmp_path / "names.png")
    texts = [*fig.legends[0].get_texts(), *(ax.title for ax in fig.axes)]
    assert f"1 {name}" in {t.get_text() for t in texts}
    for text in texts:
        first, *fallbacks = text.get_fontfamily()
        assert first == "DejaVu Sans" and fallbacks
        assert all(extra[0] in others[family] for family in fallbacks)
    assert not [w for w in recwarn if "font" in str(w.message).lower()]


def test_names_no_installed_font_has_warn_once_naming_the_characters(tmp_path):
    default, others = _installed_fonts()
    known = default.union(*others.values())
    absent = next(chr(c) for c in range(0x4E00, 0xA000) if c not in known)  # CJK ideographs
    truth = np.zeros((20, 30), np.uint8)
    truth[:, 15:] = 1
    with pytest.warns(UserWarning) as record:
        plots.plot_masks([np.zeros((20, 30, 3), np.uint8)], {"p": [truth]}, [truth],
                         task="multiclass", class_names=["sky", absent * 2],
                         path=tmp_path / "names.png")
    fonts = [str(w.message) for w in record if "font" in str(w.message).lower()]
    assert fonts == [f"no installed font has the characters {absent!r} of these class or "
                     "file names: they are drawn as boxes; install a font that has them (e.g. "
                     "Noto Sans CJK for Chinese, Japanese and Korean) and matplotlib uses it"]
    assert (tmp_path / "names.png").stat().st_size > 1000


def test_comparison_layout_one_row_per_image_one_column_per_model(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(3)]
    truths = [rng.integers(0, 2, (32, 48)).astype(np.uint8) for _ in range(3)]
    preds = {"method=full": truths, "method=lora": [1 - t for t in truths]}
    fig = plots.plot_masks(images, preds, truths, task="binary", names=["x", "y", "z"],
                           path=tmp_path / "cmp.png")
    assert len(fig.axes) == 12
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == ["image x", "ground truth", "method=full", "method=lora"]
    assert titles[8] == "image z"
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="2 masks for 'bad' but 3 images"):
        plots.plot_masks(images, {"bad": truths[:2]}, truths, task="binary")


def test_write_mask_palette_png_keeps_class_ids(tmp_path):
    mask = np.random.default_rng(1).integers(0, 12, (40, 50)).astype(np.uint8)
    mask[:3, :3] = 255
    write_mask(tmp_path / "m.png", mask, "multiclass")
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P"
        rgb = np.array(img.convert("RGB"))
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)
    palette = class_colors(12)
    inside = mask != 255
    np.testing.assert_array_equal(rgb[inside], palette[mask[inside]])
    assert len({tuple(c) for c in palette}) == 12  # every class its own colour
    write_mask(tmp_path / "b.png", np.eye(5, dtype=np.uint8), "binary")
    assert set(np.unique(_png(tmp_path / "b.png"))) == {0, 255}
    with pytest.raises(ValueError, match="2-D"):
        write_mask(tmp_path / "bad.png", np.zeros((2, 2, 3)), "multiclass")
    assert not (tmp_path / "bad.png").exists()


def test_colour_coded_classes_keep_their_colours_in_written_masks_and_overlays(tmp_path):
    """A predictor fit on colour-coded masks writes its masks (and draws its overlays) in
    the masks' colours; the PNG's values stay the class ids, read back with or without
    the map."""
    colours = {(128, 128, 128): 0, (128, 64, 128): 1, (192, 0, 0): 1, (64, 0, 128): 2,
               (0, 0, 0): 255}  # a second colour of class 1, and an ignored colour
    palette = class_colors(4, colours)
    np.testing.assert_array_equal(palette[:3], [(128, 128, 128), (128, 64, 128), (64, 0, 128)])
    np.testing.assert_array_equal(palette[3], class_colors(4)[3])  # no colour: the default
    mask = np.random.default_rng(2).integers(0, 3, (30, 40)).astype(np.uint8)
    write_mask(tmp_path / "m.png", mask, "multiclass", colours)
    rgb = _png(tmp_path / "m.png")
    np.testing.assert_array_equal(rgb, palette[mask])
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", color_map=colours), mask)
    regions = plots.class_regions(mask, 3, colours)
    assert [(c, colour) for c, _, colour in regions] == [
        (0, (128, 128, 128)), (1, (128, 64, 128)), (2, (64, 0, 128))]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    frame = make_synthetic(14, size=64, num_classes=2, seed=3, root=root / "data")
    train, test = train_test_split(frame, test_size=0.2, seed=0)
    seg = SemanticSegmentor(path=root / "run", verbosity=1)
    return seg, train, test


@pytest.mark.slow
def test_fit_prints_epoch_lines_and_summary_and_draws_pictures(fitted, capsys, tmp_path):
    seg, train, test = fitted
    seg.fit(train, presets="tiny", hyperparameters={
        "optim.max_epochs": 2, "model.input_size": 64, "peft.method": ["full", "lora"]})
    out = capsys.readouterr().out
    assert "\r" not in out
    epoch_lines = re.findall(r"^\[(method=\w+)\]\s+epoch (\d)/2 .*$", out, re.M)
    assert epoch_lines == [("method=full", "1"), ("method=full", "2"),
                           ("method=lora", "1"), ("method=lora", "2")], out
    summary = seg.fit_summary()
    board = seg.leaderboard()
    assert summary["best_model"] == seg.best_model_ == board.loc[board["best"], "model"].item()
    assert summary["candidates"] == ["method=full", "method=lora"]
    for _, row in board.iterrows():
        assert summary["val_scores"][row["model"]] == row["val_iou"]
    assert summary["path"] == str(seg.path_)
    assert all(summary["best_epochs"][n] in (1, 2) for n in summary["candidates"])
    assert f"best model: {seg.best_model_}; predictor saved in {seg.path_}" in out

    fig = seg.plot_predictions(test, n=2, path=tmp_path / "pred.png")
    assert len(fig.axes) == 6 and fig.axes[1].get_title() == "ground truth"
    assert fig.axes[2].get_title() == "prediction"
    fig = seg.plot_comparison(test, n=2, path=tmp_path / "cmp.png")
    assert [ax.get_title() for ax in fig.axes[1:4]] == ["ground truth", "method=full",
                                                        "method=lora"]
    fig = seg.plot_history(path=tmp_path / "hist.png")
    loss_ax, val_ax = fig.axes
    assert loss_ax.get_title() == "training loss" and val_ax.get_title() == "validation iou"
    for ax in (loss_ax, val_ax):
        assert [line.get_label() for line in ax.lines] == ["method=full", "method=lora"]
        assert all(len(line.get_xdata()) == 2 for line in ax.lines)
    for name in ("pred.png", "cmp.png", "hist.png"):
        assert _png(tmp_path / name).shape[0] > 100
    with pytest.raises(ValueError, match="nope"):
        seg.plot_comparison(test, models=["nope"])
    fig = seg.plot_comparison(test, models="method=lora", n=1)  # one name, not its letters
    assert [ax.get_title() for ax in fig.axes[1:]] == ["ground truth", "method=lora"]


def test_a_picture_path_ending_in_a_slash_is_a_folder_not_a_file_beside_it(tmp_path):
    """'pics/' (a folder not made yet) was saved as 'pics.png' beside it."""
    from automask.errors import DataValidationError

    for folder in (tmp_path / "new", tmp_path):  # not there yet, and there
        with pytest.raises(DataValidationError, match="folder"):
            plots.check_path(f"{folder}/")
    assert not (tmp_path / "new.png").exists() and not (tmp_path / "new").exists()
    assert plots.check_path(tmp_path / "pic") == tmp_path / "pic.png"  # a name: .png added


def test_the_demo_refuses_a_path_that_is_a_file(tmp_path, capsys):
    from automask import cli

    taken = tmp_path / "afile"
    taken.write_text("mine")
    assert cli.main(["demo", "--path", str(taken)]) == 2
    assert "is a file" in capsys.readouterr().err and taken.read_text() == "mine"
