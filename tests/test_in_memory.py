"""Images and masks held in memory (numpy arrays, torch tensors, PIL images) are predicted,
evaluated and ranked exactly as the same pictures saved to files."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from automask import SemanticSegmentor
from automask.data import read_mask
from automask.data.arrays import as_files
from automask.datasets import make_synthetic
from automask.errors import DataValidationError

from cli_process import run_automask

S = 32  # model input side


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny binary predictor, its labelled frame (PNG files) and the files' pixels."""
    root = tmp_path_factory.mktemp("in_memory")
    frame = make_synthetic(4, size=(40, 56), num_classes=2, seed=5, root=root / "data")
    seg = SemanticSegmentor(label="label", path=root / "run", verbosity=0).fit(
        frame, presets="tiny", hyperparameters={"optim.max_epochs": 1, "model.input_size": S},
    )
    images = [np.array(Image.open(p)) for p in frame["image"]]  # (H, W, 3) uint8
    masks = [np.asarray(Image.open(p)) for p in frame["label"]]  # (H, W) 0/255
    return seg, frame, images, masks


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Temporary files of the call go to a folder of the test's own."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _same(a: list[np.ndarray], b: list[np.ndarray], what: str = "") -> None:
    assert len(a) == len(b), what
    for x, y in zip(a, b):
        assert x.shape == y.shape and np.array_equal(x, y), what


def test_arrays_tensors_and_pil_images_predict_as_their_files(fitted, private_tmp):
    seg, frame, images, _ = fitted
    from_files = seg.predict_proba(frame[["image"]])
    assert len({p.shape for p in from_files}) == 1 and from_files[0].shape == (40, 56)
    forms = {
        "list of (H, W, C) arrays": images,
        "list of (C, H, W) tensors": [torch.from_numpy(a).permute(2, 0, 1) for a in images],
        "list of PIL images": [Image.fromarray(a) for a in images],
        "(N, H, W, C) array": np.stack(images),
        "(N, C, H, W) tensor": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2),
        "Series of arrays": pd.Series(images, index=list("abcd"), dtype=object),
        "DataFrame of arrays": pd.DataFrame({"image": pd.Series(images, dtype=object)}),
    }
    for name, data in forms.items():
        _same(seg.predict_proba(data), from_files, name)
    _same(seg.predict_proba(images[1]), from_files[1:2])  # one array: one image
    _same(seg.predict(Image.fromarray(images[2])), seg.predict(frame["image"][2:3]))
    # paths and arrays mixed in one list, in its order
    _same(seg.predict_proba([frame["image"][0], images[1]]), from_files[:2])
    assert list(private_tmp.iterdir()) == []  # the temporary files are gone


def test_a_thin_tensor_is_channels_first_and_a_thin_array_channels_last(fitted, private_tmp):
    # (3, 30, 2): either axis could hold the channels; a tensor's layout is torch's,
    # an array's numpy's and Pillow's
    seg, _, _, _ = fitted
    rgb = np.random.default_rng(0).integers(0, 256, (30, 2, 3), dtype=np.uint8)  # 30 x 2
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, 30, 2)
    [mask] = seg.predict([tensor])
    assert mask.shape == (30, 2)
    _same(seg.predict_proba([tensor]), seg.predict_proba([rgb]))
    # the same numbers as an array: a 3 x 30 picture with 2 channels (grey + alpha)
    assert seg.predict([tensor.numpy()])[0].shape == (3, 30)
    # a tensor whose first axis cannot be channels stays (H, W, C)
    assert seg.predict([torch.from_numpy(rgb.repeat(3, axis=0))])[0].shape == (90, 2)


def test_a_float_and_a_grayscale_array_read_as_the_same_npy_and_png_files(
        fitted, tmp_path, private_tmp):
    seg, _, images, _ = fitted
    gray = images[0][..., 0]  # (H, W) uint8
    Image.fromarray(gray).save(tmp_path / "gray.png")
    real = np.random.default_rng(0).random((40, 56, 3), dtype=np.float32)
    np.save(tmp_path / "real.npy", real)
    _same(seg.predict_proba([gray, real]),
          seg.predict_proba([tmp_path / "gray.png", tmp_path / "real.npy"]))
    # PIL images in the modes written as arrays (L, RGB) and in one written as PNG (LA)
    rgb = Image.fromarray(images[1])
    pil = [Image.fromarray(gray), rgb, rgb.convert("LA")]
    for im, name in zip(pil, ("l.png", "rgb.png", "la.png")):
        im.save(tmp_path / name)
    _same(seg.predict_proba(pil),
          seg.predict_proba([tmp_path / n for n in ("l.png", "rgb.png", "la.png")]))


def test_8_bit_values_in_a_wide_integer_array_predict_as_their_png(fitted, private_tmp):
    """np.array of a list, .astype(int) and torch.long give int64: such an array of 0..255
    was read at 16-bit full scale (65535 -> 255), an almost black picture, for a model
    fitted on 8-bit files; as float32 it was read as 8-bit."""
    seg, frame, images, _ = fitted
    from_files = seg.predict_proba(frame[["image"]].iloc[:2])
    for dtype in (np.int64, np.int32, np.uint32, np.int8):
        pictures = [(a // 2 if dtype == np.int8 else a).astype(dtype) for a in images[:2]]
        expected = from_files if dtype != np.int8 else seg.predict_proba(
            [(a // 2).astype(np.uint8) for a in images[:2]])
        _same(seg.predict_proba(pictures), expected, str(dtype))
    _same(seg.predict_proba([torch.from_numpy(images[0]).long()]), from_files[:1])
    # 16-bit data keeps the 16-bit full scale: 0..255 of 65535 is a dark picture
    dark = seg.predict_proba([images[0].astype(np.uint16)])
    _same(dark, seg.predict_proba([(images[0].astype(np.float64) / 65535)]), "uint16")


def test_predict_save_to_names_in_memory_rows_by_position(fitted, tmp_path, private_tmp):
    seg, _, images, _ = fitted
    out = tmp_path / "out"
    written = seg.predict(images[:3], save_to=out)
    assert [p.split("/")[-1] for p in written["label"]] == ["00000.png", "00001.png",
                                                           "00002.png"]
    masks = seg.predict(images[:3])
    for path, mask in zip(written["label"], masks):
        assert np.array_equal(np.asarray(Image.open(path)) > 0, mask > 0)
    assert written["image"].iloc[1] is images[1]  # the caller's objects, not lost paths
    assert list(private_tmp.iterdir()) == []


def test_an_in_memory_row_named_as_a_file_of_the_call_is_refused(fitted, tmp_path,
                                                                 private_tmp):
    """A picture in memory is saved as its position (00001.png); a file of the same call
    named 00001.png made both outputs go below their common folder, a path through the
    call's random temporary folder. Refused before any work, naming both rows."""
    seg, frame, images, _ = fitted
    assert Path(frame["image"][1]).name == "00001.png"
    out = tmp_path / "out"
    with pytest.raises(DataValidationError, match=r"row 1 \(<in-memory ndarray>, a picture "
                                                  r"given in memory.*row 0 \(.*00001\.png\) "
                                                  r"would both be saved as 00001\.png"):
        seg.predict([frame["image"][1], images[0]], save_to=out)
    assert not out.exists() and list(private_tmp.iterdir()) == []
    written = seg.predict([frame["image"][2], images[0]], save_to=out)  # no shared name
    assert [Path(p).name for p in written["label"]] == ["00002.png", "00001.png"]


def test_prompts_apply_to_in_memory_images(fitted, private_tmp):
    seg, frame, images, _ = fitted
    box = [(4, 6, 30, 35)]
    _same(seg.predict_proba([images[0]], boxes=box),
          seg.predict_proba(frame["image"][:1].tolist(), boxes=box))


def test_evaluate_and_leaderboard_take_images_and_masks_in_memory(fitted, private_tmp):
    seg, frame, images, masks = fitted
    in_memory = pd.DataFrame({"image": pd.Series(images, dtype=object),
                              "label": pd.Series([Image.fromarray(m) for m in masks],
                                                 dtype=object)})
    assert seg.evaluate(in_memory) == seg.evaluate(frame)
    boards = [seg.leaderboard(data, style="models") for data in (in_memory, frame)]
    cols = [c for c in boards[1].columns if c.startswith("test_")]
    assert cols and boards[0][cols].equals(boards[1][cols])
    assert list(private_tmp.iterdir()) == []


def test_a_palette_mask_keeps_its_indices_and_each_column_its_own_folder(tmp_path):
    index = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    pal = Image.new("P", (3, 2))
    pal.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10])  # colours unlike the indices
    pal.putdata(index.ravel().tolist())
    frame = pd.DataFrame({"image": [np.zeros((2, 3, 3), np.uint8)], "label": [pal]})
    with as_files(frame, ["image", "label"]) as files:
        image, label = files["image"][0], files["label"][0]
        assert image.endswith(".npy") and label.endswith(".png")
        assert (image.split("/")[-2], label.split("/")[-2]) == ("0-image", "1-label")
        assert image.split("/")[-3].startswith("automask-in-memory-")
        assert np.array_equal(np.asarray(Image.open(label)), index)
        assert np.array_equal(read_mask(label), index)
    assert frame["label"][0] is pal  # the caller's frame is untouched


def test_non_pictures_are_left_for_validation_to_name(fitted):
    seg, frame, images, _ = fitted
    with pytest.raises(DataValidationError, match=r"row 1 \[image\]: an in-memory ndarray of "
                                                  r"shape \(5,\), neither a file path"):
        seg.predict(pd.Series([images[0], np.arange(5)], dtype=object))
    with pytest.raises(DataValidationError, match=r"shape \(1, 2, 40, 56, 3\); an image is"):
        seg.predict(np.zeros((1, 2, 40, 56, 3), np.uint8))
    with pytest.raises(DataValidationError, match=r"shape \(40, 56\), neither a file path"):
        seg.predict([np.zeros((40, 56), np.complex64)])


HP = {"optim.max_epochs": 1, "model.input_size": S}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _in_memory_frame(images, masks):
    """The four rows as an array, a uint8 (C, H, W) tensor, a PIL image and a Hugging Face
    image (PNG bytes), each with its mask as a PIL image, an array or PNG bytes."""
    cells = [images[0], torch.from_numpy(images[1]).permute(2, 0, 1).contiguous(),
             Image.fromarray(images[2]), {"bytes": _png(images[3]), "path": None}]
    labels = [Image.fromarray(masks[0]), masks[1], Image.fromarray(masks[2]), _png(masks[3])]
    return pd.DataFrame({"image": pd.Series(cells, dtype=object),
                         "label": pd.Series(labels, dtype=object)})


def test_fit_takes_pictures_in_memory_as_its_files(fitted, tmp_path, private_tmp):
    """A fit on pictures in memory trains the model a fit on their files trains, and keeps
    nothing of them once complete."""
    _, frame, images, masks = fitted
    on_files = SemanticSegmentor(label="label", path=tmp_path / "files", verbosity=0).fit(
        frame, presets="tiny", hyperparameters=HP)
    data = _in_memory_frame(images, masks)
    seg = SemanticSegmentor(label="label", path=tmp_path / "run", verbosity=0).fit(
        data, presets="tiny", hyperparameters=HP)
    got, want = seg.predict_proba(frame), on_files.predict_proba(frame)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    history = seg.models_["default"].history  # the same holdout row scored the same
    assert history == on_files.models_["default"].history and "val_iou" in history[0]
    assert not (tmp_path / "run" / ".automask_fit").exists()
    assert list(private_tmp.iterdir()) == []
    assert data["image"][0] is images[0]  # the caller's frame is untouched


def test_an_interrupted_fit_on_pictures_in_memory_resumes_with_the_same_pictures(
        fitted, tmp_path, private_tmp, monkeypatch):
    """Interrupted twice: resumed by the API given equal pictures (other pictures are
    refused), then by ``automask fit --resume``, which has only the kept files."""
    from automask.errors import ConfigError
    from automask.training import recipe

    _, frame, images, masks = fitted
    run = tmp_path / "run"
    real, calls = recipe.train_candidate, []

    def interrupted(*args, **kwargs):  # the 2nd and the 4th candidate trained
        calls.append(args[0])
        if len(calls) in (2, 4):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "train_candidate", interrupted)
    hp = {**HP, "optim.lr": [1e-3, 2e-3, 3e-3]}  # three candidates
    with pytest.raises(KeyboardInterrupt):
        SemanticSegmentor(label="label", path=run, verbosity=0).fit(
            _in_memory_frame(images, masks), presets="tiny", hyperparameters=hp)
    inputs = run / ".automask_fit" / "inputs"
    kept = sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*.*"))
    assert len(kept) == 8 and {k.split("/")[0] for k in kept} == {"0-image", "1-label"}, kept
    train = pd.read_csv(run / ".automask_fit" / "train.csv")  # what `automask fit --resume` reads
    assert train["image"].map(lambda p: Path(p).parent.parent == inputs).all()
    assert np.array_equal(np.load(train["image"][1]), images[1].transpose(2, 0, 1))
    assert np.array_equal(read_mask(train["label"][0]), read_mask(frame["label"][0]))

    changed = _in_memory_frame(images, masks)
    changed.loc[2, "label"] = Image.fromarray(255 - masks[2])
    with pytest.raises(ConfigError, match=r"cannot resume .*'train'\[2\]\[1\] differs"):
        SemanticSegmentor(label="label", path=run, verbosity=0).fit(
            changed, presets="tiny", hyperparameters=hp, resume=True)
    with pytest.raises(KeyboardInterrupt):
        SemanticSegmentor(label="label", path=run, verbosity=0).fit(
            _in_memory_frame([i.copy() for i in images], [m.copy() for m in masks]),
            presets="tiny", hyperparameters=hp, resume=True)
    assert len(calls) == 4 and calls[2] == calls[1]  # the interrupted candidate trained
    assert sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*.*")) == kept

    done = run_automask("fit", "--resume", "--path", str(run), "--verbosity", "0",
                        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seg = SemanticSegmentor.load(run)
    assert len(seg.models_) == 3 and len(seg.predict(frame)) == 4
    assert not (run / ".automask_fit").exists()
    assert list(private_tmp.iterdir()) == []


def test_encoded_image_files_in_memory_read_as_those_files(fitted, tmp_path, private_tmp):
    """The bytes of PNG, JPEG (EXIF orientation honoured), 16-bit TIFF and .npy files, as
    bytes, bytearray, memoryview or Hugging Face images, predict and score as the files."""
    seg, frame, images, masks = fitted
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(images[1]).save(rotated, exif=exif, quality=90)
    deep = tmp_path / "deep.tiff"
    Image.fromarray((images[2][..., 0].astype(np.uint16) * 257)).save(deep)
    array = tmp_path / "a.npy"
    np.save(array, images[3])
    files = [frame["image"][0], str(rotated), str(deep), str(array), frame["image"][1]]
    raw = [Path(f).read_bytes() for f in files]
    cells = [raw[0], bytearray(raw[1]), memoryview(raw[2]), {"bytes": raw[3], "path": None},
             {"bytes": None, "path": files[4]}]  # the last: a Hugging Face image by path
    got, want = seg.predict_proba(cells), seg.predict_proba(files)
    assert [np.shape(p) for p in want] == [(40, 56), (56, 40), (40, 56), (40, 56), (40, 56)]
    for a, b in zip(got, want):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    single = seg.predict_proba(raw[1])  # one image's bytes
    assert len(single) == 1 and torch.equal(torch.as_tensor(single[0]), torch.as_tensor(want[1]))
    in_memory = pd.DataFrame({"image": pd.Series([raw[0], images[1]], dtype=object),
                              "label": pd.Series([Path(frame["label"][0]).read_bytes(),
                                                  {"bytes": _png(masks[1]), "path": None}],
                                                 dtype=object)})
    assert seg.evaluate(in_memory) == seg.evaluate(frame.iloc[:2])
    assert list(private_tmp.iterdir()) == []

    as_path = seg.predict_proba([os.fsencode(files[0])])  # bytes without NUL: a path
    assert torch.equal(torch.as_tensor(as_path[0]), torch.as_tensor(want[0]))
    with pytest.raises(DataValidationError) as info:
        seg.predict([raw[0], b"\x00\x01 not an image"])
    text = str(info.value)
    assert "row 1 [image] <in-memory bytes>: not an image Pillow can read" in text, text
    assert "automask-in-memory-" not in text


def test_errors_name_in_memory_pictures_not_their_temporary_files(fitted):
    seg, _, images, masks = fitted
    data = pd.DataFrame({"image": pd.Series(images[:2], dtype=object),
                         "label": pd.Series([masks[0], np.zeros((10, 10), np.uint8)],
                                            dtype=object)})
    with pytest.raises(DataValidationError) as info:
        seg.evaluate(data)
    text = str(info.value)
    assert ("row 1 [label] <in-memory ndarray>: mask is 10x10 (HxW) but image "
            "<in-memory ndarray> is 40x56") in text, text
    assert "automask-in-memory-" not in text


def test_pictures_of_in_memory_rows_match_those_of_their_files(fitted, private_tmp):
    """plot_predictions draws the same image, truth and prediction panels for pictures in
    memory as for their files; the rows are named by position."""
    from automask.plots import predictor_examples

    seg, frame, images, masks = fitted
    in_memory = pd.DataFrame({"image": pd.Series(images, dtype=object),
                              "label": pd.Series(masks, dtype=object)})
    got = predictor_examples(seg, in_memory, 2, [None])
    want = predictor_examples(seg, frame, 2, [None])
    for a, b in ((got[0], want[0]), (got[1], want[1])):
        _same(a, b)
    _same(got[3][seg.best_model_], want[3][seg.best_model_])
    assert got[2] == ["00000", "00001"]
    figure = seg.plot_predictions(images[:2])  # no truth column: images only
    assert len(figure.axes) >= 2
    assert list(private_tmp.iterdir()) == []


def test_a_tensor_without_data_is_named_by_its_row(fitted):
    seg, _, images, _ = fitted
    with pytest.raises(DataValidationError, match=r"row 1, column 'image': cannot keep this "
                                                  r"in-memory Tensor as a file"):
        seg.predict([images[0], torch.empty(40, 56, 3, device="meta")])


def test_kept_pictures_are_moved_not_copied_and_copied_across_filesystems(
        tmp_path, monkeypatch):
    import errno
    import types

    from automask.training import state as state_module

    state = state_module.FitState(tmp_path / "run")
    temp = tmp_path / "tmp"
    temp.mkdir()
    names = ["0-image/a.npy", "1-label/b.png", "0-image/c.npy"]
    for i, name in enumerate(names):
        (temp / name.replace("/", "-")).write_bytes(bytes([i]) * 10)
    moves = {str(temp / n.replace("/", "-")): str(state.inputs_dir / n) for n in names}
    (state.inputs_dir / "0-image").mkdir(parents=True)
    (state.inputs_dir / "0-image" / "c.npy").write_bytes(b"kept")  # from the interrupted fit

    def no_rename(src, dst):  # another filesystem
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(state_module, "os", types.SimpleNamespace(replace=no_rename))
    state.keep_inputs(dict(list(moves.items())[:1]))
    monkeypatch.undo()
    state.keep_inputs(dict(list(moves.items())[1:]))
    assert list(temp.iterdir()) == []  # nothing left twice on disk
    got = {n: (state.inputs_dir / n).read_bytes() for n in names}
    assert got == {names[0]: b"\0" * 10, names[1]: b"\1" * 10, names[2]: b"kept"}


def test_score_takes_the_bytes_of_image_files(tmp_path):
    """automask.metrics.score reads a file's bytes (or a Hugging Face image) as the file."""
    from automask.metrics import score

    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 256, (24, 30), dtype=np.uint8) for _ in range(3)]
    truths = [(rng.random((24, 30)) > 0.6).astype(np.uint8) * 255 for _ in range(3)]
    files = []
    for i, (p, t) in enumerate(zip(preds, truths)):
        Image.fromarray(p).save(tmp_path / f"p{i}.png")
        np.save(tmp_path / f"t{i}.npy", t)
        files.append((tmp_path / f"p{i}.png", tmp_path / f"t{i}.npy"))
    want = score([p for p, _ in files], [t for _, t in files])
    by_path = {"bytes": None, "path": str(files[2][0])}  # a Hugging Face image by its path
    got = score([p.read_bytes() for p, _ in files[:2]] + [by_path],
                [{"bytes": t.read_bytes(), "path": None} for _, t in files])
    assert got == want and set(want) >= {"sm", "em", "iou"}
    assert score(files[0][0].read_bytes(), [files[0][1]]) == score([files[0][0]], [files[0][1]])


def test_score_reads_pil_images_and_colour_arrays_as_their_files(tmp_path):
    """A lone RGB PIL image was split into H maps of (W, 3) and scored without a word; colour
    pictures in memory now read as their PNG files do (a prediction as its luma, a ground
    truth as grey when it is grey, else refused naming the picture)."""
    from automask.metrics import score

    rng = np.random.default_rng(0)
    pred = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    truth = np.zeros((40, 50), np.uint8)
    truth[10:30, 12:33] = 255
    colour = np.stack([pred, pred // 2, 255 - pred], axis=-1)  # a prediction saved in colour
    Image.fromarray(colour).save(tmp_path / "p.png")
    Image.fromarray(np.stack([truth] * 3, axis=-1)).save(tmp_path / "t.png")
    want = score([tmp_path / "p.png"], [tmp_path / "t.png"])
    luma = np.asarray(Image.fromarray(colour).convert("L"))
    assert want == score([luma], [truth]) and want != score([pred], [truth])

    grey_rgb = np.stack([truth] * 3, axis=-1)
    assert score(Image.fromarray(colour), Image.fromarray(grey_rgb)) == want  # lone images
    assert score([colour], [torch.from_numpy(grey_rgb)]) == want  # arrays, tensors in lists
    assert score([Image.fromarray(colour).convert("RGBA")],
                 [Image.fromarray(truth).convert("P")]) == want

    assert score(colour, grey_rgb) == want  # lone colour arrays: pictures, not stacks
    with pytest.raises(ValueError, match=r"got 1 predictions but 40 targets; the targets are "
                       r"one \(40, 50, 3\) array, read as a stack of 40 maps"):
        score(luma, grey_rgb.astype(np.float32) / 255)  # not uint8: a stack, as before
    red = np.stack([truth, np.zeros_like(truth), np.zeros_like(truth)], axis=-1)
    with pytest.raises(ValueError, match=r"ground truth <in-memory target 1> is a RGB colour "
                       r"image with non-grey pixels \(the first at row 10, column 12"):
        score([luma, luma], [truth, Image.fromarray(red)])
    # (K, H, W) class scores are not colour pictures, whatever their last axis
    scores = torch.softmax(torch.from_numpy(rng.random((3, 9, 4))).float(), dim=0)
    labels = rng.integers(0, 3, (9, 4)).astype(np.uint8)
    got = score([scores], [labels], task="multiclass", num_classes=3)
    assert got == score([scores.argmax(0)], [labels], task="multiclass", num_classes=3)


def test_warnings_name_pictures_in_memory_not_their_files(fitted, tmp_path):
    """Warnings about data given in memory used to name the temporary files (or the fit's
    kept copies, ``.automask_fit/inputs/0-image/<sha256>.npy``)."""
    import warnings

    from automask.data import arrays

    _, _, images, masks = fitted
    labels = [(m > 0).astype(np.uint8) for m in masks]
    labels[0][:3] = 255  # 0/1 masks with 255 = void ...
    frame = pd.DataFrame({"image": [images[0], images[1], images[0], images[2]],  # a repeat
                          "label": [labels[0], labels[1], labels[0], masks[2]]})  # ... and 0/255
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SemanticSegmentor(path=tmp_path / "run", verbosity=0).fit(
            frame, presets="tiny", hyperparameters=HP)
    texts = [str(w.message) for w in caught]
    void = [t for t in texts if "hold only 0 and 255" in t]
    repeat = [t for t in texts if "repeat the image of another row" in t]
    assert len(void) == 1 and "(e.g. '<in-memory ndarray>')" in void[0], texts
    assert len(repeat) == 1 and "rows 0, 2 (<in-memory ndarray>)" in repeat[0], texts
    assert not [t for t in texts if "automask-in-memory-" in t or ".automask_fit" in t]
    assert arrays._SHOWN == {}  # the names go with the files


def test_grey_masks_in_colour_read_in_memory_as_their_png_files(fitted, tmp_path):
    """A grey mask saved as an RGB PNG reads as grey; the same mask as an RGB PIL image (kept
    as the .npy of its pixels) or as its (H, W, 3) array was refused as 'a .npy array of 3
    channels'. A mask in true colour is still refused without a color_map."""
    seg, frame, _, masks = fitted
    rows = frame.iloc[:3].reset_index(drop=True)
    rgb_paths = []
    for i, mask in enumerate(masks[:3]):
        rgb_paths.append(tmp_path / f"rgb_{i}.png")
        Image.fromarray(np.stack([mask] * 3, axis=-1)).save(rgb_paths[-1])
    want = seg.evaluate(rows.assign(label=[str(p) for p in rgb_paths]))
    assert want == seg.evaluate(rows)  # the colour files read as the grey ones
    pil = rows.assign(label=[Image.open(p) for p in rgb_paths])
    assert pil["label"][0].mode == "RGB" and seg.evaluate(pil) == want
    arrays = rows.assign(label=[np.asarray(Image.open(p)) for p in rgb_paths])
    assert seg.evaluate(arrays) == want
    np.save(tmp_path / "m.npy", np.asarray(Image.open(rgb_paths[0])))  # (H, W, 3) uint8
    assert np.array_equal(read_mask(tmp_path / "m.npy"), masks[0])
    red = [np.stack([m, np.zeros_like(m), np.zeros_like(m)], axis=-1) for m in masks[:3]]
    with pytest.raises(DataValidationError, match=r"row 0 \[label\] <in-memory ndarray>: mask "
                       r"is a \.npy array of 3 channels"):
        seg.evaluate(rows.assign(label=red))


def test_score_names_in_memory_maps_it_cannot_read_and_takes_any_uint16(tmp_path):
    """A PIL image of a mode no file holds (HSV) failed with a bare OSError from Pillow, and
    one whose message names no file said nothing of which picture it was; big-endian uint16
    maps (a 16-bit big-endian PIL image or .npy) and torch.uint16 tensors failed inside
    torch ('aminmax_cpu' not implemented for 'UInt16')."""
    from automask.metrics import score

    truth = np.zeros((20, 20), np.uint8)
    truth[5:15, 5:15] = 255
    hsv = Image.fromarray(np.stack([truth] * 3, axis=-1)).convert("HSV")
    with pytest.raises(ValueError, match=r"<in-memory prediction 1>: a PIL image of mode 'HSV' "
                       r"cannot be read as a file .* convert it to 'L'"):
        score([truth, hsv], [truth, truth])
    lab = Image.fromarray(np.stack([truth] * 3, axis=-1)).convert("LAB")
    with pytest.raises(ValueError, match=r"^<in-memory prediction 0>: "):
        score([lab], [truth])
    want = score([np.zeros((20, 20), np.uint8)], [truth])
    assert score([np.zeros((20, 20), ">u2")], [truth]) == want
    assert score([torch.zeros(20, 20, dtype=torch.uint16)], [truth]) == want
    assert score([Image.new("I;16B", (20, 20))], [truth]) == want
    # widened, then read as a 16-bit map: 300 / 65535, not 300 / 255
    assert score([np.full((20, 20), 300, ">u2")], [truth]) == score(
        [np.full((20, 20), 300 / 65535)], [truth])
    with pytest.raises(ValueError, match=r"integer prediction values must lie in 0\.\.255 "
                       r"\(8-bit map\), 0\.\.65535 \(16-bit map\)"):
        score([np.full((20, 20), 70000, np.int64)], [truth])


class _Split:
    """Another library's table (a Hugging Face split, a polars or pyarrow table): pandas
    through ``to_pandas()``."""

    def __init__(self, frame):
        self.frame = frame

    def to_pandas(self):
        if isinstance(self.frame, Exception):
            raise self.frame
        return self.frame


def test_tables_of_other_libraries_are_read_through_to_pandas(fitted, private_tmp):
    """A Hugging Face split (images and masks as ``{"bytes", "path"}`` cells) predicts,
    evaluates and ranks as the same files; a ``to_pandas()`` that fails, or gives no
    DataFrame, is an error naming the table's type."""
    seg, frame, images, masks = fitted
    cells = pd.DataFrame({
        "image": pd.Series([{"bytes": _png(i), "path": None} for i in images], dtype=object),
        "label": pd.Series([{"bytes": _png(m), "path": None} for m in masks], dtype=object)})
    split = _Split(cells)
    _same(seg.predict(split), seg.predict(frame))
    _same(seg.predict(_Split(cells["image"])), seg.predict(frame["image"]))
    assert seg.evaluate(split) == seg.evaluate(frame)
    boards = [seg.leaderboard(data, style="models") for data in (split, frame)]
    cols = [c for c in boards[1].columns if c.startswith("test_")]
    assert cols and boards[0][cols].equals(boards[1][cols])
    assert list(private_tmp.iterdir()) == []
    with pytest.raises(DataValidationError,
                       match=r"the \w+\._Split as a table: its to_pandas\(\) failed "
                             r"\(needs pyarrow\)"):
        seg.evaluate(_Split(ImportError("needs pyarrow")))
    with pytest.raises(DataValidationError, match=r"to_pandas\(\) gave a list, not a pandas"):
        seg.predict(_Split([1, 2]))
