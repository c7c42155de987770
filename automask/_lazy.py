"""Names a package loads on first use (PEP 562 module ``__getattr__``): ``automask`` and
the subpackages whose heavy parts (torch, Lightning, torchmetrics, scikit-learn) not every
command needs."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_names(package: str, sources: dict[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: a name of ``sources`` is imported from
    its submodule (relative to the package: ``"segmentor"``, ``"training.distributed"``)
    on first access and kept in the package, so later look-ups skip this function; any
    other name is an AttributeError."""

    def __getattr__(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{sources[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
