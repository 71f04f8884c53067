"""Where this process sits in the job: torchrun's environment, a Slurm `srun` task, or alone.

Pure reading of environment variables into a DistEnv, with no torch.distributed state: kept apart
from the process group so it can be tested (and used by launchers) without starting anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from abdist.errors import UserError


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


def first_slurm_host(nodelist: str) -> str:
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
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=int(port),
            launcher="slurm",
        )
    return DistEnv()
