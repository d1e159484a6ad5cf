"""examples/train.py under a real launcher: 2 gloo workers, deterministic, resumable.

Launchers run inside a fresh network namespace with only ``lo`` up (torchrun's store binds the
wildcard address), so nothing is reachable from outside the test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "examples" / "train.py")
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare for a private netns"
)


def _launcher(log_dir: Path) -> list[str]:
    return [
        str(BIN / "stalwart"),
        "run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=3",
        f"--log-dir={log_dir}",
    ]


@pytest.fixture
def run(tmp_path: Path) -> Iterator:
    procs: list[subprocess.Popen] = []

    def _run(
        name: str, *train_args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [*_launcher(tmp_path / f"logs-{name}"), TRAIN, *train_args]
        shell = "ip link set lo up && exec " + " ".join(cmd)
        p = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", shell],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
        procs.append(p)
        out, _ = p.communicate(timeout=120)
        return subprocess.CompletedProcess(p.args, p.returncode, out, "")

    yield _run
    for p in procs:
        if p.poll() is None:
            for child in psutil.Process(p.pid).children(recursive=True):
                child.kill()
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def _final(out: str) -> str:
    m = re.search(r"done steps \d+ final_loss (\S+)$", out, re.M)
    assert m, out[-2000:]
    return m.group(1)


def _steps(out: str) -> list[tuple[int, int]]:
    """(generation, step) of every step line, in order."""
    return [(int(g), int(n)) for n, g in re.findall(r"^\S* ?step (\d+) loss \S+ t \S+ gen (\d+)$", out, re.M)]


def test_train_is_deterministic_and_resumes_from_its_checkpoint(run, tmp_path: Path) -> None:
    common = ["--steps", "30", "--ckpt-every", "10", "--seed", "7", "--hidden", "64"]
    whole = run("whole", *common, "--ckpt-dir", str(tmp_path / "ck-whole"))
    assert whole.returncode == 0, whole.stdout[-3000:]
    assert [n for _, n in _steps(whole.stdout)] == list(range(1, 31))
    reference = _final(whole.stdout)

    # rank 1 SIGKILLs itself after step 25; the launcher restarts both workers, which resume at 21
    fault = {"STALWART_FAULT_MARKER_DIR": str(tmp_path / "faults")}
    crashed = run(
        "crash",
        *common,
        "--ckpt-dir",
        str(tmp_path / "ck-crash"),
        env={**fault, "STALWART_FAULT": "crash:rank=1:step=25"},
    )
    assert crashed.returncode == 0, crashed.stdout[-3000:]
    assert "injecting fault 'crash:rank=1:step=25'" in crashed.stdout
    steps = _steps(crashed.stdout)
    first = [n for g, n in steps if g == 0]
    after = [n for g, n in steps if g == 1]
    assert first[:25] == list(range(1, 26)) and max(first) <= 26
    assert re.search(r"started rank 0 pid \d+ gen 1 resume_step 20$", crashed.stdout, re.M)
    assert after == list(range(21, 31))
    assert _final(crashed.stdout) == reference
