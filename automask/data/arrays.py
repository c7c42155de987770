"""In-memory images and masks (numpy arrays, torch tensors, PIL images) as temporary files.

automask reads every image and mask from a file, so that validation, the loaders and their
worker processes all see one kind of input. :func:`as_files` writes each in-memory cell of
the given columns, losslessly, into a temporary folder that lives as long as its ``with``
block, and gives the frame with those cells replaced by the files' paths:

- a numpy array or a torch tensor of shape (H, W), (H, W, C) or (C, H, W) with bool,
  integer or float samples is saved as ``.npy``, so it reads exactly as the same array
  saved with ``np.save`` (channel layout, value range and ``data.image_range`` rules
  included), except that a 3-D tensor whose first axis could be channels (1 to 4) is
  (C, H, W), torch's layout, even where its last axis could be too (an array: (H, W, C),
  the layout of numpy and Pillow);
- a PIL image is saved as PNG (TIFF for the modes PNG cannot hold; an ``L`` or ``RGB``
  image as the ``.npy`` array of its pixels, which reads the same and is written 100 times
  faster), so it reads as the same image saved by the caller: a palette ("P") mask keeps
  its indices, an RGB image its colours. Its pixels are taken as they are in memory: no
  EXIF rotation is applied;
- the bytes of an encoded file (``bytes``, ``bytearray`` or ``memoryview`` holding a PNG,
  JPEG, TIFF, BMP, GIF, WebP, ``.npy``... file, as a Parquet table or ``open(p,
  "rb").read()`` gives them; or a Hugging Face ``datasets`` image as ``to_pandas()`` gives
  it, ``{"bytes": ..., "path": ...}``) are written as they are, under the suffix of their
  format, so they read exactly as that file (EXIF orientation included). A bytes cell is
  taken for a file's contents when it holds a NUL byte (which no path holds and every
  image file does) or starts with the signature of PNG, JPEG, GIF, WebP or ``.npy``; any
  other bytes cell stays a (bytes) path. A Hugging Face image without bytes is its path.

A file is named after its row's position (``00000.npy``, ``00001.png`` ...), so masks that
``predict(save_to=...)`` writes for such rows are ``00000.png``, ``00001.png`` ...; a frame
whose ``attrs["stems"]`` holds a name per row (a TIFF stack's pages: ``vol_000``) names
them so. With
``by_content=True`` (what ``fit`` uses) it is named after its bytes instead
(``<sha256, 20 hex digits>.npy``), so the same picture gets the same name in every call and
a resumed fit recognises its data. Any other cell is left as it is, for validation to
judge. An automask error raised in the block names such a picture ``<in-memory ndarray>``
(its type), not its temporary file, and so do the warnings that name files while the block
runs (:func:`shown`; a fit's kept copies too, :func:`naming`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from ..errors import AutomaskError, DataValidationError
from .io import _MAX_CHANNELS

# PIL modes a PNG file holds as they are; any other mode (I, F, CMYK, YCbCr, ...) goes to TIFF
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}
# PIL modes written as the .npy array of their pixels, which reads as their PNG file does
_AS_ARRAY_MODES = {"L", "RGB"}


def refuse_repeated_columns(frame: pd.DataFrame, wanted: Sequence[str]) -> None:
    """DataValidationError when a column of ``wanted`` appears more than once in ``frame``
    (after a merge or a concat), naming it, rather than reading two columns as one."""
    repeated = [c for c in wanted if int((frame.columns == c).sum()) > 1]
    if repeated:
        raise DataValidationError(
            f"column(s) {repeated} appear more than once in the data (columns "
            f"{[str(c) for c in frame.columns]}); keep one column of each name")


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _is_pil(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


# file signatures -> suffix; a format not listed is named by Pillow (``_suffix``)
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"),
               (b"GIF87a", ".gif"), (b"GIF89a", ".gif"), (b"\x93NUMPY", ".npy"),
               (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"II+\x00", ".tif"),
               (b"MM\x00+", ".tif"), (b"BM", ".bmp"))
_NUL_FREE = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"\x93NUMPY")  # can hold no NUL byte


def _suffix(data: bytes) -> str:
    """The file suffix of encoded image bytes: by signature, else by Pillow's reading of
    them, else ``.bin`` (read as it can be, and named unreadable otherwise)."""
    for signature, suffix in _SIGNATURES:
        if data.startswith(signature):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except Exception:  # noqa: BLE001 - any failure: not a format Pillow knows
        return ".bin"
    by_format = {f: ext for ext, f in reversed(Image.registered_extensions().items())}
    return by_format.get(fmt, ".bin")


def encoded_image(value: Any) -> bytes | None:
    """The bytes of an encoded image file held in a cell (see the module's notes: a
    bytes-like value with a NUL byte or a known signature, or a Hugging Face image with
    bytes); None for any other value."""
    if isinstance(value, dict) and "bytes" in value and set(value) <= {"bytes", "path"}:
        value = value["bytes"]
    if isinstance(value, memoryview):
        value = value.tobytes()
    if not isinstance(value, (bytes, bytearray)):
        return None
    if b"\x00" in value or value.startswith(_NUL_FREE) or (
            value[:4] == b"RIFF" and value[8:12] == b"WEBP"):
        return bytes(value)
    return None


def _hf_path(value: Any) -> str | None:
    """The path of a Hugging Face image cell without bytes (``{"bytes": None, "path": p}``)."""
    if (isinstance(value, dict) and set(value) == {"bytes", "path"} and value["bytes"] is None
            and isinstance(value["path"], str)):
        return value["path"]
    return None


def is_picture(value: Any) -> bool:
    """True for an in-memory picture that :func:`as_files` writes: a PIL image, or a numpy
    array / torch tensor with 2 or 3 dimensions and bool, integer or float samples."""
    if _is_pil(value):
        return True
    if _is_tensor(value):
        return value.dim() in (2, 3) and not value.is_complex()
    return (isinstance(value, np.ndarray) and value.ndim in (2, 3)
            and (value.dtype == np.bool_ or value.dtype.kind in "iuf"))


def split_batch(value: Any) -> list[Any] | None:
    """The pictures of ``value`` when it is one picture (a list of one) or a batch of them
    (an (N, H, W, C) or (N, C, H, W) array or tensor, as a list of N); None otherwise."""
    if is_picture(value):
        return [value]
    if _is_tensor(value) and value.dim() == 4 and not value.is_complex():
        return list(value.unbind(0))
    if (isinstance(value, np.ndarray) and value.ndim == 4
            and (value.dtype == np.bool_ or value.dtype.kind in "iuf")):
        return list(value)
    return None


def write_picture(value: Any, folder: Path, stem: str) -> str:
    """Write one picture (:func:`is_picture`, or :func:`encoded_image` bytes) losslessly as
    ``folder/stem.<suffix>``; returns the file's path."""
    data = encoded_image(value)
    if data is not None:  # a file's contents: as they are
        path = folder / f"{stem}{_suffix(data)}"
        path.write_bytes(data)
        return str(path)
    if _is_pil(value) and value.mode in _AS_ARRAY_MODES:
        value = np.asarray(value)  # (H, W) or (H, W, 3) uint8: the same pixels, 100x faster
    if _is_pil(value):
        path = folder / f"{stem}{'.png' if value.mode in _PNG_MODES else '.tiff'}"
        # a PNG stored without compression (an RGB one: 2.7x faster to write than at Pillow's
        # default level, benchmarks/README.md); the file lives only as long as the call or fit
        value.save(path, **({"compress_level": 0} if path.suffix == ".png" else {}))
        return str(path)
    if _is_tensor(value):
        import torch

        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
        if value.ndim == 3 and 1 <= min(value.shape[0], value.shape[2]) and max(
                value.shape[0], value.shape[2]) <= _MAX_CHANNELS:
            # torch's layout is (C, H, W): a (3, 100, 2) tensor is a 100 x 2 RGB picture,
            # which a .npy of that shape would not say (arrays: channels last when both fit)
            value = np.moveaxis(value, 0, -1)
    path = folder / f"{stem}.npy"
    np.save(path, np.ascontiguousarray(value), allow_pickle=False)
    return str(path)


def _name_by_content(path: str) -> str:
    """Rename the file at ``path`` after the SHA-256 of its bytes (a second file with the
    same bytes is removed); returns the new path."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:20]
    named = Path(path).with_name(digest + Path(path).suffix)
    if named.exists():  # the same picture twice in the column
        os.unlink(path)
    else:
        os.replace(path, named)
    return str(named)


# file written for a picture in memory -> how a message names it ("<in-memory ndarray>"),
# while the call (or fit) that wrote it runs; keys are unique (each call its own folder)
_SHOWN: dict[str, str] = {}


def shown(path: Any) -> Any:
    """How a message names ``path``: ``<in-memory ndarray>`` (the picture's type) for a file
    written for a picture given in memory, while the call that wrote it runs; else ``path``
    itself."""
    return _SHOWN.get(str(path), path) if _SHOWN else path


@contextlib.contextmanager
def naming(names: dict[str, str]) -> Iterator[None]:
    """Let :func:`shown` name the files ``names`` maps (path -> how messages name it) while
    the block runs."""
    _SHOWN.update(names)
    try:
        yield
    finally:
        for path in names:
            _SHOWN.pop(path, None)


def as_pandas(data: Any) -> Any:
    """``data`` as pandas when it is another library's table: anything but a pandas object
    with a ``to_pandas()`` method (a polars or pyarrow table, a Hugging Face ``datasets``
    split, whose images then arrive as ``{"bytes": ..., "path": ...}`` cells); anything
    else is given back as it is.

    Raises
    ------
    DataValidationError
        ``to_pandas()`` fails, or gives something other than a DataFrame or a Series.
    """
    if isinstance(data, (pd.DataFrame, pd.Series, pd.Index)):
        return data
    convert = getattr(data, "to_pandas", None)
    if not callable(convert):
        return data
    kind = f"{type(data).__module__.split('.')[0]}.{type(data).__name__}"
    try:
        frame = convert()
    except Exception as exc:  # noqa: BLE001 - any library's failure, named for the user
        raise DataValidationError(
            f"cannot read the {kind} as a table: its to_pandas() failed ({exc}); pass a "
            "pandas DataFrame") from exc
    if not isinstance(frame, (pd.DataFrame, pd.Series)):
        raise DataValidationError(
            f"the {kind}'s to_pandas() gave a {type(frame).__name__}, not a pandas "
            "DataFrame; pass a pandas DataFrame")
    return frame


@contextlib.contextmanager
def as_files(data: Any, columns: Sequence[str], *, by_content: bool = False,
             written: dict[str, str] | None = None) -> Iterator[Any]:
    """``data`` with the in-memory pictures of ``columns`` written to temporary files.

    Parameters
    ----------
    data : DataFrame or any
        Anything but a DataFrame, or a DataFrame without such cells, is given back as it
        is (and nothing is written).
    columns : sequence of str
        The columns to look in (those absent from ``data`` are skipped).
    by_content : bool, default False
        Name each file after its bytes instead of its row's position.
    written : dict, optional
        Filled with ``{temporary path: "<folder>/<file name>"}`` for every file written,
        the name relative to the temporary folder (to keep the files elsewhere).

    Yields
    ------
    DataFrame or any
        A copy of the frame in which each picture cell (:func:`is_picture`) is the path of
        its file; the files are removed when the block ends.

    Raises
    ------
    DataValidationError
        A picture that cannot be written (the message names its row and column).
    """
    data = as_pandas(data)
    if not isinstance(data, pd.DataFrame):
        yield data
        return
    refuse_repeated_columns(data, columns)
    cols = [c for c in columns if c in data.columns]
    cells = [(c, pos) for c in cols for pos, v in enumerate(data[c].tolist())
             if is_picture(v) or encoded_image(v) is not None]
    for col in cols:  # Hugging Face images without bytes: their paths
        values = data[col].tolist()
        found = [_hf_path(v) for v in values]
        if any(p is not None for p in found):
            data = data.copy()
            data[col] = pd.Series([v if p is None else p for v, p in zip(values, found)],
                                  index=data.index, dtype=object)
    if not cells:
        yield data
        return
    width = max(5, len(str(len(data) - 1)))
    stems = data.attrs.get("stems")  # the files' names, where the frame gives them
    names: dict[str, str] = {}  # temporary file -> how an error names it
    # named so that a warning naming a file says what it is: <tmp>/automask-in-memory-.../
    # <k>-<column>/<row position>.npy (k: the column's place, which keeps folders apart)
    with tempfile.TemporaryDirectory(prefix="automask-in-memory-") as tmp:
        frame = data.copy()
        index = list(frame.index)
        for k, col in enumerate(cols):  # one sub-folder per column: image and mask stems match
            plain = isinstance(col, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", col)
            folder = Path(tmp) / (f"{k}-{col}" if plain else str(k))
            values = frame[col].tolist()
            wrote = False
            for c, pos in cells:
                if c != col:
                    continue
                folder.mkdir(exist_ok=True)
                what = type(values[pos]).__name__
                try:
                    stem = stems[pos] if stems is not None else f"{pos:0{width}d}"
                    values[pos] = write_picture(values[pos], folder, stem)
                    if by_content:
                        values[pos] = _name_by_content(values[pos])
                    names[values[pos]] = f"<in-memory {what}>"
                    if written is not None:
                        written[values[pos]] = f"{folder.name}/{Path(values[pos]).name}"
                # RuntimeError: a tensor without data (on the meta device)
                except (OSError, ValueError, TypeError, RuntimeError) as exc:
                    raise DataValidationError(
                        f"row {index[pos]!r}, column {col!r}: cannot keep this in-memory "
                        f"{type(data[col].iloc[pos]).__name__} as a file ({exc})") from exc
                wrote = True
            if wrote:
                frame[col] = pd.Series(values, index=frame.index, dtype=object)
        try:
            with naming(names):
                yield frame
        except AutomaskError as exc:
            text = str(exc.args[0]) if len(exc.args) == 1 else None
            if text is None or tmp not in text:
                raise
            for path in sorted(names, key=len, reverse=True):
                text = text.replace(path, names[path])
            raise type(exc)(text) from exc
