"""Audit of the SemanticSegmentor facade: odd but legitimate inputs are accepted in the
order given, and bad input fails with an automask error that leaves a fitted predictor as
it was."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask import SemanticSegmentor
from automask.datasets import make_synthetic
from automask.errors import AutomaskError, ConfigError, DataValidationError

S = 32  # model input side
HP = {"optim.max_epochs": 1, "model.input_size": S}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny binary predictor and its labelled DataFrame."""
    root = tmp_path_factory.mktemp("audit_facade")
    frame = make_synthetic(6, size=S, num_classes=2, seed=5, root=root / "data")
    seg = SemanticSegmentor(path=root / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters=HP)
    return seg, frame, root


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_predict_takes_a_series_an_array_or_a_glob_of_paths_in_their_order(fitted):
    seg, frame, root = fitted
    paths = list(frame["image"])[::-1]  # not the folder's sorted order
    expected = seg.predict(paths)
    series = pd.Series(paths, index=[10, 20, 30, 40, 50, 60])
    _same(seg.predict(series), expected)
    _same(seg.predict(frame["image"]), seg.predict(list(frame["image"])))
    _same(seg.predict(np.array(paths)), expected)
    _same(seg.predict(iter(paths)), expected)
    _same(seg.predict(Path(p) for p in paths), expected)
    probs = seg.predict_proba(series)
    assert [p.shape for p in probs] == [m.shape for m in expected]


def test_predict_save_to_from_a_series_keeps_its_index(fitted, tmp_path):
    seg, frame, _ = fitted
    series = pd.Series(list(frame["image"])[:3], index=["a", "b", "c"])
    out = seg.predict(series, save_to=tmp_path / "masks")
    assert list(out.index) == ["a", "b", "c"]
    assert [Path(p).name for p in out["label"]] == [Path(p).stem + ".png" for p in series]
    # prompts keyed by the Series' own index
    boxes = {"b": (0, 0, S // 2, S // 2)}
    assert len(seg.predict(series, boxes=boxes)) == 3


def test_predict_refuses_a_2d_array_and_bytes_naming_them(fitted):
    seg, frame, _ = fitted
    with pytest.raises(DataValidationError, match=r"1-D.*\(3, 2\)"):
        seg.predict(np.array(list(frame["image"])).reshape(3, 2))
    with pytest.raises(DataValidationError, match="bytes"):
        seg.predict(str(frame["image"][0]).encode())


def test_evaluate_unknown_metric_is_an_automask_error_naming_it(fitted, monkeypatch):
    seg, frame, _ = fitted
    from automask import prediction

    def boom(*a, **k):  # no image is predicted for a bad metric name
        raise AssertionError("predicted before checking the metrics")

    monkeypatch.setattr(prediction, "iter_proba", boom)
    with pytest.raises(ConfigError, match="'nope'"):
        seg.evaluate(frame, metrics=["iou", "nope"])
    with pytest.raises(AutomaskError):
        seg.evaluate(frame, metrics="iou,nope")


def test_a_refused_refit_leaves_the_fitted_predictor_as_it_was(fitted):
    seg, frame, root = fitted
    before = seg.predict(list(frame["image"])[:2])
    best, path = seg.best_model_, seg.path_
    with pytest.raises(DataValidationError, match="label"):
        seg.fit(frame.drop(columns=["label"]), presets="tiny", hyperparameters=HP)
    with pytest.raises(ConfigError):  # bad time limit
        seg.fit(frame, presets="tiny", hyperparameters=HP, time_limit=-1)
    with pytest.raises(ConfigError, match="exists|overwrite|predictor"):  # path in use
        seg.fit(frame, presets="tiny", hyperparameters=HP)
    assert seg.best_model_ == best and seg.path_ == path
    _same(seg.predict(list(frame["image"])[:2]), before)


@pytest.mark.parametrize("kwargs, match", [
    ({"verbosity": "2"}, "verbosity.*'2'"),
    ({"verbosity": -1}, "verbosity.*-1"),
    ({"verbosity": True}, "verbosity.*True"),
    ({"label": "image"}, "label and image.*'image'"),
    ({"label": None}, "label.*None"),
])
def test_bad_constructor_arguments_are_named_before_anything_is_written(fitted, tmp_path,
                                                                        kwargs, match):
    _, frame, _ = fitted
    seg = SemanticSegmentor(path=tmp_path / "run", **kwargs)
    with pytest.raises(ConfigError, match=match):
        seg.fit(frame, presets="tiny", hyperparameters=HP)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_path_is_refused_not_the_working_directory(fitted, tmp_path, monkeypatch,
                                                            path):
    """path="" (an unset environment variable) would be '.', fitting among the user's
    files; it is refused before anything is written."""
    _, frame, _ = fitted
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"path must name the predictor's folder"):
        SemanticSegmentor(path=path, verbosity=0).fit(frame, presets="tiny", hyperparameters=HP)
    assert list(tmp_path.iterdir()) == []


def test_a_path_of_another_type_is_named(fitted, tmp_path, monkeypatch):
    """path=123 ended in a bare TypeError from deep inside fit."""
    _, frame, _ = fitted
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"path must be a folder path .* got int 123"):
        SemanticSegmentor(path=123, verbosity=0).fit(frame, presets="tiny", hyperparameters=HP)
    assert list(tmp_path.iterdir()) == []


def test_urls_are_refused_as_paths_not_made_local_folders(fitted, tmp_path, monkeypatch):
    """seg.save("s3://bucket/m") saved to ./s3:/bucket/m (pathlib collapses '//'), and so
    did save_to, a picture's path and the constructor's path; a file:// input was "not
    found" below the working folder."""
    from automask import cli

    seg, frame, root = fitted
    monkeypatch.chdir(tmp_path)
    image = frame["image"].iloc[0]
    writes = {
        "save": lambda: seg.save("s3://bucket/models/m"),
        "save_to": lambda: seg.predict(frame, save_to="s3://bucket/preds"),
        "fit": lambda: SemanticSegmentor(path="file:///" + str(tmp_path / "run"),
                                         verbosity=0).fit(frame, presets="tiny",
                                                          hyperparameters=HP),
        "picture": lambda: seg.plot_predictions(frame, path="gs://bucket/p.png"),
        "export": lambda: seg.export("gs://bucket/m.onnx"),
    }
    for call in writes.values():
        with pytest.raises(AutomaskError, match=r"is a URL, not a file path: automask writes "
                                                r"local files only"):
            call()
    reads = {
        "predict": lambda: seg.predict("file://" + image),
        "load": lambda: SemanticSegmentor.load("file://" + str(seg.path_)),
    }
    for call in reads.values():
        with pytest.raises(AutomaskError, match=r"'file://.*' is a URL, not a file path: "
                                                r"automask reads local files only"):
            call()
    table = tmp_path / "data.csv"
    frame[["image"]].to_csv(table, index=False)
    assert cli.main(["predict", str(seg.path_), "--data", str(table), "--out",
                     "s3://bucket/preds"]) == 2
    assert list(tmp_path.iterdir()) == [table]  # no folder 's3:' or 'gs:' here


def test_an_empty_data_path_and_broken_links_are_refused(fitted, tmp_path, monkeypatch):
    """predict("") predicted the images of the working folder; predict(folder) left out
    the images behind broken links without a word (from_folders refuses them)."""
    seg, frame, _ = fitted
    monkeypatch.chdir(tmp_path)
    Image.open(frame["image"].iloc[0]).save(tmp_path / "stray.png")
    for blank in ("", "  "):
        with pytest.raises(DataValidationError, match=r"the data must name a file or folder, "
                                                      r"got .* \(an unset environment"):
            seg.predict(blank)
        with pytest.raises(DataValidationError, match=r"data must name a CSV file"):
            seg.evaluate(blank)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.open(frame["image"].iloc[i]).save(folder / f"{i}.png")
    (folder / "2.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataValidationError, match=r"holds 1 broken link\(s\) .*: 2\.png"):
        seg.predict(folder)
    (folder / "2.png").unlink()
    assert len(seg.predict(folder)) == 2


def test_a_text_list_of_paths_keeps_commas_and_semicolons_in_names(fitted, tmp_path):
    """A .txt of paths one per line was split at a ',' or ';' in a file's name, and the
    error then asked for a header line, which did not help."""
    seg, frame, _ = fitted
    names = ["photo 1, copy.png", "scan;2.png", "plain.png"]
    for name, source in zip(names, frame["image"]):
        Image.open(source).save(tmp_path / name)
    expected = seg.predict_proba([str(tmp_path / n) for n in names])
    for header in ("", "image\n"):
        listed = tmp_path / "list.txt"
        listed.write_text(header + "\n".join(names) + "\n")  # relative to the list's folder
        got = seg.predict_proba(listed)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), header
    # a table stays a table
    (tmp_path / "table.txt").write_text("image,note\nplain.png,x\n")
    assert len(seg.predict(tmp_path / "table.txt")) == 1


def test_numpy_integers_are_accepted_for_verbosity(fitted, tmp_path):
    _, frame, _ = fitted
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=np.int64(0)).fit(
        frame.iloc[:4], presets="tiny", hyperparameters=HP)
    assert len(seg.predict(list(frame["image"])[:1])) == 1
