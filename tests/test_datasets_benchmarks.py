"""fetch_benchmark: download from 127.0.0.1, verify, unpack safely, read the split CSVs."""
from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automask.data import validate_frame
from automask.datasets import BENCHMARKS, fetch_benchmark
from automask.errors import ConfigError, DownloadError

PAPER_NAMES = {"polyp", "isic2017", "camo_sem_seg", "SBU-shadow", "leaf_disease_segmentation",
               "road_segmentation"}


def _build_archive(tmp_path, name, splits=("train", "val", "test"), index_col=True):
    """A zip laid out like the authors' archives: <name>/{split}.csv + image/label files."""
    src = tmp_path / "src" / name
    for split in splits:
        rows = []
        for i in range(3):
            img = f"{split}/images/{i}.jpg"
            lbl = f"{split}/labels/{i}.png"
            for rel, arr in ((img, np.full((8, 10, 3), 40 * i, np.uint8)),
                             (lbl, (np.arange(80).reshape(8, 10) % 2 * 255).astype(np.uint8))):
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(src / rel)
            rows.append({"image": img, "label": lbl})
        pd.DataFrame(rows).to_csv(src / f"{split}.csv", index=index_col)
    served = tmp_path / "served"
    served.mkdir()
    archive = served / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src.parent).as_posix())
    return archive


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_registry_has_the_six_paper_benchmarks():
    assert set(BENCHMARKS) == PAPER_NAMES
    for name, entry in BENCHMARKS.items():
        assert entry["url"].endswith(f"/{name}.zip")


def test_fetch_unpack_and_read(tmp_path, http_server):
    archive = _build_archive(tmp_path, "toy")
    base = http_server(archive.parent)
    root = tmp_path / "data"
    splits = fetch_benchmark("toy", root=root, url=f"{base}/toy.zip", sha256=_sha(archive),
                             progress=False)
    assert list(splits) == ["train", "val", "test"]
    train = splits["train"]
    assert list(train.columns) == ["image", "label"] and list(train.index) == [0, 1, 2]
    for col in ("image", "label"):
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in train[col])
        assert all(p.startswith(str(root / "toy")) for p in train[col])
    spec = validate_frame(splits["test"])
    assert spec.task == "binary"
    # second call: no download (the server is gone), same result
    again = fetch_benchmark("toy", root=root, url="http://127.0.0.1:9/unreachable.zip",
                            progress=False)
    assert again["val"].equals(splits["val"])


def test_per_dataset_test_csvs(tmp_path, http_server):
    splits = ("train", "val", "test_Kvasir", "test_CVC-ClinicDB")
    archive = _build_archive(tmp_path, "polyp", splits=splits, index_col=False)
    base = http_server(archive.parent)
    splits = fetch_benchmark("polyp", root=tmp_path / "d", url=f"{base}/polyp.zip", progress=False)
    assert list(splits) == ["train", "val", "test_CVC-ClinicDB", "test_Kvasir"]


def test_checksum_mismatch_keeps_nothing(tmp_path, http_server):
    archive = _build_archive(tmp_path, "toy")
    base = http_server(archive.parent)
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="SHA-256"):
        fetch_benchmark("toy", root=root, url=f"{base}/toy.zip", sha256="0" * 64, progress=False)
    assert not (root / "toy.zip").exists() and not (root / "toy").exists()


@pytest.mark.parametrize("evil", ["../escape.txt", "/abs/escape.txt", "toy/../../escape.txt",
                                  "C:/escape.txt"])
def test_member_escaping_target_is_rejected(tmp_path, http_server, evil):
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "toy.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("toy/train.csv", "image,label\n")
        zf.writestr(evil, "gotcha")
    base = http_server(served)
    root = tmp_path / "a" / "b"
    with pytest.raises(DownloadError, match="escape") as info:
        fetch_benchmark("toy", root=root, url=f"{base}/toy.zip", progress=False)
    assert evil in str(info.value)
    assert not (root / "toy").exists()
    assert not list(tmp_path.rglob("escape.txt"))
    assert [p.name for p in root.iterdir()] == ["toy.zip"]  # no half-unpacked folder left


def test_symlink_member_is_rejected(tmp_path, http_server):
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "toy.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("toy/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    base = http_server(served)
    with pytest.raises(DownloadError, match="escape"):
        fetch_benchmark("toy", root=tmp_path / "r", url=f"{base}/toy.zip", progress=False)


def test_unknown_name():
    with pytest.raises(ConfigError, match="polyp"):
        fetch_benchmark("nope")
