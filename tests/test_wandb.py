"""W&B tracking, for real but offline: files under the run dir, history/summary read back from
W&B's own run file, and no network connection from any process (strace, or a socket guard)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, run_cli

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real 3-epoch digits run (log.jsonl, metrics.json, alpha.json) to replay into W&B."""
    out = tmp_path_factory.mktemp("wandb") / "ce"
    r = run_cli("train", REPO / "configs/digits_lt/la.yaml", "--out", out, *FAST)
    assert r.returncode == 0, r.stderr
    return out


# The trainer's calls, in a fresh process (W&B's service and stdout hooks stay out of pytest).
REPLAY = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from abdist.config import load_config
    from abdist.wandb_tracking import make_tracker
    run_dir = Path(sys.argv[1])
    cfg = load_config(run_dir / "config.yaml", ["tracking.backend=wandb", *sys.argv[2:]])
    tracker = make_tracker(cfg, run_dir)
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        tracker.log(json.loads(line))
    tracker.log_summary(json.loads((run_dir / "metrics.json").read_text()),
                        json.loads((run_dir / "alpha.json").read_text()))
    tracker.finish()
    leaked = [k for k in ("WANDB_MODE", "WANDB_DIR") if k in os.environ]
    print("ENV-LEFT", leaked)
    """
)


def _clean_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "RANK", "SLURM_PROCID"):
        env.pop(var, None)
    return env


def _replay(run_dir: Path, tmp_path: Path, *extra: str, prefix=()) -> subprocess.CompletedProcess:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(exist_ok=True)
    cwd.mkdir(exist_ok=True)
    return subprocess.run(
        [*prefix, sys.executable, "-c", REPLAY, str(run_dir), *extra],
        cwd=cwd,
        env=_clean_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _read_back(run_dir: Path, index: int = -1) -> dict:
    from abdist.wandb_tracking import offline_runs, read_offline_run

    runs = offline_runs(run_dir)
    assert runs, f"no offline run under {run_dir}/wandb"
    deadline = time.time() + 30
    while True:  # W&B's service writes the run file asynchronously
        data = read_offline_run(runs[index])
        if data["finished"] or time.time() > deadline:
            return data
        time.sleep(0.2)


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def test_offline_run_logs_history_summary_tables_and_stays_in_run_dir(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    r = _replay(run_dir, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ENV-LEFT []" in r.stdout  # finish() restored the environment
    data = _read_back(run_dir)
    assert data["finished"]

    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    epochs = [h for h in data["history"] if "train_loss" in h]
    assert [h["epoch"] for h in epochs] == [1, 2, 3]
    assert [h["val_balanced_error"] for h in epochs] == [x["val_balanced_error"] for x in log]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = data["summary"]
    for key in ("accuracy", "balanced_error", "worst_class_recall"):
        assert summary[key] == pytest.approx(metrics[key])
    # per-class recall table, alpha-vs-frequency table + plots, report PNGs as images
    assert summary["per_class/_type"] == "table-file" and summary["per_class/nrows"] == 10
    assert summary["alpha/_type"] == "table-file"
    assert any(k.startswith("alpha_vs_frequency/l") for k in summary)
    for png in ("per_class_recall", "loss_params"):
        assert summary[f"report/{png}/_type"] == "image-file"
        assert (run_dir / "report" / f"{png}.png").is_file()
    assert data["config"]["optim"]["lr"] == 0.05  # the resolved config

    # Everything under the run directory: nothing in $HOME or the working directory.
    assert not [p for p in (tmp_path / "home").rglob("*") if "wandb" in p.name.lower()]
    assert not list((tmp_path / "cwd").iterdir())
    assert (run_dir / "wandb" / ".cache").is_dir() and (run_dir / "wandb" / ".config").is_dir()


def test_resumed_run_continues_the_same_wandb_run(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    for _ in range(2):  # a requeue replays the trainer's calls on the same run directory
        r = _replay(run_dir, tmp_path)
        assert r.returncode == 0, r.stderr
    from abdist.wandb_tracking import offline_runs

    ids = {p.name.rsplit("-", 1)[-1] for p in offline_runs(run_dir)}
    assert len(offline_runs(run_dir)) == 2 and len(ids) == 1
    assert ids == {(run_dir / ".wandb_run_id").read_text().strip()}


def _strace_connects(trace: str) -> tuple[list[str], list[str]]:
    """(connect/sendto/sendmsg calls to a non-loopback IP address, AF_UNIX connects)."""
    remote, unix = [], []
    for line in trace.splitlines():
        if not re.search(r"\b(connect|sendto|sendmsg)\(", line):
            continue
        if "sa_family=AF_UNIX" in line:
            unix.append(line)
        for addr in re.findall(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6?, "([^"]+)"', line):
            ip = addr[0] or addr[1]
            if not (ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")):
                remote.append(line)
    return remote, unix


def test_strace_parser_tells_loopback_from_remote():
    trace = "\n".join(
        [
            '1 connect(3, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("10.1.2.3")}'
            ", 16) = -1 EINPROGRESS",
            "1 connect(4, {sa_family=AF_INET6, sin6_port=htons(80), sin6_flowinfo=htonl(0), "
            'inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, 28) = 0',
            '1 connect(3, {sa_family=AF_INET, sin_port=htons(9), sin_addr=inet_addr("127.0.0.1")}'
            ", 16) = -1 ECONNREFUSED",
            '2 connect(5, {sa_family=AF_UNIX, sun_path="/tmp/wandb-1/socket"}, 110) = 0',
        ]
    )
    remote, unix = _strace_connects(trace)
    assert len(remote) == 1 and "10.1.2.3" in remote[0]
    assert len(unix) == 1


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_offline_mode_opens_no_network_connection_strace(finished_run, tmp_path):
    """Every process (Python and W&B's Go service) under strace: no connect()/sendto() to an
    address outside loopback. The service's own local sockets are fine."""
    run_dir = _copy_run(finished_run, tmp_path / "run")
    trace_file = tmp_path / "strace.txt"
    r = _replay(
        run_dir,
        tmp_path,
        prefix=["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg", "-o", str(trace_file)],
    )
    if r.returncode != 0 and "ptrace" in r.stderr:
        pytest.skip(f"strace cannot trace here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    remote, unix = _strace_connects(trace_file.read_text())
    assert unix, "strace saw no socket activity at all: the trace is not working"
    assert remote == [], remote
    assert _read_back(run_dir)["finished"]


GUARD = textwrap.dedent(
    """
    import socket, sys
    attempts = []
    def _remote(addr):
        host = addr[0] if isinstance(addr, tuple) else addr
        if not isinstance(host, str):
            return False
        return not (host.startswith("127.") or host in ("::1", "localhost", ""))
    _connect = socket.socket.connect
    def connect(self, addr):
        if self.family in (socket.AF_INET, socket.AF_INET6) and _remote(addr):
            attempts.append(addr)
            raise OSError("network blocked by test")
        return _connect(self, addr)
    socket.socket.connect = connect
    _gai = socket.getaddrinfo
    def getaddrinfo(host, *a, **k):
        if _remote(host):
            attempts.append(("dns", host))
            raise socket.gaierror("dns blocked by test")
        return _gai(host, *a, **k)
    socket.getaddrinfo = getaddrinfo
    import atexit
    atexit.register(lambda: print("ATTEMPTS", attempts))
    """
)


def test_offline_mode_python_side_makes_no_network_attempt(finished_run, tmp_path):
    """Cheaper guard without strace: the Python side never connects or resolves a remote host."""
    run_dir = _copy_run(finished_run, tmp_path / "run")
    home = tmp_path / "home"
    home.mkdir()
    code = GUARD + REPLAY
    r = subprocess.run(
        [sys.executable, "-c", code, str(run_dir)],
        cwd=tmp_path,
        env=_clean_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "ATTEMPTS []" in r.stdout, r.stdout
    assert _read_back(run_dir)["finished"]


def test_only_rank_0_and_only_wandb_backend_track(monkeypatch):
    from abdist.config import load_config
    from abdist.wandb_tracking import NullTracker, make_tracker

    cfg = load_config(None, ["tracking.backend=wandb"])
    assert isinstance(make_tracker(cfg, "unused", rank=1), NullTracker)
    monkeypatch.setenv("RANK", "3")
    assert isinstance(make_tracker(cfg, "unused"), NullTracker)  # rank read from the env
    monkeypatch.delenv("RANK")
    for other in ("tracking.backend=jsonl", "tracking.backend=none", "tracking.mode=disabled"):
        c = load_config(None, ["tracking.backend=wandb", other])
        assert isinstance(make_tracker(c, "unused", rank=0), NullTracker), other


def test_wandb_env_is_offline_and_under_the_run_dir(tmp_path, monkeypatch):
    from abdist.config import load_config
    from abdist.wandb_tracking import wandb_env

    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    env = wandb_env(load_config(None, ["tracking.backend=wandb"]), tmp_path / "run")
    assert env["WANDB_MODE"] == "offline"
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        assert Path(env[key]).is_relative_to(tmp_path / "run"), key
    online = wandb_env(
        load_config(None, ["tracking.mode=online", f"tracking.dir={tmp_path}/w"]), "."
    )
    assert online["WANDB_MODE"] == "online" and online["WANDB_DIR"] == f"{tmp_path}/w"


def test_tracking_keys_are_validated():
    r = run_cli("config", REPO / "configs/digits_lt/ce.yaml", "tracking.mode=ofline")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "did you mean 'offline'" in r.stderr


def test_train_with_wandb_backend_end_to_end(tmp_path):
    out = tmp_path / "run"
    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "abdist", "train", str(REPO / "configs/digits_lt/ce.yaml"),
         "--out", str(out), *FAST, "tracking.backend=wandb"],
        cwd=tmp_path, env=_clean_env(home), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = _read_back(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in data["history"] if "train_loss" in h] == [1, 2, 3]
    assert data["summary"]["balanced_error"] == pytest.approx(metrics["balanced_error"])
    assert (out / "log.jsonl").is_file()  # the JSONL log is still written
    assert not [p for p in home.rglob("*") if "wandb" in p.name.lower()]
