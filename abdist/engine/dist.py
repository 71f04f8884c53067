"""Distributed training, as small helpers the one training loop composes.

    detect_env()      where this process sits: torchrun env vars, a Slurm `srun` task, or alone
    init_dist(cfg)    the process group (gloo on CPU, nccl on GPU) and this rank's device -> Dist
    Dist              rank/world/device + the few collectives the loop needs (identity when alone)
    wrap(...)         the model for training: Engine (one process), DDPEngine, DeepSpeedEngine
    sync_batchnorm()  BatchNorm over the global batch (torch's SyncBatchNorm on CUDA, ours on CPU)

This module only gathers the public names; each job lives in its own module:

    abdist.engine.env            environment detection (DistEnv, detect_env, Slurm node lists)
    abdist.engine.process_group  the process group, Dist and its collectives (init_dist)
    abdist.engine.batchnorm      BatchNorm over the global batch (GlobalBatchNorm, sync_batchnorm)
    abdist.engine.engines        the plain, DDP and DeepSpeed engines (wrap)
    abdist.engine.failures       a lost peer's errors as one line (peer_failures_as_user_errors),
                                 a torchrun worker stops with its launcher

Conventions the loop relies on:
- `train.batch_size` is the GLOBAL batch; rank r takes its contiguous slice of every global batch
  of one (seed, epoch) permutation (TensorSplit.batches), so W ranks see exactly the samples one
  rank would, in equal numbers (no DDP hang on uneven batches).
- Hyper steps, evaluation and state dicts use the UNWRAPPED module (`engine.module`): autograd
  through DDP is wrong for double backward, and evaluation needs no gradient sync.
- Only rank 0 writes shared files; every rank reads the checkpoint (a shared run directory, as on
  any cluster filesystem).
"""

from abdist.engine.batchnorm import GlobalBatchNorm, sync_batchnorm
from abdist.engine.engines import DDPEngine, DeepSpeedEngine, Engine, wrap
from abdist.engine.env import DistEnv, detect_env, first_slurm_host
from abdist.engine.failures import (
    PeerFailure,
    peer_failures_as_user_errors,
    stop_when_the_launcher_dies,
)
from abdist.engine.process_group import (
    Dist,
    current_dist,
    free_port,
    import_deepspeed,
    init_dist,
    mark_peer_lost,
    reset_dist,
)

__all__ = [
    "DDPEngine",
    "DeepSpeedEngine",
    "Dist",
    "DistEnv",
    "Engine",
    "GlobalBatchNorm",
    "PeerFailure",
    "current_dist",
    "detect_env",
    "first_slurm_host",
    "free_port",
    "import_deepspeed",
    "init_dist",
    "mark_peer_lost",
    "peer_failures_as_user_errors",
    "reset_dist",
    "stop_when_the_launcher_dies",
    "sync_batchnorm",
    "wrap",
]
