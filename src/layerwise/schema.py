"""Checking JSON data against typed definitions (TypedDicts), with one line for the first problem.

The file formats layerwise reads back — the results JSON and the baseline — are declared as
TypedDicts next to the code that owns them; :func:`check` walks a loaded JSON value against such a
declaration: required keys, types, finite numbers, and nothing nested deeper than declared. It
returns the first problem as ``"exits[2].bleu: expected a finite number, got NaN"`` so that a
reader can raise one clear error instead of a KeyError, TypeError or AttributeError later.
"""

from __future__ import annotations

import math
import types
from typing import Any, Literal, NotRequired, Required, Union, get_args, get_origin, get_type_hints

_HINTS: dict[Any, tuple[dict[str, Any], frozenset[str]]] = {}


def _hints(td: Any) -> dict[str, Any]:
    return _declared(td)[0]


def _required(td: Any) -> frozenset[str]:
    return _declared(td)[1]


def _declared(td: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """A TypedDict's key types and required keys. Worked out from the annotations, because with
    ``from __future__ import annotations`` Python 3.11 cannot see ``Required[...]`` in
    ``__required_keys__``."""
    if td not in _HINTS:
        extras = get_type_hints(td, include_extras=True)
        hints, required = {}, set()
        for key, tp in extras.items():
            origin = get_origin(tp)
            if origin is Required:
                required.add(key)
                tp = get_args(tp)[0]
            elif origin is NotRequired:
                tp = get_args(tp)[0]
            elif td.__total__:
                required.add(key)
            hints[key] = tp
        _HINTS[td] = (hints, frozenset(required))
    return _HINTS[td]


def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__")


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _name(tp: Any) -> str:
    if tp is float:
        return "a finite number"
    if tp is int:
        return "a whole number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true/false"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    origin = get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict or _is_typeddict(tp):
        return "an object"
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_name(a) for a in get_args(tp))
    return str(tp)


def check(value: Any, tp: Any, where: str = "") -> str | None:
    """The first way ``value`` does not match ``tp`` (a TypedDict or typing type), or None."""
    here = where or "the top level"
    if tp is Any:
        return None
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        problems = [check(value, a, where) for a in get_args(tp)]
        if any(p is None for p in problems):
            return None
        # one of the alternatives matched the kind: report its deeper problem
        for a, p in zip(get_args(tp), problems):
            if _kind_matches(value, a):
                return p
        return f"{here}: expected {_name(tp)}, got {_describe(value)}"
    if origin is Literal:
        return None if value in get_args(tp) else f"{here}: expected {_name(tp)}, got {value!r}"
    if tp is type(None):
        return None if value is None else f"{here}: expected null, got {_describe(value)}"
    if tp is bool:
        return None if isinstance(value, bool) else f"{here}: expected true/false, got {_describe(value)}"
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{here}: expected a whole number, got {_describe(value)}"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else f"{here}: expected a finite number, got {_describe(value)}"
    if tp is str:
        return None if isinstance(value, str) else f"{here}: expected a string, got {_describe(value)}"
    if origin is list:
        if not isinstance(value, list):
            return f"{here}: expected a list, got {_describe(value)}"
        (item,) = get_args(tp) or (Any,)
        for i, v in enumerate(value):
            p = check(v, item, f"{where}[{i}]")
            if p:
                return p
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return f"{here}: expected an object, got {_describe(value)}"
        _, item = get_args(tp) or (str, Any)
        for k, v in value.items():
            p = check(v, item, f"{where}.{k}" if where else str(k))
            if p:
                return p
        return None
    if _is_typeddict(tp):
        if not isinstance(value, dict):
            return f"{here}: expected an object, got {_describe(value)}"
        hints = _hints(tp)
        for key in sorted(_required(tp)):
            if key not in value:
                return f"{where}: lacks {key!r}" if where else f"lacks {key!r}"
        for key, sub in hints.items():
            if key in value:
                p = check(value[key], sub, f"{where}.{key}" if where else key)
                if p:
                    return p
        return None
    raise TypeError(f"schema.check cannot check {tp!r}")  # a bug in a declaration, not in the data


def _kind_matches(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin is list:
        return isinstance(value, list)
    if origin is dict or _is_typeddict(tp):
        return isinstance(value, dict)
    return False


def describe(tp: Any, indent: str = "") -> list[str]:
    """A TypedDict as indented Markdown bullet lines: key, type, required or optional."""
    out: list[str] = []
    hints = _hints(tp)
    for key, sub in hints.items():
        opt = "" if key in _required(tp) else " (optional)"
        inner = _unwrap(sub)
        out.append(f"{indent}- `{key}`: {_doc_name(sub)}{opt}")
        if inner is not None:
            out.extend(describe(inner, indent + "  "))
    return out


def undeclared(value: Any, tp: Any, where: str = "") -> list[str]:
    """Keys in ``value`` that ``tp`` does not declare (where a TypedDict describes the object)."""
    out: list[str] = []
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for a in get_args(tp):
            if _kind_matches(value, a):
                return undeclared(value, a, where)
        return out
    if origin is list and isinstance(value, list):
        (item,) = get_args(tp) or (Any,)
        for i, v in enumerate(value):
            out += undeclared(v, item, f"{where}[{i}]")
    elif origin is dict and isinstance(value, dict):
        _, item = get_args(tp) or (str, Any)
        for k, v in value.items():
            out += undeclared(v, item, f"{where}.{k}" if where else str(k))
    elif _is_typeddict(tp) and isinstance(value, dict):
        hints = _hints(tp)
        for k, v in value.items():
            here = f"{where}.{k}" if where else str(k)
            if k not in hints:
                out.append(here)
            else:
                out += undeclared(v, hints[k], here)
    return out


_PLURAL = {"a finite number": "finite numbers", "a whole number": "whole numbers", "a string": "strings",
           "an object": "objects", "true/false": "true/false values", "a list": "lists", "any value": "values",
           "a finite number or null": "finite numbers or nulls"}


def _doc_name(tp: Any) -> str:
    """Like the error messages' names, but saying what a list or object holds."""
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        inner = _doc_name(item)
        return f"a list of {_PLURAL.get(inner, inner)}"
    if origin is dict:
        _, item = get_args(tp) or (str, Any)
        inner = _doc_name(item)
        return "an object" if item is Any else f"an object of {_PLURAL.get(inner, inner)}"
    if origin in (Union, types.UnionType):
        return " or ".join(_doc_name(a) for a in get_args(tp))
    return _name(tp)


def _unwrap(tp: Any) -> Any:
    """The TypedDict inside ``tp`` (itself, a list of it, a dict of it, or optional), if any."""
    if _is_typeddict(tp):
        return tp
    for a in get_args(tp):
        found = _unwrap(a)
        if found is not None:
            return found
    return None


__all__ = ["check", "describe", "undeclared"]
