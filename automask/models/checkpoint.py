"""Find, download, verify, read and adapt SAM checkpoints.

Resolution order for a backbone's weights (:func:`resolve_checkpoint`):

1. an explicit file path (an official segment-anything ``.pth`` state dict, or a
   ``.safetensors`` file with the same keys);
2. the cache, ``$AUTOMASK_HOME/checkpoints/<file name>`` (default ``~/.cache/automask``),
   holding a previous download;
3. a download of the official URL into the cache, with a progress bar, written to a
   temporary file and renamed only after its SHA-256 matched the pinned value.

``checkpoint="random"`` asks for random initialisation on purpose. When none of the three
ways gives weights, one :class:`~automask.errors.CheckpointError` names all three; there is
never a silent fallback to random weights.

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
import re
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, DownloadError
from ..utils import cache_dir, download_file, sha256_file, sha256_fileobj
from .backbones import get_spec

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


def _file_name(url: str, fallback: str | None) -> str:
    name = Path(urllib.parse.urlparse(url).path).name
    return name or fallback or "checkpoint.pth"


def _no_weights(backbone: str, cached: Path | None, url: str | None, cause: str) -> CheckpointError:
    where = str(cached) if cached is not None else f"{checkpoint_cache_dir()}/<file name>"
    return CheckpointError(
        f"no weights for backbone {backbone!r}: {cause}. Provide them in one of three ways: "
        f"(1) pass hyperparameters={{\"model.checkpoint\": <path to the official "
        f"segment-anything .pth file>}} (--hp model.checkpoint=<path> on the command line); "
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
        # Absolute: the path is recorded in a saved predictor, which is loaded from anywhere.
        path = Path(checkpoint).expanduser().absolute()
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
    cached = checkpoint_cache_dir() / _file_name(url, spec.filename)
    with _one_downloader(cached, url):  # the other processes then find it in the cache
        return _cached_or_downloaded(backbone, cached, url, expected, env_sha, progress)


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
    if cached.is_file():
        digest = sha256_file(cached)
        if expected is not None and digest != expected:
            raise CheckpointError(
                f"cached checkpoint {str(cached)!r} has SHA-256 {digest}, expected {expected}; "
                f"delete it so that automask downloads it again"
            )
        return ResolvedCheckpoint(source="cache", path=cached, sha256=digest)

    try:
        download_file(url, cached, sha256=expected, progress=progress)
    except DownloadError as exc:
        raise _no_weights(backbone, cached, url, f"the download failed ({exc})") from exc
    if expected is None:
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
        is corrupted, or ``backbone="tiny"`` is asked for published weights; also, before
        anything is read or downloaded, a ``sha256`` (or ``AUTOMASK_SAM_SHA256_<NAME>``)
        that is not 64 hexadecimal digits.
    """
    return locate_checkpoint(backbone, checkpoint, url=url, sha256=sha256, progress=progress).path


def read_state_dict(
    path: str | os.PathLike, sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely into a flat ``{key: tensor}`` dict on the CPU.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``, which refuses to run arbitrary pickled code.

    Parameters
    ----------
    path : str or PathLike
    sha256 : str, optional
        Expected hex SHA-256. The file is hashed first and deserialised only when it
        matches; a ``.pth`` file is hashed and then loaded through the same open handle,
        so the bytes checked are the bytes loaded even if the path is replaced meanwhile.

    Raises
    ------
    CheckpointError
        A SHA-256 mismatch (nothing was deserialised), a file that cannot be read
        (truncated, not a checkpoint, unsafe pickle) or that is not a plain mapping of
        names to tensors.
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
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file  # safe format: no code to run

                state = load_file(str(path), device="cpu")
            else:
                state = torch.load(fh, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # truncated zip, pickle refused by weights_only, I/O error...
        raise CheckpointError(
            f"could not read {str(path)!r} as a SAM state dict ({type(exc).__name__}: {exc})"
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


_WRAPPERS = ("model", "state_dict")  # training scripts' checkpoints: {"model": sd, "epoch": ..}
_DDP_PREFIX = "module."  # keys saved from a DistributedDataParallel wrapper


def _unwrapped(state: Mapping) -> Mapping:
    """The state dict inside a training checkpoint, with a DDP ``module.`` prefix removed.

    ``{"model": sd, "epoch": 3, "optimizer": {...}}``-like files give ``sd`` (the first of
    ``model`` and ``state_dict`` that maps names to tensors, when no other entry is a
    tensor); ``module.image_encoder.*`` keys lose ``module.`` when every key has it.
    """
    if not any(torch.is_tensor(v) for v in state.values()):
        for key in _WRAPPERS:
            inner = state.get(key)
            if isinstance(inner, Mapping) and inner and all(
                    isinstance(k, str) and torch.is_tensor(v) for k, v in inner.items()):
                state = inner
                break
    if state and all(isinstance(k, str) and k.startswith(_DDP_PREFIX) for k in state):
        state = {k[len(_DDP_PREFIX):]: v for k, v in state.items()}
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
        Unreadable file, or keys/shapes that do not match the backbone (missing,
        unexpected or mis-shaped tensors are listed); the model is then not used partially
        initialised by the caller.
    """
    state = read_state_dict(path, sha256=sha256)
    state = adapt_state_dict(state, model.state_dict())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{str(path)!r} does not fit this backbone{_which_backbone(state, model)}: "
            f"{str(exc).strip()[:2000]}"
        ) from exc


def _encoder_shape(state: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(embed dim, number of blocks) of a SAM image encoder's state dict, if it has one."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return None
    blocks = {k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")}
    return int(patch.shape[0]), len(blocks)


def _which_backbone(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> str:
    """A hint naming the backbone the file was made for, when that is not the model's."""
    from .backbones import BACKBONES

    found, wanted = _encoder_shape(state), _encoder_shape(model.state_dict())
    if found is None:
        first = next(iter(state), "")
        return f" (its keys, e.g. {first!r}, are not segment-anything's 'image_encoder.*')"
    if wanted is None or found == wanted:
        return ""
    names = [n for n, b in BACKBONES.items() if (b.embed_dim, b.depth) == found]
    like = f"a {names[0]!r} checkpoint" if names else "another backbone's checkpoint"
    return (f" (it looks like {like}: width {found[0]}, {found[1]} blocks; backbone "
            f"{getattr(model, 'backbone', '?')!r} has width {wanted[0]}, {wanted[1]} blocks)")
