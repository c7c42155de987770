"""Parameter counts per PEFT method, computed on the meta device (no weights allocated)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .backbones import build_sam_parts, get_spec
from .sam2 import is_sam2_backbone

if TYPE_CHECKING:  # pandas loads in parameter_summary: the model path does not need it
    import pandas as pd


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) number of parameter elements of ``model``."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def sam_parameter_count(backbone: str) -> int:
    """Parameters of the whole official SAM model for ``backbone`` (641.09M for vit_h)."""
    spec = get_spec(backbone)
    if is_sam2_backbone(backbone):
        with torch.device("meta"):
            return count_parameters(_sam2_model(backbone, spec))[1]
    with torch.device("meta"):
        parts = build_sam_parts(spec, spec.pretrain_size)
    return sum(count_parameters(part)[1] for part in parts)


def _sam2_model(backbone: str, spec) -> nn.Module:
    from .sam2 import Sam2Segmenter, build_sam2_parts

    return Sam2Segmenter(*build_sam2_parts(spec, spec.pretrain_size), backbone=backbone,
                         input_size=spec.pretrain_size)


def parameter_summary(
    backbone: str = "vit_h",
    methods: list[str] | None = None,
    num_classes: int = 1,
    multiclass_head: str = "tokens",
    **peft_options,
) -> pd.DataFrame:
    """Trainable parameters of each PEFT method on ``backbone``, as in the paper's table.

    Models are built on the meta device, so even ``vit_h`` costs no memory or time.

    Parameters
    ----------
    backbone : str
        Registry name of the backbone.
    methods : list of str, optional
        PEFT methods to count; default: every method in
        :data:`~automask.peft.PEFT_METHODS`, in registry order (on SAM 2.1 backbones, those
        that Hiera supports).
    num_classes : int
        Number of classes, background included, as ``fit(num_classes=...)`` counts them:
        1 or 2 is a binary task (SAM's single mask), K >= 3 a K-class head.
    multiclass_head : {"tokens", "mask_classification"}
        Head used when ``num_classes >= 3``.
    **peft_options
        Options passed to :func:`~automask.peft.apply_peft` (``rank=4``...), each to the
        methods that use it; an option none of ``methods`` uses is an error.

    Returns
    -------
    pandas.DataFrame
        Columns ``method``, ``trainable``, ``trainable_m`` (millions, 2 decimals),
        ``ratio_pct`` (trainable / all parameters of the adapted segmenter, in %, 2
        decimals: the paper's convention, which its LST row, 11.49M / 1.77%, shows) and
        ``total`` (all parameters of the adapted segmenter).

    Raises
    ------
    ConfigError
        Unknown backbone or method, ``methods`` given as one string, or an option that
        none of ``methods`` uses (the methods that use it are named); raised before any
        model is built.
    """
    from ..errors import ConfigError
    from ..peft import PEFT_METHODS, apply_peft, get_method
    from ..peft.registry import option_users
    from .segmenter import SamSegmenter

    spec = get_spec(backbone)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    rows = []
    if methods is None:
        methods = list(PEFT_METHODS)
        if is_sam2_backbone(backbone):  # the methods that Hiera supports
            from .sam2 import SUPPORTED_METHODS

            methods = [m for m in methods if m in SUPPORTED_METHODS]
    elif isinstance(methods, str):
        raise ConfigError(f"methods must be a list of method names, got the string "
                          f"{methods!r} (write [{methods!r}])")
    used = set()
    for method in methods:
        used.update(get_method(method).options.field_types())
    unused = sorted(set(peft_options) - used)
    if unused:
        users = option_users()
        detail = "; ".join(f"{key!r} is used by {', '.join(users[key])}" if key in users
                           else f"{key!r} is no PEFT option" for key in unused)
        raise ConfigError(f"no method of {list(methods)} uses {unused}: {detail}")
    for method in methods:
        fields = get_method(method).options.field_types()
        options = {k: v for k, v in peft_options.items() if k in fields}
        with torch.device("meta"):
            model = _sam2_model(backbone, spec) if is_sam2_backbone(backbone) else SamSegmenter(
                *build_sam_parts(spec, spec.pretrain_size), backbone=backbone,
                input_size=spec.pretrain_size)
            # a fit of two classes is binary: one map, no multi-class head
            model.set_num_classes(1 if num_classes <= 2 else num_classes, head=multiclass_head)
            apply_peft(model, method, **options)
        trainable, total = count_parameters(model)
        rows.append({
            "method": method,
            "trainable": trainable,
            "trainable_m": round(trainable / 1e6, 2),
            "ratio_pct": round(100.0 * trainable / total, 2),
            "total": total,
        })
    import pandas as pd

    return pd.DataFrame(rows, columns=["method", "trainable", "trainable_m", "ratio_pct", "total"])
