"""Reading images and masks from disk, reading their size from the header alone, and
checking that a file decodes completely (:func:`check_decodes`).

Images of any mode Pillow opens (grayscale, RGB, RGBA, palette, CMYK, 1-bit, 16-bit) come
back as 8-bit RGB with the EXIF orientation applied; data stored with more than 8 bits per
sample (16-bit, 32-bit, float) is scaled to 0-255 by one value range for a whole dataset
(:func:`dataset_value_range`) or, without one, by each file's own rule. 16-bit colour PNGs
and TIFFs (which Pillow reads as each sample's top 8 bits) and 64-bit float TIFFs (which it
cannot open) are decoded by libpng through torchvision and by tifffile; numpy ``.npy``
arrays (one 2-D picture: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with 1 to 4 channels)
are read as their samples, like those TIFFs. Masks come back as
a 2-D array of class ids: palette PNGs as their indices, grayscale as their values, colour
masks only through a user-given colour-to-class mapping. The same EXIF orientation rule is
applied to masks so that an image and its mask stay aligned.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataValidationError

# {(r, g, b): class id} of colour masks, or {value: class id} (a value map) that renumbers
# the values of grey and palette-index masks (see read_mask)
ColorMap = dict[tuple[int, int, int], int] | dict[int, int]

_EXIF_ORIENTATION = 0x0112
# Orientations 5-8 swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_JPEG_EOI = b"\xff\xd9"
_MAX_16BIT = 65535
DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})  # > 8 bits per sample
_BIT_DEPTHS = (8, 10, 12, 14, 16)  # what integer data is taken to span: 2**b - 1 at full scale
_PNG_IEND = b"IEND\xaeB`\x82"


def _orientation(img: Image.Image) -> int:
    """EXIF orientation tag of an opened (not decoded) image, 1 when absent.

    For PNG an eXIf chunk after the pixel data counts too (Pillow applies it once the file
    is decoded): the chunk list is walked without decoding, so that the size read from the
    header (:func:`image_size`) and the decoded pixels (:func:`read_image`,
    :func:`read_mask`) always agree.
    """
    try:
        if img.format == "PNG":
            raw = img.info.get("exif") or _png_late_exif(img)
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block is not worth failing over
        return 1
    return value if 1 <= value <= 8 else 1


_PNG_MAX_EXIF = 1 << 24  # an eXIf chunk larger than this is not read


def _png_late_exif(img: Image.Image) -> bytes | None:
    """Data of a PNG's eXIf chunk found by walking its chunk headers (no decoding)."""
    fp = getattr(img, "fp", None)
    if fp is None:
        return None
    start = fp.tell()
    try:
        fp.seek(8)  # after the signature
        while True:
            head = fp.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return fp.read(length) if length <= _PNG_MAX_EXIF else None
            if kind == b"IEND":
                return None
            fp.seek(length + 4, os.SEEK_CUR)  # data and CRC
    finally:
        fp.seek(start)


# Orientation tag -> the transpose that shows the image upright (ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(img: Image.Image, orientation: int) -> Image.Image:
    """``img`` (decoded) turned by its ``orientation`` tag, as :func:`_orientation` read it."""
    method = _TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def _upright_array(data: np.ndarray, orientation: int) -> np.ndarray:
    """``(H, W, ...)`` samples of any dtype turned as :func:`_upright` turns an image."""
    turn = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
            7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}
    method = turn.get(orientation)
    return data if method is None else np.ascontiguousarray(method(data))


_TIFF_WIDTH, _TIFF_LENGTH = 256, 257


def _stored_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the pixels as stored, before any EXIF orientation.

    Pillow >= 11 reports a TIFF with a rotating orientation tag at its turned size (and
    turns the pixels itself on load); the TIFF's own width and length tags do not change.
    """
    if img.format == "TIFF":
        tags = getattr(img, "tag_v2", {})
        if _TIFF_WIDTH in tags and _TIFF_LENGTH in tags:
            return int(tags[_TIFF_WIDTH]), int(tags[_TIFF_LENGTH])
    return img.size


def _left_to_apply(img: Image.Image, orientation: int) -> int:
    """The orientation still to apply to a just-loaded image, read before loading.

    Pillow >= 11 applies a TIFF's orientation itself when loading (and deletes the tag);
    older versions and other formats leave it to the caller. Images are opened from a
    file object, which Pillow never memory-maps: on a memory-mapped TIFF (uncompressed,
    one strip: L, P, I;16) Pillow 13 scrambles the turned pixels.
    """
    if img.format != "TIFF" or orientation == 1:
        return orientation
    stored = _stored_size(img)
    if orientation in _SWAPPING_ORIENTATIONS and stored[0] != stored[1]:
        return 1 if img.size != stored else orientation
    tag_gone = _EXIF_ORIENTATION not in getattr(img, "tag_v2", {})
    return 1 if tag_gone and getattr(img, "map", None) is None else orientation


_TIFF_BITS, _TIFF_SAMPLES = 258, 277
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_MAX_CHANNELS = 4  # grey, grey + alpha, RGB, RGB + alpha or a fourth band


class NotOnePicture(OSError):
    """A file that decodes, but whose samples are not one 2-D picture (a volume, a stack,
    more than four bands): which picture to take from it is the user's choice."""


def _deep_colour_tiff(img: Image.Image) -> bool:
    """A TIFF with several channels of more than 8 bits each (16-bit RGB, RGBA, 4 bands).

    Pillow has no such modes: it opens them as 8-bit RGB or RGBA keeping each sample's top
    8 bits, so 12-bit data becomes a nearly black 0-15 image. They are read through
    ``tifffile`` instead (:func:`_tiff_pixels`).
    """
    if img.format != "TIFF":
        return False
    tags = getattr(img, "tag_v2", {})
    bits = tags.get(_TIFF_BITS, 8)
    bits = max(bits) if isinstance(bits, tuple) else bits
    return int(bits) > 8 and int(tags.get(_TIFF_SAMPLES, 1)) > 1


@contextlib.contextmanager
def _opened(path: str | os.PathLike) -> Iterator[tuple[Image.Image | None, bytes]]:
    """``(image, head)``: the file opened once, by Pillow from a file object (never
    memory-mapped, see :func:`_left_to_apply`), and its first 26 bytes (enough for a PNG's
    bit depth, :func:`_deep_colour_png`). The image is None for a TIFF that Pillow cannot
    open (64-bit floats, odd sample formats) and for a ``.npy`` array: read those with
    :func:`_faithful_samples`.

    Raises
    ------
    PIL.UnidentifiedImageError
        A file that is neither an image Pillow opens, nor a TIFF, nor a ``.npy`` array.
    """
    with open(path, "rb") as fh:
        head = fh.read(26)
        fh.seek(0)
        if head.startswith(_NPY_MAGIC):
            img = None
        else:
            try:
                img = Image.open(fh)
            except UnidentifiedImageError:
                if head[:4] not in _TIFF_MAGIC:
                    raise
                img = None
        try:
            if img is None:
                yield None, head
            else:
                with img:
                    yield img, head
        except (OSError, ValueError, SyntaxError) as exc:
            # Pillow's words for a damaged file ("image file is truncated") name none: a
            # file cut short after the data was checked would be found by nothing else
            named = _named(exc, path)
            if named is exc:
                raise
            raise named from exc


def reading_error(exc: BaseException, path: str | os.PathLike) -> str:
    """``exc``'s message without the ``"<path>: "`` that :func:`_named` put first, for a
    message that names ``path`` itself."""
    text, prefix = str(exc), f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _named(exc: BaseException, path: str | os.PathLike) -> BaseException:
    """``exc``, or one of its type whose message starts with ``path`` when it names none."""
    if str(path) in str(exc) or getattr(exc, "filename", None):
        return exc
    try:
        return type(exc)(f"{path}: {exc}")
    except Exception:  # a type that takes other arguments
        return exc


def _tiff_page(path: str | os.PathLike):
    """The first image (page) of a TIFF through ``tifffile``, with a hint when it is absent."""
    try:
        import tifffile
    except ImportError as exc:  # a dependency; absent only in a broken environment
        raise OSError(f"{path}: reading this TIFF needs the tifffile package "
                      "(pip install tifffile)") from exc
    return tifffile.TiffFile(path)


def _tiff_pixels(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """``(H, W, C)`` samples of a TIFF's first image as stored, and its orientation tag.

    For the TIFFs Pillow cannot read faithfully (:func:`_deep_colour_tiff`,
    :func:`_opened`). Compressions other than none, deflate and LZMA (LZW, JPEG,
    PackBits, ...) need the ``imagecodecs`` package.

    Raises
    ------
    OSError
        Data cut short or corrupt, a compression without its codec (the message says to
        install ``imagecodecs``), or an image that is not one 2-D picture.
    """
    try:
        with _tiff_page(path) as tif:
            page = tif.pages[0]
            tag = page.tags.get(_EXIF_ORIENTATION)
            orientation = int(tag.value) if tag is not None and 1 <= int(tag.value) <= 8 else 1
            data, axes = page.asarray(), page.axes
    except KeyError as exc:  # tifffile: "<COMPRESSION.LZW: 5> requires the 'imagecodecs' ..."
        raise OSError(f"{path}: cannot decode this TIFF: {exc.args[0] if exc.args else exc} "
                      "(pip install imagecodecs)") from exc
    except (ValueError, NotImplementedError, IndexError, struct.error) as exc:
        raise OSError(f"{path}: cannot decode this TIFF ({exc})") from exc
    if "S" in axes:
        data = np.moveaxis(data, axes.index("S"), -1)
    else:
        data = data[..., None]
    if data.ndim != 3:
        raise NotOnePicture(f"{path}: a TIFF image of axes {axes!r} is not one 2-D picture")
    if data.shape[-1] > _MAX_CHANNELS:  # which bands are red, green, blue: the user knows
        raise NotOnePicture(
            f"{path}: a TIFF image of {data.shape[-1]} bands (samples per pixel) is not one "
            f"picture; save 1 to {_MAX_CHANNELS} bands, e.g. the red, green and blue ones, "
            "one file per image")
    return data, orientation


_NPY_MAGIC = b"\x93NUMPY"


def _npy_layout(shape: tuple[int, ...], path: str | os.PathLike) -> tuple[int, int, bool]:
    """``(H, W, channels_first)`` of a ``.npy`` array's shape read as one 2-D picture.

    ``(H, W)``; ``(H, W, C)`` or ``(C, H, W)`` with C of 1 to 4, channels last when both
    fit (a 3 x 3 x 3 array). Any other shape (a volume, a stack, 13 spectral bands) is
    refused: which 2-D picture to take from it is the user's choice.

    Raises
    ------
    OSError
        A shape that is not one 2-D picture (the message gives it).
    """
    if len(shape) == 2:
        return int(shape[0]), int(shape[1]), False
    if len(shape) == 3 and 1 <= shape[2] <= _MAX_CHANNELS:
        return int(shape[0]), int(shape[1]), False
    if len(shape) == 3 and 1 <= shape[0] <= _MAX_CHANNELS:
        return int(shape[1]), int(shape[2]), True
    raise NotOnePicture(
        f"{path}: a .npy array of shape {tuple(shape)} is not one 2-D picture; save (H, W), "
        f"(H, W, C) or (C, H, W) with 1 to {_MAX_CHANNELS} channels (one slice or the "
        "bands to use, one file per image; images given in memory: a list of arrays, one "
        "per image, not one stack)"
    )


def _npy_array(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` file's array, refusing pickled objects; ``mmap``: read the header only.

    Raises
    ------
    OSError
        Data cut short or corrupt, a pickled (object) array, or samples that are not
        numbers (strings, complex, records).
    """
    try:
        data = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError) as exc:  # "cannot reshape ...", pickled objects, bad header
        raise OSError(f"{path}: cannot read this .npy array ({exc})") from exc
    if not (data.dtype == np.bool_ or np.issubdtype(data.dtype, np.integer)
            or np.issubdtype(data.dtype, np.floating)):
        raise OSError(f"{path}: a .npy array of dtype {data.dtype} holds no image samples "
                      "(bool, integer or float)")
    return data


def _npy_pixels(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """``(H, W, C)`` samples of a ``.npy`` array (:func:`_npy_layout`) and orientation 1."""
    data = _npy_array(path)
    _, _, channels_first = _npy_layout(data.shape, path)
    if data.ndim == 2:
        data = data[..., None]
    elif channels_first:
        data = np.moveaxis(data, 0, -1)
    return np.ascontiguousarray(data), 1


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_WITH_CHANNELS = {2, 4, 6}  # colour types: RGB, grey + alpha, RGBA


def _deep_colour_png(head: bytes) -> bool:
    """A 16-bit PNG with several channels (RGB, RGBA, grey + alpha), from the IHDR chunk in
    the file's first 26 bytes.

    Pillow opens such a file as 8-bit RGB/RGBA/LA keeping each sample's top 8 bits, as it
    does 16-bit colour TIFFs; it is decoded by libpng through ``torchvision`` instead.
    """
    return (len(head) == 26 and head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR"
            and head[24] == 16 and head[25] in _PNG_WITH_CHANNELS)


def _png_pixels(path: str | os.PathLike) -> np.ndarray:
    """``(H, W, C)`` 16-bit samples of a PNG (:func:`_deep_colour_png`), as stored.

    Raises
    ------
    OSError
        Data cut short or corrupt.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_png

    with open(path, "rb") as fh:
        data = np.frombuffer(fh.read(), dtype=np.uint8)
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs (the
            warnings.simplefilter("ignore", DeprecationWarning)  # pin: <= 0.29.1, pyproject)
            chw = decode_png(torch.from_numpy(data.copy()), mode=ImageReadMode.UNCHANGED)
    except RuntimeError as exc:  # libpng's errors: truncated or corrupt data
        reason = re.sub(r"^.*?\.cpp:\d+, ", "", str(exc))  # the message, not the C++ source
        raise OSError(f"{path}: cannot decode this PNG ({reason})") from exc
    return np.ascontiguousarray(chw.numpy().transpose(1, 2, 0))


def _faithful_samples(img: Image.Image | None, head: bytes, path: str | os.PathLike
                      ) -> tuple[np.ndarray, int] | None:
    """``(H, W, C)`` samples and the orientation to apply, for the files that Pillow reads
    as their top 8 bits (16-bit colour TIFFs and PNGs) or cannot open (``img`` None from
    :func:`_opened`), and of ``.npy`` arrays; None for the others, which Pillow reads
    faithfully."""
    if img is None and head.startswith(_NPY_MAGIC):
        return _npy_pixels(path)
    if img is None or _deep_colour_tiff(img):
        return _tiff_pixels(path)
    if img.format == "PNG" and _deep_colour_png(head):
        return _png_pixels(path), _orientation(img)
    return None


def _picture(data: np.ndarray) -> np.ndarray:
    """The channels of ``(H, W, C)`` samples that make the picture: grey or RGB."""
    return data[..., :3] if data.shape[-1] >= 3 else data[..., :1]


def _samples_to_rgb(data: np.ndarray, orientation: int,
                 value_range: tuple[float, float] | None) -> np.ndarray:
    """``(H, W, C)`` samples (:func:`_faithful_samples`) -> upright ``(H, W, 3)`` uint8.

    One or two channels read as grey (the second is alpha), three or more as RGB (a fourth
    band, alpha or near infrared, is dropped); all channels share one scale so that colours
    keep their balance.
    """
    picture = _picture(data)
    if picture.shape[-1] == 1:
        picture = np.repeat(picture, 3, axis=2)
    rgb = _to_uint8(np.ascontiguousarray(picture), value_range)
    return np.array(_upright(Image.fromarray(rgb), orientation))


def stacked_images(path: str | os.PathLike) -> int:
    """How many full-size images a file holds: above 1 for a TIFF stack (slices of a volume,
    time points, channels saved as pages) or an animated GIF, of which only the first is
    read.

    Pages at reduced resolution (a pyramid's overviews) do not count. Files other than
    TIFFs and GIFs return 1 after a 4-byte read.
    """
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GIF8":
        try:
            with Image.open(path) as gif:
                return int(getattr(gif, "n_frames", 1))
        except (OSError, ValueError, SyntaxError):  # reported by the image's own checks
            return 1
    if magic not in _TIFF_MAGIC:
        return 1
    try:
        with _tiff_page(path) as tif:
            return len(_full_size_pages(tif))
    except (OSError, ValueError, KeyError, IndexError):  # reported by the image's own checks
        return 1


def _full_size_pages(tif) -> list:
    """The pages of an open ``tifffile.TiffFile`` of its first page's shape, a pyramid's
    reduced-resolution overviews left out."""
    first = tif.pages[0].shape
    return [page for page in tif.pages
            if page.shape == first and not getattr(page, "is_reduced", False)]


def read_stack(path: str | os.PathLike) -> list[np.ndarray]:
    """The full-size images of a TIFF stack (the slices of an EM or microscopy volume,
    time points), one array per page as stored, in page order.

    ISBI 2012's ``train-volume.tif`` / ``train-labels.tif`` hold 30 slices each; automask
    reads one image per file, so a stack is given as its pages::

        pd.DataFrame({"image": read_stack("train-volume.tif"),
                      "label": read_stack("train-labels.tif")})

    Pages at reduced resolution (a pyramid's overviews) and pages of another size are
    left out, as :func:`stacked_images` counts them.

    Parameters
    ----------
    path : str or PathLike
        A TIFF file of one or more pages.

    Returns
    -------
    list of numpy.ndarray
        ``(H, W)`` or ``(H, W, C)`` arrays with the samples as stored (16-bit, float,
        class ids, palette indices), which automask reads as it reads the same arrays
        saved with ``np.save``.

    Raises
    ------
    DataValidationError
        The file is missing, not a TIFF, or cannot be decoded; the message names it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataValidationError(f"stack file not found: {str(path)!r}")
    with open(path, "rb") as fh:
        if fh.read(4) not in _TIFF_MAGIC:
            raise DataValidationError(f"{path} is not a TIFF file: read_stack reads the pages "
                                      "of a TIFF stack")
    try:
        with _tiff_page(path) as tif:
            return [page.asarray() for page in _full_size_pages(tif)]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise DataValidationError(f"{path}: the TIFF stack cannot be read ({exc})") from None


def stack_nbytes(path: str | os.PathLike) -> int:
    """Bytes of the arrays :func:`read_stack` gives for ``path``, from its page headers."""
    with _tiff_page(path) as tif:
        return sum(page.nbytes for page in _full_size_pages(tif))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image as it will be read, from the file header only (no decode).

    EXIF orientations that rotate by 90 degrees swap the two sides, as :func:`read_image`
    does.

    Parameters
    ----------
    path : str or PathLike
        Image or mask file.

    Returns
    -------
    tuple of int
        Height and width in pixels.
    """
    with _opened(path) as (img, head):
        if img is not None:
            width, height = _stored_size(img)
            if _orientation(img) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
            return int(height), int(width)
    if head.startswith(_NPY_MAGIC):
        height, width, _ = _npy_layout(_npy_array(path, mmap=True).shape, path)
        return height, width
    with _tiff_page(path) as tif:  # a TIFF Pillow cannot open
        page = tif.pages[0]
        tag = page.tags.get(_EXIF_ORIENTATION)
        height, width = page.imagelength, page.imagewidth
        if tag is not None and int(tag.value) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
    return int(height), int(width)


def looks_truncated(path: str | os.PathLike) -> bool:
    """True when a JPEG or PNG file lacks its end marker (a cut-off download or copy).

    Reads the file's last kilobyte only; formats other than JPEG and PNG return False.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 1024))
        tail = fh.read()
    if head.startswith(b"\xff\xd8"):
        return _JPEG_EOI not in tail
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _PNG_IEND not in tail
    return False


_JPEG_OUTPUT = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}


def check_decodes(path: str | os.PathLike) -> None:
    """Decode a whole image file and raise if its data is cut short or corrupt.

    Pillow decodes a JPEG whose data was cut off and given a new end marker without
    complaint (libjpeg only warns and fills the rest with grey), so JPEGs are decoded with
    libjpeg-turbo through ``simplejpeg`` in strict mode, where "premature end of data"
    is an error; DCT scaling (1/8 size) keeps that cheap while every byte of the
    compressed data is still read. Other formats, and JPEGs that ``simplejpeg`` cannot
    decode for another reason (12-bit, arithmetic coding, harmless warnings such as
    extraneous bytes), are fully decoded by Pillow (``Image.load()``).

    Raises
    ------
    OSError
        Truncated or corrupt data (the message says which).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if data.startswith(b"\xff\xd8"):
        import simplejpeg

        try:
            colorspace = simplejpeg.decode_jpeg_header(data)[2]
            simplejpeg.decode_jpeg(
                data, colorspace=_JPEG_OUTPUT.get(colorspace, "RGB"), min_factor=8, strict=True
            )
            return
        except ValueError as exc:
            reason = str(exc)
            if "premature end" in reason.lower():
                raise OSError(f"JPEG data ends early: {reason}") from exc
    if data.startswith(_NPY_MAGIC):
        _npy_pixels(path)
        return
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data[:4] not in _TIFF_MAGIC:
            raise
        img = None
    if img is None:
        _tiff_pixels(path)  # decoded in full by tifffile
        return
    with img:
        if _faithful_samples(img, data[:26], path) is None:  # else decoded in full already
            img.load()


def _to_uint8(array: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Scale a 16/32-bit integer or float array to 0-255.

    With ``value_range=(low, high)``, ``low`` maps to 0 and ``high`` to 255, values beyond
    them are clipped and NaNs read as ``low``. Without one, each array has its own rule:
    floats in [0, 1] are multiplied by 255, floats in [0, 255] are rounded; 16-bit integers
    (``uint16``/``int16``, what 16-bit files decode to) in [0, 65535] map 65535 to 255
    (16-bit full scale); other integers (``int64``, numpy's default, ``int32``, ...), whose
    type says nothing of a bit depth, are 8-bit values when they lie in [0, 255], as floats
    there are, and 16-bit ones up to 65535. Data outside those ranges (float reflectances
    of 0-10000, negative values, 32-bit counts above 65535) are stretched from their
    smallest to their largest finite value, instead of being clipped to a white or black
    image.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if value_range is not None:
        low, high = value_range
        values = array.astype(np.float64)
        return _stretch(np.where(np.isfinite(values), values, low), low, high)
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            return np.zeros(values.shape, dtype=np.uint8)
        low, high = float(values[finite].min()), float(values[finite].max())
        values = np.where(finite, values, low)
        if low >= 0.0 and high <= 1.0:
            values = values * 255.0
        elif low < 0.0 or high > 255.0:
            return _stretch(values, low, high)
        return np.clip(values + 0.5, 0, 255).astype(np.uint8)
    values = array.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > _MAX_16BIT):
        return _stretch(values.astype(np.float64), float(values.min()), float(values.max()))
    if array.dtype.itemsize != 2 and (not values.size or values.max() <= 255):
        return values.astype(np.uint8)  # 8-bit values in a wider type (np.array of a list)
    # 16-bit data: the full range maps 65535 -> 255 (rounded division by 257).
    return ((values + 128) // 257).astype(np.uint8)


def dataset_value_range(paths) -> tuple[float, float] | None:
    """One value range for the images of a dataset stored with more than 8 bits per sample.

    A 12-bit camera or scanner writes its data into 16-bit files: read at 16-bit full scale
    (65535 to 255) such an image would keep 16 grey levels out of 4096. Scaling each image
    by its own minimum and maximum instead would keep the levels but make the same tissue
    or surface brighter in one image than in the next. One range for all images keeps both.

    Parameters
    ----------
    paths : iterable of str or PathLike
        Image files; only those stored with more than 8 bits per sample (Pillow modes
        ``I;16*``, ``I``, ``F``, and the TIFFs read through ``tifffile``: 16-bit colour,
        64-bit floats) are decoded, the others are read from their header.

    Returns
    -------
    tuple of float or None
        None when no image has more than 8 bits per sample. Integer data from 0 up:
        ``(0, 2**b - 1)`` for the smallest ``b`` of 8, 10, 12, 14 and 16 that holds the
        largest value (12-bit data: ``(0, 4095)``); float data within [0, 1] or [0, 255]:
        that range; anything else (negative values, counts above 65535, other floats): the
        smallest and largest finite value over all the images.
    """
    low, high, floats, seen = np.inf, -np.inf, False, False
    for path in paths:
        with _opened(path) as (img, head):
            samples = _faithful_samples(img, head, path)
            if samples is not None:
                values = _picture(samples[0])
            elif img.mode in DEEP_MODES:
                values = np.asarray(img)
            else:
                continue
        seen = True
        is_float = np.issubdtype(values.dtype, np.floating)
        floats = floats or is_float
        finite = values[np.isfinite(values)] if is_float else values
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if not seen:
        return None
    if not np.isfinite(low):  # every deep image all NaN or infinite
        return (0.0, 1.0) if floats else (0.0, 255.0)
    if floats:
        for top in (1.0, 255.0):
            if low >= 0.0 and high <= top:
                return 0.0, top
    elif low >= 0 and high <= _MAX_16BIT:
        bits = next(b for b in _BIT_DEPTHS if high <= 2**b - 1)
        return 0.0, float(2**bits - 1)
    return (low, high) if high > low else (low, low + 1.0)


def deep_image_file(path: str | os.PathLike) -> bool:
    """Whether an image file stores more than 8 bits per sample, from its header: Pillow
    modes ``I;16*``, ``I`` and ``F``, 16-bit colour PNGs and TIFFs, and the TIFFs only
    ``tifffile`` reads. A ``.npy`` array (an image given in memory, a TIFF stack's page)
    when it is read as more than 8 bits: ``uint16`` or ``int16``, wider integers holding a
    value above 255, floats outside [0, 1]."""
    with _opened(path) as (img, head):
        if img is None:
            if not head.startswith(_NPY_MAGIC):
                return True
            array = np.load(path, mmap_mode="r")
            if array.dtype.kind not in "iuf" or array.size == 0:
                return False
            if array.dtype in (np.uint16, np.int16):
                return True
            if array.dtype.kind in "iu":
                return array.dtype.itemsize > 1 and int(array.max()) > 255
            finite = np.asarray(array)[np.isfinite(array)]
            return finite.size > 0 and (float(finite.min()) < 0 or float(finite.max()) > 1)
        return (img.mode in DEEP_MODES or _deep_colour_tiff(img)
                or (img.format == "PNG" and _deep_colour_png(head)))


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` mapped linearly from [low, high] to 0-255 (all 0 when low == high)."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike, min_size: tuple[int, int] | None = None,
               value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Decode an image file to 8-bit RGB with its EXIF orientation applied.

    Parameters
    ----------
    path : str or PathLike
        Any file Pillow opens (JPEG, PNG, BMP, TIFF, WebP, ...), or a ``.npy`` array of
        one picture: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with 1 to 4 channels of
        bool, integer or float samples (scaled as deeper data below; bool as 0/255).
    min_size : tuple of int, optional
        ``(h, w)`` the caller will resize to. A JPEG may then be decoded at 1/2, 1/4 or
        1/8 scale (DCT scaling, much faster) as long as both sides stay at least this
        large. Other formats ignore it. Default: full resolution.
    value_range : tuple of float, optional
        ``(low, high)`` mapped to 0-255 for data with more than 8 bits per sample (see
        :func:`dataset_value_range`); 8-bit images ignore it. Default: each file's own rule.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8 array. Grayscale is repeated over three channels, alpha is
        dropped, palettes are expanded. Deeper data is scaled by ``value_range``, else by
        its own rule: 16-bit data 65535 to 255; float and 32-bit data as :func:`_to_uint8`
        says (floats in [0, 1] times 255, data beyond the 8/16-bit ranges stretched from
        its minimum to its maximum).
    """
    with _opened(path) as (img, head):
        samples = _faithful_samples(img, head, path)
        if samples is not None:
            return _samples_to_rgb(*samples, value_range)
        orientation = _orientation(img)
        if min_size is not None and img.format == "JPEG":
            want_h, want_w = int(min_size[0]), int(min_size[1])
            if orientation in _SWAPPING_ORIENTATIONS:
                want_h, want_w = want_w, want_h
            img.draft("RGB", (want_w, want_h))
        img.load()
        return pil_to_rgb(_upright(img, _left_to_apply(img, orientation)), value_range)


def pil_to_rgb(img: Image.Image, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Convert a decoded Pillow image of any mode to a ``(H, W, 3)`` uint8 RGB array.

    ``value_range``: as in :func:`read_image`, for modes with more than 8 bits per sample.
    """
    mode = img.mode
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if mode in DEEP_MODES:
        gray = _to_uint8(np.array(img), value_range)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("L", "1"):
        gray = np.array(img.convert("L"), dtype=np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _apply_color_map(rgb: np.ndarray, color_map: ColorMap, path: str | os.PathLike,
                     lossy: bool = False) -> np.ndarray:
    """Map an ``(H, W, 3)`` colour mask to class ids; unknown colours raise (``lossy``: the
    file's format is lossy, which the message names as the likely cause)."""
    codes = (
        rgb[..., 0].astype(np.int32) << 16
        | rgb[..., 1].astype(np.int32) << 8
        | rgb[..., 2].astype(np.int32)
    )
    uniq, inverse = np.unique(codes.ravel(), return_inverse=True)
    lut = {((r & 0xFF) << 16) | ((g & 0xFF) << 8) | (b & 0xFF): int(v)
           for (r, g, b), v in color_map.items()}
    unknown = [int(c) for c in uniq if int(c) not in lut]
    if unknown:
        shown = ", ".join(str(((c >> 16) & 255, (c >> 8) & 255, c & 255)) for c in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        cause = ("; it is a lossy (JPEG or WebP) file, whose compression turns the colours "
                 "at every edge into colours no class has: save colour masks losslessly "
                 "(PNG)") if lossy else ""
        raise DataValidationError(
            f"mask {path} holds colours missing from color_map: {shown}{more}{cause}"
        )
    ids = np.array([lut[int(c)] for c in uniq], dtype=np.int64)
    out = ids[inverse].reshape(codes.shape)
    return out.astype(np.uint8) if out.size == 0 or (out.min() >= 0 and out.max() <= 255) else out


def is_value_map(color_map: ColorMap | None) -> bool:
    """Whether ``color_map`` is a value map ``{value: class_id}`` (integer keys) rather than
    a colour map ``{(r, g, b): class_id}``; False for None or an empty map."""
    return bool(color_map) and not any(isinstance(key, tuple) for key in color_map)


def color_map_rows(color_map: ColorMap | None) -> list[list[int]]:
    """A colour or value map as JSON rows: ``[r, g, b, class_id]`` or ``[value, class_id]``."""
    return [[*map(int, key), int(class_id)] if isinstance(key, tuple)
            else [int(key), int(class_id)] for key, class_id in (color_map or {}).items()]


def color_map_from_rows(rows: list[list[int]] | None) -> ColorMap | None:
    """The map of :func:`color_map_rows`' rows; None for none."""
    return {(tuple(row[:3]) if len(row) == 4 else row[0]): row[-1]
            for row in rows or []} or None


def _apply_value_map(values: np.ndarray, value_map: ColorMap, path: str | os.PathLike
                     ) -> np.ndarray:
    """Renumber an ``(H, W)`` mask's values through ``{value: class_id}``; values missing
    from the map raise, naming the mask and them.

    A map that keys one of 255 and 65535 gives the other the same id: a 16-bit binary
    mask at full scale (0/65535) reads as 0/255 (:func:`read_mask`), so ``{0: 0, 65535:
    1}`` written for it, and ``{0: 0, 255: 1}`` for the values :func:`read_mask` gives,
    both apply to it, stored as a PNG or a ``.npy`` array alike.
    """
    if (255 in value_map) != (_MAX_16BIT in value_map):
        full = value_map.get(255, value_map.get(_MAX_16BIT))
        value_map = {**value_map, 255: full, _MAX_16BIT: full}
    if values.dtype == np.uint8:  # most masks: 8-bit gathers through 256 entries
        lut, known = np.zeros(256, dtype=np.uint8), np.zeros(256, dtype=bool)
        for value, class_id in value_map.items():
            if value < 256:
                lut[int(value)], known[int(value)] = int(class_id), True
        if not known.take(values).all():  # take: about twice as fast as indexing here
            _refuse_unmapped(np.unique(values[~known.take(values)]).tolist(), path)
        return lut.take(values)
    size = int(max(value_map)) + 1  # 16-bit and signed values
    lut = np.full(size + 1, -1, dtype=np.int16)  # the last entry: values beyond the keys
    for value, class_id in value_map.items():
        lut[int(value)] = int(class_id)
    wide = values.astype(np.int64, copy=False)
    ids = lut[np.where((wide >= 0) & (wide < size), wide, size)]
    if (ids < 0).any():
        _refuse_unmapped(np.unique(values[ids < 0]).tolist(), path)
    return ids.astype(np.uint8)


def _refuse_unmapped(unknown: list[int], path: str | os.PathLike) -> None:
    """Raise naming the mask and the values a value map misses, when there are any."""
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise DataValidationError(
            f"mask {path} holds values missing from color_map: {shown}{more} (a value map "
            "{value: class_id} lists every value the masks hold; give void values the id 255)"
        )


def _refuse_alpha_only(colour: np.ndarray, alpha: Callable[[], np.ndarray], mode: str,
                       path: str | os.PathLike) -> None:
    """Raise when a mask's colour is one value everywhere but its alpha channel varies.

    Such a file keeps the mask in its alpha channel, which is not read: taken at face
    value it would be a silently empty (or full) mask. ``alpha`` returns the ``(H, W)``
    alpha channel (read only when the colour is one value); ``mode`` names the image's kind.
    """
    flat = colour.reshape(colour.shape[0] * colour.shape[1], -1)
    if flat.size == 0 or (flat != flat[:1]).any():
        return
    values = alpha()
    if values.min() != values.max():
        raise DataValidationError(
            f"mask {path} is a {mode} image of one colour whose alpha channel varies: "
            "the mask seems to be in the alpha channel, which is not read; save it as a "
            "grayscale PNG (e.g. Image.open(path).getchannel('A'))"
        )


# Formats whose colour channels carry compression noise, and how far apart the channels
# of a grey mask saved in them may be (lossy WebP at quality 50: 1 level).
_LOSSY_FORMATS = {"JPEG", "MPO", "WEBP", "JPEG2000"}
_LOSSY_GREY_TOLERANCE = 8


def _spread(rgb: np.ndarray) -> int:
    """Largest difference between two colour channels of one pixel."""
    if rgb.size == 0:
        return 0
    wide = rgb.astype(np.int16)
    return int((wide.max(axis=2) - wide.min(axis=2)).max())


def _palette_values(img) -> np.ndarray:
    """A palette mask's values: its indices (class ids), except when the entries it uses are
    all grey and run backwards (white at a lower index than black, as Pillow's
    ``quantize(2)`` and palette optimisers write a black-and-white mask): then the grey
    levels it shows, so that a white object is not read as background."""
    from ..utils.palette import palette_greys

    indices, greys, backwards = palette_greys(img)
    return greys if greys is not None and backwards else indices


def read_mask(
    path: str | os.PathLike, color_map: ColorMap | None = None
) -> np.ndarray:
    """Decode a mask file to a 2-D array of label values.

    Parameters
    ----------
    path : str or PathLike
        Single-channel image (PNG, BMP, TIFF, ...) or a ``.npy`` array (``(H, W)`` of
        bool, integer or integral float class ids; ``(H, W, 3)`` uint8 colours with
        ``color_map``; several channels otherwise refused, a one-hot array among them).
        Palette images give their indices.
        An RGB(A) file whose three channels are equal everywhere is read as grayscale,
        and so is a lossy (JPEG, WebP) colour file whose channels differ by at most 8
        levels anywhere (compression noise of a grey mask): their rounded mean is read.
        16-bit colour PNGs and TIFFs and 64-bit float TIFFs are read from their stored
        samples, as :func:`read_image` reads them (Pillow would keep each sample's top 8
        bits, turning class ids below 256 into 0). 1-bit and 8-bit WhiteIsZero TIFFs
        (ImageJ masks with an inverting LUT, ``bool`` arrays written by ``tifffile``) give
        their stored values, not the inverted ones Pillow shows.
    color_map : dict, optional
        ``{(r, g, b): class_id}``: required for colour masks, every colour present must
        be listed. Or ``{value: class_id}``, a value map (integer keys): the values read
        as above (grey levels, palette indices) are renumbered through it, e.g.
        ADE20K's or LoveDA's void 0 below classes 1..K as ``{0: 255, 1: 0, 2: 1, ...}``;
        every value present must be listed (of a 16-bit mask at full scale, 0/65535, as
        255 or 65535).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` uint8 (int64 only for 16-bit masks with values above 255). A 16-bit
        mask holding only 0 and 65535 (a binary mask at full scale) reads as 0/255.

    Raises
    ------
    DataValidationError
        For a colour mask without ``color_map`` or with colours missing from it; for a
        mask with values missing from a value map.
    """
    if color_map is not None and is_value_map(color_map):
        return _apply_value_map(read_mask(path), color_map, path)
    with _opened(path) as (img, head):
        samples = _faithful_samples(img, head, path)
        if samples is not None and head.startswith(_NPY_MAGIC):
            return _npy_mask(samples[0], color_map, path)
        if samples is not None:  # a 16-bit colour PNG or TIFF, a TIFF Pillow cannot open
            return _mask_from_samples(*samples, color_map, path)
        orientation = _orientation(img)
        lossy = img.format in _LOSSY_FORMATS
        inverted = _inverted_by_pillow(img)  # read from the tags before they are gone
        img.load()
        img = _upright(img, _left_to_apply(img, orientation))
        mode = img.mode
        if mode == "P":
            # palette indices, not colours (with or without a color_map)
            if color_map is not None:
                return _apply_color_map(np.array(img.convert("RGB")), color_map, path)
            return _palette_values(img)
        if mode == "1":
            values = np.array(img, dtype=np.uint8)  # 0/1
            return 1 - values if inverted else values
        if mode == "L":
            values = np.array(img, dtype=np.uint8)
            if inverted:
                values = 255 - values
            if color_map is not None:
                return _apply_color_map(np.repeat(values[:, :, None], 3, axis=2), color_map,
                                        path, lossy)
            return values
        if mode == "LA":
            values = np.array(img.getchannel("L"), dtype=np.uint8)
            _refuse_alpha_only(values, lambda: np.array(img.getchannel("A")), mode, path)
            return values
        if mode.startswith("I") or mode == "F":
            return _label_values(np.array(img), path)
        rgb = np.array(img.convert("RGB"), dtype=np.uint8)
        if mode in ("RGBA", "RGBa"):
            _refuse_alpha_only(rgb, lambda: np.array(img.getchannel("A")), mode, path)
    if color_map is not None:
        return _apply_color_map(rgb, color_map, path, lossy)
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    if lossy and _spread(rgb) <= _LOSSY_GREY_TOLERANCE:
        # a grey mask saved as a lossy colour file (WebP is always colour; some JPEG
        # writers keep three channels): chroma noise of a few levels, read as its grey
        return np.rint(rgb.mean(axis=2)).astype(np.uint8)
    raise DataValidationError(f"mask {path} is a colour ({mode}) image{_colour_advice(rgb)}")


def _colour_advice(rgb: np.ndarray, shown: int = 8) -> str:
    """The colours of an ``(H, W, 3)`` colour mask and the ``color_map`` it needs, for the
    error that refuses it."""
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) \
        | rgb[..., 2]
    values = np.unique(packed)
    colours = [(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255) for v in values[:shown]]
    listed = ", ".join(str(c) for c in colours) + (", ..." if len(values) > shown else "")
    if len(values) > 64:  # not class colours: a photo, or a colour mask saved lossily
        return (f" of {len(values)} colours ({listed}), too many for class colours: a "
                "photograph in the mask column, or a colour mask saved as JPEG? Masks hold "
                "class ids in one channel (grayscale or palette PNG)")
    example = ", ".join(f"{c}: {i}" for i, c in enumerate(colours[:2]))
    return (f" of {len(values)} colour(s): {listed}; masks hold class ids in one channel "
            f"(grayscale or palette PNG), or pass color_map={{{example}, ...}}, one class "
            "id per colour, the same in every mask (automask fit: --color-map FILE)")


def _label_values(values: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """``(H, W)`` samples of any integer or float dtype as label values (see
    :func:`read_mask`): uint8 when they fit, 0/65535 as 0/255, else int64."""
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise DataValidationError(f"mask {path} holds non-integer floating-point values")
    values = values.astype(np.int64)
    if values.size and values.min() >= 0 and values.max() <= 255:
        return values.astype(np.uint8)
    if values.size and np.isin(values, (0, _MAX_16BIT)).all():
        # a binary mask at 16 bits (0 and full scale): read as the 0/255 of 8 bits
        return np.where(values == _MAX_16BIT, 255, 0).astype(np.uint8)
    return values


_TIFF_PHOTOMETRIC, _WHITE_IS_ZERO = 262, 0


def _inverted_by_pillow(img: Image.Image) -> bool:
    """A 1-bit or 8-bit TIFF whose photometric interpretation is WhiteIsZero (min-is-white),
    whose samples Pillow inverts to show it as displayed (it leaves 16-bit and float ones
    as stored).

    A mask's labels are its stored values, as ``tifffile``, ImageJ (whose binary masks
    with an inverting LUT are saved this way) and numpy ``bool`` masks written by
    ``tifffile.imwrite`` have them: read as displayed, foreground and background would swap.
    """
    if img.format != "TIFF":
        return False
    tags = getattr(img, "tag_v2", {})
    bits = tags.get(_TIFF_BITS, 1)
    bits = bits[0] if isinstance(bits, tuple) else bits
    return tags.get(_TIFF_PHOTOMETRIC) == _WHITE_IS_ZERO and int(bits) in (1, 8)


def _npy_mask(data: np.ndarray, color_map: ColorMap | None,
              path: str | os.PathLike) -> np.ndarray:
    """``(H, W)`` label values of a ``.npy`` mask's ``(H, W, C)`` samples (:func:`_npy_pixels`).

    One channel holds the class ids. An array has no alpha channel, and a second channel is
    not one (a one-hot or score array of two classes read as grey + alpha would swap
    foreground and background), so several channels are refused, except 8-bit colours:
    given a ``color_map`` mapped by it, else read as grey when the three channels are equal
    (a grey mask in colour, as its PNG file reads, e.g. an RGB PIL image given in memory;
    a one-hot array never has equal channels).
    """
    if data.shape[-1] == 1:
        return _label_values(data[..., 0], path)
    if data.shape[-1] == 3 and data.dtype == np.uint8:
        if color_map is not None:
            return _apply_color_map(data, color_map, path)
        if np.array_equal(data[..., 0], data[..., 1]) and np.array_equal(data[..., 0],
                                                                         data[..., 2]):
            return np.ascontiguousarray(data[..., 0])
    raise DataValidationError(
        f"mask {path} is a .npy array of {data.shape[-1]} channels; a mask holds one class id "
        "per pixel, (H, W): save a one-hot or score array (C, H, W) as its argmax over C "
        "(a.argmax(axis=0)), or 8-bit colours (H, W, 3) with color_map={(r, g, b): class_id}"
    )


def _mask_from_samples(data: np.ndarray, orientation: int, color_map: ColorMap | None,
                       path: str | os.PathLike) -> np.ndarray:
    """``(H, W)`` label values from the ``(H, W, C)`` samples of :func:`_faithful_samples`.

    Pillow would read a 16-bit colour mask as each sample's top 8 bits, so that class ids
    below 256 all become 0. One or two channels (grey, grey + alpha) and colour channels
    equal everywhere are grey; other colours need ``color_map`` and samples that are 8-bit
    colours at 16-bit scale (multiples of 257).
    """
    data = _upright_array(data, orientation)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    colour = data[..., :3] if data.shape[-1] >= 3 else data[..., :1]
    if data.shape[-1] in (2, 4):  # grey + alpha, RGBA
        mode = f"{'LA' if data.shape[-1] == 2 else 'RGBA'} ({data.dtype})"
        _refuse_alpha_only(colour, lambda: data[..., -1], mode, path)
    if data.shape[-1] < 3:  # grey: class ids, as Pillow's 16-bit and float modes are read
        return _label_values(colour[..., 0], path)
    grey = all(np.array_equal(colour[..., 0], colour[..., c]) for c in range(3))
    if grey and color_map is None:
        return _label_values(colour[..., 0], path)
    if colour.dtype == np.uint8 and color_map is not None:  # 8-bit colours as they are
        return _apply_color_map(colour, color_map, path)
    if np.issubdtype(colour.dtype, np.integer) and colour.size and colour.min() >= 0 \
            and colour.max() <= _MAX_16BIT and not (colour.astype(np.int64) % 257).any():
        if color_map is not None:
            return _apply_color_map((colour // 257).astype(np.uint8), color_map, path)
    raise DataValidationError(
        f"mask {path} is a colour image with {data.dtype} samples; masks must hold class ids "
        "in one channel (grayscale or palette PNG), or be 8-bit colours with color_map="
        "{(r, g, b): class_id, ...}"
    )


# Okabe-Ito's colour-blind-safe colours after black (background); more classes get
# evenly spread hues (golden-ratio steps), so the palette never repeats a colour.
_OKABE_ITO = [(0, 0, 0), (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
              (0, 114, 178), (213, 94, 0), (204, 121, 167)]
IGNORE_COLOR = (255, 255, 255)


def class_colors(num_classes: int, color_map: ColorMap | None = None) -> np.ndarray:
    """RGB colour of each class id, the palette of :func:`write_mask`'s PNGs.

    Parameters
    ----------
    num_classes : int
        Number of class ids to colour (0..num_classes-1).
    color_map : dict, optional
        ``{(r, g, b): class_id}`` of colour-coded masks (a predictor's ``color_map_``):
        each class id it gives a colour is drawn in that colour (the first listed, when
        several map to it), so that predictions look like the masks trained on. A value
        map ``{value: class_id}`` gives no colours.

    Returns
    -------
    numpy.ndarray
        ``(num_classes, 3)`` uint8: class 0 black, then Okabe-Ito's colour-blind-safe
        colours, then hues spread by the golden ratio, each replaced by its colour in
        ``color_map``. The ignore value 255 is drawn in :data:`IGNORE_COLOR` (white).
    """
    import colorsys

    colors = list(_OKABE_ITO[:num_classes])
    hue = 0.1
    while len(colors) < num_classes:
        hue = (hue + 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.6 + 0.35 * (len(colors) % 2))
        colors.append((round(255 * r), round(255 * g), round(255 * b)))
    out = np.array(colors, dtype=np.uint8).reshape(-1, 3)
    given: set[int] = set()
    for colour, class_id in ({} if is_value_map(color_map) else color_map or {}).items():
        if 0 <= class_id < num_classes and class_id not in given:
            out[class_id] = colour
            given.add(class_id)
    return out


def dataset_values(color_map: ColorMap | None, num_classes: int) -> np.ndarray:
    """The value or colour that the training masks held for each class id: ``color_map``
    read backwards, to write predictions as the dataset's own masks.

    Parameters
    ----------
    color_map : dict
        A predictor's ``color_map_``: a value map ``{value: class_id}`` or a colour map
        ``{(r, g, b): class_id}``. Where several keys give one class (merged classes), the
        first listed stands for it, as in :func:`class_colors`; void keys (id 255) are
        never predicted and give nothing.
    num_classes : int
        Number of class ids (2 for a binary task: background and foreground).

    Returns
    -------
    numpy.ndarray
        Value map: ``(num_classes,)`` uint8, or uint16 when a value exceeds 255. Colour
        map: ``(num_classes, 3)`` uint8. Row ``c`` is what class ``c`` is written as, so
        that ``table[ids]`` is the mask in the dataset's values and :func:`read_mask` with
        ``color_map`` reads it back as ``ids``.

    Raises
    ------
    ConfigError
        Without a map (the masks' values are the class ids already), or when a class id
        below ``num_classes`` has no key in the map.
    """
    from ..errors import ConfigError

    if not color_map:
        raise ConfigError(
            "the model was trained without a color_map, so its class ids are the values "
            "its training masks held (binary: 0/1, written as 0/255): predict with "
            "values='class_ids'")
    first: dict[int, int | tuple[int, int, int]] = {}
    for key, class_id in color_map.items():
        first.setdefault(int(class_id), key)
    missing = [c for c in range(num_classes) if c not in first]
    if missing:
        raise ConfigError(
            f"class id(s) {missing} have no {'value' if is_value_map(color_map) else 'colour'}"
            " in the model's color_map, so predictions cannot be written in the dataset's "
            "values; predict with values='class_ids'")
    keys = [first[c] for c in range(num_classes)]
    if is_value_map(color_map):
        return np.array(keys, dtype=np.uint8 if max(keys) <= 255 else np.uint16)
    return np.array(keys, dtype=np.uint8).reshape(num_classes, 3)


def write_values(path: str | os.PathLike, values: np.ndarray, *, replace: bool = True) -> Path:
    """Write a mask in a dataset's own values as a lossless PNG, atomically: ``(H, W)``
    uint8 as 8-bit grey, uint16 as 16-bit grey, ``(H, W, 3)`` uint8 as RGB (see
    :func:`dataset_values`). Returns ``path``. ``replace``: as :func:`write_mask`'s."""
    from ..utils import atomic_write

    assert values.dtype in (np.uint8, np.uint16) and values.ndim in (2, 3), values.shape
    with atomic_write(path, replace=replace) as fh:
        Image.fromarray(values).save(fh, format="PNG")
    return Path(path)


def write_mask(path: str | os.PathLike, mask: np.ndarray, task: str,
               color_map: ColorMap | None = None, *, replace: bool = True) -> Path:
    """Write a predicted or ground-truth mask as a lossless PNG, atomically.

    Parameters
    ----------
    path : str or PathLike
        Destination ``.png`` file; written to a temporary file, then renamed.
    mask : numpy.ndarray
        ``(H, W)`` integer or bool array. Binary: foreground where > 0. Multi-class: class
        ids, 255 for ignored pixels.
    task : {"binary", "multiclass"}
        Binary masks are written as 8-bit grayscale 0/255. Multi-class masks are written
        as palette PNGs whose pixel values are the class ids (read back unchanged by
        :func:`read_mask`) and whose palette shows each class in the colour of
        :func:`class_colors` (255 in white); ids above 255 need 16-bit grayscale.
    color_map : dict, optional
        Multi-class: the ``{(r, g, b): class_id}`` of colour-coded training masks; the
        palette then shows each class in its colour there (:func:`class_colors`), so that
        the PNG looks like those masks, while its pixel values stay the class ids.
    replace : bool, default True
        False: a file at ``path`` is never replaced, even one made by another process
        meanwhile (FileExistsError; see :func:`automask.utils.atomic_write`).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        For an unknown task, a mask that is not 2-D, or negative class ids.
    """
    from ..utils import atomic_write

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {mask.shape} for {path}")
    if task == "binary":
        img = Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8))  # mode L
    elif task == "multiclass":
        if mask.size and int(mask.min()) < 0:
            raise ValueError(f"class ids must be >= 0, got {int(mask.min())} for {path}")
        if mask.size == 0 or int(mask.max()) <= 255:
            img = Image.fromarray(mask.astype(np.uint8))  # L; putpalette makes it P
            palette = np.zeros((256, 3), dtype=np.uint8)
            palette[:255] = class_colors(255, color_map)
            palette[255] = IGNORE_COLOR
            img.putpalette(palette.tobytes())
        else:
            img = Image.fromarray(mask.astype(np.uint16))
    else:
        raise ValueError(f"unknown task {task!r}; expected 'binary' or 'multiclass'")
    with atomic_write(path, replace=replace) as fh:
        img.save(fh, format="PNG")
    return Path(path)
