"""Check a DataFrame of image/mask paths before anything is trained, and describe it.

:func:`validate_frame` decodes every image and every mask once (see
:func:`~automask.data.io.check_decodes`: a JPEG cut short is caught even when its end
marker was added back),
collects *every* problem it finds (missing columns, empty frame, NaN paths, missing,
unreadable or truncated files, image/mask size mismatches, mask values that fit neither
task) and raises one :class:`~automask.errors.DataValidationError` listing them with row
index and path. On success it returns a :class:`DataSpec`: the frame with absolute paths,
the detected task and class count, and per-row statistics (size, mask kind, foreground
fraction) that the data module reuses for stratified splitting.

Task detection
--------------
Each mask's set of values (after ``color_map``; ``void_label`` pixels excluded) is one of

* ``b01``  - a subset of {0, 1};
* ``b255`` - a subset of {0, 255} containing 255 (255 = foreground);
* ``soft`` - an anti-aliased or JPEG-compressed binary mask: values 128-254 present (or
  a JPEG file), at least 90% of the pixels within 31 of 0 or 255, and some pixels near
  255 (with ``num_classes=2``: values 128-254 present, or a JPEG file with values above
  128, however many pixels lie between); also a JPEG mask of values within 31 of 0 only
  (no object, compression noise) when other masks of the data are binary 0/255. It is
  binarised at ``> 128``, the convention of PySODMetrics and the salient/camouflaged
  object literature, with a warning (also with ``num_classes=2``);
* ``ids``  - anything else: class ids, with 255 = ignore.

Without ``num_classes`` the task is binary when every mask is ``b01``, ``b255`` or
``soft``; otherwise it is multi-class with ``K = max class id + 1``. Two patterns are
reported as "fits neither task" rather than guessed: 0/255 binary masks mixed with
class-id masks, and masks holding values 128-254 that do not look like a soft binary
mask (nor like class ids below 128). Passing ``num_classes`` (or ``class_names``)
accepts any id below ``K``. With ``K = 2`` the task is binary: 255 is foreground in
``b255`` masks and ignore otherwise.
With ``K > 2`` a 255 is always the ignore index, so masks that hold nothing but 0 and
255 (binary masks given to a K-class task: every foreground pixel would be ignored, and
a multi-class model would be scored on background alone) are an error naming the rows.

Training data that can be used but probably is not what was meant (repeated images,
tuning images that are also training images, empty binary masks) is reported by
:func:`warn_training_issues`, which the data module calls before training.
"""
from __future__ import annotations

import contextlib

import math
import os
import re
import threading
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataValidationError
from .arrays import refuse_repeated_columns, shown
from .io import (
    _SWAPPING_ORIENTATIONS,
    ColorMap,
    NotOnePicture,
    _orientation,
    check_decodes,
    image_size,
    is_value_map,
    read_mask,
    reading_error,
    stacked_images,
)
from .transforms import IGNORE_INDEX

KIND_B01 = "b01"
KIND_B255 = "b255"
KIND_IDS = "ids"
KIND_SOFT = "soft"
SOFT_THRESHOLD = 128  # soft masks: foreground is value > 128
_ANTIALIAS_LOW = 128  # values 128..254 in a mask look like a soft/JPEG binary mask
_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")  # always lossy: class ids do not survive
_MASK_MEMO_LIMIT = 50_000


@dataclass
class DataSpec:
    """A validated data set: the frame and what was learned about it.

    Attributes
    ----------
    frame : pandas.DataFrame
        The user's frame (original index kept) with the image and label columns
        replaced by absolute path strings.
    image_col : str
    label_col : str or None
        None when the frame carries no labels (prediction).
    task : {"binary", "multiclass"}
    num_classes : int
        Classes including background; 2 for binary.
    class_names : list of str
    void_label : int or None
        Mask value mapped to IGNORE_INDEX (e.g. 11 for CamVid's "Unlabelled").
    color_map : dict or None
        ``{(r, g, b): class_id}`` used to read colour masks.
    stats : pandas.DataFrame or None
        Per row, aligned by position with ``frame``: ``height``, ``width`` (image size
        after EXIF orientation), and when labelled ``kind`` (b01/b255/ids) and
        ``foreground`` (fraction of labelled pixels that are not background); for
        multi-class tasks also ``classes``, the tuple of class ids the mask labels; with a
        ``void_label`` also ``void``, the fraction of the mask's pixels that hold it.
    """

    frame: pd.DataFrame
    image_col: str
    label_col: str | None
    task: str
    num_classes: int
    class_names: list[str]
    void_label: int | None = None
    color_map: ColorMap | None = None
    stats: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def num_outputs(self) -> int:
        """Model output channels: 1 for binary (sigmoid), ``num_classes`` otherwise."""
        return 1 if self.task == "binary" else self.num_classes

    def __len__(self) -> int:
        return len(self.frame)

    def subset(self, positions: Sequence[int]) -> "DataSpec":
        """A spec over rows at ``positions`` (original index labels kept)."""
        positions = np.asarray(positions, dtype=np.int64)
        stats = self.stats.iloc[positions] if self.stats is not None else None
        return replace(self, frame=self.frame.iloc[positions], stats=stats)

    def target_lut(self, position: int, mask: np.ndarray | None = None) -> np.ndarray:
        """256-entry lookup table from raw mask values to training targets for one row.

        Targets are class ids (binary: 0/1) with IGNORE_INDEX for ignored pixels. The
        row's kind comes from ``stats``; when absent it is worked out from ``mask``.
        """
        kind = None
        if self.stats is not None and "kind" in self.stats.columns:
            kind = self.stats["kind"].iat[position]
        if kind is None and mask is not None:
            kind = _kind_of(set(np.unique(mask).tolist()) - _void_set(self.void_label))
        return _lut(kind, self.num_classes, self.void_label)


def _same_file(a: str, b: str) -> bool:
    """True where paths ``a`` and ``b`` name one file (the same path, a link to it, or
    another spelling of it on a case-insensitive disk)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # a missing file: reported by the checks that read it
        return False


def _void_set(void_label: int | None) -> set[int]:
    return set() if void_label is None else {int(void_label)}


def _kind_of(values: set[int]) -> str:
    if values <= {0, 1}:
        return KIND_B01
    if values <= {0, 255}:
        return KIND_B255
    return KIND_IDS


_FEW_LEVELS = 16  # at most this many grey levels over all the masks: classes drawn visible
_NEAR_BLACK, _NEAR_WHITE = 32, 224  # soft masks: values below / from these are "near" 0 / 255


def _is_soft_binary(values: np.ndarray, counts: np.ndarray, declared: bool = False) -> bool:
    """Most pixels near 0 or 255 and some near 255: an anti-aliased or JPEG binary mask.
    ``declared`` (``num_classes=2``): any mask with values above the threshold is one
    (a blurred mask, a saliency map), as the caller said the task is binary."""
    if declared:
        return bool(len(values)) and int(values.max()) > SOFT_THRESHOLD
    total = counts.sum()
    near_white = values >= _NEAR_WHITE
    extreme = counts[(values < _NEAR_BLACK) | near_white].sum()
    return bool(total) and extreme >= 0.9 * total and bool(near_white.any())


def _lut(kind: str | None, num_classes: int, void_label: int | None) -> np.ndarray:
    if kind == KIND_SOFT:
        lut = (np.arange(256) > SOFT_THRESHOLD).astype(np.uint8)
        if void_label is not None:
            lut[int(void_label)] = IGNORE_INDEX
        return lut
    lut = np.arange(256, dtype=np.uint8)
    lut[num_classes:] = IGNORE_INDEX  # ids beyond K never reach a loss
    if num_classes == 2 and kind == KIND_B255:
        lut[255] = 1
    if void_label is not None:
        lut[int(void_label)] = IGNORE_INDEX
    return lut


class _Problems:
    """Collects row problems; the message shows the first ``cap`` of them."""

    def __init__(self, cap: int, unique_index: bool = True) -> None:
        self.cap = max(1, int(cap))
        self.unique_index = unique_index  # else each row is also named by its position
        self.items: list[tuple[int, str]] = []  # (position, line)
        self.colour_hint = ""  # the last line when a mask is refused for its colours

    def add(
        self, position: int, index: Any, column: str | None, path: str | None, reason: str
    ) -> None:
        where = f"row {_plain(index)!r}"
        if not self.unique_index:
            where += f" (position {position})"
        if column is not None:
            where += f" [{column}]"
        if path is not None:
            where += f" {path}"
        self.items.append((position, f"{where}: {reason}"))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        items = sorted(self.items, key=lambda item: item[0])
        shown = [line for _, line in items[: self.cap]]
        more = len(items) - len(shown)
        rows = len({pos for pos, _ in items})
        head = f"{len(items)} problem(s) in {rows} row(s) of the data:"
        tail = f"\n  ... and {more} more (raise max_errors to see them)" if more else ""
        if self.colour_hint and any("is a colour (" in line for _, line in items):
            tail += "\n" + self.colour_hint
        raise DataValidationError(head + "\n  " + "\n  ".join(shown) + tail)


_memo: dict[tuple, tuple[tuple[int, int], np.ndarray, np.ndarray]] = {}
_memo_lock = threading.Lock()


def _mask_summary(
    path: str, color_map: ColorMap | None
) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """``((H, W), values, counts)`` of a mask, memoised on path, size and mtime."""
    stat = os.stat(path)
    cmap_key = None if color_map is None else tuple(sorted(color_map.items()))
    key = (path, stat.st_mtime_ns, stat.st_size, cmap_key)
    with _memo_lock:
        hit = _memo.get(key)
    if hit is not None:
        return hit
    mask = read_mask(path, color_map=color_map)
    if mask.dtype == np.uint8:
        counts = np.bincount(mask.ravel(), minlength=256)
        values = np.flatnonzero(counts)
        summary = (mask.shape, values, counts[values])
    else:
        values, counts = np.unique(mask, return_counts=True)
        summary = (mask.shape, values.astype(np.int64), counts)
    with _memo_lock:
        if len(_memo) >= _MASK_MEMO_LIMIT:
            _memo.clear()
        _memo[key] = summary
    return summary


def _raw_path(value: Any) -> str | None:
    """The cell as a path string, or None when it is missing (NaN, None, empty)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):  # a bytes path, as os.fsencode gives it
        value = os.fsdecode(value)
    if not isinstance(value, str):
        try:
            if pd.isna(value):
                return None
        except (TypeError, ValueError):
            pass
        return None if not str(value).strip() else str(value)
    return value if value.strip() else None


_FILES_FIRST = ("validate_frame reads images and masks from files (SemanticSegmentor's fit, "
                "predict, predict_proba, evaluate, leaderboard and plots take them in memory "
                "and write them to files first)")


def _is_missing(value: Any) -> bool:
    """pd.NA, NaT and other missing markers (no path, reported as one missing)."""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _in_memory(value: Any) -> str | None:
    """Why a cell holding an image itself (a numpy array, a tensor, a PIL image, an encoded
    file's bytes, a list of pixels) is no path, or None for any other cell: its text would
    be read as a file name."""
    from .arrays import encoded_image, is_picture

    data = encoded_image(value)
    if data is not None:
        return f"an in-memory encoded image ({len(data)} bytes), not a file path: {_FILES_FIRST}"
    if isinstance(value, (str, bytes, os.PathLike)) or np.isscalar(value) or value is None:
        return None
    if callable(getattr(value, "read", None)):
        return (f"an open {type(value).__name__}, not a file path: pass the file's path, or "
                "its bytes (f.read())")
    shape = getattr(value, "shape", None)
    if shape is None and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        shape = tuple(value.size)[::-1]
    if shape is None and not isinstance(value, (list, tuple, dict)):
        if _is_missing(value):
            return None  # reported as a missing path
        return (f"a value of type {type(value).__name__} ({str(value)[:60]!r}), not a file "
                "path: a cell holds a path (str or pathlib.Path) or an image in memory")
    what = type(value).__name__ + (f" of shape {tuple(shape)}" if shape is not None else "")
    if not is_picture(value):
        return (f"an in-memory {what}, neither a file path nor an image: in memory an image "
                "or a mask is an array or tensor of shape (H, W), (H, W, C) or (C, H, W), "
                "a PIL image, or the bytes of an image file")
    return f"an in-memory {what}, not a file path: {_FILES_FIRST}"


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")  # http://, s3://, gs://, file://...
_URL_REASON = ("a URL, not a file path: automask reads local files only; download the files "
               "first (for file:// give the path itself)")


def _is_url(raw: str) -> bool:
    """True for ``scheme://...`` (two letters or more, so that ``C:/`` stays a path)."""
    return _URL.match(raw.strip()) is not None


def refuse_url(value: Any, what: str, error: type[Exception] = DataValidationError, *,
               writing: bool = False) -> None:
    """``error`` naming ``what`` when ``value`` (a path given as a str) is a URL
    (``s3://bucket/x``, ``file:///tmp/x``), which ``pathlib`` would turn into a local folder
    ``s3:/bucket/x`` below the working directory; ``writing``: an output's path."""
    if isinstance(value, str) and _is_url(value):
        reason = ("a URL, not a file path: automask writes local files only; write them "
                  "here, then upload them (for file:// give the path itself)"
                  if writing else _URL_REASON)
        raise error(f"{what} {value!r} is {reason}")


def _resolve(raw: str, root: Path) -> str:
    """``raw`` as an absolute path (relative ones against ``root``). A path written on
    Windows (``images\\a.png``) that names no file here, where ``\\`` is no separator but
    names one with ``/`` in its place, is that file."""
    path = os.path.abspath(root / Path(raw).expanduser())  # an absolute raw stays itself
    if os.sep == "/" and "\\" in raw and not os.path.exists(path):
        posix = os.path.abspath(root / Path(raw.replace("\\", "/")).expanduser())
        if os.path.exists(posix):
            return posix
    if not os.path.exists(path) and not raw.isascii():
        # 'café.png' composed in the table, decomposed on disk (a copy from macOS), or the
        # other way round: the same name to a reader, another to the file system
        for form in ("NFC", "NFD"):
            other = unicodedata.normalize(form, path)
            if other != path and os.path.exists(other):
                return other
    return path


def _number_not_path(value: Any, path: str, role: str) -> str | None:
    """Why a number cell (``0``, ``3.0``, ``True``) names no file, or None for any other
    cell and for a number that is a file's name: a value per image, as an image-classification
    table holds, where a path to a picture belongs. ``role``: "image" or "label"."""
    if isinstance(value, str) or not isinstance(value, (int, float, np.number, np.bool_)):
        return None
    if os.path.exists(path):
        return None
    need = ("the path of a mask file (a mask's pixels are the class ids)" if role == "label"
            else "the path of an image file")
    return (f"a number ({value}), not a path: the column holds a value per image, as an "
            f"image-classification table does; each row needs {need}")


def _not_found(path: str) -> str:
    """The reason for a missing file, naming white space at either end of its name."""
    name = os.path.basename(path)
    if name != name.strip():
        return f"file not found ({name!r} starts or ends with white space)"
    return "file not found"


def _check_image(path: str) -> tuple[tuple[int, int] | None, str | None]:
    """(size, reason): size from the header, then a full decode of one image file."""
    if not os.path.exists(path):
        return None, _not_found(path)
    if not os.path.isfile(path):
        return None, "not a file"
    try:
        size = image_size(path)
    except UnidentifiedImageError:
        return None, _unreadable(path)
    except Image.DecompressionBombError as exc:
        return None, _too_large(exc)
    except (OSError, ValueError) as exc:
        return None, f"unreadable image ({reading_error(exc, path)})"
    if size[0] < 1 or size[1] < 1:
        return None, f"image has an empty size {size}"
    try:
        check_decodes(path)  # a cut-off file whose end marker was added back fails here
    except Image.DecompressionBombError as exc:
        return None, _too_large(exc)
    except NotOnePicture as exc:  # decodes, but holds several pictures' worth of samples
        return None, f"unreadable image ({reading_error(exc, path)})"
    except (OSError, ValueError, SyntaxError) as exc:
        return None, f"truncated or corrupt file ({reading_error(exc, path)})"
    return size, None


def _unreadable(path) -> str:
    """Why Pillow could not identify ``path``: an empty file (an interrupted copy or
    download) and the volume formats of medical imaging and science (DICOM, NIfTI, ...)
    are named as such, with what to do."""
    with contextlib.suppress(OSError):  # unreadable size: the general reason
        if os.path.getsize(path) == 0:
            return "an empty file (0 bytes): an interrupted copy or download?"
    kind = _other_format(path)
    if kind is None:
        return "not an image Pillow can read"
    return (f"a {kind} file, which automask does not read: it reads 2-D images (PNG, JPEG, "
            "TIFF, BMP, ...) and .npy arrays; save each 2-D image or slice as a PNG or TIFF "
            "file or a .npy array (16 bits or floats keep an image's intensities; "
            "data.image_range sets one window for all of them, e.g. '-1000,400' for CT) "
            "and give those paths")


# (name, file name endings, test of the file's first bytes), in the order tried
_OTHER_FORMATS = (
    ("DICOM", (".dcm", ".dicom"), lambda head: head[128:132] == b"DICM"),
    ("NIfTI", (".nii", ".nii.gz", ".hdr", ".img"),
     lambda head: head[344:348] in (b"n+1\0", b"ni1\0")),
    ("NRRD", (".nrrd", ".nhdr"), lambda head: head.startswith(b"NRRD")),
    ("MetaImage", (".mha", ".mhd"),
     lambda head: head.lstrip().startswith((b"ObjectType", b"NDims"))),
    ("HDF5", (".h5", ".hdf5"), lambda head: head.startswith(b"\x89HDF\r\n\x1a\n")),
)


def _other_format(path) -> str | None:
    """The name of a known non-image format ``path`` holds (by its first bytes, gzip
    opened, else by its name), or None."""
    import gzip

    head = b""
    with contextlib.suppress(OSError, EOFError, ValueError):
        with open(path, "rb") as fh:
            head = fh.read(352)
        if head.startswith(b"\x1f\x8b"):  # gzip: a .nii.gz, most often
            with gzip.open(path, "rb") as fh:
                head = fh.read(352)
    for name, _, test in _OTHER_FORMATS:
        if test(head):
            return name
    lower = str(path).lower()
    for name, endings, _ in _OTHER_FORMATS:
        if lower.endswith(endings):
            return name
    return None


def _too_large(exc: Exception) -> str:
    """Why an image over Pillow's decompression-bomb limit was refused, and the way out."""
    return (f"larger than Pillow allows by default ({exc}); for a large image of your own "
            "(an aerial or slide scan), lift the limit before reading it (fit, predict or "
            "evaluate): "
            "PIL.Image.MAX_IMAGE_PIXELS = None (or a larger number of pixels)")


def _rotation_hint(image_path: str, shape: Sequence[int], size: Sequence[int]) -> str:
    """Why a mask may be the image's size turned by 90 degrees: the image's EXIF tag."""
    if tuple(shape) != (size[1], size[0]):
        return ""
    try:
        with Image.open(image_path) as img:
            orientation = _orientation(img)
    except Exception:  # the image was read a moment ago; a hint is not worth failing over
        return ""
    if orientation not in _SWAPPING_ORIENTATIONS:
        return ""
    return (f" after the EXIF orientation tag ({orientation}) of the image turns it by 90 "
            "degrees; the mask must match the image as displayed (rotate the mask, or give "
            "it the same EXIF orientation)")


def _check_mask(path: str, color_map: ColorMap | None) -> tuple[Any, str | None]:
    """(summary, reason): full decode of one mask file."""
    if not os.path.exists(path):
        return None, _not_found(path)
    if not os.path.isfile(path):
        return None, "not a file"
    try:
        return _mask_summary(path, color_map), None
    except DataValidationError as exc:
        return None, str(exc).replace(f"mask {path} ", "mask ")
    except UnidentifiedImageError:
        return None, _unreadable(path)
    except Image.DecompressionBombError as exc:
        return None, _too_large(exc)
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc)
        if "truncated" in reason.lower():
            return None, f"truncated file ({reason})"
        return None, f"unreadable mask ({reason})"


def _whole_number(value: Any) -> int | None:
    """``value`` as an int when it is an integral number (not a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return None
    try:
        if not math.isfinite(float(value)) or int(value) != value:
            return None
    except (TypeError, ValueError, OverflowError):
        return None
    return int(value)


def _check_options(
    num_classes: int | None,
    class_names: Sequence[str] | None,
    void_label: int | None,
    color_map: ColorMap | None,
) -> tuple[int | None, list[str] | None]:
    if class_names is not None:
        if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
            raise ConfigError(f"class_names must be a list of strings, got {class_names!r}")
        class_names = list(class_names)
        blank = [i for i, n in enumerate(class_names) if not n.strip()]
        if blank:
            raise ConfigError(
                f"class_names must name every class; class {blank[0]} of {class_names!r} "
                "has an empty name (it would head an empty column in per-class scores)")
        repeated = sorted({n for n in class_names if class_names.count(n) > 1})
        if repeated:
            raise ConfigError(
                f"class_names must be distinct; {repeated} appear more than once in "
                f"{class_names!r}"
            )
        if num_classes is None:
            num_classes = len(class_names)
        elif len(class_names) != num_classes:
            raise ConfigError(
                f"class_names has {len(class_names)} names but num_classes={num_classes}"
            )
    if num_classes is not None:
        count = _whole_number(num_classes)
        if count is None or not 2 <= count <= 255:
            raise ConfigError(
                "num_classes must be an integer in [2, 255] (background included), "
                f"got {num_classes!r}"
            )
        num_classes = count
    if void_label is not None:
        void = _whole_number(void_label)
        if void is None or not 0 <= void <= 255:
            raise ConfigError(f"void_label must be an integer in [0, 255], got {void_label!r}")
        ids = sorted({int(v) for v in (color_map or {}).values()} - {IGNORE_INDEX}) \
            if isinstance(color_map, Mapping) else []
        if class_names is not None and void == len(class_names) - 1 and ids \
                and ids[-1] > void and _folded(class_names[void]) not in _VOID_NAMES:
            # the names leave the void out (as advised) while the map numbers it among
            # the classes: it lies before the last class, which no name reaches
            raise ConfigError(
                f"void_label={void} lies among the class ids 0..{ids[-1]} that color_map "
                f"gives, before class {ids[-1]}: class ids are kept as they are, so the void "
                f"id must come after the classes (or be 255). "
                f"{_void_in_the_middle(void, ids[-1])}")
        if class_names is not None and void == len(class_names) - 1:
            # e.g. CamVid's classes.txt, whose last name ("Unlabelled", 11) is its void id
            raise ConfigError(
                f"void_label={void} is ignored in training, yet class_names names it as class "
                f"{void} ({class_names[void]!r}): that class could never be learnt; leave its "
                f"name out of class_names (class_names[:{void}])")
        if class_names is not None and void < len(class_names) and color_map is not None:
            raise ConfigError(
                f"void_label={void} is ignored in training, yet class_names names it as class "
                f"{void} ({class_names[void]!r}) of {len(class_names)}, before "
                f"{class_names[void + 1]!r}: class ids are kept as they are, so the void id "
                f"must come after the classes (or be 255). "
                f"{_void_in_the_middle(void, ids[-1] if ids else len(class_names) - 1)} Or "
                f"leave void_label unset if {class_names[void]!r} is a class")
        if class_names is not None and void < len(class_names):
            # leaving the name out would shift the names of the classes after it
            raise ConfigError(
                f"void_label={void} is ignored in training, yet class_names names it as class "
                f"{void} ({class_names[void]!r}) of {len(class_names)}, before "
                f"{class_names[void + 1]!r}: class ids are kept as they are, so the void id "
                f"must come after the classes (or be 255). Renumber the masks as they are "
                f"read: color_map={_renumbering(void, len(class_names))} makes the void "
                "value 255 (always ignored) and the classes after it one lower (automask "
                "fit: --color-map FILE of 'VALUE CLASS_ID' lines); then leave "
                f"void_label unset and {class_names[void]!r} out of class_names. Or leave "
                f"void_label unset if {class_names[void]!r} is a class")
    if color_map is not None:
        check_color_map(color_map)
    return num_classes, class_names


def check_color_map(color_map: Any) -> None:
    """Raise ConfigError unless ``color_map`` is ``{(r, g, b): class id}`` of 8-bit values, or
    a value map ``{value: class id}`` of mask values 0..65535 (not both kinds of key)."""
    if not isinstance(color_map, Mapping):
        raise ConfigError(
            "color_map must be a dict {(r, g, b): class_id, ...} (colour masks) or "
            "{value: class_id, ...} (renumbering grey or palette-index masks), got "
            f"{type(color_map).__name__} {color_map!r}"
        )

    def whole(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    kinds = {"value" if whole(key) else "colour" for key in color_map}
    if len(kinds) > 1:
        raise ConfigError(
            "color_map mixes colours (r, g, b) and mask values as keys: a colour map maps "
            "the colours of colour masks, a value map the values of grey or palette-index "
            "masks; give one kind")
    for key, value in color_map.items():
        if kinds == {"value"}:
            ok_key = 0 <= key <= 65535
        else:
            ok_key = isinstance(key, tuple) and len(key) == 3 and all(
                whole(c) and 0 <= c <= 255 for c in key)
        if not ok_key or not whole(value) or not 0 <= value <= 255:
            raise ConfigError(
                "color_map entries must be (r, g, b) -> class id in [0, 255], or mask value "
                f"in [0, 65535] -> class id in [0, 255], got {key!r}: {value!r}"
            )


TABLE_SUFFIXES = (".csv", ".tsv", ".txt")


def _encoding(path: Path, what: str) -> str:
    """The text encoding of a table of paths: UTF-16 after its byte-order mark (Excel's
    "Unicode Text"); else UTF-8 (a byte-order mark or not) when the bytes decode as it;
    else Windows-1252 (Excel's "CSV (Comma delimited)" on a Western Windows, ``café.png``)
    when they decode as that. Bytes holding a NUL (an image, not text) are left to the parser
    to refuse; text in another encoding is a DataValidationError naming the line."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as exc:
        if b"\x00" in raw:
            return "utf-8"  # binary: the parser's error says it is no text
        try:
            raw.decode("cp1252")
            return "cp1252"
        except UnicodeDecodeError:
            line = raw[:exc.start].count(b"\n") + 1
            raise DataValidationError(
                f"{what} {str(path)!r} is text, but neither UTF-8 nor Windows-1252 (byte "
                f"{raw[exc.start]:#04x} on line {line}); save it as UTF-8 (Excel: 'CSV UTF-8 "
                "(Comma delimited)')") from None


def _separator(path: Path, encoding: str = "utf-8") -> str:
    """The column separator of a table of paths: a tab for ``.tsv``; else ``;`` when the
    header line holds semicolons and no comma (Excel saves "CSV" so where the comma is the
    decimal mark), a tab when it holds tabs and neither (Excel's "Unicode Text" and "Text
    (Tab delimited)"), else ``,``."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    with open(path, encoding=encoding, errors="replace") as fh:
        header = fh.readline()
    if "," in header:
        return ","
    if ";" in header:
        return ";"
    return "\t" if "\t" in header else ","


def read_table(path: Path, what: str = "CSV file", names: list[str] | None = None
               ) -> pd.DataFrame:
    """Read a table of paths: tab-separated when ``path`` ends in ``.tsv``, else comma-separated
    (``.csv``, ``.txt`` or any other suffix), or semicolon-separated when its header line has
    semicolons and no comma, or tab-separated when it has tabs and neither. UTF-8, UTF-16
    with its byte-order mark, and Windows-1252 text are read (:func:`_encoding`). Spaces
    after a separator, and around a header's names, are not part of a name or a path
    (``image, label``). ``what`` names the file in the error raised when it cannot be
    parsed. ``names``: the file has no header line; these are its columns.
    """
    encoding = _encoding(path, what)
    try:
        # skipinitialspace: "image, label" and "a.png, a_mask.png" as written by hand
        frame = pd.read_csv(path, sep=_separator(path, encoding), skipinitialspace=True,
                            header=None if names is not None else "infer", names=names,
                            encoding=encoding)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        hint = ("; it is not text (an image?): a table lists image and mask paths, one row "
                "per image; pair folders of images and masks with "
                "automask.datasets.from_folders (--images/--masks on the command line)"
                if isinstance(exc, UnicodeDecodeError) else "")
        raise DataValidationError(
            f"{what} {str(path)!r} could not be parsed: {exc}{hint}") from exc
    stripped = [c.strip() if isinstance(c, str) else c for c in frame.columns]
    if len(set(stripped)) == len(stripped):  # "image ,label": the header's names, no spaces
        frame.columns = stripped
    return frame


def _read_frame(data: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, (str, os.PathLike)):
        if not os.fspath(data).strip():  # Path("") is the working folder
            raise DataValidationError(f"data must name a CSV file, got {data!r} (an unset "
                                      "environment variable?)")
        path = Path(data)
        if path.is_dir():
            raise DataValidationError(
                f"data {str(path)!r} is a folder, not a CSV file; pair its images and masks with "
                "automask.datasets.from_folders (--images/--masks on the command line)"
            )
        if not path.is_file():
            raise DataValidationError(f"data CSV {path} not found")
        frame = read_table(path, "data CSV")
        if len(frame) == 0:
            raise DataValidationError(f"data CSV {path} has no rows (columns: "
                                      f"{list(frame.columns)})")
        return frame
    raise DataValidationError(
        f"data must be a pandas DataFrame or a CSV path, got {type(data).__name__}"
    )


def _workers(n_rows: int) -> int:
    if n_rows < 16:
        return 1
    return max(1, min(8, (os.cpu_count() or 1) * 2))


def validate_frame(
    data: pd.DataFrame | str | os.PathLike,
    *,
    image_col: str = "image",
    label_col: str = "label",
    root: str | os.PathLike | None = None,
    require_labels: bool = True,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    void_label: int | None = None,
    color_map: ColorMap | None = None,
    max_errors: int = 20,
    fitted: bool = False,
) -> DataSpec:
    """Check every row of ``data`` and describe it, or raise one error listing all problems.

    Parameters
    ----------
    data : DataFrame or path to a CSV file
        One row per sample with an image path column and (for training/evaluation) a
        mask path column.
    image_col, label_col : str
        Column names.
    root : path, optional
        Folder that relative paths are resolved against; default: the working directory.
    require_labels : bool
        True for training/evaluation. False reads the image column only (prediction);
        the spec then has ``label_col=None`` and takes its task from ``num_classes``
        (binary when not given).
    num_classes : int, optional
        Classes including background. Given, it fixes the task (2 = binary) and every
        mask id must lie in ``[0, num_classes)``; this is how labels are checked against
        an already fitted model. Default: detected from the masks (see module notes).
    class_names : list of str, optional
        One name per class; implies ``num_classes`` when that is not given.
    void_label : int, optional
        A mask value that means "not labelled" and is mapped to IGNORE_INDEX (255); use
        11 for CamVid's "Unlabelled" class.
    color_map : dict, optional
        ``{(r, g, b): class_id}`` for colour masks.
    max_errors : int
        How many problems the error message lists (all are counted).
    fitted : bool
        True when ``num_classes`` is a fitted model's (evaluation): a mask id outside it is
        reported as a class the model does not know.

    Returns
    -------
    DataSpec

    Raises
    ------
    DataValidationError
        Naming row index, column, path and reason of every problem found.
    ConfigError
        For inconsistent options (e.g. ``class_names`` and ``num_classes`` disagree).
    """
    named_only = num_classes is None and class_names is not None  # K is len(class_names)
    num_classes, class_names = _check_options(num_classes, class_names, void_label, color_map)
    frame = _read_frame(data)
    if not isinstance(frame.columns, pd.MultiIndex):
        columns = [str(c) for c in frame.columns]
    else:  # pragma: no cover - unusual
        columns = [str(c) for c in frame.columns]
    wanted = [image_col] + ([label_col] if require_labels else [])
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        paths = [c for c in columns if os.path.splitext(c)[1].lower()
                 in Image.registered_extensions()]
        hint = (" (other column names: SemanticSegmentor(image=..., label=...) in Python,"
                " --image/--label on the command line)")
        if paths:  # a list of files without a header: its first row became the column names
            hint = (f"; its column names {paths[:2]} are file paths: the table needs a "
                    f"header line naming its columns, e.g. {','.join(wanted)!r}")
        raise DataValidationError(
            f"missing column(s) {missing}; the data has columns {columns}{hint}")
    refuse_repeated_columns(frame, wanted)
    if len(frame) == 0:
        raise DataValidationError("the data frame is empty: it has no rows")
    root_path = Path(root).expanduser().resolve() if root is not None else Path.cwd()
    use_labels = require_labels
    n_rows = len(frame)
    problems = _Problems(max_errors, unique_index=frame.index.is_unique)
    if color_map is None and getattr(data, "attrs", {}).get("color_map"):
        problems.colour_hint = (
            "from_folders found the colour table of these masks beside them: pass "
            "color_map=df.attrs['color_map'] (fit(df) and automask fit use it by "
            "themselves)")
    index = list(frame.index)
    raw_images = frame[image_col].tolist()
    raw_labels = frame[label_col].tolist() if use_labels else [None] * n_rows

    image_paths: list[str | None] = [None] * n_rows
    label_paths: list[str | None] = [None] * n_rows
    for pos in range(n_rows):
        raw = _raw_path(raw_images[pos])
        held = _in_memory(raw_images[pos])
        if held is not None:
            problems.add(pos, index[pos], image_col, None, held)
        elif raw is None:
            reason = f"missing image path ({raw_images[pos]!r})"
            problems.add(pos, index[pos], image_col, None, reason)
        elif _is_url(raw):
            problems.add(pos, index[pos], image_col, raw, _URL_REASON)
        else:
            image_paths[pos] = _resolve(raw, root_path)
            number = _number_not_path(raw_images[pos], image_paths[pos], "image")
            if number is not None:
                problems.add(pos, index[pos], image_col, None, number)
                image_paths[pos] = None
        if use_labels:
            raw = _raw_path(raw_labels[pos])
            held = _in_memory(raw_labels[pos])
            if held is not None:
                problems.add(pos, index[pos], label_col, None, held)
            elif raw is None:
                reason = f"missing mask path ({raw_labels[pos]!r})"
                problems.add(pos, index[pos], label_col, None, reason)
            elif _is_url(raw):
                problems.add(pos, index[pos], label_col, raw, _URL_REASON)
            else:
                label_paths[pos] = _resolve(raw, root_path)
                number = _number_not_path(raw_labels[pos], label_paths[pos], "label")
                if number is not None:
                    problems.add(pos, index[pos], label_col, None, number)
                    label_paths[pos] = None
                elif image_paths[pos] is not None and _same_file(image_paths[pos],
                                                                 label_paths[pos]):
                    problems.add(pos, index[pos], label_col, label_paths[pos],
                                 f"the mask is the row's image file itself ({image_col!r} "
                                 "names the same file): the label column must name the "
                                 "mask, a separate file")
                    label_paths[pos] = None

    # (position, column, path) -> full-size images in the file (TIFF stacks)
    stacks: dict[tuple[int, str, str], int] = {}

    def check(pos: int) -> tuple[Any, Any]:
        img = _check_image(image_paths[pos]) if image_paths[pos] is not None else (None, None)
        if img[0] is not None:
            depth = stacked_images(image_paths[pos])
            if depth > 1:
                stacks[(pos, image_col, image_paths[pos])] = depth
        lbl = (
            _check_mask(label_paths[pos], color_map)
            if use_labels and label_paths[pos] is not None
            else (None, None)
        )
        if lbl[0] is not None:  # a mask stack: one page per class or slice, the first read
            depth = stacked_images(label_paths[pos])
            if depth > 1:
                stacks[(pos, label_col, label_paths[pos])] = depth
        return img, lbl

    workers = _workers(n_rows)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(check, range(n_rows)))
    else:
        results = [check(pos) for pos in range(n_rows)]

    heights = np.zeros(n_rows, dtype=np.int64)
    widths = np.zeros(n_rows, dtype=np.int64)
    summaries: list[Any] = [None] * n_rows
    for pos, ((size, img_reason), (summary, lbl_reason)) in enumerate(results):
        if img_reason is not None:
            problems.add(pos, index[pos], image_col, image_paths[pos], img_reason)
        if lbl_reason is not None:
            if fitted and ", or pass color_map=" in lbl_reason and (
                    color_map is None or not any(isinstance(k, tuple) for k in color_map)):
                # a fitted model's map is fixed at fit: evaluate takes none
                lbl_reason = lbl_reason.split(", or pass color_map=")[0] + (
                    "; the model was fit on masks without a colour map, so these must hold "
                    "the class ids it was fit on" if color_map is None else
                    "; the model was fit on grey masks through a value map, so these must "
                    "hold the values it was fit on")
            problems.add(pos, index[pos], label_col, label_paths[pos], lbl_reason)
        if size is not None:
            heights[pos], widths[pos] = size
        if summary is not None:
            shape, values, _ = summary
            if size is not None and tuple(shape) != tuple(size):
                problems.add(
                    pos, index[pos], label_col, label_paths[pos],
                    f"mask is {shape[0]}x{shape[1]} (HxW) but image {image_paths[pos]} is "
                    f"{size[0]}x{size[1]}" + _rotation_hint(image_paths[pos], shape, size),
                )
                continue
            if values.size and (values.min() < 0 or values.max() > 255):
                low, high = int(values.min()), int(values.max())
                if low < 0:  # -1 as PyTorch's ignore_index: no value map takes it
                    way = ("negative values (-1 as an ignore index?) cannot be renumbered: "
                           "write the masks with 255 for ignored pixels")
                else:
                    way = ("pass a value map that renumbers them, color_map={value: class_id"
                           f", ...}} ({high}: 255 for an ignore value), or --color-map FILE")
                problems.add(
                    pos, index[pos], label_col, label_paths[pos],
                    f"mask values must lie in 0-255, found {low}..{high}; {way}",
                )
                continue
            summaries[pos] = summary

    if stacks:
        first = sorted(stacks, key=lambda key: (key[0], key[1] != image_col))[:5]
        warnings.warn(
            f"{len(stacks)} image or mask file(s) hold a stack of images (TIFF pages of one "
            "size, GIF frames), of which only the first is read: "
            + "; ".join(f"row {_plain(index[pos])!r} [{col}] {shown(path)} "
                        f"({stacks[pos, col, path]} images)" for pos, col, path in first)
            + ("; ..." if len(stacks) > len(first) else "")
            + ". Give a stack's pages as rows (automask.data.read_stack(path) reads them; "
            "from_folders does so for an image stack paired with a mask stack of as many "
            "pages) or save each in a file of its own; save the channels of one image as "
            "the samples of one page, and a mask as one page of class ids",
            stacklevel=2)
    task, k, kinds = "binary", num_classes or 2, [None] * n_rows
    if use_labels:
        task, k, kinds = _detect_task(
            summaries, index, label_paths, label_col, num_classes, void_label, problems,
            named_only=named_only, fitted=fitted,
        )
        _check_some_pixel_labelled(summaries, kinds, k, void_label, index, label_paths,
                                   label_col, problems)
    problems.raise_if_any()
    if use_labels and void_label is not None and int(void_label) < k:
        raise ConfigError(_void_among_classes(int(void_label), task, k, color_map))
    if use_labels and void_label is not None and task == "binary":
        _refuse_void_as_the_objects(summaries, int(void_label))

    if class_names is None:
        class_names = (
            ["background", "foreground"] if k == 2 else [f"class_{i}" for i in range(k)]
        )
    out = frame.copy()
    out[image_col] = image_paths
    stats = pd.DataFrame({"height": heights, "width": widths}, index=frame.index)
    if use_labels:
        out[label_col] = label_paths
        stats["kind"] = kinds
        stats["foreground"] = [
            _foreground_fraction(summaries[pos], kinds[pos], k, void_label) for pos in range(n_rows)
        ]
        stats["labelled"] = [  # the holdout split leaves masks without one in training
            _labelled_fraction(summaries[pos], kinds[pos], k, void_label) for pos in range(n_rows)
        ]
        if void_label is not None:  # fraction of each mask's pixels equal to void_label
            stats["void"] = [
                _value_fraction(summaries[pos], void_label) for pos in range(n_rows)
            ]
        if task == "multiclass":  # the holdout split keeps a class seen in one image trained
            stats["classes"] = [
                _classes_present(summaries[pos], kinds[pos], k, void_label)
                for pos in range(n_rows)
            ]
    return DataSpec(
        frame=out,
        image_col=image_col,
        label_col=label_col if use_labels else None,
        task=task,
        num_classes=k,
        class_names=list(class_names),
        void_label=None if void_label is None else int(void_label),
        color_map=dict(color_map) if color_map is not None else None,
        stats=stats,
    )


def _refuse_void_as_the_objects(summaries: list[Any], void: int) -> None:
    """ConfigError when binary masks hold only 0 and ``void``: there ``void`` marks the
    objects (0/255 masks with ``void_label=255``), and ignoring it would leave every mask
    background only, a fit that learns nothing (it ran, with a warning that the masks were
    empty)."""
    held = [{int(v) for v in summary[1]} for summary in summaries if summary is not None]
    if held and any(void in values for values in held) \
            and all(values - {void} <= {0} for values in held):
        raise ConfigError(
            f"void_label={void} leaves no object in any mask: the masks hold only 0 and "
            f"{void}, so {void} marks their objects (binary 0/{void} masks), and ignoring it "
            "would train on background alone; leave void_label unset (a void value goes "
            "beside the objects' own value, e.g. 255 in 0/1 masks)")


def _void_among_classes(void: int, task: str, k: int, color_map: Any = None) -> str:
    """Why a ``void_label`` that is one of the task's class ids cannot be used, and the fix
    (masks read through a ``color_map``: in the map, not in the masks).

    Class ids are kept as they are (the void value is only ignored), so such a value would
    be a class the model has an output for but never learns, and could still predict.
    """
    if task == "binary":
        side = "background" if void == 0 else "foreground"
        return (f"void_label={void} is a class of binary masks (0 background, 1 foreground): "
                f"every {side} pixel would be ignored and the model would learn the other "
                "class only; leave void_label unset, or use a value the masks keep for "
                "unlabelled pixels (255 beside {0, 1})")
    never = (f"ids are kept as they are, so class {void} would be an output the model never "
             "learns, yet could predict")
    if color_map is not None and not is_value_map(color_map):
        return (f"void_label={void} lies among the class ids 0..{k - 1} that color_map gives "
                f"the colours: {never}. Give the void colour the id 255 "
                "in color_map (or the last id, with void_label set to it) and number the "
                f"classes 0..{k - 2} (a class_dict.csv: move the void row last), or leave "
                f"void_label unset if {void} is a class")
    if color_map is not None:
        return (f"void_label={void} lies among the class ids 0..{k - 1} that color_map gives "
                f"the mask values: {never}. Give the void value the id 255 in color_map "
                f"(always ignored; leave void_label unset) and number the classes "
                f"0..{k - 2}, or leave void_label unset if {void} is a class")
    return (f"void_label={void} lies among the class ids 0..{k - 1} of these masks: {never}. "
            "Renumber the masks as they are read: color_map="
            f"{_renumbering(void, k)} makes the void value 255 (always ignored) and the "
            f"classes 0..{k - 2} (automask fit: --color-map FILE of 'VALUE CLASS_ID' lines); "
            "then leave void_label unset and give class_names without the void's name. Or "
            f"leave void_label unset if {void} is a class")


def _void_in_the_middle(void: int, last: int) -> str:
    """The fix for a void id among the class ids 0..``last`` that a colour (or value) map
    gives."""
    return ("Give the void 255 (always ignored) and the classes after it one id less, in "
            f"the map: color_map={{key: 255 if i == {void} else i - (i > {void}) for key, "
            "i in color_map.items()} (color_map: the map given, or the one read from the "
            "class_dict.csv, automask.datasets.read_color_map(path)[0]); then leave "
            "void_label unset and give class_names without the void's name. Or move the "
            f"void row last and pass void_label={last}, its id there (a class_dict.csv with "
            f"the row moved, on the command line: --void-label {last})")


def _renumbering(void: int, k: int) -> str:
    """The value map, as Python, that makes mask value ``void`` (one of ``0..k-1``) 255 and
    numbers the other values ``0..k-2`` in their order."""
    if void == 0:
        return "{0: 255, **{v: v - 1 for v in range(1, %d)}}" % k
    return "{**{v: v - (v > %d) for v in range(%d)}, %d: 255}" % (void, k, void)


def duplicate_images(spec: DataSpec) -> list[list[int]]:
    """Groups of row positions that share one image file, each of two rows or more.

    Paths are compared after resolving symbolic links; files with equal content under
    different names are not detected.

    Returns
    -------
    list of list of int
        Positions (into ``spec.frame``), in order of first occurrence.
    """
    groups: dict[str, list[int]] = {}
    for pos, path in enumerate(spec.frame[spec.image_col]):
        groups.setdefault(image_key(path), []).append(pos)
    return [rows for rows in groups.values() if len(rows) > 1]


def image_key(path: str | os.PathLike) -> str:
    """The same string for every path of one file (how a repeated image is told): its
    device and inode, so that hard links are one file too; for a path that cannot be
    read, the path with ``~`` expanded, links and ``..`` resolved and case folded where
    the file system folds it."""
    resolved = os.path.normcase(os.path.realpath(os.path.expanduser(str(path))))
    try:
        info = os.stat(resolved)
    except (OSError, ValueError):
        return resolved
    return f"inode:{info.st_dev}:{info.st_ino}"


def repeated_images(spec: DataSpec) -> tuple[int, int, str] | None:
    """For rows that repeat an image of another row (:func:`duplicate_images`): how many
    rows repeat one, how many images appear more than once, and up to three examples
    (``"rows 0, 4 (a.png); ..."``); None when no image repeats."""
    groups = duplicate_images(spec)
    if not groups:
        return None
    examples = "; ".join(
        f"rows {_rows_text(spec, rows, 3)} ({shown(spec.frame[spec.image_col].iat[rows[0]])})"
        for rows in groups[:3]
    )
    return sum(len(rows) - 1 for rows in groups), len(groups), examples


def _plain(label: Any) -> Any:
    """A numpy scalar index label as its Python value (``0``, not ``np.int64(0)``)."""
    return label.item() if isinstance(label, np.generic) else label


def _rows_text(spec: DataSpec, positions: Sequence[int], limit: int = 5) -> str:
    index = spec.frame.index
    shown = ", ".join(repr(_plain(index[pos])) for pos in positions[:limit])
    return shown + (f", ... ({len(positions)} in all)" if len(positions) > limit else "")


def warn_training_issues(spec: DataSpec, tuning_spec: DataSpec | None = None) -> list[str]:
    """Warn about training data that can be used but probably is not what was meant.

    Called before training (by the data module). Seven checks, each one warning that
    names a few rows or values where it can:

    * rows that repeat an image of another row (the holdout split keeps all rows of an
      image on one side);
    * tuning rows whose image is also a training image (validation scores then flatter);
    * binary masks with no foreground pixel (how many; when all are empty the model can
      only learn to predict background);
    * binary masks whose foreground is most of every mask (the object marked with 0?),
      with the value map that reads them inverted;
    * a ``void_label`` that no training mask holds (a wrong value ignores nothing);
    * multi-class ids that label no pixel of any training mask: the model has an output for
      each but cannot learn it. When most ids are missing (``{0, 38}`` read as 39 classes,
      since K is the largest id + 1), the masks probably hold labels rather than class
      ids, and the warning gives the ``color_map`` that maps them to ``0..n-1``;
    * without ``void_label``, a class named as datasets name unlabelled pixels
      (``"Unlabelled"``, ``"void"``, ``"ignore"``): it would be learnt as a class.

    Returns
    -------
    list of str
        The warning messages, also issued with :func:`warnings.warn`.
    """
    messages: list[str] = []
    repeated = repeated_images(spec)
    if repeated:
        extra, groups, examples = repeated
        messages.append(
            f"{extra} training row(s) repeat the image of another row ({groups} image(s) "
            f"appear more than once), e.g. {examples}; a holdout split keeps every row of "
            "an image on one side"
        )
    if tuning_spec is not None:
        train_images = {image_key(p) for p in spec.frame[spec.image_col]}
        shared = [pos for pos, p in enumerate(tuning_spec.frame[tuning_spec.image_col])
                  if image_key(p) in train_images]
        if shared:
            messages.append(
                f"{len(shared)} of the {len(tuning_spec)} tuning row(s) use an image that is "
                f"also in the training data (tuning rows {_rows_text(tuning_spec, shared)}); "
                "validation scores will look better than they are"
            )
    if spec.task == "binary" and spec.stats is not None and "foreground" in spec.stats.columns:
        empty = np.flatnonzero(spec.stats["foreground"].to_numpy(dtype=np.float64) == 0.0)
        if len(empty) == len(spec):
            messages.append(
                f"all {len(spec)} training masks are empty (no foreground pixel, rows "
                f"{_rows_text(spec, empty.tolist())}): the model can only learn to predict "
                "background; check that the masks are the right files"
            )
        elif len(empty):
            messages.append(
                f"{len(empty)} of the {len(spec)} training masks are empty (no foreground "
                f"pixel, rows {_rows_text(spec, empty.tolist())}); fine for images without "
                "the object, otherwise check those mask files"
            )
        inverted = _mostly_foreground(spec)
        if inverted:
            messages.append(inverted)
    if spec.void_label is not None and spec.stats is not None and "void" in spec.stats.columns \
            and not (spec.stats["void"].to_numpy(dtype=np.float64) > 0).any():
        messages.append(
            f"void_label={spec.void_label} marks no pixel of any training mask: nothing is "
            "ignored; check the value (CamVid's void is 11; 255 is common for 0/1 masks)"
        )
    unlearnt = _classes_without_pixels(spec)
    if unlearnt:
        messages.append(unlearnt)
    void_named = _class_named_as_void(spec)
    if void_named:
        messages.append(void_named)
    for message in messages:
        warnings.warn(message, stacklevel=2)
    return messages


_MOSTLY_FOREGROUND = 0.7  # mean foreground fraction of binary masks that suggests inversion


def _mostly_foreground(spec: DataSpec) -> str | None:
    """The warning for binary masks whose foreground is most of every mask (on average more
    than :data:`_MOSTLY_FOREGROUND`, in each more than half), or None.

    An object is usually the smaller part of an image; masks that mark it with 0 (ISBI
    2012's membranes, 0 between cells of 255) train the model on the background, and the
    S-measure, E-measure and BER score the wrong side.
    """
    labelled = spec.stats["foreground"].to_numpy(dtype=np.float64)
    labelled = labelled[np.isfinite(labelled)]
    if not len(labelled) or labelled.mean() <= _MOSTLY_FOREGROUND or labelled.min() <= 0.5:
        return None
    kinds = set(spec.stats["kind"]) if "kind" in spec.stats.columns else set()
    if kinds == {KIND_B255}:
        fix = "read them inverted with color_map={0: 1, 255: 0}"
    elif kinds == {KIND_B01}:
        fix = "read them inverted with color_map={0: 1, 1: 0, 255: 255}"
    else:
        fix = "invert them (foreground where the mask is background now)"
    return (f"the foreground covers {labelled.mean():.0%} of the training masks' labelled "
            f"pixels on average (at least {labelled.min():.0%} in each): the object is "
            "usually the smaller part, and the model learns to segment the foreground; if "
            "the masks mark the object with 0 (ISBI 2012's membranes between cells of 255), "
            f"{fix}")


# Names datasets give the label of unlabelled pixels (CamVid's "Unlabelled", Cityscapes'
# "unlabeled", ADE20K's "other"... not the last: it can be a class), folded as by _folded.
_VOID_NAMES = frozenset({"void", "unlabelled", "unlabeled", "ignore", "ignored", "dontcare",
                         "donotcare", "unknown", "undefined", "nolabel", "notlabelled",
                         "notlabeled", "unclassified", "nodata", "invalid"})


def _folded(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def _class_named_as_void(spec: DataSpec) -> str | None:
    """The warning for a multi-class fit without ``void_label`` whose class names call a
    class what datasets call their unlabelled pixels (``"Unlabelled"``, ``"void"``), or
    None: its pixels are then learnt as a class, and scored as one."""
    if spec.task != "multiclass" or spec.void_label is not None:
        return None
    named = [(c, name) for c, name in enumerate(spec.class_names)
             if _folded(name) in _VOID_NAMES]
    if not named:
        return None
    c, name = named[0]
    said = (f"class {c} is named {name!r}, as datasets name the pixels they leave "
            "unlabelled: it is learnt and scored as a class. If it marks no class, ")
    if c < spec.num_classes - 1:  # before other classes: ignoring it needs new ids
        fix = (_void_in_the_middle(c, spec.num_classes - 1) if spec.color_map is not None else
               f"renumber the masks as they are read: color_map="
               f"{_renumbering(c, spec.num_classes)} makes it 255 (always ignored) and the "
               f"classes after it one lower; then give class_names without {name!r}")
        return said + fix[0].lower() + fix[1:]
    return (said + "ignore its pixels in training and scoring with hyperparameters="
            f"{{'data.void_label': {c}}} and class_names without {name!r} (automask fit "
            f"--void-label {c})")


def _id_ranges(ids: Sequence[int], limit: int = 8) -> str:
    """Sorted ids as runs: ``[1, 2, 3, 7]`` -> ``"1-3, 7"`` (at most ``limit`` runs shown)."""
    runs: list[list[int]] = []
    for value in ids:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:limit])
    return text + (", ..." if len(runs) > limit else "")


def _classes_without_pixels(spec: DataSpec) -> str | None:
    """The warning for multi-class ids that no training mask labels, or None."""
    if spec.task != "multiclass" or spec.stats is None or "classes" not in spec.stats.columns:
        return None
    present = sorted(set().union(*(set(c) for c in spec.stats["classes"])))
    missing = sorted(set(range(spec.num_classes)) - set(present) - _void_set(spec.void_label))
    if not missing or not present:
        return None
    names = spec.class_names  # one per class (validate_frame)
    ids = _id_ranges(missing)
    if len(missing) <= 5 and any(names[c] != f"class_{c}" for c in missing):  # named by the user
        ids = ", ".join(f"{c} ({names[c]!r})" for c in missing)
    message = (
        f"{len(missing)} of the {spec.num_classes} classes label no pixel of any training mask "
        f"(class id(s) {ids}): the model has an output for each but cannot learn them"
    )
    if spec.color_map is None and 2 * len(missing) >= spec.num_classes and len(present) <= 16:
        # void values too: a value map lists every value the masks hold (255 stays void)
        mapping = ", ".join([f"{v}: {i}" for i, v in enumerate(present)]
                            + [f"{v}: 255" for v in sorted(_void_set(spec.void_label) | {255})])
        message += (
            f". The masks hold only the values {_fmt(set(present))}: if these are labels "
            "rather than class ids 0..n-1, map them with color_map={" + mapping + "} (a "
            "value map: mask value -> class id)"
        )
    return message


def _values_without_void(summary: Any, void_label: int | None) -> set[int]:
    values = set(int(v) for v in summary[1])
    return values - _void_set(void_label)


def _fmt(values: set[int], limit: int = 12) -> str:
    ordered = sorted(values)
    text = ", ".join(str(v) for v in ordered[:limit])
    return "{" + text + (", ..." if len(ordered) > limit else "") + "}"


def _detect_task(
    summaries: list[Any],
    index: list[Any],
    paths: list[str | None],
    label_col: str,
    num_classes: int | None,
    void_label: int | None,
    problems: _Problems,
    named_only: bool = False,
    fitted: bool = False,
) -> tuple[str, int, list[str | None]]:
    """Decide task and K from the per-row value sets; report rows that fit neither.
    ``named_only``: ``num_classes`` is the length of the user's ``class_names``;
    ``fitted``: it is a fitted model's."""
    n_rows = len(summaries)
    kinds: list[str | None] = [None] * n_rows
    value_sets: list[set[int] | None] = [None] * n_rows
    for pos, summary in enumerate(summaries):
        if summary is None:
            continue
        values = _values_without_void(summary, void_label)
        value_sets[pos] = values
        kinds[pos] = _kind_of(values)
    valid = [pos for pos in range(n_rows) if kinds[pos] is not None]

    jpeg = [str(path).lower().endswith(_JPEG_SUFFIXES) for path in paths]
    for pos in valid:
        # A JPEG binary mask with a tiny object may have no value in 128-254 at all: only
        # noise near 0 and the object's pixels near 255.
        if kinds[pos] == KIND_IDS and num_classes in (None, 2) and (
                jpeg[pos] or any(_ANTIALIAS_LOW <= v < IGNORE_INDEX for v in value_sets[pos])):
            _, values, counts = summaries[pos]
            if _is_soft_binary(values, counts, declared=num_classes == 2):
                kinds[pos] = KIND_SOFT
    if any(kinds[pos] in (KIND_SOFT, KIND_B255) for pos in valid):
        for pos in valid:  # a JPEG binary mask without an object: compression noise near 0
            if kinds[pos] == KIND_IDS and jpeg[pos] and num_classes in (None, 2) \
                    and value_sets[pos] and max(value_sets[pos]) < _NEAR_BLACK:
                kinds[pos] = KIND_SOFT
    _void_255_in_binary_data(kinds, value_sets, valid, paths)
    for pos in valid:  # JPEG blurs class ids into their neighbours: ids that are no class
        if kinds[pos] == KIND_IDS and str(paths[pos]).lower().endswith(_JPEG_SUFFIXES) \
                and any(1 < v < IGNORE_INDEX for v in value_sets[pos]):
            problems.add(
                pos, index[pos], label_col, paths[pos],
                f"mask values {_fmt(value_sets[pos])} come from a JPEG file: its compression "
                "turns class ids into other ids at every edge (new classes that do not "
                "exist); save class-id masks losslessly (PNG)",
            )
    if num_classes is not None:
        k = num_classes
        if k > 2 and valid and all(value_sets[pos] <= {0, IGNORE_INDEX} for pos in valid) \
                and any(IGNORE_INDEX in value_sets[pos] for pos in valid):
            # binary 0/255 masks given to a K-class task: 255 would be ignored everywhere
            for pos in valid:
                if IGNORE_INDEX in value_sets[pos]:
                    problems.add(
                        pos, index[pos], label_col, paths[pos],
                        f"mask values {_fmt(value_sets[pos])} look like a binary mask, but "
                        f"num_classes={k} reads 255 as 'ignore' and no mask holds a class id "
                        f"in 1..{k - 1}: every foreground pixel would be ignored; use masks "
                        f"of class ids for a {k}-class model, or a binary model",
                    )
            return "multiclass", k, kinds
        outside = {}  # row position -> its class ids >= k
        for pos in valid:
            if kinds[pos] == KIND_SOFT:
                continue  # binarised at > 128 (k == 2)
            ids = value_sets[pos] - {IGNORE_INDEX} if kinds[pos] != KIND_B255 else set()
            bad = {v for v in ids if v >= k}
            if bad:
                outside[pos] = bad
        need = max((max(bad) for bad in outside.values()), default=0) + 1  # over every row
        # every row's extra id is k alone (CamVid's void 11 beside classes 0-10): a void label?
        void_hint = (f"; if {k} marks unlabelled pixels (a void, as CamVid's 11 beside its 11 "
                     f"classes), pass void_label={k} (hyperparameter data.void_label, "
                     f"--void-label {k}) to leave them out of training and scores"
                     if not fitted and void_label is None and outside
                     and set().union(*outside.values()) == {k} else "")
        for pos, bad in outside.items():
            if named_only:
                problems.add(
                    pos, index[pos], label_col, paths[pos],
                    f"mask holds class id(s) {_fmt(bad)} outside [0, {k}): class_names names "
                    f"{k} classes, one per class id from 0; give a name to every class id "
                    f"(at least {need} names for this data){void_hint}",
                )
            elif k == 2 and value_sets[pos] - {0} == bad and len(bad) == 1 \
                    and min(bad) >= _ANTIALIAS_LOW:
                problems.add(  # {0, 128}: a binary mask whose object value is no foreground
                    pos, index[pos], label_col, paths[pos],
                    f"mask values {_fmt(value_sets[pos])}: num_classes=2 binarises values "
                    f"above {SOFT_THRESHOLD}, which leaves {_fmt(bad)} background; pass "
                    f"{_object_value_hint(value_sets[pos])} instead",
                )
            elif fitted:
                problems.add(
                    pos, index[pos], label_col, paths[pos],
                    f"mask holds class id(s) {_fmt(bad)} outside [0, {k}): the model was fitted "
                    f"on {k} classes (ids 0-{k - 1}) and cannot be scored on others; label this "
                    "data as its training data was (same ids; the fit's void_label and "
                    "color_map are applied here)",
                )
            else:
                problems.add(
                    pos, index[pos], label_col, paths[pos],
                    f"mask holds class id(s) {_fmt(bad)} outside [0, {k}) for num_classes={k} "
                    f"(a fitted model, or the training masks when fit is given no "
                    f"num_classes, set it; pass num_classes={need} or more to fit "
                    f"when a class appears only in the tuning data){void_hint}",
                )
        _warn_soft(kinds, hint=False)  # K was given
        return ("binary" if k == 2 else "multiclass"), k, kinds

    if all(kinds[pos] in (KIND_B01, KIND_B255, KIND_SOFT) for pos in valid):
        _warn_soft(kinds)
        return "binary", 2, kinds

    soft = [
        pos for pos in valid
        if kinds[pos] in (KIND_IDS, KIND_SOFT)
        and any(_ANTIALIAS_LOW <= v < IGNORE_INDEX for v in value_sets[pos])
    ]
    # a few grey levels over all the masks (classes drawn visible, as 0/85/170/255): the
    # value map that reads them as classes 0..n-1
    levels = sorted(set().union(*(value_sets[pos] for pos in valid))) if soft else []
    as_classes = (f"color_map={{{', '.join(f'{v}: {i}' for i, v in enumerate(levels))}}} "
                  f"to read the {len(levels)} grey levels of the masks as classes "
                  f"0-{len(levels) - 1}, " if 3 <= len(levels) <= _FEW_LEVELS else "")
    for pos in soft:
        values = value_sets[pos]
        if max(values) > SOFT_THRESHOLD:
            binarise = (f"num_classes=2 to binarise them at > {SOFT_THRESHOLD} (a blurred or "
                        "soft binary mask), ")
        else:  # {0, 128}: binarising would leave nothing
            binarise = (f"{_object_value_hint(values)}, " if len(values - {0}) == 1 else "")
        if len(values - {0}) > 1:
            binarise = as_classes + binarise
        problems.add(
            pos, index[pos], label_col, paths[pos],
            f"mask values {_fmt(values)} fit neither task: values 128-254 are "
            "neither a clean or soft (anti-aliased/JPEG) binary mask beside the other "
            f"masks, nor class ids below 128; pass {binarise}"
            f"{'or ' if binarise else ''}num_classes=K to read the values as class ids",
        )
    soft_set = set(soft)
    multi = [
        pos for pos in valid
        if kinds[pos] == KIND_IDS and pos not in soft_set
        and any(1 < v < IGNORE_INDEX for v in value_sets[pos])
    ]
    b255 = [pos for pos in valid if kinds[pos] == KIND_B255]
    if multi and b255:
        if len(b255) >= len(multi):
            for pos in multi:
                problems.add(
                    pos, index[pos], label_col, paths[pos],
                    f"mask values {_fmt(value_sets[pos])} fit neither task: {len(b255)} other "
                    "mask(s) are binary 0/255; pass num_classes to read all masks as class "
                    "ids (255 = ignore)",
                )
        else:
            for pos in b255:
                problems.add(
                    pos, index[pos], label_col, paths[pos],
                    f"mask values {{0, 255}} fit neither task: {len(multi)} other mask(s) hold "
                    "class ids, where 255 means ignore; pass num_classes to accept this",
                )
    ids = [
        v for pos in valid if kinds[pos] == KIND_IDS
        for v in value_sets[pos] if v != IGNORE_INDEX
    ]
    k = max(2, (max(ids) + 1) if ids else 2)
    return ("binary" if k == 2 else "multiclass"), k, kinds


def _object_value_hint(values: set[int]) -> str:
    """``color_map={0: 0, v: 1}`` (and what it does) for a mask of 0 and one other grey
    value v: a binary mask that marks its object with v."""
    (v,) = values - {0}
    return f"color_map={{0: 0, {v}: 1}} to read {v} as the object of a binary mask"


def _void_255_in_binary_data(kinds: list[str | None], value_sets: list[set[int] | None],
                             valid: list[int], paths: list[str | None]) -> None:
    """Read ``{0, 255}`` masks as background + ignore where other masks of the data hold 0/1
    labels beside 255: there 255 already means ignore, and reading it as foreground in the
    masks that happen to hold no 1 would turn their void pixels into foreground."""
    if not any(kinds[pos] == KIND_IDS and IGNORE_INDEX in value_sets[pos]
               and value_sets[pos] - {IGNORE_INDEX} <= {0, 1} for pos in valid):
        return
    changed = [pos for pos in valid if kinds[pos] == KIND_B255]
    for pos in changed:
        kinds[pos] = KIND_IDS
    if changed:
        example = str(shown(paths[changed[0]]))
        warnings.warn(
            f"{len(changed)} mask(s) hold only 0 and 255 (e.g. {example!r}) while "
            "other masks label 0/1 beside 255: 255 is read as ignore in all of them, as in "
            "the 0/1 masks",
            stacklevel=3,
        )


def _check_some_pixel_labelled(
    summaries: list[Any],
    kinds: list[str | None],
    k: int,
    void_label: int | None,
    index: list[Any],
    paths: list[str | None],
    label_col: str,
    problems: _Problems,
) -> None:
    """Report every row when no mask of the data has a pixel that is not ignored.

    One void-only mask is fine (it is left out of losses and metrics); data in which every
    pixel of every mask is the void label or the ignore index gives nothing to train on or
    to score, so it is refused before anything runs.
    """
    if problems.items or not summaries or any(summary is None for summary in summaries):
        return  # rows with other problems are reported already
    for pos, summary in enumerate(summaries):
        _, values, counts = summary
        targets = _lut(kinds[pos], k, void_label)[np.clip(values, 0, 255)]
        if counts[targets != IGNORE_INDEX].sum():
            return
    ignored = "255 (ignore)"
    if void_label is not None and int(void_label) != IGNORE_INDEX:
        ignored = f"void_label={void_label} or {ignored}"
    for pos, summary in enumerate(summaries):
        problems.add(
            pos, index[pos], label_col, paths[pos],
            f"mask values {_fmt(set(int(v) for v in summary[1]))} are all {ignored}: no mask "
            "of the data has a labelled pixel, so there is nothing to train on or to score",
        )


def _warn_soft(kinds: list[str | None], hint: bool = True) -> None:
    """Warn about masks binarised at SOFT_THRESHOLD; ``hint``: say how to read them as class
    ids instead (only when the number of classes came from the data, not from a fitted
    model or the caller)."""
    n_soft = sum(kind == KIND_SOFT for kind in kinds)
    if n_soft:
        warnings.warn(
            f"{n_soft} mask(s) look like anti-aliased or JPEG-compressed binary masks "
            f"(values between 0 and 255); they are binarised at > {SOFT_THRESHOLD}, as "
            "PySODMetrics does." + (" Pass num_classes > 2 to read the values as class ids."
                                    if hint else ""),
            stacklevel=4,
        )


def _classes_present(
    summary: Any, kind: str | None, k: int, void_label: int | None
) -> tuple[int, ...]:
    """Class ids (background included) that label at least one pixel of a mask."""
    if summary is None:
        return ()
    targets = _lut(kind, k, void_label)[np.clip(summary[1], 0, 255)]
    return tuple(int(t) for t in np.unique(targets) if t != IGNORE_INDEX)


def class_pixels(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts of a multi-class ``spec``'s masks as stored, for
    :func:`automask.losses.class_weights`.

    Returns
    -------
    pixels, holding : numpy.ndarray
        ``(K,)`` int64 each: the pixels whose target is class k (void and ignored ones
        count for no class), and all the pixels of the masks that hold class k (void
        included: Eigen and Fergus' "pixels in images where c is present").
    """
    assert spec.task == "multiclass" and spec.label_col is not None, spec.task
    k = spec.num_classes
    pixels, holding = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for pos, path in enumerate(spec.frame[spec.label_col]):
        _, values, counts = _mask_summary(path, spec.color_map)  # memoised by validation
        targets = _lut(spec.stats["kind"].iat[pos], k, spec.void_label)[np.clip(values, 0, 255)]
        kept = targets != IGNORE_INDEX
        per_class = np.bincount(targets[kept], weights=counts[kept], minlength=k)
        per_class = per_class[:k].astype(np.int64)
        pixels += per_class
        holding[per_class > 0] += counts.sum()
    return pixels, holding


def _value_fraction(summary: Any, value: int) -> float:
    """Fraction of a mask's pixels that hold ``value`` (NaN for a row without a summary)."""
    if summary is None:
        return float("nan")
    _, values, counts = summary
    total = counts.sum()
    return float(counts[values == value].sum() / total) if total else 0.0


def _labelled_fraction(summary: Any, kind: str | None, k: int, void_label: int | None) -> float:
    """Fraction of a mask's pixels that are not ignored (void or 255); NaN when unread."""
    if summary is None:
        return float("nan")
    _, values, counts = summary
    targets = _lut(kind, k, void_label)[np.clip(values, 0, 255)]
    return float(counts[targets != IGNORE_INDEX].sum() / max(1, counts.sum()))


def _foreground_fraction(summary: Any, kind: str | None, k: int, void_label: int | None) -> float:
    """Fraction of labelled (non-ignored) pixels whose target is not background."""
    if summary is None:
        return float("nan")
    _, values, counts = summary
    lut = _lut(kind, k, void_label)
    targets = lut[np.clip(values, 0, 255)]
    labelled = targets != IGNORE_INDEX
    total = counts[labelled].sum()
    if total == 0:
        return 0.0
    return float(counts[labelled & (targets != 0)].sum() / total)
