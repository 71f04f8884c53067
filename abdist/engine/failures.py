"""Failure translation: a collective that fails because a peer died becomes one line (exit 4).

Separate because it is about what the user is told, not about training: it reads this process's
Dist (to know whether several ranks exist and which one this is) and marks the peer lost so the
process group is not torn down at exit, and nothing in the group or the engines depends on it.
"""

from __future__ import annotations

import contextlib
import re

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
    summary names the failed rank ("Root Cause ... rank: N"); with --max-restarts it starts them
    again and they resume from the latest checkpoint.
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
