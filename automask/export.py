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
dynamo-based exporter takes minutes. Graphs it cannot translate (SAM-Adapter's FFT
high-pass) fall back to the dynamo-based exporter, which needs ``onnxscript``. Every file
is checked with ONNX Runtime against PyTorch before it is renamed into place.

Input: ``images`` (batch, 3, S, S) float32; output: ``logits`` (batch, C, S, S). The
preprocessing (resize, normalise, pad) and the meaning of the output are stored in the
file's metadata (:func:`preprocessing_metadata`) and written in the README.
"""
from __future__ import annotations

import contextlib
import copy
import json
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
from .utils import top_created

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
                           classes: list[str] | None = None) -> dict[str, str]:
    """What a runtime needs to feed the exported model and read its output.

    Parameters
    ----------
    model : SamSegmenter
        The model exported.
    task : {"binary", "multiclass"}, optional
        Default: from the model's number of outputs.
    classes : list of str, optional
        Class names, background first.

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
        "resize": f"longest side to {size} pixels, aspect ratio kept "
                  "(new side = max(1, int(side * scale + 0.5))), bilinear",
        "pixel_mean": ",".join(str(v) for v in PIXEL_MEAN),
        "pixel_std": ",".join(str(v) for v in PIXEL_STD),
        "normalisation": "(pixel - pixel_mean) / pixel_std per channel, pixels in 0..255",
        "padding": f"bottom and right to {size}x{size}, value 0 after normalisation",
        "output_name": OUTPUT_NAME,
        "output": f"logits (batch, {num_outputs}, {size}, {size}) over the padded input",
        "output_activation": activation,
        "postprocessing": "crop the resized (h, w) region at the top left, resize "
                          "probabilities bilinearly to the original size, then threshold "
                          "or argmax",
    }
    return meta


# --------------------------------------------------------------------------- export
def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "onnx",
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
    format : {"onnx", "pt2"}
        ``"onnx"``: an ONNX file (opset 17) for ONNX Runtime and others; ``"pt2"``: a
        :func:`torch.export.save` program (needs PyTorch to run).
    metadata : dict of str to str, optional
        Default: :func:`preprocessing_metadata` of ``model``.
    tolerance : float
        Largest accepted ``max |exported - PyTorch|`` over the logits of a random batch of
        3, relative to ``1 + max |PyTorch logits|``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ConfigError
        Unknown format, a file name whose suffix does not fit it, or a path that cannot be
        a file (an existing folder, or under a file).
    ExportError
        ``onnx``/``onnxruntime`` missing, the exporter failed, or the exported file does not
        reproduce the model within ``tolerance``.
    """
    path = _check_target(path, format)
    clone = inference_copy(model)
    meta = dict(metadata if metadata is not None else preprocessing_metadata(clone))
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
        if created is not None:  # no debris: the folders this call created go again
            shutil.rmtree(created, ignore_errors=True)
        raise
    return path


def _write_checked(clone: nn.Module, example: torch.Tensor, check: torch.Tensor,
                   expected: np.ndarray, path: Path, format: str, meta: dict[str, str],
                   tolerance: float) -> None:
    """Export into a temporary folder beside ``path``, compare with PyTorch, rename."""
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        tmp_file = Path(tmp) / path.name
        if format == "onnx":
            exporter = _export_onnx(clone, example, tmp_file, meta)
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
        data_file = Path(tmp) / (path.name + ".data")
        if data_file.exists():  # weights beside the graph (over 2 GiB)
            os.replace(data_file, path.parent / data_file.name)
        os.replace(tmp_file, path)


def export_predictor(seg, path: str | os.PathLike, format: str = "onnx",
                     model: str | None = None) -> Path:
    """Export candidate ``model`` (default: the best) of a fitted :class:`SemanticSegmentor`.

    See :func:`export_model`; the metadata also names the task, the classes and the
    candidate. The predictor's in-memory model is not changed.
    """
    seg._check_fitted()
    name = seg.best_model_ if model is None else model
    if name not in seg.models_:
        raise ConfigError(f"unknown model {name!r}; trained models: {', '.join(seg.models_)}")
    _check_target(path, format)  # before the model is rebuilt
    net = seg._model(name)
    meta = preprocessing_metadata(net, task=seg.task_, classes=[str(c) for c in seg.classes_])
    meta["model"] = name
    return export_model(net, path, format=format, metadata=meta)


# --------------------------------------------------------------------------- internals
def _check_target(path: str | os.PathLike, format: str) -> Path:
    """The destination as a Path; ConfigError / ExportError before any work is done."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; valid formats: {list(FORMATS)}")
    path = Path(path)
    if path.suffix.lower() != f".{format}":
        raise ConfigError(f"export path {str(path)!r} must end with '.{format}' for format "
                          f"{format!r}")
    from .prediction import path_problem

    problem = path_problem(path, folder=False)
    if problem is not None:
        raise ConfigError(f"cannot export to {str(path)!r}: {problem}")
    if format == "onnx":
        _require_onnx()
    return path


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
                 meta: dict[str, str]) -> str:
    """Write ``dest`` with the metadata; returns the exporter used."""
    import onnx

    raw = dest.with_suffix(".raw.onnx")
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
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {exc}") from exc
    proto = onnx.load(str(raw))  # loads weights kept beside the graph, if any
    meta = {**meta, "exporter": exporter}
    onnx.helper.set_model_props(proto, meta)
    for leftover in raw.parent.iterdir():  # the raw file and any weights beside it
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    if proto.ByteSize() < _PROTOBUF_LIMIT:
        onnx.checker.check_model(proto)
        onnx.save_model(proto, str(dest))
    else:
        onnx.save_model(proto, str(dest), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=dest.name + ".data")
    return exporter


@contextlib.contextmanager
def _quiet_stdout():
    """Send file descriptor 1 (written by C++ code, not only Python's) to /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
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
    torch.export.save(program, str(dest), extra_files={"automask.json": json.dumps(meta)})
