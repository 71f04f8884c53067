"""The process group and this rank's collectives: init_dist(cfg) -> Dist.

Owns the process-wide state that must be single: the one Dist of this process (init_dist is
idempotent) and whether a peer was lost (then the group is not destroyed at exit). Separate from
environment detection (pure, no torch.distributed), from the engines that wrap a model around a
Dist, and from the translation of a lost peer's errors, which all build on this module.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
import socket
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor

from abdist.engine.env import DistEnv, detect_env
from abdist.errors import UserError


def free_port() -> int:
    """A port that is free on this host now: a private one-process rendezvous (and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def current_dist() -> Dist | None:
    """This process's Dist, once init_dist has run (None before)."""
    return _DIST


def reset_dist() -> None:
    """Forget this process's Dist, so the next init_dist detects and decides afresh (tests)."""
    global _DIST
    _DIST = None


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
        import_deepspeed()  # before the group exists: a missing extra is a one-line error
    device = _device(cfg.train.device, env)
    if backend != "none" and not tdist.is_initialized():
        if env.launcher == "single":  # one process asked for ddp/deepspeed: a private rendezvous
            env = DistEnv(master_port=free_port())
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


def mark_peer_lost() -> None:
    """A peer is gone: leave the group undestroyed at exit, since shutting it down could wait on
    the lost peer."""
    global _PEER_LOST
    _PEER_LOST = True


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


def import_deepspeed():
    """DeepSpeed, an optional extra: a missing one is a one-line error. Here because init_dist
    checks it before the group exists; the DeepSpeed engine imports it the same way."""
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
