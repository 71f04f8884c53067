"""SelMix (Ramasubramanian et al., ICLR 2024): selective mixup fine-tuning of a trained model for a
non-decomposable objective (min recall, G-mean, H-mean, ...) measured on the validation split.

Every `selmix.refresh_interval` optimiser steps (and before the first), on validation: the class
prototypes (mean features) and the confusion matrix, the objective's gradient in the confusion
(abdist/methods/selmix_objectives.py), the gain of a head step on the mixup of every class pair
and the pair distribution P = softmax(gain / T) over the pairs that gain
(abdist/methods/selmix_gain.py). Each training batch is B pairs drawn from P: for pair (i, j), a
training sample of class i and one of class j (uniformly within the class), their features mixed
lambda f(x1) + (1 - lambda) f(x2) with lambda ~ U(lambda_min, 1), cross-entropy on class i.
BatchNorm statistics stay frozen (`selmix.freeze_bn`); the backbone's lr is `optim.lr` x
`selmix.backbone_lr_scale`.

Distributed: each rank reduces its slice of validation into exact integer statistics (features
in fixed point, 2^-20; confusion counts), one all-reduce of K*d + K + K^2 int64 per refresh, so
every rank holds bit-identical prototypes and confusion whatever the number of ranks; every rank
derives P from them, and a 32-byte digest of P is compared across ranks (rank 0's P is
broadcast if any differs, e.g. ranks on CPUs with other kernels). Pairs are drawn for the global
batch from the epoch's generator (the same on every rank) and each rank takes its slice, so W
ranks x B/W see exactly the pairs one rank x B would. The step itself is a normal DDP/ZeRO step
through the wrapper (features and head inside its forward).

Draws are by class, so the training split needs random access: in memory (digits, shards with
data.in_memory=true), or FFCV (each rank decodes its own pairs in one FFCV pass per batch, so
there the augmentation, drawn per rank, depends on the number of ranks); streamed WebDataset
shards are refused in one line.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abdist.data.memory import TensorSplit
from abdist.engine.init_from import trained_on_val
from abdist.errors import UserError
from abdist.methods.protocol import Batch, MethodSpec, SetupContext
from abdist.methods.registry import register
from abdist.methods.selmix_gain import gains, logit_gradient, pair_distribution
from abdist.methods.selmix_objectives import Objective, tail_classes

FIXED_POINT = 2.0**20  # feature resolution of the exact prototype sums
TOP_PAIRS = 10  # pairs of P kept per refresh in selmix.json


class SelMix:
    name = "selmix"
    needs: frozenset[str] = frozenset()

    def __init__(self, ctx: SetupContext) -> None:
        cfg, data = ctx.cfg, ctx.data
        self.cfg, self.sm, self.ctx = cfg, cfg.selmix, ctx
        self.model, self.comm, self.device = ctx.model, ctx.comm, ctx.device
        self.augment = ctx.augment
        if not isinstance(getattr(ctx.model, "head", None), nn.Linear):
            raise UserError(
                "method.name=selmix mixes features before a linear head; set model.head=linear "
                "(the model of model.init_from must have one too)"
            )
        self.random_access = isinstance(data.train, TensorSplit)
        if not self.random_access and not hasattr(data.train, "gather"):
            raise UserError(
                "method.name=selmix draws training samples by class, which needs random access: "
                "set data.in_memory=true, or prepare the data with --format ffcv (streamed "
                "WebDataset shards cannot be drawn from by class)"
            )
        if ctx.init and trained_on_val(ctx.init["init_from"]):
            raise UserError(
                f"model.init_from: {ctx.init['init_from']} was trained on train+val, so the "
                "validation split SelMix optimises on is not held out; fine-tune a run trained "
                "without train.merge_val (of an AutoBalance run: its search phase, RUN/search)"
            )
        if len(data.val) == 0:
            raise UserError(
                "method.name=selmix measures its objective on the validation split, which is "
                "empty; prepare the data with a validation split (and keep train.merge_val=false)"
            )
        self.num_classes = K = data.num_classes
        sm = self.sm
        tail = None
        if sm.objective == "min_head_tail_recall":
            tail = tail_classes(list(data.class_counts), sm.tail_fraction)
        self.objective = Objective(
            sm.objective,
            eta=sm.min_sharpness,
            tail=tail,
            alpha=sm.coverage_alpha,
            lambda_max=sm.coverage_lambda_max,
            tau=sm.coverage_tau,
        )
        labels = data.train.labels.cpu()
        self.order = torch.argsort(labels, stable=True)  # training rows grouped by class
        self.counts = torch.bincount(labels, minlength=K)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.P: Tensor | None = None
        self.history: list[dict] = []
        self.before: dict[str, float] = {}

    @classmethod
    def build(cls, ctx: SetupContext) -> SelMix:
        return cls(ctx)

    # --- the optimiser and the loop's hooks --------------------------------------------------

    def param_groups(self, model: nn.Module) -> list[dict]:
        head = list(model.head.parameters())
        ids = {id(p) for p in head}
        backbone = [p for p in model.parameters() if id(p) not in ids]
        return [
            {"params": head},
            {"params": backbone, "lr": self.cfg.optim.lr * self.sm.backbone_lr_scale},
        ]

    def train_augment(self):
        return self.augment

    def on_epoch_start(self, epoch: int) -> None:
        if self.sm.freeze_bn:  # after the loop's model.train(): BatchNorm uses its running stats
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def train_batches(self, *, batch_size, generator, augment, rank, world_size, first_batch):
        """This epoch's pair batches (protocol: `train_batches`), drawn lazily from P."""
        if self.P is None:  # the first refresh: before the first step of a fresh run
            self.refresh(step=0, initial=True)
        split = self.ctx.data.train
        n_batches = split.num_batches(batch_size, drop_last=True)
        b = self.comm.local_batch(batch_size)
        lo, hi = rank * b, (rank + 1) * b
        for k in range(n_batches):
            pairs = torch.multinomial(self.P.flatten(), batch_size, True, generator=generator)
            i, j = pairs // self.num_classes, pairs % self.num_classes
            rows = torch.cat([self._draw(i, generator), self._draw(j, generator)])
            lam = self.sm.lambda_min + (1 - self.sm.lambda_min) * torch.rand(
                batch_size, generator=generator, dtype=torch.float32
            )
            index = None if first_batch is None else first_batch + k
            if self.random_access:  # in memory: the global batch, augmented whole, then sliced
                x, y = split.images[rows], split.labels[rows]
                if augment is not None:
                    x = augment(x, y, generator, index)
                x = torch.stack([x[:batch_size], x[batch_size:]], 1)  # [B, 2, C, H, W]
                yield Batch(x[lo:hi], y[:batch_size][lo:hi], mix=lam[lo:hi])
                continue
            # FFCV: this rank's pairs only, decoded and augmented in one pass of 2b samples (the
            # crop/flip draws 2b samples' worth from the generator on every rank alike).
            mine = torch.cat([rows[:batch_size][lo:hi], rows[batch_size:][lo:hi]])
            ((x, y),) = split.gather(mine.numpy(), 2 * b, augment=augment, generator=generator,
                                     first_batch=index)  # fmt: skip
            yield Batch(torch.stack([x[:b], x[b:]], 1), y[:b], mix=lam[lo:hi])

    def _draw(self, classes: Tensor, generator: torch.Generator) -> Tensor:
        """A training row of each given class, uniformly within the class."""
        u = torch.rand(len(classes), generator=generator, dtype=torch.float64)
        within = (u * self.counts[classes]).long().clamp_max(self.counts[classes] - 1)
        return self.order[self.starts[classes] + within]

    def training_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        b = batch.x.shape[0]
        z = model.features(batch.x.flatten(0, 1)).view(b, 2, -1)
        lam = batch.mix[:, None].to(z.dtype)
        mixed = lam * z[:, 0] + (1 - lam) * z[:, 1]
        return F.cross_entropy(model.head(mixed).float(), batch.y)

    def before_step(self, step: int, module: nn.Module, lr: float) -> None:
        pass

    def after_step(self, step: int, module: nn.Module) -> dict:
        if (step + 1) % self.sm.refresh_interval:
            return {}
        return self.refresh(step + 1)

    # --- the refresh -------------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self, step: int, initial: bool = False) -> dict:
        """Prototypes, confusion, gains and P from the validation split (every rank, exact)."""
        K = self.num_classes
        proto, conf, soft = self._val_statistics(self.ctx.data.val)
        C = _normalised(conf)
        if initial:
            self.before["val"] = self.objective.value(C)
            self.before["test"] = self.objective.value(self._confusion(self.ctx.data.test))
        # The objective's gradient and the Jacobian dC/dA are taken at the soft confusion by
        # default: at the argmax one (the public code's), a class never predicted right has
        # s_qq = 0 and no gradient at all, exactly the class min recall must lift.
        S = _normalised(soft) if self.sm.confusion == "soft" else C
        head = self.model.head
        D = logit_gradient(self.objective.grad(S), S)
        G = gains(proto, head.weight.double().cpu(), _bias(head), D, lam_bar=self._lam_bar())
        P = pair_distribution(
            G, self.sm.temperature, allowed=self._drawable(), relative=self.sm.relative_temperature
        )
        self.P = self._agree(P.to(torch.float64))
        top = torch.topk(self.P.flatten(), min(TOP_PAIRS, K * K))
        record = {
            "step": step,
            "val_objective": self.objective.value(C),
            "max_gain": float(G.max()),
            "positive_pairs": int((G > 0).sum()),
            "top_pairs": [
                [int(t) // K, int(t) % K, round(float(p), 6)]
                for p, t in zip(top.values, top.indices)
            ],
        }
        self.history.append(record)
        return {
            "selmix_val_objective": record["val_objective"],
            "selmix_max_gain": record["max_gain"],
        }

    def _lam_bar(self) -> float:
        return (self.sm.lambda_min + 1) / 2

    def _drawable(self) -> Tensor:
        """Pairs whose two classes have training samples to draw."""
        has = self.counts > 0
        return has[:, None] & has[None, :]

    def _val_statistics(self, split) -> tuple[Tensor, Tensor, Tensor]:
        """Over every rank's slice of `split`: prototypes [K, d] (float64), the confusion counts
        [K, K] (argmax) and the soft confusion [K, K] (float64: row q sums the predicted
        probabilities of class q's samples), each exact (integers, fixed point for floats)."""
        K, module = self.num_classes, self.model
        d = module.head.in_features
        feat = torch.zeros(K, d, dtype=torch.int64)
        count = torch.zeros(K, dtype=torch.int64)
        conf = torch.zeros(K, K, dtype=torch.int64)
        soft = torch.zeros(K, K, dtype=torch.int64)
        was = module.training
        module.eval()
        try:
            shard = split.shard(self.comm.rank, self.comm.world_size)
            for x, y in shard.batches(self.cfg.train.eval_batch_size, shuffle=False):
                z = module.features(x.to(self.device)).float()
                logits = module.head(z).float()
                pred = logits.argmax(1).cpu()
                feat.index_add_(0, y, _fixed(z))
                soft.index_add_(0, y, _fixed(torch.softmax(logits, 1)))
                count += torch.bincount(y, minlength=K)
                conf += torch.bincount(y * K + pred, minlength=K * K).view(K, K)
        finally:
            module.train(was)
            self.on_epoch_start(0)  # back to frozen BatchNorm if it was
        # One all-reduce of K*d + K + 2 K^2 integers: exact, so the same on any number of ranks.
        flat = self.comm.all_reduce_sum(torch.cat([feat.flatten(), count, conf.flatten(),
                                                   soft.flatten()]))  # fmt: skip
        feat, count, rest = flat[: K * d].view(K, d), flat[K * d : K * d + K], flat[K * d + K :]
        conf, soft = rest[: K * K].view(K, K), rest[K * K :].view(K, K)
        proto = feat.double() / FIXED_POINT / count.clamp_min(1)[:, None].double()
        return proto, conf, soft.double() / FIXED_POINT

    def _confusion(self, split) -> Tensor:
        return _normalised(self._val_statistics(split)[1])

    def _agree(self, P: Tensor) -> Tensor:
        """Every rank's P, or rank 0's if any rank computed other bits."""
        if self.comm.world_size == 1:
            return P
        digest = hashlib.sha256(P.numpy().tobytes()).hexdigest()
        if len(set(self.comm.all_gather_object(digest))) == 1:
            return P
        return self.comm.broadcast(P)

    # --- outputs -----------------------------------------------------------------------------

    def summary(self, val_confusion: Tensor | None, test_confusion: Tensor) -> dict:
        if val_confusion is None:
            val_confusion = self._val_statistics(self.ctx.data.val)[1]
        after = {
            "val": self.objective.value(_normalised(val_confusion)),
            "test": self.objective.value(_normalised(test_confusion)),
        }
        return {
            "selmix": {
                "objective": self.sm.objective,
                "before": dict(self.before),
                "after": after,
                "refreshes": len(self.history),
            }
        }

    def artifacts(self) -> dict:
        K = self.num_classes
        out = {"objective": self.sm.objective, "before": self.before, "history": self.history}
        if self.P is not None and K <= 100:
            out["P"] = [[round(float(p), 8) for p in row] for row in self.P]
        return {"selmix.json": out}

    def state_dict(self) -> dict:
        return {"P": self.P, "history": self.history, "before": self.before}

    def load_state_dict(self, state: dict) -> None:
        self.P = state["P"]
        self.history = list(state["history"])
        self.before = dict(state["before"])


def _fixed(t: Tensor) -> Tensor:
    """Floats as int64 fixed point (resolution 2^-20): sums of them are exact in any order."""
    return torch.round(t.double().cpu() * FIXED_POINT).long()


def _bias(head: nn.Linear) -> Tensor | None:
    return None if head.bias is None else head.bias.double().cpu()


def _normalised(conf: Tensor) -> Tensor:
    conf = conf.double()
    return conf / conf.sum().clamp_min(1)


def validate(cfg) -> None:
    """Checks across `selmix.*` and other sections (each key alone is checked by config)."""
    if not cfg.model.init_from:
        raise UserError(
            "method.name=selmix fine-tunes a trained model; set model.init_from=RUN_DIR (a "
            "finished CE, LA or AutoBalance run of the same data and model)"
        )
    if cfg.train.merge_val:
        raise UserError(
            "method.name=selmix measures its objective on the validation split; unset "
            "train.merge_val"
        )
    if cfg.model.head != "linear":
        raise UserError(
            f"method.name=selmix mixes features before a linear head; model.head={cfg.model.head} "
            "is not one (set model.head=linear)"
        )


SPEC = register(MethodSpec("selmix", SelMix.build, validate=validate))
