"""One config key's declaration and its value checks: `opt` declares a key (default, choices,
bounds, help), `coerce` checks a value against the declared type, `check_range` against the
choices and bounds, `describe_key` says what the key means. Nothing here knows the sections."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import field
from typing import Any

from abdist.errors import UserError


def opt(default, *, choices=None, lo=None, hi=None, lo_open=False, help=""):
    """A field with validation metadata (`choices`, inclusive `lo`/`hi`, `lo_open` for lo < x)."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "help": help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def describe_key(meta: dict) -> str:
    """A field's meaning and allowed values, e.g. 'lr schedule ...; one of cosine, step'."""
    parts = [meta["help"]] if meta.get("help") else []
    if meta.get("choices"):
        parts.append("one of " + ", ".join(map(str, meta["choices"])))
    bounds = []
    if meta.get("lo") is not None:
        bounds.append(f"{'>' if meta.get('lo_open') else '>='} {meta['lo']}")
    if meta.get("hi") is not None:
        bounds.append(f"<= {meta['hi']}")
    if bounds:
        parts.append(" and ".join(bounds))
    return "; ".join(parts)


def suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def coerce(key: str, value: Any, typ, where: str) -> Any:
    """Check `value` against the declared type; ints are accepted where floats are expected."""
    origin = typing.get_origin(typ)
    if origin in (list,) or typ is list:
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return coerce(key, value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(
        f"{where}: '{key}' must be {typ.__name__}, got {value!r} ({type(value).__name__})"
    )


def check_range(key: str, value: Any, meta: dict, where: str) -> None:
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if choices is not None and value not in choices:
        hint = suggest(str(value), list(choices))
        raise UserError(
            f"{where}: '{key}' must be one of {', '.join(choices)}; got {value!r}{hint}"
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
            op = ">" if meta.get("lo_open") else ">="
            raise UserError(f"{where}: '{key}' must be {op} {lo}; got {value}")
        if hi is not None and value > hi:
            raise UserError(f"{where}: '{key}' must be <= {hi}; got {value}")
