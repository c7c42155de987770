"""Export a fine-tuned segmenter for inference outside Python: ONNX, or a torch.export program.

The exported graph is :meth:`automask.models.SamSegmenter.forward` of an inference copy of
the model (the model in memory is never changed):

- every mergeable adapter (LoRA, SSF where the layer has a bias) folded into its base
  weights (:func:`automask.peft.merge_adapters`);
- Conv-LoRA's eval-time routing computed with static operations
  (:meth:`automask.peft.ConvLoRALinear.dense_mixture`: every expert on every sample,
  weighted by the deterministic top-k gate), so no data-dependent shape is left;
- float32 on the CPU, a dynamic batch dimension and the model's fixed input size.

ONNX files are written by the TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``): it needs only ``onnx`` and traces a tiny model in seconds where the
dynamo-based exporter takes minutes (SAM-Adapter's FFT high-pass, which it has no
translation for, is traced as matrix products: :func:`automask.peft.sam_adapter.high_pass`).
Graphs it still cannot translate fall back to the dynamo-based exporter, which needs
``onnxscript``. Every file is checked with ONNX Runtime against PyTorch before it is
renamed into place.

Input: ``images`` (batch, 3, S, S) float32; output: ``logits`` (batch, C, S, S). The
preprocessing (resize, normalise, pad) and the meaning of the output are stored in the
file's metadata (:func:`preprocessing_metadata`) and written in the README.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import numbers
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.transforms import PIXEL_MEAN, PIXEL_STD
from .errors import AutomaskError, ConfigError
from .tiling import AUTO_RATIO, OVERLAP, TRAINED_RULE
from .utils import remove_empty_folders, top_created

FORMATS = ("onnx", "pt2")
OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# ONNX files over protobuf's 2 GiB limit (vit_h) keep their weights in "<name>.data".
_PROTOBUF_LIMIT = 2**31 - 2**26


class ExportError(AutomaskError, RuntimeError):
    """The model could not be exported, or the exported file does not compute the model."""


# --------------------------------------------------------------------------- model copy
def inference_copy(model: nn.Module) -> nn.Module:
    """A float32, CPU, eval-mode copy of ``model`` with its mergeable adapters merged.

    Conv-LoRA layers of the copy use their static routing (``dense_routing``). Tensors
    that modules keep from their last forward (auxiliary losses) are not copied.

    Returns
    -------
    nn.Module
        The copy; ``model`` itself is left as it was.
    """
    from .models.frozen import restore_originals
    from .peft import ConvLoRALinear, merge_adapters

    # deepcopy refuses non-leaf tensors; a module's last aux_loss is one. Map them to None.
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if torch.is_tensor(value) and not value.is_leaf:
                memo[id(value)] = None
    clone = copy.deepcopy(model, memo)
    restore_originals(model, clone)  # float32 weights held in bf16 during a prediction
    clone = clone.to(device="cpu", dtype=torch.float32).eval()
    clone.requires_grad_(False)
    clone.merged_adapters = merge_adapters(clone)
    for module in clone.modules():
        if isinstance(module, ConvLoRALinear):
            module.dense_routing = True
    return clone


# --------------------------------------------------------------------------- metadata
def preprocessing_metadata(model: nn.Module, *, task: str | None = None,
                           classes: list[str] | None = None,
                           image_range: str | tuple[float, float] | None = None,
                           large_images: str = "auto",
                           resize: str = "longest_side",
                           interpolation: str = "bilinear") -> dict[str, str]:
    """What a runtime needs to feed the exported model and read its output.

    Parameters
    ----------
    model : SamSegmenter
        The model exported.
    task : {"binary", "multiclass"}, optional
        Default: from the model's number of outputs.
    classes : list of str, optional
        Class names, background first.
    image_range : "auto", "per_image" or (low, high), optional
        How images with more than 8 bits per sample become 0..255 (``data.image_range``
        as :func:`automask.config.parse_image_range` reads it); default, ``"auto"`` and
        ``"per_image"``: each file by its own rule.
    large_images : {"auto", "crop", "resize"}
        The model's ``data.large_images``: which images predict's default tiling runs as
        windows (:func:`automask.tiling.trained_tiling`).
    resize : {"longest_side", "square"}
        The model's ``data.resize``: aspect ratio kept and padded, or stretched.
    interpolation : {"bilinear", "bicubic"}
        The model's ``data.interpolation``: Pillow's filter for that resize.

    Returns
    -------
    dict of str to str
        Stored as the ONNX file's ``metadata_props`` (and in a ``.pt2``'s
        ``automask.json``).
    """
    import automask

    num_outputs = int(model.num_classes)
    task = task or ("binary" if num_outputs == 1 else "multiclass")
    size = int(model.input_size)
    activation = ("sigmoid; foreground where the probability > 0.5" if task == "binary"
                  else "softmax over dim 1; class = argmax over dim 1")
    if isinstance(image_range, tuple):  # one range for every file, as predict reads them
        low, high = (float(v) for v in image_range)
        range_name = f"{low:.17g},{high:.17g}"
        deep = (f"samples of images with more than 8 bits (16-bit, 32-bit, float): "
                f"min(255, max(0, (value - {low:g}) * 255 / ({high:g} - {low:g}) + 0.5)) "
                f"rounded down, NaN read as {low:g}; 8-bit images unchanged")
    else:
        range_name = "per_image"
        deep = ("samples of images with more than 8 bits, each file by its own rule: 16-bit "
                "65535 to 255; floats in [0, 1] times 255; other data stretched from its "
                "minimum to its maximum; 8-bit images unchanged")
    stride = max(1, int(round(size * (1.0 - OVERLAP))))
    filter_text = (f"{interpolation} (Pillow's Image.resize with Resampling."
                   f"{interpolation.upper()}, antialiased when shrinking)")
    meta = {
        "automask.version": automask.__version__,
        "torch_version": torch.__version__,
        "backbone": str(model.backbone),
        "peft_method": str(model.peft_method),
        "merged_adapters": str(getattr(model, "merged_adapters", 0)),
        "task": task,
        "classes": json.dumps(classes if classes is not None else []),
        "input_name": INPUT_NAME,
        "input_size": str(size),
        "input_layout": f"(batch, 3, {size}, {size}) float32, RGB",
        "orientation": "apply the file's EXIF orientation first (Pillow's "
                       "ImageOps.exif_transpose), as predict reads images; masks come "
                       "out upright, in that orientation",
        "jpeg_draft": ("JPEG files: Image.draft('RGB', (w, h)) before the decode, (w, h) the "
                       "resized size in the file's own orientation (swapped for EXIF "
                       "orientations 5-8), so that libjpeg decodes at 1/2, 1/4 or 1/8 scale "
                       "while both sides stay at least (w, h), as predict decodes JPEGs"),
        "resize_mode": resize,
        "interpolation": interpolation,
        "resize": (f"longest side to {size} pixels, aspect ratio kept "
                   f"(new side = max(1, int(side * scale + 0.5))), {filter_text}"
                   if resize == "longest_side" else
                   f"stretched to {size}x{size} pixels, aspect ratio not kept, {filter_text}"),
        "pixel_mean": ",".join(str(v) for v in PIXEL_MEAN),
        "pixel_std": ",".join(str(v) for v in PIXEL_STD),
        "image_range": range_name,
        "deep_images": deep,
        "normalisation": "(pixel - pixel_mean) / pixel_std per channel, pixels in 0..255",
        "padding": (f"bottom and right to {size}x{size}, value 0 after normalisation"
                    if resize == "longest_side" else "none: the image fills the input"),
        "output_name": OUTPUT_NAME,
        "output": f"logits (batch, {num_outputs}, {size}, {size}) over the "
                  f"{'padded ' if resize == 'longest_side' else ''}input",
        "output_activation": activation,
        "postprocessing": "crop the resized (h, w) region at the top left, resize the "
                          "probabilities to the original size bilinearly with half-pixel "
                          "centres and no antialiasing (torch's F.interpolate(..., "
                          "mode='bilinear', align_corners=False)), then threshold or argmax",
        "large_images": _large_images_rule(large_images, size, stride),
    }
    return meta


def _large_images_rule(large_images: str, size: int, stride: int) -> str:
    """How predict's default ``tiling="auto"`` treats large images, for the metadata."""
    windows = (f"it runs {size}x{size} windows of the original image (stride {stride}, the "
               "last window aligned with the border), each prepared as above, and blends "
               "their probabilities with automask.tiling.blend_weights")
    rule = TRAINED_RULE[large_images]
    if rule == "off":
        return (f"predict's default tiling='auto' resizes every image, as the model was "
                f"trained (data.large_images='resize'); with tiling='on' {windows} for "
                f"every image larger than {size}")
    which = (f"whose longer side exceeds {AUTO_RATIO:g} x {size}" if rule == "auto"
             else f"larger than {size} (the model was trained on native-scale crops, "
                  "data.large_images='crop')")
    return (f"predict's default tiling='auto' does not resize an image {which}: {windows}; "
            "tiling='off' resizes every image")


# --------------------------------------------------------------------------- export
def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    metadata: dict[str, str] | None = None,
    tolerance: float = 1e-3,
) -> Path:
    """Export a segmenter (merged, static routing) to ``path``, checking it first.

    Parameters
    ----------
    model : SamSegmenter
        Any segmenter, with or without a PEFT method; it is copied, never changed.
    path : str or os.PathLike
        Destination file; its folder is created. An existing file is replaced only when
        the new one is complete and checked.
    format : {"onnx", "pt2"}, optional
        ``"onnx"``: an ONNX file (opset 17) for ONNX Runtime and others; ``"pt2"``: a
        :func:`torch.export.save` program (needs PyTorch to run). Default: from the
        path's suffix (``.onnx`` or ``.pt2``).
    metadata : dict of str to str, optional
        Stored in the file over :func:`preprocessing_metadata` of ``model``: a key of
        your own (a licence, a dataset name) is added, a key of the same name replaces
        the default one.
    tolerance : float
        Largest accepted ``max |exported - PyTorch|`` over the logits of a random batch of
        3, relative to ``1 + max |PyTorch logits|``; a finite number >= 0.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ConfigError
        Unknown format, a file name whose suffix does not fit it, a path that cannot be
        a file (an existing folder, under a file, in a folder that cannot be written), a
        ``tolerance`` that is not a finite number >= 0, or ``metadata`` that is not a dict of
        str to str; all before any work.
    ExportError
        ``onnx``/``onnxruntime`` missing, the exporter failed, or the exported file does not
        reproduce the model within ``tolerance``.
    """
    path, format = _check_target(path, format)
    if (isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real)
            or not math.isfinite(tolerance) or tolerance < 0):
        raise ConfigError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if metadata is not None:
        _check_metadata(metadata)
    clone = inference_copy(model)
    meta = {**preprocessing_metadata(clone), **(metadata or {})}
    meta["merged_adapters"] = str(clone.merged_adapters)
    size = int(clone.input_size)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=gen)  # batch 2: not specialised to 1
    check = torch.randn(3, 3, size, size, generator=gen)  # another batch size than traced
    with torch.no_grad():
        expected = clone(check).numpy()
    created = top_created(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_checked(clone, example, check, expected, path, format, meta, tolerance)
    except BaseException:
        # no debris: the folders this call created go again, while empty (another
        # process may have written into them meanwhile)
        remove_empty_folders(path.parent, created)
        raise
    return path


def _write_checked(clone: nn.Module, example: torch.Tensor, check: torch.Tensor,
                   expected: np.ndarray, path: Path, format: str, meta: dict[str, str],
                   tolerance: float) -> None:
    """Export into a temporary folder beside ``path``, compare with PyTorch, rename; an
    ExportError naming ``path`` when the disk refuses a write."""
    try:
        _write_checked_in(clone, example, check, expected, path, format, meta, tolerance)
    except OSError as exc:  # a full disk, a file size limit: the temporary folder is gone
        raise ExportError(f"cannot write the {format} export {str(path)!r}: "
                          f"{exc.strerror or exc}") from exc


def _write_checked_in(clone: nn.Module, example: torch.Tensor, check: torch.Tensor,
                      expected: np.ndarray, path: Path, format: str, meta: dict[str, str],
                      tolerance: float) -> None:
    # a short name of its own: ``path.name`` may already be as long as the system allows
    with tempfile.TemporaryDirectory(prefix=".automask-export-", dir=path.parent) as tmp:
        tmp_file = Path(tmp) / path.name
        if format == "onnx":
            exporter = _export_onnx(clone, example, tmp_file, meta, expected.shape[1:])
            produced = _run_onnx(tmp_file, check.numpy())
        else:
            exporter = "torch.export"
            _export_pt2(clone, example, tmp_file, meta)
            program = torch.export.load(str(tmp_file))
            with torch.no_grad():
                produced = program.module()(check).numpy()
        error = float(np.abs(produced - expected).max())
        if not error <= tolerance * (1.0 + float(np.abs(expected).max())):
            raise ExportError(
                f"the {format} export ({exporter}) does not reproduce the model: max |logit "
                f"difference| {error:.3g} on a random batch (tolerance {tolerance:g})"
            )
        data_name = path.name + ".data"  # listed, not stat'ed: it may be too long a name
        if data_name in os.listdir(tmp):  # weights beside the graph (over 2 GiB)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_file, path)


def export_predictor(seg, path: str | os.PathLike, format: str | None = None,
                     model: str | None = None) -> Path:
    """Export candidate ``model`` (default: the best) of a fitted :class:`SemanticSegmentor`.

    See :func:`export_model`; the metadata also names the task, the classes, the candidate
    and the value range its images with more than 8 bits are read with. The predictor's
    in-memory model is not changed.
    """
    from .hardware import ready_cpu_threads

    seg._check_fitted()
    ready_cpu_threads()  # the check below runs the model on torch's CPU threads
    name = seg.best_model_ if model is None else model
    if name not in seg.models_:
        raise ConfigError(f"unknown model {name!r}; trained models: {', '.join(seg.models_)}")
    format = _check_target(path, format)[1]  # before the model is rebuilt
    from .prediction import check_output_file

    check_output_file(path, "the export", predictor=getattr(seg, "path_", None))
    from .config import parse_image_range

    image_range = parse_image_range(seg._config(name).data.image_range)
    net = seg._model(name)
    meta = preprocessing_metadata(net, task=seg.task_, classes=[str(c) for c in seg.classes_],
                                  image_range=image_range,
                                  large_images=seg._config(name).data.large_images,
                                  resize=seg._config(name).data.resize,
                                  interpolation=seg._config(name).data.interpolation)
    meta["model"] = name
    precision = seg._config(name).env.precision
    if precision in ("bf16-mixed", "16-mixed"):
        where = ("bfloat16 where the machine has native bfloat16 products (a CUDA GPU of "
                 "compute capability 8.0 on, a CPU with AVX512-BF16 or AMX)"
                 if precision == "bf16-mixed" else "float16 on a CUDA GPU")
        meta["predict_precision"] = (
            f"{precision}: the predictor's predict computes in {where}, in float32 "
            "elsewhere; this file computes in float32, so its probabilities differ from a "
            "reduced-precision predict's by up to about 1e-2")
    else:
        meta["predict_precision"] = f"{precision}: the same arithmetic as predict"
    return export_model(net, path, format=format, metadata=meta)


# --------------------------------------------------------------------------- internals
def _check_target(path: str | os.PathLike, format: str | None) -> tuple[Path, str]:
    """The destination as a Path and the format (None: the path's suffix); ConfigError /
    ExportError before any work is done."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise ConfigError(f"the export path must name a file (str or pathlib.Path), got "
                          f"{type(path).__name__} {path!r}")
    path = Path(path).expanduser()
    if path.name.lower() in {f".{f}" for f in FORMATS}:  # a hidden file of no suffix
        raise ConfigError(f"export path {str(path)!r} names a file {path.name!r} without a "
                          f"name before its suffix; name the file, e.g. "
                          f"{str(path.with_name('model' + path.name))!r}")
    if isinstance(format, str):
        format = format.lower()  # as the suffix is read: "ONNX" and ".ONNX" alike
    if format is None:
        format = path.suffix.lower().lstrip(".")
        if format not in FORMATS:
            raise ConfigError(f"export path {str(path)!r} must end with "
                              f"{' or '.join('.' + f for f in FORMATS)} (the format is taken "
                              "from the suffix)")
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; valid formats: {list(FORMATS)}")
    if path.suffix.lower() != f".{format}":
        raise ConfigError(f"export path {str(path)!r} must end with '.{format}' for format "
                          f"{format!r}")
    from .prediction import path_problem

    problem = path_problem(path, folder=False)
    if problem is not None:
        raise ConfigError(f"cannot export to {str(path)!r}: {problem}")
    # the nearest existing folder on the way gets the temporary file (or the new folders)
    existing = next(folder for folder in path.parents if folder.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot export to {str(path)!r}: cannot write in "
                          f"{str(existing)!r} ({exc.strerror or exc})") from exc
    if format == "onnx":
        _require_onnx()
    return path, format


def _check_metadata(metadata: Any) -> None:
    """ConfigError unless ``metadata`` is a dict of str to str (what ONNX can store)."""
    if not isinstance(metadata, dict):
        raise ConfigError(f"metadata must be a dict of str to str, got a "
                          f"{type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"metadata must be a dict of str to str; the entry {key!r}: "
                              f"{value!r} is not (json.dumps a list or a number first)")


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the packages onnx and onnxruntime ({exc}); install them with "
            "pip install 'automask[export]'"
        ) from exc


def _export_onnx(model: nn.Module, example: torch.Tensor, dest: Path,
                 meta: dict[str, str], out_dims: tuple[int, ...]) -> str:
    """Write ``dest`` with the metadata and the output's non-batch dimensions ``out_dims``
    (K, H, W); returns the exporter used."""
    import onnx

    raw_dir = dest.parent / "raw"  # dest's name may be as long as the system allows
    raw_dir.mkdir()
    raw = raw_dir / "model.onnx"
    common = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    exporter = "torchscript"
    try:
        # Tracer warnings are about the fixed input size; on failure the exporter prints the
        # whole graph to the process's stdout, which the fallback makes irrelevant.
        with warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(raw), dynamo=False, opset_version=OPSET,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True, **common)
    except torch.onnx.errors.UnsupportedOperatorError as first:
        exporter = "dynamo"
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ExportError(
                f"the TorchScript exporter cannot translate this model ({first}) and the "
                "dynamo-based one needs onnxscript: pip install 'automask[export]'"
            ) from first
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(raw), dynamo=True, verbose=False,
                                  opset_version=18, optimize=True,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},), **common)
        except Exception as exc:  # the exporter raises many kinds
            raise ExportError(f"ONNX export failed with both exporters: {first}; {exc}") from exc
    except OSError:
        raise  # the disk's refusal: named with the export's path by the caller
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {exc}") from exc
    proto = onnx.load(str(raw))  # loads weights kept beside the graph, if any
    _declare_output_dims(proto, out_dims)
    meta = {**meta, "exporter": exporter}
    onnx.helper.set_model_props(proto, meta)
    shutil.rmtree(raw_dir)  # the raw file and any weights beside it
    if proto.ByteSize() < _PROTOBUF_LIMIT:
        onnx.checker.check_model(proto)
        onnx.save_model(proto, str(dest))
    else:
        onnx.save_model(proto, str(dest), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=dest.name + ".data")
    return exporter


def _declare_output_dims(proto, out_dims: tuple[int, ...]) -> None:
    """Declare the logits' class and pixel dimensions as the numbers they are.

    The exporter leaves them symbolic (``Resizelogits_dim_1``, ...) although the model's
    fixed input size and classes fix them, so that a runtime or compiler reading the graph
    (TensorRT, ONNX Runtime's memory planning) could not size the output ahead of a run.
    """
    output = next(o for o in proto.graph.output if o.name == OUTPUT_NAME)
    shape = output.type.tensor_type.shape  # written anew: (batch, K, H, W)
    shape.ClearField("dim")
    shape.dim.add().dim_param = "batch"  # the input's name for it
    for size in out_dims:
        shape.dim.add().dim_value = int(size)


@contextlib.contextmanager
def _quiet_stdout():
    """Send file descriptor 1 (written by C++ code, not only Python's) to /dev/null.

    Also where there is no stdout: ``sys.stdout`` None (``pythonw``, some services) or
    descriptor 1 closed. A closed descriptor 1 is held by /dev/null meanwhile, so that no
    file the exporter opens gets it, and is closed again afterwards.
    """
    if sys.stdout is not None:
        with contextlib.suppress(OSError, ValueError):  # ValueError: closed by the caller
            sys.stdout.flush()
    try:
        saved: int | None = os.dup(1)
    except OSError:  # descriptor 1 is closed
        saved = None
    null = os.open(os.devnull, os.O_WRONLY)  # descriptor 1 itself when that one is closed
    try:
        if null != 1:
            os.dup2(null, 1)
            os.close(null)
        yield
    finally:
        if saved is None:
            os.close(1)
        else:
            os.dup2(saved, 1)
            os.close(saved)


def _run_onnx(file: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def _export_pt2(model: nn.Module, example: torch.Tensor, dest: Path,
                meta: dict[str, str]) -> None:
    try:
        program = torch.export.export(model, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:
        raise ExportError(f"torch.export failed: {exc}") from exc
    meta = {**meta, "exporter": "torch.export"}
    # Serialised in memory, then written by Python: torch's own file writer, out of disk
    # space, aborts the whole process (a C++ exception past its destructor), where a
    # write here raises OSError.
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"automask.json": json.dumps(meta)})
    with open(dest, "wb") as fh:
        fh.write(buffer.getbuffer())
