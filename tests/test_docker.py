"""The Docker images cannot be built here (no container engine): check what can be checked."""

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

DOCKERFILES = {
    "cpu": REPO / "docker" / "Dockerfile.cpu",
    "cuda": REPO / "docker" / "Dockerfile.cuda",
}


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_uses_the_shared_install_script_with_extras(kind):
    text = DOCKERFILES[kind].read_text()
    base = {"cpu": r"^FROM python:3\.11-slim\b", "cuda": r"^FROM \$\{CUDA_IMAGE\}"}[kind]
    assert re.search(base, text, re.M), base
    if kind == "cuda":
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+runtime\S*", text, re.M)
    assert re.search(r"^COPY \. /opt/abdist$", text, re.M)
    run = re.search(r"^RUN .*bash docker/install\.sh (\S+) (\S+)", text, re.M)
    assert run, "the image must install through docker/install.sh"
    assert set(run.group(2).split(",")) >= {"deepspeed", "ffcv"}
    assert (REPO / "docker" / "install.sh").is_file()


def test_shell_scripts_parse():
    bash = shutil.which("bash")
    assert bash
    scripts = [REPO / "docker" / "install.sh", *sorted((REPO / "launch" / "slurm").glob("*.sh"))]
    assert len(scripts) >= 4
    for script in scripts:
        r = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"


def test_build_context_excludes_the_venv_and_runs():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
