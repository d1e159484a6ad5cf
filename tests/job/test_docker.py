"""The images in docker/: hadolint-clean, ``stalwart run`` as PID 1, a non-root user, EFA set up.

No container daemon exists on CI, so the images are linted and read, not built (README: Images).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "docker"
HADOLINT = Path(sys.executable).with_name("hadolint")
FILES = ["Dockerfile", "Dockerfile.cpu"]


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", FILES)
def test_dockerfile_is_hadolint_clean(name: str) -> None:
    res = _hadolint(DOCKER / name)
    assert (res.returncode, res.stdout.strip()) == (0, "")


def test_hadolint_is_live_and_catches_a_shell_form_entrypoint(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:3.11-slim\nRUN apt-get update && apt-get install -y curl\nENTRYPOINT stalwart run\n"
    )
    res = _hadolint(bad)
    assert res.returncode != 0
    assert "DL3025" in res.stdout  # JSON (exec) form for ENTRYPOINT


@pytest.mark.parametrize("name", FILES)
def test_stalwart_run_is_pid_1_and_the_user_is_not_root(name: str) -> None:
    text = (DOCKER / name).read_text()
    entry = [line for line in text.splitlines() if line.startswith("ENTRYPOINT")]
    assert len(entry) == 1
    assert json.loads(entry[0].removeprefix("ENTRYPOINT").strip()) == ["stalwart", "run"]
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert "useradd" in text and "pip install --no-cache-dir ." in text
    assert (DOCKER / f"{name}.dockerignore").is_file()


def test_the_cuda_image_installs_efa_and_sets_its_environment() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "efa_installer.sh -y --skip-kmod" in text
    for var in ("FI_PROVIDER=efa", "FI_EFA_USE_DEVICE_RDMA=1", "/opt/amazon/ofi-nccl/lib"):
        assert var in text
    assert re.search(r"^ARG BASE_IMAGE=\S*cuda", text, re.M)
