"""Names that moved to another module keep working for one release, with a warning.

The new home is imported by name on first use, so a module low in the stack (the
NumPy-only format) can keep an old spelling without importing the PyTorch side.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def moved(module: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves ``names`` (old name -> ``package.module:new``)
    with a DeprecationWarning; other names raise AttributeError as usual."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, new = names[name].partition(":")
        warnings.warn(f"{module}.{name} moved to {where}.{new}; the old name goes in the "
                      "next release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(where), new)

    return __getattr__
