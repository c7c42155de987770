"""Test-time augmentation by flips: each pass is the prediction of the mirrored image file,
mirrored back, and the passes are averaged; bad values fail before any work."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from automask import SemanticSegmentor, cli
from automask.datasets import make_synthetic
from automask.errors import ConfigError
from automask.tta import check_tta

S = 32  # model input side
HP = {"optim.max_epochs": 1, "model.input_size": S, "env.precision": "32-true"}


@pytest.fixture(scope="module", params=[2, 3], ids=["binary", "multiclass"])
def fitted(request, tmp_path_factory):
    """A tiny predictor in float32 (so that the passes compare exactly), and three images
    of 40 x 27 pixels (padded in the model input): one, and it mirrored each way."""
    root = tmp_path_factory.mktemp("tta")
    frame = make_synthetic(6, size=(27, 40), num_classes=request.param, seed=5,
                           root=root / "data")
    seg = SemanticSegmentor(path=root / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters=HP)
    image = np.asarray(Image.open(frame["image"][0]).convert("RGB"))
    paths = {}
    for name, array in (("plain", image), ("hflip", image[:, ::-1]), ("vflip", image[::-1])):
        paths[name] = str(root / f"{name}.png")
        Image.fromarray(np.ascontiguousarray(array)).save(paths[name])
    return seg, paths, frame


def _maps(seg, paths, **kwargs):
    """{name: (C, H, W) probabilities of that file}."""
    out = {}
    for name, path in paths.items():
        prob = seg.predict_proba([path], **kwargs)[0]
        out[name] = prob[None] if prob.ndim == 2 else prob
    return out


@pytest.mark.parametrize("tiling", ["off", "on"])
def test_each_flip_is_the_mirrored_files_prediction_mirrored_back(fitted, tiling):
    """tta="hflip" is (p + mirror(p of the mirrored file)) / 2, and so on; tiling="on"
    (sliding windows, the 40-pixel image wider than the 32-pixel input) as well."""
    seg, paths, _ = fitted
    plain = _maps(seg, paths, tiling=tiling)
    back = {"hflip": plain["hflip"][..., ::-1], "vflip": plain["vflip"][:, ::-1]}
    assert not np.allclose(back["hflip"], plain["plain"], atol=1e-3)  # the model is not
    for tta, passes in (("hflip", ["hflip"]), (["vflip", "hflip"], ["vflip", "hflip"])):
        got = seg.predict_proba([paths["plain"]], tiling=tiling, tta=tta)[0]
        want = (plain["plain"] + sum(back[name] for name in passes)) / (1 + len(passes))
        np.testing.assert_allclose(got.reshape(want.shape), want, atol=2e-6)
    mask = seg.predict([paths["plain"]], tiling=tiling, tta="hflip")[0]
    averaged = (plain["plain"] + back["hflip"]) / 2
    expected = (averaged[0] > 0.5 if seg.task_ == "binary" else averaged.argmax(0))
    assert (mask == expected).mean() > 0.99  # thresholds of averages within 2e-6


def test_true_takes_the_training_flips_and_evaluate_scores_the_average(fitted):
    seg, paths, frame = fitted
    assert seg.config_.data.hflip and seg.config_.data.vflip  # the tiny preset's
    np.testing.assert_array_equal(seg.predict_proba([paths["plain"]], tta=True)[0],
                                  seg.predict_proba([paths["plain"]],
                                                    tta=["hflip", "vflip"])[0])
    plain, mirrored = seg.evaluate(frame), seg.evaluate(frame, tta=True)
    assert plain.keys() == mirrored.keys() and plain != mirrored
    assert check_tta(True, hflip=False, vflip=True) == ("vflip",)
    assert check_tta(True, hflip=False, vflip=False) == ("hflip",)
    assert check_tta(["hflip", "hflip"]) == ("hflip",) and check_tta(False) == ()


@pytest.mark.parametrize("tta", ["rot90", ["hflip", "x"], [], 1, object()])
def test_a_bad_tta_fails_before_any_image_is_read(fitted, tta, tmp_path):
    seg, _, _ = fitted
    missing = [str(tmp_path / "not_there.png")]
    for call in (lambda: seg.predict(missing, tta=tta),
                 lambda: seg.predict_proba(missing, tta=tta),
                 lambda: seg.evaluate(tmp_path / "no.csv", tta=tta)):
        with pytest.raises(ConfigError, match="tta must be True, False, one of"):
            call()


def test_tta_with_prompts_is_refused(fitted):
    """A prompt marks a place of the image as it is: refused with tta (a multi-class model
    refuses prompts first)."""
    seg, paths, _ = fitted
    says = ("tta cannot be used with point or box prompts" if seg.task_ == "binary"
            else "binary")
    with pytest.raises(ConfigError, match=says):
        seg.predict([paths["plain"]], boxes=[(2, 2, 20, 20)], tta="hflip")


def test_command_line_tta(fitted, tmp_path, capsys):
    """``automask predict --tta`` writes the averaged masks; ``evaluate --tta`` scores
    them; ``--tta vflip`` names a flip."""
    seg, paths, frame = fitted
    out = tmp_path / "out"
    assert cli.main(["predict", str(seg.path_), "--data", paths["plain"], "--out", str(out),
                     "--tta", "hflip"]) == 0
    written = np.asarray(Image.open(out / "plain.png"))
    expected = seg.predict([paths["plain"]], tta="hflip")[0]
    np.testing.assert_array_equal(written > 0 if seg.task_ == "binary" else written,
                                  expected > 0 if seg.task_ == "binary" else expected)
    for bad in ("", "rot90", "hflip,x"):  # refused, naming the flips, before any model loads
        assert cli.main(["predict", str(seg.path_), "--data", paths["plain"], "--out",
                         str(out), "--tta", bad]) == 2
        assert capsys.readouterr().err.startswith("automask: error: --tta expects")
    csv = tmp_path / "data.csv"
    frame.to_csv(csv, index=False)
    capsys.readouterr()
    assert cli.main(["evaluate", str(seg.path_), "--data", str(csv), "--tta", "vflip",
                     "--json"]) == 0
    import json

    scores = json.loads(capsys.readouterr().out)
    expected = seg.evaluate(frame, tta="vflip")
    assert scores.keys() == expected.keys()
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key


def test_a_mapping_of_flips_is_refused_and_numpy_booleans_are_booleans():
    """{"hflip": False} reads like a switch per flip; read as its keys it would turn the
    flip on, so it is refused. numpy's booleans (a numpy or pandas config) are booleans."""
    for tta in ({"hflip": False}, {"vflip": 0}, {"hflip": True}):
        with pytest.raises(ConfigError, match="tta must be True, False"):
            check_tta(tta)
    assert check_tta(np.True_, hflip=False, vflip=True) == ("vflip",)
    assert check_tta(np.False_) == ()
