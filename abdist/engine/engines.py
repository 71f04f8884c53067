"""The model as the loop trains it: Engine (one process), DDPEngine, DeepSpeedEngine; wrap().

The loop's verbs (grad_sync, backward, step, zero_grad, sync_buffers, state dicts) with one
implementation per backend. Separate from the process group: an engine is built on a Dist that
init_dist already made, and only the backend-specific wrapping and checkpoint layout live here.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from abdist.engine.process_group import Dist, import_deepspeed
from abdist.errors import UserError


class Engine:
    """One process: the loop's four verbs on a bare module and a torch optimizer.

    `model` is what the training forward calls; `module` is the bare network (evaluation, hyper
    steps, state dicts). The DDP and DeepSpeed engines change only what they must.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist):
        self.module, self.model, self.optimizer, self.dist = module, module, optimizer, dist

    def grad_sync(self, last_micro_batch: bool):
        """Context for one micro-batch's forward+backward; ranks exchange gradients only on the
        micro-batch that completes an accumulation."""
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def sync_buffers(self) -> None:
        """Make BatchNorm running statistics identical on every rank (their mean) before they are
        evaluated or saved: each rank's differ after a local forward, and the checkpoint must be
        the state of every rank for a resume to be exact."""
        if self.dist.world_size == 1:
            return
        with torch.no_grad():
            for buf in self.module.buffers():
                if buf.is_floating_point():
                    buf.copy_(self.dist.reduce_mean(buf))
                else:
                    buf.copy_(self.dist.broadcast(buf))

    def state_dict(self, root: Path, epoch: int) -> dict[str, Any]:
        """What the checkpoint holds for the model and the optimiser (identical on every rank for
        DDP, so rank 0's copy is everyone's)."""
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any], root: Path) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class DDPEngine(Engine):
    def __init__(self, module, optimizer, dist):
        super().__init__(module, optimizer, dist)
        from torch.nn.parallel import DistributedDataParallel

        # No buffer broadcast at every forward (a collective only to overwrite BatchNorm stats):
        # sync_buffers() averages them once per epoch instead, before evaluation and checkpoint.
        # (torch >= 2.14 renamed the switch; the GPU images carry older torch.)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = (
            "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        )
        # 1-channel convolutions: a size-1 dimension's stride is arbitrary, so the reducer warns
        # that grad and bucket strides differ and copies; correct, and only noise here.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.model = DistributedDataParallel(
            module,
            device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            # Gradients live in the all-reduce buckets: no copy, and no stride-mismatch warning
            # for 1-channel convolutions.
            gradient_as_bucket_view=True,
            **{no_sync: False},
        )

    def grad_sync(self, last_micro_batch: bool):
        return contextlib.nullcontext() if last_micro_batch else self.model.no_sync()


class DeepSpeedEngine(Engine):
    """ZeRO stage 0/1/2 around the same torch optimizer (its states partitioned from stage 1).

    Parameters stay whole on every rank (stage <= 2), so the hyper step and evaluation still run on
    the bare module. bf16 is torch autocast, as for the other backends: DeepSpeed's bf16 mode
    would store the weights in bf16, which the fp32 hyper step and BatchNorm do not want. The
    optimiser's partitions are saved by DeepSpeed itself (one file per rank) under
    <checkpoints>/deepspeed/<tag>, before rank 0 writes the epoch file that points to them.
    """

    def __init__(self, module, optimizer, dist, *, zero_stage: int, micro_batch: int, accum: int):
        super().__init__(module, optimizer, dist)
        deepspeed = import_deepspeed()
        deepspeed.init_distributed(dist_backend=tdist.get_backend(), auto_mpi_discovery=False)
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accum,
            "zero_optimization": {"stage": zero_stage, **_cpu_buckets(module, dist.device)},
            # ZeRO's whitelist names Adam-family optimisers only; torch SGD partitions fine.
            "zero_allow_untested_optimizer": True,
            # DeepSpeed clips the gradient norm to 1.0 by default; the other backends do not clip.
            "gradient_clipping": 0.0,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        # The client optimizer keeps its torch implementation (DeepSpeed's fused/CPU Adam would
        # JIT-compile for minutes) and its param_groups, where the loop's LR schedule writes.
        self.model, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config
        )

    def grad_sync(self, last_micro_batch: bool):
        # The loop, not DeepSpeed's micro-step counter, decides where an accumulation ends (the
        # last micro-batch of an epoch may end a short one).
        self.model.set_gradient_accumulation_boundary(last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop already divided by grad_accum

    def step(self) -> None:
        self.model.step()  # optimiser step and zero_grad inside

    def zero_grad(self) -> None:
        self.model.zero_grad()

    def state_dict(self, root: Path, epoch: int) -> dict[str, Any]:
        tag = f"epoch-{epoch:06d}"
        self.model.save_checkpoint(str(root / "deepspeed"), tag=tag, save_latest=False)
        self.dist.barrier()  # every rank's partition is on disk before rank 0 points to it
        return {"model": self.module.state_dict(), "deepspeed_tag": tag}

    def load_state_dict(self, state: dict[str, Any], root: Path) -> None:
        if "deepspeed_tag" not in state:
            raise UserError(
                "this checkpoint was not written by dist.backend=deepspeed; resume it with the "
                "backend that wrote it"
            )
        path, _ = self.model.load_checkpoint(
            str(root / "deepspeed"),
            tag=state["deepspeed_tag"],
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise UserError(f"DeepSpeed checkpoint {state['deepspeed_tag']} not found in {root}")


def _cpu_buckets(module: nn.Module, device: torch.device) -> dict[str, int]:
    """ZeRO allocates a fresh gradient bucket of `reduce_bucket_size` elements (default 5e8:
    2 GB) at every micro-step; a GPU caching allocator hides that, the CPU allocator does not
    (measured: 0.45 s per step on a 100k-parameter model). On CPU, size buckets to the model."""
    if device.type != "cpu":
        return {}
    size = int(min(5e8, max(2**20, sum(p.numel() for p in module.parameters()))))
    return {"reduce_bucket_size": size, "allgather_bucket_size": size}


def wrap(module, optimizer, dist: Dist, cfg, *, micro_batch: int) -> Engine:
    if cfg.dist.backend == "deepspeed":
        return DeepSpeedEngine(
            module,
            optimizer,
            dist,
            zero_stage=cfg.dist.zero_stage,
            micro_batch=micro_batch,
            accum=cfg.train.grad_accum,
        )
    if cfg.dist.backend == "ddp":
        return DDPEngine(module, optimizer, dist)
    return Engine(module, optimizer, dist)
