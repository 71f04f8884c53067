import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Small, fast settings shared by the tests that train on digits-LT.
FAST = ["train.epochs=3", "train.threads=1", "tracking.progress=never"]


def run_cli(*args, cwd=None, timeout=300):
    """Run `python -m abdist ...` as a real subprocess; returns CompletedProcess (text)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "abdist", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
    )


@pytest.fixture
def ce_config():
    return REPO / "configs" / "digits_lt" / "ce.yaml"
