"""Failure translation: a collective that fails because a peer died becomes one line (exit 4), and
a torchrun worker whose launcher died stops (exit 4) instead of training on unseen.

Separate because it is about what the user is told, not about training: it reads this process's
Dist (to know whether several ranks exist and which one this is) and marks the peer lost so the
process group is not torn down at exit, and nothing in the group or the engines depends on it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time

import torch.distributed as tdist

from abdist.engine.process_group import current_dist, mark_peer_lost
from abdist.errors import UserError


class PeerFailure(UserError):
    """A collective failed because another rank died or stopped answering."""

    exit_code = 4


@contextlib.contextmanager
def peer_failures_as_user_errors():
    """Turn the backend's error on a lost peer into one line that says what to do.

    When a rank dies, the survivors' next collective fails: at once with gloo (the peer's socket
    closes), after dist.timeout_s otherwise. torchrun then stops the remaining workers and its
    summary lists the failed ranks with their exit codes (its "Root Cause" is the earliest by
    whole seconds, ties to the lowest rank, so a survivor may be named there); with
    --max-restarts it starts them again and they resume from the latest checkpoint.
    """
    try:
        yield
    except UserError:
        raise
    except (RuntimeError, tdist.DistError) as exc:
        dist = current_dist()
        if not (dist is not None and dist.world_size > 1 and _looks_like_peer_loss(exc)):
            raise
        mark_peer_lost()
        # "[.../gloo/transport/tcp/pair.cc:545] Read error ...": drop the source location.
        text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", str(exc).strip())
        first = text.splitlines()[0][:160] if text else type(exc).__name__
        raise PeerFailure(
            f"{dist.env.where}: lost contact with another rank ({first}); the launcher's log "
            "names the rank that failed; re-run the same command to resume from the last "
            "checkpoint"
        ) from None


def _looks_like_peer_loss(exc: BaseException) -> bool:
    if isinstance(exc, tdist.DistError):
        return True
    text = str(exc).lower()
    signs = ("connection closed", "connection reset", "broken pipe", "connectfullmesh", "timed out")
    return any(s in text for s in signs)


_WATCHING = False


def stop_when_the_launcher_dies(env, poll_s: float = 1.0) -> None:
    """Under torchrun: exit (4) with one line once the launcher is gone (once per process).

    torchrun starts each worker in its own session, so a SIGKILLed torchrun (kill -9, an OOM
    kill of the agent) leaves its workers training on, unseen, and holding the run directory:
    the same command would be refused as "in use". A daemon thread polls for the parent to
    change (it becomes init or a subreaper), as PyTorch's own loader workers do. PDEATHSIG is
    not used: it fires when the launcher's *thread* that started the worker exits.
    """
    global _WATCHING
    if env.launcher != "torchrun" or _WATCHING:
        return
    _WATCHING = True
    parent, where = os.getppid(), env.where

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        with contextlib.suppress(OSError):  # stderr may have been a pipe to the dead launcher
            print(
                f"abdist: error: {where}: the launcher (torchrun, pid {parent}) is gone; "
                "stopping; re-run the same command to resume from the last checkpoint",
                file=sys.stderr,
                flush=True,
            )
        # Checkpoint writes are atomic (tmp + rename), so this is as safe as the SIGKILL a
        # cluster sends; no cleanup may wait on peers that are stopping too.
        os._exit(PeerFailure.exit_code)

    threading.Thread(target=watch, name="abdist-launcher-watch", daemon=True).start()
