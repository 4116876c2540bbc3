"""Code the user names on the command line or in an opted-in recipe: ``package.module:name``.

The only place deepzip imports a module by name. Names read from files never get here.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .errors import DeepzipError

__all__ = ["load_entry_point"]


def load_entry_point(spec: str, what: str) -> Any:
    """``package.module:attribute`` -> the attribute (imports the module: the user's code,
    found from the current folder first, as ``python -m`` finds modules)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise DeepzipError(f"{what} {spec!r}: expected package.module:function")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise DeepzipError(f"{what} {spec!r}: cannot import {mod_name} ({e}; modules are "
                           "found from the current folder and PYTHONPATH)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DeepzipError(f"{what} {spec!r}: {mod_name} has no {attr}")
        obj = getattr(obj, part)
    return obj
