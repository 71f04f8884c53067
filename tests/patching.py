"""Instrumentation that fails loudly when its target moves.

`setattr(cls, "hyper_step", f)` on a class that no longer has `hyper_step` silently adds a new
attribute nobody calls, and a test built on it then checks nothing. `replace` refuses that.
"""

from __future__ import annotations

from typing import Any


def replace(owner: Any, name: str, new: Any) -> Any:
    """Set `owner.name = new` and return what was there; AttributeError if nothing was."""
    if name not in vars(owner) and not hasattr(owner, name):
        raise AttributeError(
            f"test instrumentation: {getattr(owner, '__name__', owner)!r} has no {name!r} to "
            "replace (renamed or moved? update the test's patch)"
        )
    original = getattr(owner, name)
    setattr(owner, name, new)
    return original
