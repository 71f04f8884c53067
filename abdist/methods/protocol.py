"""The Method protocol: what the training loop asks of a method, when, and with what.

A method is the part of training that is not the network, the data or the optimiser: how a batch
becomes the loss, what happens between steps (AutoBalance's hyper step), what it writes into the
run directory, and which phases the run has. Adding one is one module, one config section and one
`register` call (see abdist/methods/__init__.py).

The loop (abdist/engine/trainer.py), per phase, calls in this order:

    method = spec.build(ctx)                       # ctx: SetupContext, below
    augment = method.train_augment()               # the training augmentation (or None)
    method.load_state_dict(ckpt["method"])         # when resuming
    for epoch:
        method.on_epoch_start(epoch)
        for batch in train batches (a Batch with the fields in `method.needs`):
            loss = engine.loss(lambda m: method.training_loss(m, batch))
            engine.backward(loss)
            if the last micro-batch of a step:
                method.before_step(step, module, lr)   # bare module, gradients in .grad
                engine.step()
                info = method.after_step(step, module) # bare module: hyper steps, refreshes
        checkpoint: {"method": method.state_dict(), ...}
    method.artifacts() -> {"alpha.json": {...}}    # written by rank 0 into the phase directory

- `training_loss(model, batch)` runs INSIDE the wrapped (DDP / DeepSpeed) module's forward: the
  `model` it receives is the bare network, and everything it computes — `model(x)`, or
  `model.features(x)` and `model.head(z)` separately — is part of the wrapper's forward, so every
  parameter the loss reaches is gradient-synchronised. Never reach for `.module` yourself.
- `before_step` and `after_step` get the bare module: no gradient sync, no θ graph (differentiate
  through `torch.func.functional_call` if needed).
- Phases: `spec.phases(cfg)` lists them; a phase with `inputs_from` gets that earlier phase's
  artifacts in `ctx.inputs` (AutoBalance's retrain reads the search's alpha.json).

Optional members (the loop uses them when a method has them; SelMix does):
- `param_groups(model) -> list[dict]`: the optimiser's parameter groups (e.g. a smaller lr for
  the backbone); default: every parameter at `optim.lr`.
- `train_batches(batch_size=, generator=, augment=, rank=, world_size=, first_batch=)`: the
  epoch's training batches as `Batch`es of this rank, instead of the data's shuffled pass (e.g.
  class-conditional draws); exactly `data.train.num_batches(batch_size, drop_last=True)` of
  them, drawn lazily (a batch may depend on what `after_step` changed before it), a function of
  the generator and the method's state so that resume stays exact.
- `summary(val_confusion, test_confusion) -> dict`: entries added to metrics.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

# What a batch can carry beyond (x, y); a method lists the ones it needs in `needs`:
#   groups   int64 [b] group ids (shards prepared with --groups; other data refuses in one line)
#   ids      int64 [b] sample ids: unique in the split, the same every epoch, on every rank, in
#            memory and streamed ("train+val" numbers val after train)
#   weights  float32 [b] per-sample weights from `loss.sample_weights` (mean 1 over the
#            training split; abdist/methods/sample_weights.py); a method that does not list
#            them refuses that key in one line
BATCH_FIELDS = ("groups", "ids", "weights")


@dataclass
class Batch:
    """One training batch on this rank: inputs, labels and what the method asked for."""

    x: Tensor
    y: Tensor
    groups: Tensor | None = None
    ids: Tensor | None = None
    weights: Tensor | None = None
    # Pair batches of a mixup method's own `train_batches`: x is [b, 2, ...] and `mix` [b] the
    # first sample's mixing weight.
    mix: Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        fields = (self.x, self.y, self.groups, self.ids, self.weights, self.mix)
        return Batch(*(move(t) for t in fields))


@dataclass(frozen=True)
class Phase:
    """One call of the training loop. `subdir`: where it writes (None: the run directory itself);
    `merge_val`: train on train+val; `inputs_from`: the earlier phase whose artifacts it reads."""

    name: str
    subdir: str | None = None
    merge_val: bool = False
    inputs_from: str | None = None


@dataclass
class SetupContext:
    """Everything a method is built from, for one phase."""

    cfg: Any  # abdist.config.Config
    data: Any  # the data bundle: train / val / test splits, class_counts, num_groups, ...
    model: nn.Module  # the bare network (features + head)
    loss_spec: Any  # abdist.losses.LossSpec of the configured preset
    augment: Any  # the run's TrainAugment (abdist/data/augment.py) or None; a method may tune
    # its per-class table (augment.table.set) between steps
    device: torch.device
    comm: Any  # abdist.engine.dist.Dist: rank, world_size and the collectives
    phase: Phase = field(default_factory=lambda: Phase("train"))
    inputs: dict[str, Any] = field(default_factory=dict)  # artifacts of `phase.inputs_from`
    # model.init_from: where the starting weights came from (abdist.engine.init_from's record:
    # init_from = the checkpoint file, epoch, sha256); empty for a random initialisation.
    init: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    name: str
    needs: frozenset[str]  # Batch fields beyond x, y (a subset of BATCH_FIELDS)

    def train_augment(self) -> Callable | None: ...

    def on_epoch_start(self, epoch: int) -> None: ...

    def training_loss(self, model: nn.Module, batch: Batch) -> Tensor: ...

    def before_step(self, step: int, module: nn.Module, lr: float) -> None: ...

    def after_step(self, step: int, module: nn.Module) -> dict[str, Any]: ...

    def artifacts(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, how to build it, the phases a config gives it, and its
    cross-key config checks (`validate(cfg)` raises a one-line UserError; run by load_config
    when the config selects this method)."""

    name: str
    build: Callable[[SetupContext], Method]
    phases: Callable[[Any], list[Phase]] = lambda cfg: [Phase("train")]
    validate: Callable[[Any], None] = lambda cfg: None
