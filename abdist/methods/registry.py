"""Methods by name: `register(MethodSpec(...))` once per method, `get(name)` where one is built.

The registry is filled by abdist/methods/__init__.py, which imports every method module; the
trainer and the recipe know methods only through it.
"""

from __future__ import annotations

import difflib

from abdist.errors import UserError
from abdist.methods.protocol import MethodSpec

_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"a method named {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def names() -> list[str]:
    return sorted(_METHODS)


def get(name: str) -> MethodSpec:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, names(), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(
            f"unknown method.name '{name}'{hint}; registered methods: {', '.join(names())}"
        )
    return _METHODS[name]
