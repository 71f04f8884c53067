"""Distributed training, as small helpers the one training loop composes.

    detect_env()      where this process sits: torchrun env vars, a Slurm `srun` task, or alone
    init_dist(cfg)    the process group (gloo on CPU, nccl on GPU) and this rank's device -> Dist
    Dist              rank/world/device + the few collectives the loop needs (identity when alone)
    wrap(...)         the model for training: Engine (one process), DDPEngine, DeepSpeedEngine
    sync_batchnorm()  BatchNorm over the global batch (torch's SyncBatchNorm on CUDA, ours on CPU)

Conventions the loop relies on:
- `train.batch_size` is the GLOBAL batch; rank r takes its contiguous slice of every global batch
  of one (seed, epoch) permutation (TensorSplit.batches), so W ranks see exactly the samples one
  rank would, in equal numbers (no DDP hang on uneven batches).
- Hyper steps, evaluation and state dicts use the UNWRAPPED module (`engine.module`): autograd
  through DDP is wrong for double backward, and evaluation needs no gradient sync.
- Only rank 0 writes shared files; every rank reads the checkpoint (a shared run directory, as on
  any cluster filesystem).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import inspect
import json
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from abdist.errors import UserError

# --- where am I? --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # torchrun | env (RANK/WORLD_SIZE from another launcher) | slurm

    @property
    def where(self) -> str:
        return f"rank {self.rank} of {self.world_size} ({self.launcher})"


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[07-09,12],cpu01' -> 'gpu07' (zero padding kept)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if m is None:
        raise UserError(f"cannot read the Slurm node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = m.group(1), m.group(2)
    return prefix if not ranges else prefix + ranges.split(",")[0].split("-")[0]


def _leading_int(text: str | None, default: int) -> int:
    m = re.match(r"\d+", text or "")
    return int(m.group()) if m else default


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read this process's place in the job from the launcher's environment variables.

    torchrun (and any launcher that sets RANK/WORLD_SIZE, e.g. submitit's
    TorchDistributedEnvironment().export()) wins over Slurm, so `torchrun` inside an allocation
    works. A Slurm task started by `srun` is rank SLURM_PROCID of SLURM_STEP_NUM_TASKS (or
    SLURM_NTASKS); the rendezvous host is MASTER_ADDR or the first host of the step's node list,
    the port MASTER_PORT or one derived from the job id (the same on every task, different for
    concurrent jobs). Anything else is one process.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "env",
        )
    world = _leading_int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"), 1)
    if "SLURM_PROCID" in env and world > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        port = env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=_leading_int(per_node, world),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            master_port=int(port),
            launcher="slurm",
        )
    return DistEnv()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the process group and its collectives ------------------------------------------------------


class Dist:
    """This rank's view of the job. With one process every collective is the identity, so the loop
    calls them unconditionally. Tensors are moved to the communication device (the GPU for nccl)
    and back, so callers pass CPU or GPU tensors alike."""

    def __init__(self, env: DistEnv, backend: str, device: torch.device):
        self.env, self.backend, self.device = env, backend, device
        self.rank, self.world_size = env.rank, env.world_size
        self.is_main = env.rank == 0
        self._group = tdist.is_available() and tdist.is_initialized()
        self._comm_device = device if self._group and tdist.get_backend() == "nccl" else None

    def _to_comm(self, t: Tensor) -> Tensor:
        # A private contiguous copy: collectives work in place and must not touch the caller's.
        dev = self._comm_device or t.device
        return t.detach().to(dev, copy=True).contiguous()

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if not self._group:
            return t
        buf = self._to_comm(t)
        tdist.all_reduce(buf)
        return buf.to(t.device)

    def reduce_mean(self, t: Tensor) -> Tensor:
        """The coordinator's `reduce`: every rank gets the mean of the local hypergradients."""
        if not self._group:
            return t
        return self.all_reduce_sum(t) / self.world_size

    def broadcast(self, t: Tensor) -> Tensor:
        """The coordinator's `broadcast`: rank 0's tensor, bitwise, on every rank."""
        if not self._group:
            return t
        buf = self._to_comm(t)
        tdist.broadcast(buf, src=0)
        return buf.to(t.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self._group:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self._group:
            tdist.barrier()

    def mean_over_samples(self, total: float, count: int) -> float:
        """Σ total / Σ count over ranks: an epoch's training loss as one rank would report it."""
        both = self.all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64))
        return float(both[0] / max(1.0, float(both[1])))

    def local_batch(self, global_batch: int) -> int:
        if global_batch % self.world_size:
            raise UserError(
                f"train.batch_size={global_batch} is the global batch and must be divisible by "
                f"the {self.world_size} ranks (each takes batch_size/{self.world_size})"
            )
        return global_batch // self.world_size

    def threads(self, node_threads: int) -> int:
        """train.threads is the node's budget: split it among the ranks sharing the node."""
        if node_threads <= 0:
            return 0
        return max(1, node_threads // self.env.local_world_size)

    def check_same_config(self, cfg_dict: dict, run_dir: str) -> None:
        """Every rank must run the same resolved config into the same directory; a rank launched
        with other overrides would silently train something else (or deadlock on shapes)."""
        mine = {"run_dir": run_dir, **cfg_dict}
        digest = hashlib.sha256(json.dumps(mine, sort_keys=True, default=str).encode()).hexdigest()
        everyone = self.all_gather_object((digest, mine))
        ref_digest, ref = everyone[0]
        for r, (d, theirs) in enumerate(everyone):
            if d != ref_digest:
                diff = _first_difference(ref, theirs)
                raise UserError(
                    f"rank {r} was launched with a different config than rank 0 ({diff}); "
                    "start every rank with the same config file, overrides and --out"
                )

    def pick_rng(self, saved: Any) -> Any:
        """This rank's RNG state from a checkpoint (a list, one per rank; old files: one dict)."""
        if isinstance(saved, dict):
            return saved
        return saved[self.rank] if self.rank < len(saved) else saved[0]


def _first_difference(a: dict, b: dict) -> str:
    for section in sorted(set(a) | set(b)):
        x, y = a.get(section), b.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if x.get(k) != y.get(k):
                    return f"{section}.{k}: {x.get(k)!r} vs {y.get(k)!r}"
        elif x != y:
            return f"{section}: {x!r} vs {y!r}"
    return "same values, different hash"


_DIST: Dist | None = None


def init_dist(cfg) -> Dist:
    """Detect the environment, start the process group once per process, pick the device.

    Idempotent: a recipe with two phases (search, retrain) calls it twice and gets the same Dist.
    dist.backend=none with several processes is refused: W copies of one run writing the same
    directory is never what was meant.
    """
    global _DIST
    env = detect_env()
    backend = cfg.dist.backend
    if _DIST is not None and _DIST.backend == backend and _DIST.env == env:
        return _DIST
    if backend == "none" and env.world_size > 1:
        raise UserError(
            f"this process is {env.where} but dist.backend=none; "
            "pass dist.backend=ddp (or deepspeed) to train with several processes"
        )
    if backend == "deepspeed":
        _import_deepspeed()  # before the group exists: a missing extra is a one-line error
    device = _device(cfg.train.device, env)
    if backend != "none" and not tdist.is_initialized():
        if env.launcher == "single":  # one process asked for ddp/deepspeed: a private rendezvous
            env = DistEnv(master_port=_free_port())
        # DeepSpeed (and env:// itself) read the rendezvous from the environment: export what was
        # detected, so a Slurm task or a bare `python` process looks like a torchrun worker.
        os.environ.update(
            RANK=str(env.rank),
            WORLD_SIZE=str(env.world_size),
            LOCAL_RANK=str(env.local_rank),
            LOCAL_WORLD_SIZE=str(env.local_world_size),
            MASTER_ADDR=env.master_addr,
            MASTER_PORT=str(env.master_port),
        )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # The timeout bounds how long a rank waits for a dead peer when no launcher tears the
        # job down.
        timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
        tdist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            **_rendezvous(env, timeout),
        )
        atexit.register(_teardown)
    _DIST = Dist(env, backend, device)
    return _DIST


_PEER_LOST = False


def _teardown() -> None:
    # A clean teardown at exit (an undestroyed group can abort at interpreter shutdown), unless a
    # peer is gone: then shutting the group down could wait on it.
    if tdist.is_initialized() and not _PEER_LOST:
        tdist.destroy_process_group()


def _rendezvous(env: DistEnv, timeout: datetime.timedelta) -> dict[str, Any]:
    """How ranks find each other: env:// (rank 0 hosts the store), except under a torchrun agent.

    torchrun's agent hosts the store and keeps it across `--max-restarts` attempts, with the
    previous attempt's keys in it: a restarted rank may read a dead peer's address and fail to
    connect (seen with torch 2.14 whenever one rank starts slower, e.g. importing DeepSpeed).
    A key prefix per attempt keeps the attempts apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {"init_method": "env://"}
    agent = tdist.TCPStore(
        env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": tdist.PrefixStore(f"abdist/attempt_{attempt}", agent)}


def _device(setting: str, env: DistEnv) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise UserError(
            "dist.backend=deepspeed needs DeepSpeed: "
            "DS_BUILD_OPS=0 pip install 'abdist[deepspeed]' (or use dist.backend=ddp)"
        ) from None
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory comm op (~100 s, needs g++) at its
    # first init_distributed; gloo does the same job here, so mark the op unavailable up front.
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict):
        ops["deepspeed_shm_comm"] = False
    return deepspeed


# --- BatchNorm over the global batch ------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Differentiable SUM all-reduce: the gradient of a sum over ranks is the sum of the ranks'
    gradients (torch.distributed.nn.functional.all_reduce does this too, but is deprecated)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        t = t.clone()
        tdist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        tdist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all ranks).

    torch.nn.SyncBatchNorm only runs on accelerators; this is the same computation with two
    differentiable all-reduces (sum and count, then the centred sum of squares: the two-pass
    variance, as stable as BatchNorm's own) that also run on gloo. Eval mode, a single process and
    the hyper step (which runs in eval mode, needing no double backward through a collective) are
    plain BatchNorm. State-dict keys are BatchNorm's, so checkpoints move freely between the two.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and tdist.is_initialized() and tdist.get_world_size() > 1):
            return super().forward(x)
        dtype, x = x.dtype, x.float()  # statistics in fp32 under bf16 autocast too
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() // x.shape[1]])
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm by one over the global batch (weights and buffers kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)


def _to_global_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm
    ):
        bn = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        ).to(next(iter(module.state_dict().values()), torch.empty(0)).device)
        bn.load_state_dict(module.state_dict())
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        setattr(module, name, _to_global_bn(child))
    return module


# --- the model as the loop trains it ------------------------------------------------------------


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
        deepspeed = _import_deepspeed()
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


# --- failures -----------------------------------------------------------------------------------


class PeerFailure(UserError):
    """A collective failed because another rank died or stopped answering."""

    exit_code = 4


@contextlib.contextmanager
def peer_failures_as_user_errors():
    """Turn the backend's error on a lost peer into one line that says what to do.

    When a rank dies, the survivors' next collective fails: at once with gloo (the peer's socket
    closes), after dist.timeout_s otherwise. torchrun then stops the remaining workers and its
    summary names the failed rank ("Root Cause ... rank: N"); with --max-restarts it starts them
    again and they resume from the latest checkpoint.
    """
    try:
        yield
    except UserError:
        raise
    except (RuntimeError, tdist.DistError) as exc:
        if not (_DIST is not None and _DIST.world_size > 1 and _looks_like_peer_loss(exc)):
            raise
        global _PEER_LOST
        _PEER_LOST = True
        # "[.../gloo/transport/tcp/pair.cc:545] Read error ...": drop the source location.
        text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", str(exc).strip())
        first = text.splitlines()[0][:160] if text else type(exc).__name__
        raise PeerFailure(
            f"{_DIST.env.where}: lost contact with another rank ({first}); the launcher's log "
            "names the rank that failed; re-run the same command to resume from the last "
            "checkpoint"
        ) from None


def _looks_like_peer_loss(exc: BaseException) -> bool:
    if isinstance(exc, tdist.DistError):
        return True
    text = str(exc).lower()
    signs = ("connection closed", "connection reset", "broken pipe", "connectfullmesh", "timed out")
    return any(s in text for s in signs)
