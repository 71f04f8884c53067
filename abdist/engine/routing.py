"""Run a method's loss inside the wrapped module's forward, so DDP / DeepSpeed see all of it.

DistributedDataParallel all-reduces the gradients of exactly the parameters reached from the
output of ITS forward. A loss that calls `model.features(x)` and `model.head(z)` on the bare
module (the obvious workaround for `.features` not existing on the wrapper) bypasses that: the
gradients stay per rank and the ranks drift apart with no error. So the loss itself is routed
through the wrapper's forward: for the duration of the call the bare module's `forward` is the
loss function, and the wrapper's forward (DDP's reducer setup, DeepSpeed's hooks) runs around it.
Inside, `model(x)` is the ordinary forward again.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def loss_through(wrapper: nn.Module, module: nn.Module, fn: Callable[[nn.Module], Tensor]):
    """`fn(module)` computed as the forward of `wrapper` (which wraps `module`, or is it)."""
    if "forward" in module.__dict__:
        raise RuntimeError("loss_through: the module's forward is already routed (nested call)")

    def routed(*args, **kwargs):
        del module.forward  # back to the class's forward for every call `fn` makes
        return fn(module)

    module.forward = routed  # an instance attribute: shadows the class's forward for one call
    try:
        return wrapper()
    finally:
        module.__dict__.pop("forward", None)  # also when `wrapper` raised before calling it
