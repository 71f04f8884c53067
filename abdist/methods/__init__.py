"""Training methods behind one protocol (abdist/methods/protocol.py), built by name from the
registry (abdist/methods/registry.py). Importing this package registers every built-in method."""

from abdist.methods import autobalance, erm, selmix  # noqa: F401  (each module registers its method)
from abdist.methods.protocol import Batch, Method, MethodSpec, Phase, SetupContext
from abdist.methods.registry import get, names, register

__all__ = ["Batch", "Method", "MethodSpec", "Phase", "SetupContext", "get", "names", "register"]
