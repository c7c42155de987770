"""Reliability of file input/output: downloads, archives, checkpoints and file modes.

Real files, a real HTTP server on 127.0.0.1 (the ``http_server`` fixture, or a small
handler that lies about its Content-Length) and real zip archives.
"""
from __future__ import annotations

import hashlib
import http.server
import os
import stat
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from automask.datasets import fetch_benchmark
from automask.errors import CheckpointError, ConfigError, DownloadError
from automask.models.checkpoint import (
    checkpoint_cache_dir,
    load_sam_weights,
    locate_checkpoint,
    read_state_dict,
)
from automask.utils import atomic_write, download_file, safe_unpack


def _build_archive(tmp_path: Path, name: str = "toy") -> Path:
    """A small benchmark-like zip: <name>/{train,val}.csv with images and masks."""
    src = tmp_path / "src" / name
    for split in ("train", "val"):
        rows = []
        for i in range(2):
            img, lbl = f"{split}/images/{i}.png", f"{split}/labels/{i}.png"
            for rel, arr in ((img, np.full((8, 10, 3), 50 * i, np.uint8)),
                             (lbl, (np.arange(80).reshape(8, 10) % 2 * 255).astype(np.uint8))):
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(src / rel)
            rows.append({"image": img, "label": lbl})
        pd.DataFrame(rows).to_csv(src / f"{split}.csv", index=False)
    served = tmp_path / "served"
    served.mkdir(exist_ok=True)
    archive = served / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src.parent).as_posix())
    return archive


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. fetch_benchmark never deletes a folder it did not make ------------------------------

def test_fetch_refuses_a_folder_it_did_not_make_and_leaves_it_alone(tmp_path, http_server):
    archive = _build_archive(tmp_path)
    base = http_server(archive.parent)
    root = tmp_path / "data"
    mine = root / "toy"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "thesis.txt").write_text("three years of work")
    (mine / "train.csv").write_text("image,label\n")
    before = _tree(mine)
    with pytest.raises(DownloadError) as info:
        fetch_benchmark("toy", root=root, url=f"{base}/toy.zip", progress=False)
    assert str(mine) in str(info.value) and "not made by automask" in str(info.value)
    assert _tree(mine) == before
    assert sorted(p.name for p in root.iterdir()) == ["toy"]  # nothing downloaded either


def test_fetch_moves_a_complete_folder_into_place(tmp_path, http_server):
    archive = _build_archive(tmp_path)
    base = http_server(archive.parent)
    root = tmp_path / "data"
    (root / "toy").mkdir(parents=True)  # an empty folder holds nothing to lose
    splits = fetch_benchmark("toy", root=root, url=f"{base}/toy.zip", progress=False)
    assert list(splits) == ["train", "val"]
    assert (root / "toy" / ".complete").read_text().startswith(base)
    assert sorted(p.name for p in root.iterdir()) == ["toy", "toy.zip"]  # no staging left


def test_a_corrupt_member_leaves_no_folder(tmp_path, http_server):
    archive = _build_archive(tmp_path)
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("toy/val.csv")
    # flip a byte of the stored member's data (after its 30-byte local header and name)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start] ^= 0xFF
    archive.write_bytes(bytes(data))
    base = http_server(archive.parent)
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="could not be unpacked") as err:
        fetch_benchmark("toy", root=root, url=f"{base}/toy.zip", progress=False)
    assert "toy.zip" in str(err.value)
    assert sorted(p.name for p in root.iterdir()) == ["toy.zip"]


# -- 2. archive size limits and path traversal -------------------------------------------

def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("toy/zeros.bin", "w", force_zip64=True) as fh:
            block = bytes(1 << 24)
            for _ in range(66):  # 1.1 GB of zeros
                fh.write(block)
    assert archive.stat().st_size < 1.5e6
    dest = tmp_path / "out" / "toy"
    with pytest.raises(DownloadError) as info:
        safe_unpack(archive, dest)
    message = str(info.value)
    assert "1107296256 bytes" in message and "limit of 100 times" in message
    assert "AUTOMASK_MAX_UNPACK_RATIO" in message and "max_ratio=" in message
    assert not dest.exists() and not dest.parent.exists()


def test_unpack_limits_come_from_the_environment_or_the_argument(tmp_path, monkeypatch):
    archive = _build_archive(tmp_path)
    total = sum(m.file_size for m in zipfile.ZipFile(archive).infolist())
    monkeypatch.setenv("AUTOMASK_MAX_UNPACK_BYTES", "100")
    dest = tmp_path / "out" / "toy"
    with pytest.raises(DownloadError) as info:
        safe_unpack(archive, dest)
    assert f"{total} bytes, over the limit of 100 bytes" in str(info.value)
    assert "AUTOMASK_MAX_UNPACK_BYTES" in str(info.value)
    assert not dest.exists()
    safe_unpack(archive, dest, max_bytes=total)  # the argument wins over the variable
    assert (dest / "toy" / "train.csv").is_file()
    monkeypatch.setenv("AUTOMASK_MAX_UNPACK_RATIO", "lots")
    with pytest.raises(ConfigError, match="AUTOMASK_MAX_UNPACK_RATIO"):
        safe_unpack(archive, tmp_path / "other")


@pytest.mark.parametrize("evil", ["../toy-sibling/x.txt", "a/../../x.txt", "/tmp/x.txt"])
def test_path_traversal_is_still_refused(tmp_path, evil):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("toy/ok.txt", "fine")
        zf.writestr(evil, "gotcha")
    dest = tmp_path / "out" / "toy"
    with pytest.raises(DownloadError, match="escape") as info:
        safe_unpack(archive, dest)
    assert repr(evil) in str(info.value)
    assert not dest.exists() and not (tmp_path / "out" / "toy-sibling").exists()
    assert not [p for p in tmp_path.rglob("x.txt")]


# -- 3. downloads: short bodies, stale .part files, unreadable cached archives -------------

class _LyingHandler(http.server.BaseHTTPRequestHandler):
    """Announces 1000 bytes, sends 300, then closes the connection."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 300)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def lying_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LyingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_download_shorter_than_its_content_length_is_an_error(tmp_path, lying_server):
    dest = tmp_path / "cache" / "weights.pth"
    with pytest.raises(DownloadError) as info:
        download_file(f"{lying_server}/weights.pth", dest, progress=False)
    assert "300 of the 1000 bytes" in str(info.value) and "weights.pth" in str(info.value)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a .part

    dest.write_bytes(b"the previous, complete file")
    with pytest.raises(DownloadError):
        download_file(f"{lying_server}/weights.pth", dest, progress=False)
    assert dest.read_bytes() == b"the previous, complete file"
    assert [p.name for p in dest.parent.iterdir()] == ["weights.pth"]


def test_stale_part_files_of_ours_are_removed_and_nothing_else(tmp_path, http_server):
    served = tmp_path / "served"
    served.mkdir()
    (served / "toy.zip").write_bytes(b"payload")
    base = http_server(served)
    folder = tmp_path / "cache"
    folder.mkdir()
    old = time.time() - 7200
    stale = [folder / ".toy.zip.ab12cd34.part", folder / ".toy.zip.k2_j9x0q.part"]
    kept = [
        folder / ".toy.zip.0123abcd.part",  # ours but fresh: maybe a live download
        folder / "toy.zip.part",  # a user's file
        folder / ".toy.zip.backup.part",  # not our pattern
        folder / ".other.zip.ab12cd34.part",  # another destination's
    ]
    for path in stale + kept:
        path.write_bytes(b"partial")
        if path != kept[0]:
            os.utime(path, (old, old))
    download_file(f"{base}/toy.zip", folder / "toy.zip", progress=False)
    assert (folder / "toy.zip").read_bytes() == b"payload"
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"partial" for p in kept)


def test_a_cached_archive_that_does_not_open_is_downloaded_again(tmp_path, http_server):
    archive = _build_archive(tmp_path)
    base = http_server(archive.parent)
    root = tmp_path / "data"
    root.mkdir()
    (root / "toy.zip").write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    splits = fetch_benchmark("toy", root=root, url=f"{base}/toy.zip", progress=False)
    assert len(splits["train"]) == 2
    assert (root / "toy.zip").read_bytes() == archive.read_bytes()


# -- 4. a SAM checkpoint is hashed before it is deserialised -------------------------------

def _state_file(path: Path) -> tuple[Path, str]:
    torch.save({"w": torch.arange(6.0)}, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def forbid_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a file whose hash did not match")

    monkeypatch.setattr(torch, "load", refuse)


def test_a_mismatching_checkpoint_never_reaches_torch_load(tmp_path, forbid_torch_load,
                                                           monkeypatch):
    path, digest = _state_file(tmp_path / "sam.pth")
    wrong = "0" * 64
    with pytest.raises(CheckpointError, match="expected 0{64}") as info:
        read_state_dict(path, sha256=wrong)
    assert str(path) in str(info.value) and digest in str(info.value)
    with pytest.raises(CheckpointError, match="expected 0{64}"):
        load_sam_weights(torch.nn.Linear(2, 3), path, sha256=wrong)
    with pytest.raises(CheckpointError, match="expected 0{64}"):
        locate_checkpoint("tiny", path, sha256=wrong)
    # a corrupted file in the cache, found by the resolver while offline (the official URL
    # replaced by a closed local port): it is named, never read
    monkeypatch.setenv("AUTOMASK_SAM_URL_VIT_B", "http://127.0.0.1:9/sam_vit_b_01ec64.pth")
    cached = checkpoint_cache_dir() / "sam_vit_b_01ec64.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="delete it"):
        locate_checkpoint("vit_b", None, progress=False)


def test_a_matching_checkpoint_is_loaded_from_the_bytes_that_were_hashed(tmp_path, monkeypatch):
    path, digest = _state_file(tmp_path / "sam.pth")
    seen = []
    real_load = torch.load

    def spy(source, *args, **kwargs):
        seen.append(source)
        return real_load(source, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state = read_state_dict(path, sha256=digest.upper())
    assert torch.equal(state["w"], torch.arange(6.0))
    assert len(seen) == 1 and hasattr(seen[0], "read")  # the open, hashed handle
    assert locate_checkpoint("tiny", path, sha256=digest).sha256 == digest


# -- 5. files get the user's umask -------------------------------------------------------

@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_follow_the_umask_and_replacements_keep_their_mode(tmp_path, umask):
    target = tmp_path / "out" / "config.json"
    with atomic_write(target, "w") as fh:
        fh.write("{}")
    assert _mode(target) == 0o644
    umask(0o077)
    private = tmp_path / "out" / "private.bin"
    with atomic_write(private) as fh:
        fh.write(b"x")
    assert _mode(private) == 0o600
    umask(0o022)
    os.chmod(target, 0o640)
    with atomic_write(target, "w") as fh:
        fh.write('{"a": 1}')
    assert _mode(target) == 0o640 and target.read_text() == '{"a": 1}'


def test_downloads_and_unpacked_folders_follow_the_umask(tmp_path, http_server, umask):
    archive = _build_archive(tmp_path)
    base = http_server(archive.parent)
    root = tmp_path / "data"
    fetch_benchmark("toy", root=root, url=f"{base}/toy.zip", progress=False)
    assert _mode(root / "toy.zip") == 0o644
    assert _mode(root / "toy") == 0o755
    assert _mode(root / "toy" / "toy" / "train.csv") == 0o644


def test_a_write_that_fails_names_the_file_and_leaves_the_old_one(tmp_path):
    """A full disk fails in write, flush or fsync with an OSError naming no file ("[Errno 28]
    No space left on device", as a fit's final save reported it); atomic_write names the
    file it was writing, removes its temporary file and leaves the old file as it was."""
    import errno

    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device: '.*"
                       r"weights\.safetensors'$") as caught:
        with atomic_write(target) as fh:
            fh.write(b"new, half written")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    named = OSError(errno.EACCES, os.strerror(errno.EACCES), "/elsewhere/x")
    with pytest.raises(OSError, match="/elsewhere/x"):  # a name it had is kept
        with atomic_write(target):
            raise named
    # numpy's tofile cut short by a full disk or a file size limit: a bare message, no
    # errno, which a file name alone made "[Errno None] None: '<path>'"
    with pytest.raises(OSError, match=r"^cannot write '.*weights\.safetensors': 1000000 "
                                      r"requested and 50144 written \(a full disk") as caught:
        with atomic_write(target) as fh:
            np.arange(250_000, dtype=np.float32).tofile(fh)
            raise OSError("1000000 requested and 50144 written")
    assert "Errno None" not in str(caught.value)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


def test_a_temporary_file_that_cannot_be_removed_does_not_hide_the_error(tmp_path,
                                                                         monkeypatch):
    """The folder made read-only during a write: the rename fails, and so does removing
    the temporary file. The rename's error (naming the file) is raised, with a note naming
    the temporary file left behind; before, the removal's error replaced it."""
    import automask.utils.download as download

    target = tmp_path / "00059.png"
    real_unlink = os.unlink

    def replace(src, dst):
        raise PermissionError(1, "Operation not permitted", str(dst))

    def unlink(path, *args, **kwargs):
        if str(path).endswith(".part"):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(download.os, "replace", replace)
    monkeypatch.setattr(download.os, "unlink", unlink)
    with pytest.raises(PermissionError) as caught:
        with atomic_write(target) as fh:
            fh.write(b"mask")
    assert caught.value.filename == str(target)
    [note] = caught.value.__notes__
    assert "could not be removed" in note and ".part" in note and str(target) in note
