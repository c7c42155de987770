"""Find, download, verify, read and adapt SAM checkpoints.

Resolution order for a backbone's weights (:func:`resolve_checkpoint`):

1. an explicit file path (an official segment-anything ``.pth`` state dict, or a
   ``.safetensors`` file with the same keys; Hugging Face transformers' ``SamModel``
   files, ``facebook/sam-vit-base``'s ``model.safetensors`` and models fine-tuned from
   it, are renamed to those keys by :mod:`automask.models.hf_layout`);
2. the cache, ``$AUTOMASK_HOME/checkpoints/<file name>`` (default ``~/.cache/automask``),
   holding a previous download; a cached file whose SHA-256 is not the expected one
   (truncated, damaged, another file) is downloaded again, with a warning, and replaced
   only by a complete, verified copy; when that download fails the file is left as it was
   and the error names it and the ways out;
3. a download of the official URL into the cache, with a progress bar, written to a
   temporary file and renamed only after its SHA-256 matched the pinned value.

``checkpoint="random"`` asks for random initialisation on purpose. When none of the three
ways gives weights, one :class:`~automask.errors.CheckpointError` names all three; there is
never a silent fallback to random weights, and a file that does not fit the backbone
exactly (missing, unexpected or mis-shaped tensors) is refused whole, never loaded in part.

Files are read without running code from them (``torch.load(weights_only=True)`` or
safetensors) and onto the CPU (tensors saved from a GPU load on a machine without one);
half-precision tensors are cast to the model's dtype. A file that cannot be read is named
with the reason: empty, truncated, a text or HTML page saved in place of the weights,
Python objects besides tensors.

The URL and SHA-256 can be overridden per call (``url=``, ``sha256=``) or per backbone with
the environment variables ``AUTOMASK_SAM_URL_<NAME>`` and ``AUTOMASK_SAM_SHA256_<NAME>``
(``<NAME>`` is the backbone in upper case, e.g. ``AUTOMASK_SAM_URL_VIT_B``; :func:`env_name`
spells names such as ``sam2.1_hiera_b+``), e.g. to use a mirror. A download with no SHA-256
to check against is kept with a warning saying so.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, DownloadError
from ..utils import cache_dir, download_file, remove_stale_parts, sha256_file, sha256_fileobj
from .backbones import get_spec
from .hf_layout import from_hf_sam, hf_weights_file, is_hf_sam

RANDOM = "random"


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a backbone's weights come from.

    Attributes
    ----------
    source : str
        ``"random"``, ``"file"``, ``"cache"`` or ``"download"``.
    path : Path or None
        The checkpoint file (``None`` for random init).
    sha256 : str or None
        SHA-256 of that file, computed once here.
    """

    source: str
    path: Path | None = None
    sha256: str | None = None


def checkpoint_cache_dir() -> Path:
    """Folder holding downloaded checkpoints: ``cache_dir() / "checkpoints"``."""
    return cache_dir() / "checkpoints"


def env_name(backbone: str) -> str:
    """``backbone`` as it appears in environment variable names: upper case, ``+`` spelled
    ``PLUS``, other characters that no shell accepts as ``_`` (``sam2.1_hiera_b+`` ->
    ``SAM2_1_HIERA_BPLUS``; ``vit_b`` -> ``VIT_B``)."""
    return re.sub(r"[^A-Z0-9_]", "_", backbone.upper().replace("+", "PLUS"))


def _override(kind: str, backbone: str) -> str | None:
    return os.environ.get(f"AUTOMASK_SAM_{kind}_{env_name(backbone)}") or None


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _checked_sha256(value: str | None, source: str) -> str | None:
    """``value`` in lower case when it is a SHA-256 hex digest; CheckpointError naming
    ``source`` otherwise, before a byte is hashed or downloaded."""
    if value is None:
        return None
    digest = value.strip().lower() if isinstance(value, str) else value
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise CheckpointError(
            f"{source} must be a SHA-256 digest (64 hexadecimal digits), got {value!r}")
    return digest


def _file_name(url: str, backbone: str, official: str | None) -> str:
    """The cache's name for ``backbone``'s file from ``url``: the official file name, else
    the URL's, after the backbone's (two mirrors' ``.../model.safetensors`` of two backbones
    must not take turns replacing one cached file)."""
    name = Path(urllib.parse.urlparse(url).path).name or official or "checkpoint.pth"
    return name if name == official else f"{backbone}--{name}"


def _no_weights(backbone: str, cached: Path | None, url: str | None, cause: str) -> CheckpointError:
    return CheckpointError(
        f"no weights for backbone {backbone!r}: {cause}. {_ways(backbone, cached, url)}")


def _ways(backbone: str, cached: Path | None, url: str | None) -> str:
    """The three ways to provide ``backbone``'s weights, for error messages."""
    from .sam2 import is_sam2_backbone

    where = str(cached) if cached is not None else f"{checkpoint_cache_dir()}/<file name>"
    official = "SAM 2.1 .pt" if is_sam2_backbone(backbone) else "segment-anything .pth"
    return (
        f"Provide them in one of three ways: "
        f"(1) pass hyperparameters={{\"model.checkpoint\": <path to the official "
        f"{official} file>}} (--hp model.checkpoint=<path> on the command line); "
        f"(2) place that file in the cache as {where} ($AUTOMASK_HOME sets the cache root); "
        f"(3) let automask download {url or 'the official checkpoint'} (needs network access; "
        f"AUTOMASK_SAM_URL_{env_name(backbone)} sets a mirror). "
        f"Use model.checkpoint='random' only to train from scratch on purpose."
    )


def locate_checkpoint(
    backbone: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> ResolvedCheckpoint:
    """Resolve ``backbone``'s weights and report where they came from.

    Same arguments as :func:`resolve_checkpoint`; returns a :class:`ResolvedCheckpoint`
    carrying the source and the file's SHA-256 (computed or verified exactly once). Every
    check happens here, on the file's bytes, before anything deserialises it: a file path
    is verified against ``sha256`` when given, the cache and downloads against ``sha256``,
    then ``AUTOMASK_SAM_SHA256_<NAME>``, then the pinned value.
    """
    spec = get_spec(backbone)
    if isinstance(checkpoint, str) and checkpoint == RANDOM:
        return ResolvedCheckpoint(source=RANDOM)
    sha256 = _checked_sha256(sha256, "sha256")
    if checkpoint is not None:
        _check_path_argument(backbone, checkpoint)
        # Absolute: the path is recorded in a saved predictor, which is loaded from anywhere.
        path = Path(checkpoint).expanduser().absolute()
        if path.is_dir():  # a transformers model folder: its weights file
            path = hf_weights_file(path) or path
        if path.is_dir():
            found: list[str] = []
            with contextlib.suppress(OSError):
                found = sorted(p.name for p in path.iterdir()
                               if p.suffix in (".pth", ".pt", ".bin", ".safetensors"))[:5]
            inside = f" (checkpoint files in it: {', '.join(found)})" if found else ""
            raise CheckpointError(
                f"checkpoint {str(path)!r} is a folder, not a file; pass the path of the "
                f"checkpoint file itself{inside}")
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {str(path)!r} does not exist or is not a file")
        digest = sha256_file(path)
        if sha256 is not None and digest != sha256:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} has SHA-256 {digest}, expected {sha256}; "
                "it was not loaded"
            )
        return ResolvedCheckpoint(source="file", path=path, sha256=digest)

    url = url or _override("URL", backbone) or spec.url
    env_sha = f"AUTOMASK_SAM_SHA256_{env_name(backbone)}"
    expected = (sha256 or _checked_sha256(_override("SHA256", backbone), f"${env_sha}")
                or spec.sha256 or "").lower() or None
    if url is None:
        raise CheckpointError(
            f"backbone {backbone!r} has no published weights; build it with "
            f"checkpoint='random' or pass checkpoint=<path to a state dict with its keys>"
        )
    cached = checkpoint_cache_dir() / _file_name(url, backbone, spec.filename)
    official = checkpoint_cache_dir() / spec.filename if spec.filename else None
    if expected and official is not None and official != cached and not cached.is_file() \
            and official.is_file() and sha256_file(official) == expected:
        # a mirror's URL names the file otherwise: the official copy in the cache is it
        return ResolvedCheckpoint(source="cache", path=official, sha256=expected)
    with _one_downloader(cached, url):  # the other processes then find it in the cache
        return _cached_or_downloaded(backbone, cached, url, expected, env_sha, progress)


def _check_path_argument(backbone: str, checkpoint: str | os.PathLike) -> None:
    """Refuse, naming the way out, a ``checkpoint`` that cannot be meant as a file path:
    an empty string (it would name the working directory) or a URL."""
    try:
        text = os.fspath(checkpoint)
    except TypeError:
        raise CheckpointError(
            f"checkpoint must be a file path, None (the official {backbone!r} weights) or "
            f"{RANDOM!r}, got {checkpoint!r}") from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise CheckpointError(
            f"checkpoint is an empty string; leave it unset (None) for the official "
            f"{backbone!r} weights from the cache or a download, give the path of a "
            f"checkpoint file, or {RANDOM!r} for random initialisation")
    if re.match(r"(?i)(https?|ftp)://", text):
        raise CheckpointError(
            f"checkpoint {text!r} is a URL, not a file path; download it and pass its path, "
            f"or set AUTOMASK_SAM_URL_{env_name(backbone)}={text} (and "
            f"AUTOMASK_SAM_SHA256_{env_name(backbone)}=<its SHA-256>) so that automask "
            f"downloads it into its cache")


@contextlib.contextmanager
def _one_downloader(cached: Path, url: str) -> Iterator[None]:
    """Hold a file lock per cached checkpoint while it is looked up and downloaded.

    The processes of a distributed fit, or several jobs of one user, all miss an empty
    cache at once: without the lock each would download the whole file (2.4 GiB for
    vit_h). A cache where no lock file can be made (read-only) goes on without one; the
    download itself is atomic either way.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(cache_dir() / "locks" / f"{cached.name}.lock"))
    locked = False
    try:
        Path(lock.lock_file).parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logging.getLogger("automask").info(
                "waiting for another process that is downloading %s", url)
            lock.acquire()
        locked = True
    except OSError:  # no lock file possible here: as before, without one
        pass
    try:
        yield
    finally:
        if locked:
            lock.release()


def _cached_or_downloaded(backbone: str, cached: Path, url: str, expected: str | None,
                          env_sha: str, progress: bool) -> "ResolvedCheckpoint":
    """The cached file, verified, else downloaded into the cache (:func:`locate_checkpoint`)."""
    stale = None  # (SHA-256) of a cached file that is not the expected one
    remove_stale_parts(cached)  # a killed download's part, though a later one completed
    if cached.is_file():
        digest = sha256_file(cached)
        if expected is None or digest == expected:
            return ResolvedCheckpoint(source="cache", path=cached, sha256=digest)
        # Truncated or damaged (an interrupted copy, a full disk) or another file under the
        # official name: download the official one again. It replaces the cached file only
        # once complete and verified; when the download fails, the file stays as it is.
        stale = digest
        warnings.warn(
            f"cached checkpoint {cached} has SHA-256 {digest}, expected {expected}: it is "
            f"truncated or not the official file; downloading {url} again to replace it",
            stacklevel=3,
        )

    try:
        download_file(url, cached, sha256=expected, progress=progress)
    except DownloadError as exc:
        if stale is not None:
            raise CheckpointError(
                f"cached checkpoint {str(cached)!r} has SHA-256 {stale}, expected {expected} "
                f"(it is truncated or not the official file), and downloading it again "
                f"failed ({exc}); the cached file was left as it is: delete it or replace it "
                f"with the official file. {_ways(backbone, cached, url)}"
            ) from exc
        raise _no_weights(backbone, cached, url, f"the download failed ({exc})") from exc
    if expected is None:
        not_weights = _text_instead_of_weights(cached) or _cut_short(cached)
        if not_weights:
            with contextlib.suppress(OSError):
                cached.unlink()
            raise _no_weights(backbone, cached, url,
                              f"{url} sent {not_weights}; it was not kept")
        warnings.warn(
            f"downloaded {url} to {cached} WITHOUT verifying it: no SHA-256 is pinned for it "
            f"(pass sha256= or set {env_sha})",
            stacklevel=3,
        )
        expected = sha256_file(cached)
    return ResolvedCheckpoint(source="download", path=cached, sha256=expected)


def resolve_checkpoint(
    backbone: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path | None:
    """Path of the weights to load for ``backbone``, downloading them if needed.

    Parameters
    ----------
    backbone : str
        A key of :data:`~automask.models.BACKBONES`.
    checkpoint : str, os.PathLike or None
        ``None``: cache, then download of the official checkpoint. A path: that file.
        ``"random"``: no weights, random initialisation on purpose.
    url, sha256 : str, optional
        Override the download URL and the expected SHA-256 (defaults: the environment
        variables ``AUTOMASK_SAM_URL_<NAME>`` / ``AUTOMASK_SAM_SHA256_<NAME>``, then the
        official values pinned in :data:`~automask.models.BACKBONES`). A ``sha256`` given
        with a file path ``checkpoint`` is checked against that file too.
    progress : bool
        Show a progress bar while downloading.

    Returns
    -------
    Path or None
        The checkpoint file; ``None`` only for ``checkpoint="random"``.

    Raises
    ------
    CheckpointError
        When no weights can be had (the message names the three ways to provide them), a
        download does not match its SHA-256 (nothing is left in the cache), a cached file
        does not match and cannot be downloaded again (it is named, and left as it was),
        an unverified download is a text or HTML page (not kept), or ``backbone="tiny"``
        is asked for published weights; also, before anything is read or downloaded, a
        ``sha256`` (or ``AUTOMASK_SAM_SHA256_<NAME>``) that is not 64 hexadecimal digits,
        and a ``checkpoint`` that is an empty string, a URL or a folder.
    """
    return locate_checkpoint(backbone, checkpoint, url=url, sha256=sha256, progress=progress).path


def read_state_dict(
    path: str | os.PathLike, sha256: str | None = None, *, what: str = "a SAM state dict"
) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely into a flat ``{key: tensor}`` dict on the CPU.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True, map_location="cpu")``, which refuses to run arbitrary
    pickled code and loads tensors saved from a GPU on a machine without one.

    A training script's checkpoint is unwrapped: the weights under one ``model``,
    ``state_dict``, ``model_state_dict`` or ``module`` entry (when no other entry is a
    tensor), keys saved from DistributedDataParallel / DeepSpeed (``module.``) or
    ``torch.compile`` (``_orig_mod.``), and a prefix shared by every key in front of SAM's
    own names (a Lightning module's ``model.image_encoder.*``).

    Parameters
    ----------
    path : str or PathLike
    sha256 : str, optional
        Expected hex SHA-256. The file is hashed first and deserialised only when it
        matches; a ``.pth`` file is hashed and then loaded through the same open handle,
        so the bytes checked are the bytes loaded even if the path is replaced meanwhile.
    what : str
        What the file should be, for error messages.

    Raises
    ------
    CheckpointError
        A SHA-256 mismatch (nothing was deserialised), a file that cannot be read (empty,
        truncated, a text or HTML page, Python objects that ``weights_only`` refuses; the
        message says which) or that is not a plain mapping of names to tensors.
    """
    path = Path(path)
    expected = sha256.lower() if sha256 is not None else None
    try:
        with open(path, "rb") as fh:
            if expected is not None:
                digest = sha256_fileobj(fh)
                if digest != expected:
                    raise CheckpointError(
                        f"{str(path)!r} has SHA-256 {digest}, expected {expected}; it was not "
                        "loaded"
                    )
                fh.seek(0)
            if _is_safetensors(fh):  # by its bytes: a renamed download, a hub blob
                from safetensors.torch import load_file  # safe format: no code to run

                state = load_file(str(path), device="cpu")
            else:
                state = torch.load(fh, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # truncated zip, pickle refused by weights_only, I/O error...
        raise CheckpointError(
            f"could not read {str(path)!r} as {what}: {_why_unreadable(path, exc)}"
            f"{_cache_hint(path)}"
        ) from exc
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{str(path)!r} holds a {type(state).__name__}, not a state dict of named tensors"
        )
    state = _unwrapped(state)
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(
            f"{str(path)!r} is not a plain state dict: entries {bad[:5]!r} are not named "
            "tensors; save the model's state_dict() itself (a checkpoint whose weights sit "
            "under one 'model' or 'state_dict' entry is read as well)"
        )
    return dict(state)


def _cut_short(path: Path) -> str | None:
    """What is missing when ``path`` is a torch zip or a safetensors file cut short (a
    download without a Content-Length that stopped early), else None: a zip's end records,
    or the bytes a safetensors header promises. Nothing else can be told without reading
    the whole file."""
    import json
    import zipfile

    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            fh.seek(0)
            if head == b"PK\x03\x04":
                try:
                    zipfile.ZipFile(fh).close()  # reads the central directory at the end
                except zipfile.BadZipFile as exc:
                    return f"a zip archive cut short or damaged ({exc})"
                return None
            if not _is_safetensors(fh):
                return None
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
            end = max((v["data_offsets"][1] for k, v in header.items()
                       if k != "__metadata__"), default=0)
            have = os.fstat(fh.fileno()).st_size - 8 - size
            if have < end:
                return f"a safetensors file cut short ({have} of its {end} data bytes)"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "a file that is no checkpoint torch or safetensors can read"
    return None


def _is_safetensors(fh) -> bool:
    """Whether the open file ``fh`` starts as a safetensors file does: an 8-byte
    little-endian header length, then the header's JSON ``{"``; ``fh`` is rewound."""
    head = fh.read(10)
    fh.seek(0)
    if len(head) < 10 or head[8:10] != b'{"':
        return False
    size = int.from_bytes(head[:8], "little")
    try:
        return 0 < size <= os.fstat(fh.fileno()).st_size - 8
    except (OSError, AttributeError, ValueError):
        return True


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _text_instead_of_weights(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is text (an HTML error page, a JSON answer, a Git LFS
    pointer) instead of a checkpoint, else None. A torch zip or pickle and a safetensors
    header all have control bytes in their first bytes; text has none."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    if not head or any(b < 32 and b not in (9, 10, 12, 13) for b in head) or b"\x7f" in head:
        return None
    text = head.decode("utf-8", errors="replace")
    snippet = " ".join(text.split())[:60]
    if text.lstrip().startswith("<"):
        return (f"an HTML or XML page (it starts with {snippet!r}), not a checkpoint: perhaps "
                "an error or login page saved in place of the weights")
    if text.startswith("version https://git-lfs"):
        return (f"a Git LFS pointer (it starts with {snippet!r}), not the checkpoint itself: "
                "fetch the real file (git lfs pull)")
    return f"a text file (it starts with {snippet!r}), not a checkpoint"


def _why_unreadable(path: Path, exc: BaseException) -> str:
    """Why ``path`` could not be deserialised, in words, from the file and ``exc``."""
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    if size == 0:
        return "the file is empty (0 bytes)"
    text = _text_instead_of_weights(path)
    if text:
        return f"it is {text}"
    try:
        with open(path, "rb") as fh:
            numpy_array = fh.read(6) == b"\x93NUMPY"
    except OSError:
        numpy_array = False
    if numpy_array:
        return "it is a numpy .npy array, not a checkpoint of named tensors"
    cause = f"{type(exc).__name__}: {_first_line(exc)}"
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if refused:
        return (f"it holds Python objects besides tensors ({refused.group(1)}), which automask "
                "does not unpickle: checkpoints are read with torch.load(weights_only=True) so "
                "that loading never runs code from the file. Save the weights alone, e.g. "
                "torch.save(checkpoint['model'], 'weights.pth') where you trust the file, and "
                "pass that file")
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        why = " ".join(detail.group(1).split()) if detail else _first_line(exc)
        return (f"it is not a checkpoint that torch.load(weights_only=True) reads ({why}); "
                "automask never unpickles anything but tensors")
    if isinstance(exc, EOFError) or re.search(
            r"central directory|EOF|truncat|incomplete|unexpected end", str(exc), re.IGNORECASE):
        return f"the file ({size} bytes) is truncated or damaged ({cause})"
    try:
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"
    except OSError:
        zipped = False
    if zipped or "PytorchStreamReader" in str(exc):
        return (f"it is a damaged torch checkpoint, or a zip archive that is not one "
                f"({cause})")
    return f"({cause})"


def _cache_hint(path: Path) -> str:
    """For a file in automask's checkpoint cache: how to get a good copy."""
    try:
        inside = Path(path).absolute().parent == checkpoint_cache_dir()
    except OSError:  # pragma: no cover
        inside = False
    return ("; it is in automask's cache: delete it so that automask downloads it again, or "
            "replace it with a good copy" if inside else "")


_WRAPPERS = ("model", "state_dict", "model_state_dict", "module")
"""Entries of a training script's checkpoint that hold the weights: {"model": sd, "epoch": ..}."""
_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes of wrappers: DistributedDataParallel / DeepSpeed, torch.compile."""
_SAM_TOP = ("image_encoder.", "prompt_encoder.", "mask_decoder.", "sam_prompt_encoder.",
            "sam_mask_decoder.")
"""The top-level modules of SAM's and SAM 2.1's image models."""


def _unwrapped(state: Mapping) -> Mapping:
    """The state dict inside a training checkpoint, with wrapper prefixes removed.

    ``{"model": sd, "epoch": 3, "optimizer": {...}}``-like files give ``sd`` (the first of
    :data:`_WRAPPERS` that maps names to tensors, when no other entry is a tensor);
    ``module.image_encoder.*`` or ``_orig_mod.image_encoder.*`` keys lose the prefix when
    every key has it; and when no key names one of SAM's modules but all share a first
    component after which they do (``model.image_encoder.*``), that component goes.
    """
    if not any(torch.is_tensor(v) for v in state.values()):
        for key in _WRAPPERS:
            inner = state.get(key)
            if isinstance(inner, Mapping) and inner and all(
                    isinstance(k, str) and torch.is_tensor(v) for k, v in inner.items()):
                state = inner
                break
    for _ in range(4):  # e.g. "model.module._orig_mod.image_encoder..."
        keys = list(state)
        if not keys or not all(isinstance(k, str) for k in keys):
            break
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in keys)), None)
        if prefix is None and not any(k.startswith(_SAM_TOP) for k in keys):
            first = keys[0].split(".", 1)[0] + "."
            if len(first) > 1 and all(k.startswith(first) for k in keys) and any(
                    k[len(first):].startswith((*_SAM_TOP, *_PREFIXES)) for k in keys):
                prefix = first  # a Lightning module's "model." around DDP or compile too
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize an absolute position table (1, H, W, C) to (1, grid, grid, C), bicubic."""
    if pos_embed.shape[1] == grid and pos_embed.shape[2] == grid:
        return pos_embed
    dtype = pos_embed.dtype
    table = pos_embed.permute(0, 3, 1, 2).float()  # (1, C, H, W)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).to(dtype).contiguous()


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Resize a relative-position table (L, C) to (length, C), linearly.

    The same interpolation segment-anything applies on the fly when a table does not fit
    the attention size (``get_rel_pos``).
    """
    if rel_pos.shape[0] == length:
        return rel_pos
    dtype = rel_pos.dtype
    table = rel_pos.t().unsqueeze(0).float()  # (1, C, L)
    table = F.interpolate(table, size=length, mode="linear", align_corners=False)
    return table.squeeze(0).t().to(dtype).contiguous()


def adapt_state_dict(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Resize position tables of ``state`` to the shapes of ``target`` (a model's state dict).

    Only ``image_encoder.pos_embed`` and the ``rel_pos_h``/``rel_pos_w`` tables (those of
    the global-attention blocks change with the input size; windowed blocks keep theirs) are
    resized; every other tensor is passed through unchanged, so any remaining mismatch is
    reported by the strict load.
    """
    out = dict(state)
    for key, value in state.items():
        want = target.get(key)
        if want is None or tuple(want.shape) == tuple(value.shape):
            continue
        if key.endswith("pos_embed") and value.dim() == 4 and value.shape[-1] == want.shape[-1]:
            assert want.shape[1] == want.shape[2], "SAM position grids are square"
            out[key] = resize_pos_embed(value, want.shape[1])
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.dim() == 2:
            if value.shape[1] == want.shape[1]:
                out[key] = resize_rel_pos(value, want.shape[0])
    return out


def load_sam_weights(
    model: torch.nn.Module, path: str | os.PathLike, sha256: str | None = None
) -> None:
    """Load an official-format SAM state dict into ``model`` strictly, resizing position tables.

    ``model`` must expose ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` as
    segment-anything lays them out (and nothing else persistent). With ``sha256``, the
    file is verified before it is deserialised (see :func:`read_state_dict`).

    Raises
    ------
    CheckpointError
        Unreadable file, or keys/shapes that do not match the backbone: the message
        summarises the missing and unexpected tensors by module, names mis-shaped ones
        with both shapes, and says which backbone the file was made for when it can tell.
        Nothing is loaded then: the model is never used partly initialised.

    Notes
    -----
    A ``model`` built on the meta device (as :func:`~automask.models.build_segmenter`
    builds one for a checkpoint, skipping a random initialisation the file replaces)
    takes the file's tensors as its own, in its dtypes, none sharing memory with another.
    """
    state = read_state_dict(path, sha256=sha256)
    if is_hf_sam(state):  # transformers' SamModel: the same tensors under other names
        state = from_hf_sam(state)
    target = model.state_dict()
    state = adapt_state_dict(state, target)
    raise_if_mismatched(state, target, path, model)
    try:
        load_strict(model, state, target)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{str(path)!r} does not fit backbone {getattr(model, 'backbone', '?')!r}"
            f"{_which_backbone(state, model)}: {str(exc).strip()[:2000]}"
        ) from exc


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                target: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state, strict=True)``; ``target`` is ``model.state_dict()``.

    A model built on the meta device (no random initialisation for the file to replace)
    takes ``state``'s tensors as its own instead (``assign=True``), each made fit for it
    by :func:`_own_tensors`. Raises what ``load_state_dict`` raises.
    """
    on_meta = any(t.is_meta for t in target.values())
    if on_meta:
        state = _own_tensors(state, target)
    model.load_state_dict(state, strict=True, assign=on_meta)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), \
        "a tensor of the model is not in its state dict and was left on the meta device"


_ALIGNMENT = 64  # bytes: c10's CPU allocator's


def _own_tensors(state: Mapping[str, torch.Tensor],
                 target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state``'s tensors made fit to become a model's parameters and buffers: each in
    ``target``'s dtype, contiguous, with memory of its own (a file may hold views of one
    tensor under several keys) and aligned as torch aligns what it allocates (64 bytes).
    safetensors hands out tensors at any offset of their file, and matrix products on
    them can round differently: a model built from one computed other logits than the
    same weights copied into fresh parameters."""
    out, seen = {}, set()
    for key, value in state.items():
        value = value.detach().to(dtype=target[key].dtype).contiguous()
        storage = value.untyped_storage().data_ptr()
        if (storage in seen or value.untyped_storage().nbytes() != value.nbytes
                or value.data_ptr() % _ALIGNMENT):
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def raise_if_mismatched(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                        path: str | os.PathLike, model: torch.nn.Module) -> None:
    """CheckpointError naming ``path``, what is missing, unexpected or mis-shaped in
    ``state`` against ``target`` (``model``'s state dict), and the backbone ``state`` was
    made for; nothing when they match key for key and shape for shape."""
    problem = describe_mismatch(state, target)
    if not problem:
        return
    found, wanted = _identify(state), _identify(target)
    if found is not None and wanted is not None and found[0] != wanted[0]:
        problem = "its keys are another model's altogether"  # the hint says which
    raise CheckpointError(
        f"{str(path)!r} does not fit backbone {getattr(model, 'backbone', '?')!r}"
        f"{_which_backbone(state, model)}: {problem}; nothing was loaded"
    )


def describe_mismatch(state: Mapping[str, torch.Tensor],
                      target: Mapping[str, torch.Tensor]) -> str:
    """The differences between a file's ``state`` and a model's ``target`` state dict, in
    words ("" when keys and shapes all match): missing and unexpected tensors summarised
    per module (``image_encoder.blocks.12-23.*``), mis-shaped ones named with both shapes."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    misshaped = [k for k in state if k in target
                 and tuple(state[k].shape) != tuple(target[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the backbone's {len(target)} tensors are missing "
                     f"from the file ({_key_groups(missing, target)})")
    if unexpected:
        parts.append(f"{len(unexpected)} of the file's {len(state)} tensors are not in the "
                     f"backbone ({_key_groups(unexpected, state)})")
    if misshaped:
        shown = "; ".join(f"{k}: file {tuple(state[k].shape)}, backbone "
                          f"{tuple(target[k].shape)}" for k in misshaped[:4])
        more = f"; and {len(misshaped) - 4} more" if len(misshaped) > 4 else ""
        parts.append(f"{len(misshaped)} tensors have other shapes ({shown}{more})")
    return "; ".join(parts)


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _key_groups(keys: list[str], universe: Mapping[str, object], per_module: int = 3) -> str:
    """``keys`` summarised per top-level module: "all N of mask_decoder.*" when every key of
    that module in ``universe`` is among them, else up to ``per_module`` patterns in which
    the first numbered component becomes a range (``image_encoder.blocks.12-23.*``)."""
    modules: dict[str, list[str]] = {}
    for key in keys:
        modules.setdefault(key.split(".", 1)[0], []).append(key)
    words = []
    for module, members in modules.items():
        total = sum(1 for k in universe if k.split(".", 1)[0] == module)
        if "." not in members[0] and len(members) == 1:
            words.append(module)
            continue
        if len(members) == total and total > 1:
            words.append(f"all {total} of {module}.*")
            continue
        patterns: dict[str, list[int]] = {}
        for key in members:
            parts = key.split(".")
            index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
            if index is None:
                patterns.setdefault(key, [])
            else:
                stem = ".".join(parts[:index])
                patterns.setdefault(stem, []).append(int(parts[index]))
        shown = [f"{stem}.{_ranges(nums)}.*" if nums else stem
                 for stem, nums in list(patterns.items())[:per_module]]
        more = ", ..." if len(patterns) > per_module else ""
        words.append(f"{len(members)} of {module}.*: {', '.join(shown)}{more}")
    return "; ".join(words)


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})


def _identify(state: Mapping[str, torch.Tensor]) -> tuple[str, str | None, str] | None:
    """(family, backbone name or None, "width W, N blocks") of the image encoder in a state
    dict with automask's key names: family "sam" (segment-anything ViT), "sam2" (SAM 2.1
    Hiera) or "hf" (Hugging Face transformers' SAM layout); None when it has no encoder."""
    from .backbones import BACKBONES

    if is_hf_sam(state):  # a SAM 1 file of transformers: identified by its SAM names
        state = from_hf_sam(state)
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if torch.is_tensor(patch) and patch.dim() == 4:
        width, depth = int(patch.shape[0]), _count_blocks(state, "image_encoder.blocks.")
        names = [n for n, b in BACKBONES.items() if (b.embed_dim, b.depth) == (width, depth)]
        return "sam", (names[0] if names else None), f"width {width}, {depth} blocks"
    patch = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if torch.is_tensor(patch) and patch.dim() == 4:
        from .sam2 import SAM2_BACKBONES

        width, depth = int(patch.shape[0]), _count_blocks(state, "image_encoder.trunk.blocks.")
        names = [n for n, b in SAM2_BACKBONES.items()
                 if (b.embed_dim, sum(b.stages)) == (width, depth)]
        return "sam2", (names[0] if names else None), f"Hiera width {width}, {depth} blocks"
    if any(isinstance(k, str) and k.startswith("vision_encoder.") for k in state):
        return "hf", None, ""
    return None


_FAMILY = {"sam": "SAM 1 (segment-anything ViT)", "sam2": "SAM 2.1 (Hiera)"}


def _which_backbone(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> str:
    """A hint naming what the file was made for, when that is not the model's backbone."""
    backbone = getattr(model, "backbone", "?")
    found, wanted = _identify(state), _identify(model.state_dict())
    if found is not None and found[0] == "hf":
        return (" (it is a Hugging Face transformers checkpoint, with 'vision_encoder.*' keys, "
                "but not of SamModel (SAM 1); automask reads transformers' SamModel files "
                "and the official segment-anything / SAM 2.1 files, e.g. "
                "sam_vit_b_01ec64.pth or sam2.1_hiera_tiny.pt)")
    if found is None:
        tops = sorted({k.split(".", 1)[0] for k in state})
        known = [t for t in tops if f"{t}." in _SAM_TOP or t == "no_mem_embed"]
        if not known:
            first = next(iter(state), "")
            return (f" (its keys, e.g. {first!r}, are not SAM's: no image_encoder, "
                    "prompt_encoder or mask_decoder)")
        if "image_encoder" in known:  # encoder tensors, but not its patch embedding
            return (" (its image encoder is incomplete: it has no patch embedding, "
                    "'image_encoder.patch_embed.proj.weight' or "
                    "'image_encoder.trunk.patch_embed.proj.weight')")
        return f" (it holds no image encoder, only {', '.join(known)})"
    if wanted is None or found == wanted:
        return ""
    like = f"a {found[1]!r} checkpoint" if found[1] else "another backbone's checkpoint"
    if found[0] != wanted[0]:
        of = f" of {found[1]!r}" if found[1] else ""
        use = f"; use it with model.backbone={found[1]!r}" if found[1] else ""
        return (f" (it is a {_FAMILY[found[0]]} checkpoint{of}: {found[2]}; backbone "
                f"{backbone!r} is {_FAMILY[wanted[0]]} and needs a {_FAMILY[wanted[0]]} "
                f"checkpoint{use})")
    return (f" (it looks like {like}: {found[2]}; backbone {backbone!r} has "
            f"{wanted[2]})")
