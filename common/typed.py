"""Plain data (parsed YAML or JSON) to typed dataclasses, checked field by field.

One small builder serves the experiment config and the run records: it follows the
dataclass's type hints (nested dataclasses, lists, dicts, unions, ``Literal`` choices,
enums), reports an unknown or missing key with the dotted path to it and a guess at
what was meant, and never coerces a value silently into another kind.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from enum import Enum
from typing import Any, Literal


class TypedDataError(ValueError):
    """Data that does not fit its declared type; the message says where and why."""


def build(cls: type, data: Any, origin: str, prefix: str = "", null_is_nan: bool = False) -> Any:
    """``cls(**data)`` with every field checked against its type hint.

    ``null_is_nan``: a ``null`` where a float is expected reads as NaN (JSON writes NaN
    metrics as null); configs leave it off, so a forgotten value is an error.
    """
    if not isinstance(data, dict):
        raise TypedDataError(f"{origin}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise TypedDataError(f"{origin}: unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, origin, f"{prefix}{key}", null_is_nan)
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise TypedDataError(f"{origin}: '{prefix}{missing[0]}' is missing")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, origin: str, dotted: str, null_is_nan: bool) -> Any:
    kind, args = typing.get_origin(tp), typing.get_args(tp)
    where = f"{origin}: '{dotted}'"
    if dataclasses.is_dataclass(tp):
        return build(tp, value, origin, dotted + ".", null_is_nan)
    if kind in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, origin, dotted, null_is_nan)
            except TypedDataError as exc:
                errors.append(str(exc))
        raise TypedDataError(errors[0] if errors else f"{where} must not be empty")
    if kind is Literal:
        if value not in args:
            raise TypedDataError(f"{where} is {value!r}; choose one of {', '.join(repr(a) for a in args)}")
        return value
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise TypedDataError(f"{where} is {value!r}; choose one of {', '.join(repr(m.value) for m in tp)}") from None
    if kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypedDataError(f"{where} must be a list")
        items = [_coerce(args[0], v, origin, f"{dotted}[{i}]", null_is_nan) for i, v in enumerate(value)]
        return items if kind is list else tuple(items)
    if kind is dict:
        if not isinstance(value, dict):
            raise TypedDataError(f"{where} must be a mapping")
        return {
            _coerce(args[0], str(k), origin, dotted, null_is_nan): _coerce(args[1], v, origin, f"{dotted}.{k}", null_is_nan)
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypedDataError(f"{where} must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypedDataError(f"{where} must be a whole number, not {value!r}")
        return value
    if tp is float:
        if value is None and null_is_nan:
            return math.nan
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as text
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypedDataError(f"{where} must be a number, not {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypedDataError(f"{where} must be text, not {value!r}")
        return str(value)
    raise TypedDataError(f"{where}: unsupported type {tp}")  # pragma: no cover - a programming error
