"""`abdist launch slurm|local CONFIG ...`: submit training runs through submitit.

Each submitted task runs `TrainJob`, which

1. exports the torch.distributed variables submitit derives from Slurm (RANK, WORLD_SIZE,
   LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) -- the distributed engine picks them up
   when `dist.backend` is not `none`;
2. calls `abdist.engine.recipe.run(cfg, run_dir)`, exactly what `abdist train` does.

`TrainJob` is a `submitit.helpers.Checkpointable`: on preemption or timeout submitit requeues the
same call, and `run()` resumes from the run directory's latest checkpoint (resume is exact, so the
final metrics equal those of an uninterrupted run).

Arrays (`--array seeds=0,1,2`, `--array optim.lr=0.1,0.05`, repeatable: the cartesian product) are
one Slurm job array; point i trains in RUN_DIR/<name of its overrides> (e.g. RUN_DIR/seed_1).
submitit's files (pickles, logs) go to RUN_DIR/slurm/<launch time>/: a fresh folder per launch, so
a job id reused after the cluster's state was wiped can never return an older job's result.

This module does not import torch at import time (the CLI stays fast).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from abdist.errors import UserError

CLUSTERS = ("slurm", "local")
_ALIASES = {"seeds": "train.seed", "seed": "train.seed"}


class TrainJob(submitit.helpers.Checkpointable):
    """What each submitted task runs: train (or resume) one run; requeued on preemption/timeout.

    Checkpointable's default `checkpoint()` resubmits the same call; resuming from the run
    directory's checkpoints is the trainer's job, so no state needs to travel with it.
    """

    def __call__(self, cfg_dict: dict, run_dir: str, threads: int | None = None) -> dict:
        return run_training_task(cfg_dict, run_dir, threads)


def run_training_task(cfg_dict: dict, run_dir: str, threads: int | None = None) -> dict:
    """Body of a submitted task: distributed env from submitit, then `recipe.run`."""
    env = submitit.JobEnvironment()
    # overwrite=True: values inherited from the submitting shell (sbatch exports the environment)
    # would be wrong for this job.
    submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    from abdist.config import config_from_dict
    from abdist.engine.recipe import run

    cfg = config_from_dict(cfg_dict, "submitted config")
    metrics = run(cfg, run_dir)
    return {
        "run_dir": str(run_dir),
        "rank": env.global_rank,
        "world_size": env.num_tasks,
        "job_id": env.job_id,
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "metrics": metrics,
    }


def probe_task() -> dict:
    """Diagnostic task: export the distributed env like `TrainJob`, then (with more than one task)
    initialise a gloo process group and all-reduce each rank's number. Returns what it saw, so a
    cluster's multi-task setup can be checked without training anything."""
    env = submitit.JobEnvironment()
    submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    seen: dict[str, Any] = {k: os.environ.get(k) for k in keys}
    seen["job_id"] = env.job_id
    if env.num_tasks > 1:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        try:
            t = torch.tensor([float(env.global_rank + 1)])
            dist.all_reduce(t)
            seen["all_reduce_sum"] = t.item()
        finally:
            dist.destroy_process_group()
    return seen


# --- arrays ---------------------------------------------------------------------------------------


def parse_array(specs: list[str]) -> list[tuple[str, list[Any]]]:
    """['seeds=0,1', 'optim.lr=0.1,0.05'] -> [('train.seed', [0, 1]), ('optim.lr', [0.1, 0.05])].

    Values are YAML scalars separated by commas; `seeds`/`seed` mean `train.seed`.
    """
    import yaml

    out: list[tuple[str, list[Any]]] = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = _ALIASES.get(key.strip(), key.strip())
        if not sep or not raw.strip():
            raise UserError(f"--array {spec!r}: expected KEY=v1,v2,... (e.g. seeds=0,1,2)")
        if "." not in key:
            import difflib

            from abdist.config import all_keys

            close = difflib.get_close_matches(key, ["seeds", *all_keys()], n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"--array: unknown key '{key}'{hint}; use seeds=... or section.key=...")
        values = []
        for part in raw.split(","):
            try:
                values.append(yaml.safe_load(part.strip()))
            except yaml.YAMLError:
                values.append(part.strip())
        if any(k == key for k, _ in out):
            raise UserError(f"--array: '{key}' is given twice")
        out.append((key, values))
    return out


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_") or "x"


def point_name(point: dict[str, Any]) -> str:
    """{'train.seed': 1} -> 'seed_1'; {'optim.lr': 0.1, 'train.seed': 0} -> 'lr_0.1-seed_0'."""
    leaves = [k.split(".")[-1] for k in point]
    names = [
        k.split(".")[-1] if leaves.count(k.split(".")[-1]) == 1 else k.replace(".", "_")
        for k in point
    ]
    return "-".join(f"{n}_{_slug(v)}" for n, v in zip(names, point.values()))


def expand_points(array: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    keys = [k for k, _ in array]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in array))]


# --- launching -----------------------------------------------------------------------------------


@dataclass
class LaunchOptions:
    cluster: str = "slurm"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: gpus_per_node, or 1 on CPU
    cpus_per_task: int = 1
    partition: str | None = None
    time_min: int = 60
    mem_gb: float | None = None
    job_name: str | None = None
    array: list[str] = field(default_factory=list)


@dataclass
class Submitted:
    job: Any  # submitit Job
    run_dir: Path
    point: dict[str, Any]


def _tasks_per_node(opts: LaunchOptions) -> int:
    if opts.tasks_per_node is not None:
        return opts.tasks_per_node
    return opts.gpus_per_node if opts.gpus_per_node > 0 else 1


def _check_options(cfg, opts: LaunchOptions) -> None:
    if opts.cluster not in CLUSTERS:
        raise UserError(f"unknown cluster '{opts.cluster}'; use one of {', '.join(CLUSTERS)}")
    for name in ("nodes", "cpus_per_task", "time_min"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if opts.gpus_per_node < 0 or (opts.tasks_per_node is not None and opts.tasks_per_node < 1):
        raise UserError("--gpus-per-node must be >= 0 and --tasks-per-node >= 1")
    world = opts.nodes * _tasks_per_node(opts)
    if world > 1 and cfg.dist.backend == "none":
        raise UserError(
            f"{world} tasks need a distributed backend, but dist.backend=none: every task would "
            "train the same run on its own; set dist.backend (see `abdist config`) or use 1 task"
        )
    if opts.cluster == "local" and opts.nodes != 1:
        raise UserError("--nodes > 1 needs a cluster; the local executor runs on this machine only")
    if opts.gpus_per_node > 0 and cfg.train.device == "cpu":
        raise UserError("--gpus-per-node > 0 with train.device=cpu: the GPUs would sit idle")


def make_executor(folder: Path, opts: LaunchOptions, name: str):
    ex = submitit.AutoExecutor(folder=folder, cluster=opts.cluster)
    params: dict[str, Any] = {
        "name": opts.job_name or name,
        "timeout_min": opts.time_min,
        "nodes": opts.nodes,
        "tasks_per_node": _tasks_per_node(opts),
        "cpus_per_task": opts.cpus_per_task,
    }
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    if opts.partition:
        params["slurm_partition"] = opts.partition
    ex.update_parameters(**params)
    return ex


def submit(cfg, run_dir: str | Path, opts: LaunchOptions) -> list[Submitted]:
    """Submit one job (or one array); return the jobs with their run directories."""
    from abdist.config import set_key

    _check_options(cfg, opts)
    run_dir = Path(run_dir).resolve()
    points = expand_points(parse_array(opts.array)) if opts.array else [{}]
    jobs_spec = []
    for point in points:
        pcfg = copy.deepcopy(cfg)
        for key, value in point.items():
            set_key(pcfg, key, value, where="--array")
        # Array points of one launch are different runs: give each its own name in reports.
        if point:
            pcfg.train.name = f"{cfg.train.name}/{point_name(point)}"
        pdir = run_dir / point_name(point) if point else run_dir
        jobs_spec.append((pcfg, pdir, point))
    names = [d for _, d, _ in jobs_spec]
    if len(set(names)) != len(names):
        raise UserError("--array: two points map to the same run directory; use distinct values")

    folder = run_dir / "slurm" / time.strftime("%Y%m%d-%H%M%S")
    while folder.exists():  # two launches within one second
        folder = folder.with_name(folder.name + "+")
    ex = make_executor(folder, opts, name=f"abdist-{cfg.train.name}")
    try:
        if len(jobs_spec) == 1:
            pcfg, pdir, point = jobs_spec[0]
            jobs = [ex.submit(TrainJob(), pcfg.to_dict(), str(pdir), opts.cpus_per_task)]
        else:
            with ex.batch():
                jobs = [
                    ex.submit(TrainJob(), pcfg.to_dict(), str(pdir), opts.cpus_per_task)
                    for pcfg, pdir, _ in jobs_spec
                ]
    except Exception as exc:  # sbatch refused the job: its message is the useful part
        msg = " ".join(str(exc).split())
        raise UserError(f"submission failed: {msg[-500:]}") from None
    submitted = [Submitted(j, d, p) for j, (_, d, p) in zip(jobs, jobs_spec)]
    _write_launch_record(run_dir, folder, opts, submitted)
    return submitted


def _write_launch_record(run_dir: Path, folder: Path, opts: LaunchOptions, subs) -> None:
    from abdist.io import write_json

    record = {
        "cluster": opts.cluster,
        "folder": str(folder),
        "options": opts.__dict__,
        "jobs": [
            {
                "job_id": s.job.job_id,
                "run_dir": str(s.run_dir),
                "overrides": s.point,
                "stdout": str(s.job.paths.stdout),
                "stderr": str(s.job.paths.stderr),
            }
            for s in subs
        ],
    }
    write_json(run_dir / "launch.json", record)


def describe(subs: list[Submitted], opts: LaunchOptions) -> str:
    tasks = opts.nodes * _tasks_per_node(opts)
    what = f"{tasks} task{'s' if tasks > 1 else ''} on {opts.nodes} node(s)"
    lines = []
    if len(subs) > 1:
        ids = {str(s.job.job_id).split("_")[0] for s in subs}
        if len(ids) == 1:  # a Slurm job array
            lines.append(f"submitted job array {ids.pop()} ({len(subs)} jobs, {what} each)")
        else:
            lines.append(f"submitted {len(subs)} jobs ({what} each)")
    for s in subs:
        head = f"job {s.job.job_id}" + (f" ({what})" if len(subs) == 1 else "")
        lines.append(f"{'submitted ' if len(subs) == 1 else '  '}{head} -> {s.run_dir}")
        lines.append(f"    log: {s.job.paths.stdout}  (stderr: {s.job.paths.stderr.name})")
    return "\n".join(lines)


def remote_error(job, exc: BaseException) -> UserError:
    """A failed job as one line: the remote exception's last line, plus where the log is."""
    text = str(exc)
    if isinstance(exc, submitit.core.utils.FailedJobError):
        trace = text.split("----------------------")[1] if "------" in text else text
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else "unknown error"
        last = re.sub(r"^abdist\.errors\.UserError: ", "", last)
        return UserError(f"job {job.job_id} failed: {last} (log: {job.paths.stderr})")
    state = getattr(job, "state", "UNKNOWN")
    return UserError(f"job {job.job_id} did not finish (state {state}); see {job.paths.stderr}")


def wait(subs: list[Submitted]) -> tuple[list[dict], list[UserError]]:
    """Wait for every job; return (finished runs as table rows, one-line errors)."""
    rows, errors = [], []
    for s in subs:
        try:
            results = s.job.results()
        except Exception as exc:  # FailedJobError / UncompletedJobError
            errors.append(remote_error(s.job, exc))
            continue
        first = results[0]
        rows.append({"name": first["metrics"].get("name", s.run_dir.name), **first})
    return rows, errors


def launch(
    config: str,
    overrides: list[str],
    run_dir: str | None,
    opts: LaunchOptions,
    *,
    wait_for_results: bool = False,
    out=print,
) -> int:
    """What `abdist launch` does; returns the exit code."""
    from abdist.config import load_config

    cfg = load_config(config, overrides)
    target = Path(run_dir) if run_dir else Path("runs") / cfg.train.name
    subs = submit(cfg, target, opts)
    out(describe(subs, opts))
    if not wait_for_results:
        return 0
    from abdist.report import format_table

    rows, errors = wait(subs)
    if rows:
        out(format_table(rows))
    if errors:
        if len(errors) > 1:
            raise UserError(f"{len(errors)} of {len(subs)} jobs failed; first: {errors[0]}")
        raise errors[0]
    return 0


def load_launch_record(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "launch.json"
    if not path.is_file():
        raise UserError(f"no launch.json in {run_dir}: nothing was launched there")
    return json.loads(path.read_text())
