"""Guards on a run directory, so that no command can lose or mix up a run.

- `check_out_dir`: `--out` must be a directory (or not exist yet).
- `lock_run_dir`: one `abdist train` per run directory at a time (an advisory POSIX record lock
  on RUN/.lock held by rank 0 for the whole run; the kernel releases it when that process dies,
  so a killed or requeued run never leaves a stale lock behind).
- `check_resumable`: a directory holding a run with a different config is refused, unless that
  run never got anywhere (a failed start leaves only config.yaml: it must not block the corrected
  command).
- `resume_state`: the newest readable checkpoint, with a line for every newer one skipped; a run
  whose checkpoints are all gone or damaged is refused, never silently restarted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from abdist.config import Config, config_from_dict
from abdist.engine.checkpoint import CheckpointDir
from abdist.errors import UserError
from abdist.tracking import JsonlLogger

LOCK_NAME = ".lock"


def check_out_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a directory; pass a directory for the run")


@contextlib.contextmanager
def lock_run_dir(run_dir: Path, dist) -> Iterator[None]:
    """Hold RUN/.lock for the duration; every rank stops with the same line if it is taken."""
    handle, holder = None, ""
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_NAME, "a+")
        try:
            # lockf, not flock: a flock is shared with every forked child (the loader workers),
            # which outlive a SIGKILLed rank 0 by seconds and would block the resume meanwhile.
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                handle.seek(0)
                holder = handle.read().strip() or "another process"
            else:  # a filesystem without locks (some NFS mounts): run, but say it is unguarded
                print(
                    f"abdist: warning: cannot lock {run_dir / LOCK_NAME} ({exc.strerror}); "
                    "nothing stops a second abdist train on this directory",
                    file=sys.stderr,
                )
            handle.close()
            handle = None
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
            handle.flush()
    holder = dist.all_gather_object(holder)[0]  # rank 0's verdict, so no rank trains alone
    if holder:
        raise UserError(
            f"{run_dir} is in use by another abdist train ({holder}); wait for it to finish, "
            "or pass another --out"
        )
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock; the file stays (removing it would race a waiter)


def has_progress(run_dir: Path) -> bool:
    """Whether anything in `run_dir` (or its phases) came out of training: a checkpoint, a
    logged epoch or final metrics. A directory without any holds at most a failed start."""
    if not run_dir.is_dir():
        return False
    for pattern in ("**/checkpoints/epoch-*.pt", "**/metrics.json"):
        if next(run_dir.glob(pattern), None) is not None:
            return True
    return any(JsonlLogger(p).records() for p in run_dir.glob("**/log.jsonl"))


def check_resumable(run_dir: Path, cfg: Config) -> None:
    """Refuse to resume a run directory that holds a run with a different config."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file() or not has_progress(run_dir):
        return  # nothing to protect: the config is (re)written when the run starts
    import yaml

    try:
        raw = yaml.safe_load(saved_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(
            f"{saved_path} is unreadable ({type(exc).__name__}), so the run in {run_dir} cannot "
            "be checked for resume; restore it, or pass another --out"
        ) from None
    saved = config_from_dict(raw, str(saved_path)).to_dict()
    new = cfg.to_dict()
    diffs = [
        f"{s}.{k}: {saved[s][k]!r} -> {new[s][k]!r}"
        for s in new
        if s != "tracking"  # where output goes does not change the run
        for k in new[s]
        if saved[s].get(k) != new[s][k]
    ]
    if diffs:
        raise UserError(
            f"{run_dir} holds a run with a different config ({'; '.join(diffs[:3])}); "
            "pass another --out, or delete that directory to start over"
        )


def resume_state(ckpts: CheckpointDir, run_dir: Path, *, verbose: bool) -> dict[str, Any] | None:
    """The state to resume from (None: start fresh), falling back to an older checkpoint when
    the newest cannot be read, and refusing when the run's checkpoints are lost."""
    state, path, problems = ckpts.load_newest()
    if state is not None:
        if problems and verbose:
            for p in problems:
                print(f"abdist: warning: {p}", file=sys.stderr)
            print(
                f"abdist: warning: resuming from the newest readable checkpoint {path.name} "
                f"(epoch {state['epoch'] + 1}); later epochs are trained again",
                file=sys.stderr,
            )
        return state
    # No checkpoint. Legitimate only before the first one was written: the log then holds at
    # most the first epoch (it is written just before that epoch's checkpoint).
    logged = len(JsonlLogger(run_dir / "log.jsonl").records())
    finished = (run_dir / "metrics.json").is_file()
    if problems or logged >= 2 or finished:
        what = problems[0] if problems else f"{ckpts.root} holds no checkpoint"
        done = "a finished run" if finished else f"{logged} logged epoch(s)"
        raise UserError(
            f"{run_dir} has {done} but no readable checkpoint ({what}); it cannot resume: "
            "restore the checkpoints, pass another --out, or delete the directory to start over"
        )
    return None
