"""The coordinator: owns the subspace parameters alpha_sub and the upper optimiser.

One hyper step is: every worker computes its local hypergradient for alpha_sub -> `reduce` sums
them -> the coordinator clips and applies the upper optimiser -> `broadcast` hands alpha_sub back.
alpha_sub has K numbers per tuned vector, so what crosses the wire per hyper step is independent of
the model size. In a single process `reduce` and `broadcast` are the identity; the distributed
engine passes torch.distributed collectives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Collective = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


class Coordinator:
    def __init__(
        self,
        alpha_sub: dict[str, Tensor],
        *,
        optimizer: str = "adam",
        lr: float = 0.05,
        momentum: float = 0.9,
        clip: float = 1.0,
        reduce: Collective = _identity,
        broadcast: Collective = _identity,
    ):
        # Leaf tensors the upper optimiser updates; the method reads them after every step.
        self.alpha_sub = {k: v.detach().clone().requires_grad_(True) for k, v in alpha_sub.items()}
        params = list(self.alpha_sub.values())
        if optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
        else:
            self.optimizer = torch.optim.Adam(params, lr=lr)
        self.clip = clip
        self.reduce, self.broadcast = reduce, broadcast

    def _flat(self, tensors: dict[str, Tensor]) -> Tensor:
        return torch.cat([tensors[k].reshape(-1) for k in self.alpha_sub])

    def _unflat(self, flat: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for k, v in self.alpha_sub.items():
            out[k] = flat[i : i + v.numel()].view_as(v)
            i += v.numel()
        return out

    def step(self, grads: dict[str, Tensor]) -> dict[str, float]:
        """Reduce the local hypergradients, clip, take one upper step, broadcast alpha_sub."""
        g = self.reduce(self._flat(grads).detach())  # one collective of sum(K) floats
        norm = float(g.norm())
        if self.clip > 0 and norm > self.clip:
            g = g * (self.clip / norm)
        for k, gk in self._unflat(g).items():
            self.alpha_sub[k].grad = gk.clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            flat = self.broadcast(self._flat(self.alpha_sub))
            for k, v in self._unflat(flat).items():
                self.alpha_sub[k].copy_(v)
        return {"hypergrad_norm": norm}

    def state_dict(self) -> dict:
        return {
            "alpha_sub": {k: v.detach().clone() for k, v in self.alpha_sub.items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, v in state["alpha_sub"].items():
                self.alpha_sub[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
