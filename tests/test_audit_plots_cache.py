"""Audit of the pictures (automask.plots), the sample cache (automask.data.cache) and the
embedding cache (automask.training.embeddings): what real data and real disks do to them."""
from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import threading
import warnings
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from automask import plots
from automask.data import SampleCache, SegmentationDataset, validate_frame
from automask.data import cache as cache_mod
from automask.datasets import make_synthetic
from automask.errors import DataValidationError
from automask.training.embeddings import EmbeddingCache, input_key

S = 32


def _sample(seed: int = 0, shape=(12, 17)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, shape, dtype=np.uint8)
    return image, mask


# ------------------------------------------------------------------ sample cache
def _corrupt(path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "empty":            # what a crash after the rename, before the data, leaves
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) - 7])
    elif kind == "garbage":
        path.write_bytes(b"not an array " * 20)
    elif kind == "wrong array":    # a valid .npy that is not a sample of this cache
        np.save(path, np.zeros((2, 2), np.float32))
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "wrong array"])
@pytest.mark.parametrize("part", ["image", "mask"])
def test_a_corrupt_disk_entry_is_a_miss_and_is_written_again(tmp_path, kind, mmap, part):
    image, mask = _sample()
    cache = SampleCache(0, tmp_path)
    cache.put("k", image, mask)
    _corrupt(tmp_path / f"k.{part}.npy", kind)
    assert cache.get("k", mmap=mmap) is None  # neither an exception nor wrong data
    assert cache.misses == 1 and not list(tmp_path.glob("k.*"))  # the entry is gone ...
    cache.put("k", image, mask)                                   # ... and comes back
    hit = cache.get("k", mmap=mmap)
    assert hit is not None and cache.hits_disk == 1
    np.testing.assert_array_equal(hit[0], image)
    np.testing.assert_array_equal(hit[1], mask)


def test_a_dataset_decodes_and_rebuilds_a_corrupt_entry(tmp_path):
    spec = validate_frame(make_synthetic(2, size=(40, 56), seed=1, root=tmp_path / "data"))
    reference = SegmentationDataset(spec, S)[0]
    directory = tmp_path / "cache"
    SegmentationDataset(spec, S, cache=SampleCache(0, directory))[0]
    for path in directory.glob("*.npy"):
        path.write_bytes(b"")  # a crash without a flush to disk: empty files
    cache = SampleCache(0, directory)
    dataset = SegmentationDataset(spec, S, cache=cache)
    item = dataset[0]
    assert dataset.decodes == 1
    for key in ("image", "target"):
        assert torch.equal(item[key], reference[key])
    dataset[0]
    assert dataset.decodes == 1 and cache.hits_disk == 1  # rebuilt, then read back


def test_an_image_entry_without_its_mask_is_completed(tmp_path):
    image, mask = _sample()
    cache = SampleCache(0, tmp_path)
    cache.put("k", image, mask)
    (tmp_path / "k.mask.npy").unlink()
    assert cache.get("k")[1] is None  # the dataset takes this as a miss ...
    cache.put("k", image, mask)       # ... and puts the sample again: the mask is written
    np.testing.assert_array_equal(cache.get("k")[1], mask)


@pytest.mark.parametrize("failure", ["file in the way", "disk full"])
def test_a_cache_folder_that_cannot_be_written_does_not_stop_training(tmp_path, monkeypatch,
                                                                      failure):
    spec = validate_frame(make_synthetic(3, size=(40, 56), seed=1, root=tmp_path / "data"))
    reference = [SegmentationDataset(spec, S)[i] for i in range(3)]
    directory = tmp_path / "cache"
    if failure == "file in the way":
        (tmp_path / "blocker").write_text("")
        directory = tmp_path / "blocker" / "cache"
    else:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(cache_mod.np, "save", full)
    cache = SampleCache(0, directory)
    dataset = SegmentationDataset(spec, S, cache=cache)
    with pytest.warns(RuntimeWarning, match="cannot write") as caught:
        items = [dataset[i] for i in range(3)] + [dataset[0]]
    assert len([w for w in caught if "cannot write" in str(w.message)]) == 1  # once
    assert str(directory) in str(caught[0].message)
    for item, ref in zip(items, reference + reference[:1]):
        assert torch.equal(item["image"], ref["image"])
        assert torch.equal(item["target"], ref["target"])
    if failure == "disk full":  # no temporary or half entry left
        assert list(directory.iterdir()) == []


def test_entries_are_read_only_so_a_caller_cannot_change_the_next_epoch(tmp_path):
    image, mask = _sample()
    for cache in (SampleCache(64), SampleCache(0, tmp_path)):
        cache.put("k", image.copy(), mask.copy())
        hit = cache.get("k")
        with pytest.raises(ValueError, match="read-only"):
            hit[0][0, 0] = 0
        with pytest.raises(ValueError, match="read-only"):
            hit[1][:] = 9
        np.testing.assert_array_equal(cache.get("k")[0], image)
    mine = image.copy()
    SampleCache(64).put("k", mine, None)
    mine[0, 0] = 1  # the caller's own array stays writable


def test_concurrent_writers_of_one_entry_never_show_a_reader_a_broken_sample(tmp_path):
    image, mask = _sample(shape=(64, 96))
    errors, hits = [], []
    stop = threading.Event()

    def write():
        cache = SampleCache(0, tmp_path)
        try:
            for _ in range(25):
                cache._write("k", image, mask)
                cache._discard("k")  # a reader that found it broken, or a new writer
        except Exception as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    def read():
        cache = SampleCache(0, tmp_path)
        while not stop.is_set():
            try:
                hit = cache.get("k")
            except Exception as exc:  # pragma: no cover
                errors.append(exc)
                return
            if hit is not None and hit[1] is not None:
                hits.append(np.array_equal(hit[0], image) and np.array_equal(hit[1], mask))

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write) for _ in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors and all(hits)
    assert not list(tmp_path.glob("*.part"))


class _Putter(torch.utils.data.Dataset):
    """Puts a 96 KiB sample per item into the cache; returns what its worker holds."""

    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return 12

    def __getitem__(self, index):
        self.cache.put(str(index), np.zeros((128, 256, 3), np.uint8), None)
        worker = torch.utils.data.get_worker_info()
        return torch.tensor([worker.id, self.cache.used_bytes, index])


def test_the_workers_of_a_loader_share_the_memory_budget(tmp_path):
    """Each worker holds its own in-memory part: together they stay within the budget,
    and what a worker does not keep in memory goes to disk."""
    cache = SampleCache(0.5, tmp_path)  # 512 KiB: five samples in one process
    loader = torch.utils.data.DataLoader(_Putter(cache), batch_size=None, num_workers=2)
    rows = torch.stack(list(loader))
    held = {int(w): int(rows[rows[:, 0] == w, 1].max()) for w in rows[:, 0].unique()}
    assert len(held) == 2 and sum(held.values()) <= cache.memory_bytes
    assert all(0 < b <= cache.memory_bytes // 2 for b in held.values())
    assert len(list(tmp_path.glob("*.image.npy"))) == 12  # every entry on disk too


def test_the_key_holds_the_cache_format(monkeypatch):
    key = cache_mod.sample_key("a.png", (1, 2), 64)
    assert cache_mod.sample_key("a.png", (1, 2), 64) == key
    monkeypatch.setattr(cache_mod, "CACHE_FORMAT", cache_mod.CACHE_FORMAT + 1)
    assert cache_mod.sample_key("a.png", (1, 2), 64) != key


def test_the_key_follows_what_the_cached_sample_is_made_from(tmp_path):
    """Mask content (same size and mtime), image range and colour map each give a new
    entry; the same inputs find the old one."""
    root = tmp_path / "data"
    (root).mkdir()
    image = np.random.default_rng(0).integers(0, 4096, (30, 40)).astype(np.uint16)
    Image.fromarray(image).save(root / "a.png")
    mask = np.zeros((30, 40), np.uint8)
    mask[:, :20] = 1
    Image.fromarray(mask).save(root / "a_mask.png")
    frame = pd.DataFrame({"image": [str(root / "a.png")], "label": [str(root / "a_mask.png")]})
    spec = validate_frame(frame)
    cache = SampleCache(64)

    def load(value_range=None):
        return SegmentationDataset(spec, S, cache=cache, value_range=value_range).load_resized(0)

    first = load()
    assert load()[0] is not None and cache.hits_memory == 1
    ranged = load((0.0, 4095.0))
    assert cache.hits_memory == 1 and ranged[0].max() > first[0].max()
    stat = os.stat(root / "a_mask.png")
    flipped = np.ascontiguousarray(mask[:, ::-1])
    Image.fromarray(flipped).save(root / "a_mask.png")
    os.utime(root / "a_mask.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = load()
    assert cache.hits_memory == 1  # a new entry, with the new mask
    assert again[1][0, -1] == 1 and again[1][0, 0] == 0


# -------------------------------------------------------------- embedding cache
class _Encoder(torch.nn.Module):
    """A frozen encoder whose weights are large enough to be allocated with mmap, so that a
    replacement of the same size usually lands where the old one was."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = torch.nn.Conv2d(3, 256, 16, stride=16).requires_grad_(False)

    def encoder_is_frozen(self) -> bool:
        return True

    def encoder_parts(self):
        return [self.enc]

    def encode(self, images):
        return self.enc(images)


def test_kept_embeddings_are_dropped_when_the_encoder_is_replaced_in_place():
    """A new encoder module (or parameter) of the same shapes is a change even where the
    allocator puts it at the old one's address with the same version counter."""
    images = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    model = _Encoder(0)
    cache = EmbeddingCache(16, input_size=S)
    keys = cache.keys(images, None, training=False)
    with torch.no_grad():
        old = cache.features(model, images, keys)
        model.enc = None
        gc.collect()
        model.enc = _Encoder(5).enc  # freshly built, other weights
        new = cache.features(model, images, keys)
        assert torch.equal(new, model.encode(images)) and not torch.equal(new, old)
        # The same storage and version count, new values: nothing but the parameter
        # object tells the change.
        old_weight = model.enc.weight
        new_weight = torch.nn.Parameter(old_weight.data, requires_grad=False)  # own counter
        while new_weight._version < old_weight._version:
            new_weight.add_(0)
        old_weight.mul_(-1)  # counted on the old parameter only
        model.enc.weight = new_weight
        assert new_weight.data_ptr() == old_weight.data_ptr()
        assert torch.equal(cache.features(model, images, keys), model.encode(images))
        hits = cache.hits
        cache.features(model, images, keys)  # nothing changed: the kept rows are used
        assert cache.hits == hits + 2


def test_kept_embeddings_do_not_hold_a_reference_to_the_encoder():
    model = _Encoder(0)
    images = torch.randn(1, 3, S, S)
    cache = EmbeddingCache(16, input_size=S)
    with torch.no_grad():
        cache.features(model, images, [input_key(images[0])])
    ref = weakref.ref(model.enc.weight)
    del model
    gc.collect()
    assert ref() is None


# -------------------------------------------------------------------- pictures
def test_images_of_any_depth_are_drawn_as_read_image_reads_them():
    ramp = np.linspace(0, 65535, 12 * 16).reshape(12, 16)
    as_rgb = plots._as_rgb
    np.testing.assert_array_equal(as_rgb(ramp.astype(np.uint16), 0)[..., 0],
                                  ((ramp.astype(np.int64) + 128) // 257).astype(np.uint8))
    assert as_rgb(np.eye(4, dtype=bool), 0).max() == 255          # not 0 / 1
    ints = np.arange(12 * 16).reshape(12, 16) % 256                 # int64 holding 0-255
    np.testing.assert_array_equal(as_rgb(ints, 0)[..., 0], ints)
    wide = np.arange(12 * 16, dtype=np.int32).reshape(12, 16) * 1000  # beyond 16 bits
    out = as_rgb(wide, 0)
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 100
    signed = np.linspace(-1, 1, 12 * 16).reshape(12, 16)            # float in [-1, 1]
    out = as_rgb(signed, 0)
    assert out.min() == 0 and out.max() == 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert as_rgb(np.full((4, 4, 3), np.nan), 0).max() == 0
    with pytest.raises(DataValidationError, match="image 0"):
        as_rgb(np.full((4, 4), "x"), 0)


def _drawing_forbidden(monkeypatch):
    monkeypatch.setattr(plots, "blend", lambda *a, **k: pytest.fail("drew before the check"))


def test_names_and_truths_that_do_not_match_the_images_are_named_before_drawing(monkeypatch):
    _drawing_forbidden(monkeypatch)
    images = [np.zeros((8, 8, 3), np.uint8)] * 2
    masks = [np.zeros((8, 8), np.uint8)] * 2
    with pytest.raises(DataValidationError, match="1 ground-truth masks but 2 images"):
        plots.plot_masks(images, {"p": masks}, masks[:1], task="binary")
    with pytest.raises(DataValidationError, match="0 ground-truth masks"):
        plots.plot_masks(images, {"p": masks}, [], task="binary")
    with pytest.raises(DataValidationError, match="one name per image"):
        plots.plot_masks(images, {"p": masks}, None, task="binary", names=["a"])
    with pytest.raises(DataValidationError, match="one name per image"):
        plots.plot_masks(images, {"p": masks}, None, task="binary", names="ab")


def test_file_and_class_names_are_text_not_mathtext(tmp_path):
    """A '$' in a file or class name is drawn as it is, and a pair of them holding what
    mathtext cannot parse does not break the drawing."""
    image = np.full((20, 30, 3), 90, np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[:, 10:], mask[:, 20:] = 1, 2
    names = ["a$\\foo$b", "price_$1_and_$2"]
    fig = plots.plot_masks([image] * 2, {"p": [mask] * 2}, [mask] * 2, task="multiclass",
                           class_names=["bg", "x$^$y", "$c"], names=names,
                           path=tmp_path / "math.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "image a$\\foo$b" and titles[3] == "image price_$1_and_$2"
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"0 bg", "1 x$^$y", "2 $c"}
    assert (tmp_path / "math.png").stat().st_size > 1000


def test_a_long_file_name_is_shortened_in_its_middle():
    image = np.zeros((20, 30, 3), np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    name = "patient_0042_" + "x" * 200 + "_slice_017"
    fig = plots.plot_masks([image], {"model " + "y" * 100: [mask]}, None, task="binary",
                           names=[name])
    title, column = (ax.get_title() for ax in fig.axes)
    assert len(title) <= plots._TITLE_CHARS and len(column) <= plots._TITLE_CHARS
    assert title.startswith("image patient_") and title.endswith("_slice_017")
    assert "\u2026" in title
    assert plots._short("a\nb\tc") == "a b c"


def test_void_pixels_and_absent_or_unnamed_classes_in_the_legend():
    image = np.zeros((10, 12, 3), np.uint8)
    truth = np.zeros((10, 12), np.uint8)
    truth[:, 6:] = 5                      # class 5: beyond the two names
    truth[0] = 255                        # void
    pred = np.full((10, 12), 1, np.uint8)  # class 1 only
    fig = plots.plot_masks([image], {"p": [pred]}, [truth], task="multiclass",
                           class_names=["bg", "road", "car"])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["0 bg", "class 5", "ignored", "1 road"]  # "2 car": in no mask


def test_a_home_relative_path_is_saved_in_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    plots.plot_masks([np.zeros((8, 8, 3), np.uint8)], {"p": [np.zeros((8, 8), np.uint8)]},
                     task="binary", path="~/pictures/p.png")
    assert (tmp_path / "home" / "pictures" / "p.png").is_file()
    assert not (tmp_path / "~").exists()


def test_a_folder_that_cannot_be_written_is_named_before_drawing(
        tmp_path, monkeypatch, unwritable):
    _drawing_forbidden(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    unwritable(locked)
    with pytest.raises(DataValidationError, match="locked.*not writable"):
        plots.plot_masks([np.zeros((8, 8, 3), np.uint8)],
                         {"p": [np.zeros((8, 8), np.uint8)]}, task="binary",
                         path=locked / "new" / "p.png")


def test_a_failed_save_leaves_the_old_picture_and_no_temporary_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "p.png"
    args = ([np.zeros((8, 8, 3), np.uint8)], {"p": [np.zeros((8, 8), np.uint8)]})
    plots.plot_masks(*args, task="binary", path=path)
    before = path.read_bytes()

    def broken(self, fh, **kwargs):
        fh.write(b"\x89PNG half")
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="renderer failed"):
        plots.plot_masks(*args, task="binary", path=path)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_figures_are_freed_and_no_display_is_needed(tmp_path):
    """Nothing keeps a figure alive (no pyplot registry), and drawing works with a GUI
    backend asked for and no display."""
    args = ([np.zeros((8, 8, 3), np.uint8)], {"p": [np.zeros((8, 8), np.uint8)]})
    ref = weakref.ref(plots.plot_masks(*args, task="binary", path=tmp_path / "a.png"))
    gc.collect()
    assert ref() is None
    code = ("import numpy as np; from automask.plots import plot_masks; "
            "plot_masks([np.zeros((8, 8, 3), np.uint8)], {'p': [np.zeros((8, 8), np.uint8)]}, "
            f"task='binary', path={str(tmp_path / 'b.png')!r})")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert (tmp_path / "b.png").stat().st_size > 100


def _logs(run, **files):
    for name, text in files.items():
        (run / "logs" / name).mkdir(parents=True)
        (run / "logs" / name / "metrics.csv").write_text(text)
    return run


GOOD_LOG = "epoch,step,train_loss,val_iou\n0,0,1.0,\n0,0,,0.5\n1,1,0.8,\n1,1,,0.6\n"


def test_history_with_an_empty_log_or_before_any_validation(tmp_path):
    run = _logs(tmp_path / "a", started="", done=GOOD_LOG)
    fig = plots.plot_history(run, metric="iou", path=tmp_path / "h.png")
    loss_ax, val_ax = fig.axes
    assert [line.get_label() for line in val_ax.lines] == ["done"]
    # a fit that has not validated yet: the asked metric is not an error
    run = _logs(tmp_path / "b", only="epoch,step,train_loss\n0,0,1.0\n")
    fig = plots.plot_history(run, metric="iou")
    assert len(fig.axes[0].lines) == 1 and not fig.axes[1].lines
    # a metric that is not among those validated still is
    with pytest.raises(DataValidationError, match="val_dice"):
        plots.plot_history(tmp_path / "a", metric="dice")


def test_a_log_with_text_where_numbers_belong_is_named(tmp_path):
    """A metrics.csv holding a row of text ended in pandas' raw TypeError ("dtype 'str'
    does not support operation 'mean'"); an empty cell and inf are a fit's own."""
    run = _logs(tmp_path / "a", default="epoch,step,train_loss,val_iou\nx,y,z,w\n")
    with pytest.raises(DataValidationError, match=r"holds text in column\(s\) \['epoch', "
                                                  r"'step', 'train_loss', 'val_iou'\]"):
        plots.plot_history(run)
    run = _logs(tmp_path / "b", default="epoch,step,train_loss,val_iou\n0,1,inf,\n0,1,,0.5\n")
    curves = plots.read_history(run)
    assert curves["default"]["val_iou"].tolist()[1] == 0.5
    assert np.isinf(curves["default"]["train_loss"].iloc[0])
    plots.plot_history(run)


def test_history_leaves_out_the_half_epoch_a_resume_ran_again(tmp_path):
    """Interrupted after a step of epoch 2 (index 1), resumed from the end of epoch 1:
    the resumed log's epoch 2 is the one drawn, the half epoch's loss is not."""
    half = GOOD_LOG.rsplit("1,1,,0.6\n", 1)[0].replace("1,1,0.8,", "1,1,0.95,")
    run = _logs(tmp_path / "a", default=half,
                **{"default-resumed-1": "epoch,step,train_loss,val_iou\n1,1,0.8,\n1,1,,0.6\n"
                                        "2,2,0.7,\n2,2,,0.65\n"},
                other=GOOD_LOG)
    curves = plots.read_history(run)
    assert curves["default"]["epoch"].tolist() == [0, 0]  # epoch 1's half is left out
    assert curves["default-resumed-1"]["epoch"].tolist() == [1, 1, 2, 2]
    assert curves["other"]["epoch"].tolist() == [0, 0, 1, 1]  # another candidate: whole
    loss_ax, _ = plots.plot_history(run, metric="iou").axes
    drawn = {line.get_label(): list(line.get_ydata()) for line in loss_ax.lines}
    assert drawn["default"] == [1.0] and drawn["default-resumed-1"] == [0.8, 0.7]


def test_history_draws_every_validation_of_an_epoch(tmp_path):
    """optim.val_check_interval=0.5 validates twice an epoch: both are drawn (the first,
    the best here, selected the model), at the epoch's half and end."""
    log = ("epoch,step,train_loss,val_iou\n0,0,1.0,\n0,0,,0.41\n0,1,0.9,\n0,1,,0.38\n"
           "1,2,0.8,\n1,2,,0.37\n")
    run = _logs(tmp_path / "a", default=log)
    _, val_ax = plots.plot_history(run, metric="iou").axes
    [line] = val_ax.lines
    assert list(line.get_xdata()) == [0.5, 1.0, 2.0]
    assert list(line.get_ydata()) == [0.41, 0.38, 0.37]


def test_history_names_a_log_it_cannot_read(tmp_path, monkeypatch):
    _drawing_forbidden(monkeypatch)
    run = _logs(tmp_path / "a", bad=GOOD_LOG + "2,2,0.5,0.7,extra\n")
    with pytest.raises(DataValidationError, match="bad.metrics.csv"):
        plots.plot_history(run)
    run = _logs(tmp_path / "b", odd="step,train_loss\n0,1.0\n")
    with pytest.raises(DataValidationError, match="no 'epoch' column"):
        plots.plot_history(run)


def test_plot_predictions_needs_a_whole_number_of_images():
    class Fitted:
        image, label = "image", "label"

        def _check_fitted(self):
            pass

    frame = pd.DataFrame({"image": ["a.png"]})
    for n in (0, 2.5, True):
        with pytest.raises(DataValidationError, match="whole number"):
            plots.predictor_examples(Fitted(), frame, n, [None])
