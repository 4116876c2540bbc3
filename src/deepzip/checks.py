"""Values from a file, a flag or a caller checked against the types a dataclass declares:
the one type checker recipes (built from YAML) and training configs (made in Python)
share, so a wrong type says the same line wherever it comes from."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from typing import Any

from .errors import DeepzipError

__all__ = ["brief", "build", "coerce", "field_problems"]


def brief(v: Any) -> str:
    """A value for an error message: short, and safe for 5,000-digit integers."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    text = repr(v) if isinstance(v, (str, int, float, bool, type(None))) else type(v).__name__
    return text[:40] + ("..." if len(text) > 40 else "")


def build(cls: type, data: Any, where: str) -> Any:
    """Dataclass from a mapping, recursively; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise DeepzipError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DeepzipError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(names))}")
    return cls(**{k: coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def coerce(tp: Any, v: Any, where: str) -> Any:
    """``v`` as a value of the declared type ``tp``: ints stay ints (not bools), numbers
    become finite floats, strings and bools stay themselves, lists, tuples and mappings
    are checked item by item (at most 10,000), a dataclass is built from a mapping,
    ``X | None`` takes None; anything else is one line naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if v is None:
            return None
        for a in args[:-1]:  # the first type that takes the value; the last one's error
            with contextlib.suppress(DeepzipError):
                return coerce(a, v, where)
        return coerce(args[-1], v, where)
    if dataclasses.is_dataclass(tp):
        return build(tp, v, where)
    if origin is list:
        if not isinstance(v, list) or len(v) > 10_000:
            raise DeepzipError(f"{where}: expected a list (of at most 10,000 items)")
        (item,) = typing.get_args(tp)
        return [coerce(item, x, f"{where}[{i}]") for i, x in enumerate(v)]
    if origin is tuple:
        if not isinstance(v, (list, tuple)) or len(v) > 64:
            raise DeepzipError(f"{where}: expected a list (of at most 64 items)")
        item = typing.get_args(tp)[0]
        return tuple(coerce(item, x, f"{where}[{i}]") for i, x in enumerate(v))
    if origin is dict:
        if not isinstance(v, dict) or len(v) > 10_000:
            raise DeepzipError(f"{where}: expected a mapping (of at most 10,000 items)")
        _, val = typing.get_args(tp)
        return {str(k): (x if val is Any else coerce(val, x, f"{where}.{k}"))
                for k, x in v.items()}
    if tp is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        if (abs(v) < 1e300 if isinstance(v, int) else math.isfinite(v)):
            return float(v)
        raise DeepzipError(f"{where}: expected a finite number, got {brief(v)}")
    if tp is int and type(v) is int:
        if -(2 ** 63) < v < 2 ** 63:
            return v
        raise DeepzipError(f"{where}: {brief(v)} is out of range")
    if tp in (str, bool) and type(v) is tp:
        return v
    if tp is Any:
        return v
    raise DeepzipError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {brief(v)}")


def field_problems(obj: Any) -> list[str]:
    """What is wrong with the types of a dataclass instance's fields, one line each; the
    fields that pass take their coerced value (an int where a float is declared becomes
    a float, a list where a tuple is declared a tuple)."""
    hints = typing.get_type_hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        try:
            setattr(obj, f.name, coerce(hints[f.name], getattr(obj, f.name), f.name))
        except DeepzipError as e:
            problems.append(str(e))
    return problems
