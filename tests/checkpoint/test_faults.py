"""Faults in real processes: kill mid-save, restart onto the memory tier, SIGTERM flush, disk full."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from stalwart.checkpoint import CheckpointConfig, Checkpointer, committed_steps, open_storage

from .workers.ckpt_worker import state

WORKER = Path(__file__).parent / "workers" / "ckpt_worker.py"


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"worker exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


@pytest.fixture
def worker(tmp_path: Path, shm: str) -> Iterator:
    procs: list[subprocess.Popen[bytes]] = []
    marker = tmp_path / "marker"
    marker.mkdir()

    def start(mode: str) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            str(WORKER),
            "--root",
            str(tmp_path / "ck"),
            "--shm",
            shm,
            "--marker",
            str(marker),
            "--mode",
            mode,
        ]
        proc = subprocess.Popen(
            argv, stderr=subprocess.PIPE, start_new_session=True, cwd=Path(__file__).parents[2]
        )
        procs.append(proc)
        return proc

    start.marker = marker  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_killed_in_the_middle_of_a_save_the_previous_checkpoint_stays_latest(
    tmp_path: Path, shm: str, worker
) -> None:  # type: ignore[no-untyped-def]
    proc = worker("hang-in-write")
    _wait_for(worker.marker / "writing", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    storage = open_storage(str(tmp_path / "ck"))
    assert committed_steps(storage) == ([1], [2])
    ck = Checkpointer(str(tmp_path / "ck"), CheckpointConfig(memory_tier=False, flush_on_sigterm=False))
    target = {"model": {"w": torch.zeros(256, 256)}, "step": 0}
    assert ck.load_latest(target) == 1
    assert torch.equal(target["model"]["w"], state(1)["model"]["w"]) and target["step"] == 1
    ck.save(3, state(3), blocking=True)
    ck.wait()  # the next commit's retention clears the torn attempt
    assert committed_steps(storage) == ([1, 3], [])
    ck.close()


def test_a_restarted_worker_reloads_from_the_memory_tier(
    tmp_path: Path, shm: str, worker, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    proc = worker("exit-after-save")
    assert proc.wait(timeout=60) == 0
    # the durable copy is gone: only memory can serve this load
    (tmp_path / "ck/step-000000005/rank-00000.safetensors").unlink()
    caplog.set_level(logging.INFO, logger="stalwart.checkpoint")
    ck = Checkpointer(
        str(tmp_path / "ck"), CheckpointConfig(shm_root=shm, job="worker", flush_on_sigterm=False)
    )
    target = {"model": {"w": torch.zeros(256, 256)}, "step": 0}
    assert ck.load_latest(target) == 5
    assert "from the memory tier" in caplog.text
    assert torch.equal(target["model"]["w"], state(5)["model"]["w"])
    ck.close(drop_memory=True)
    assert not (Path(shm) / "stalwart-worker").exists()


@pytest.mark.parametrize("mode", ["sigterm", "sigterm-after-other-closed"])
def test_sigterm_flushes_the_save_in_flight_before_the_process_exits(
    tmp_path: Path, worker, mode: str
) -> None:  # type: ignore[no-untyped-def]
    # sigterm-after-other-closed: closing a Checkpointer made earlier leaves this one's handler
    proc = worker(mode)
    _wait_for(worker.marker / "writing", proc)
    os.kill(proc.pid, signal.SIGTERM)
    (worker.marker / "go").touch()
    assert proc.wait(timeout=60) == -signal.SIGTERM
    assert committed_steps(open_storage(str(tmp_path / "ck"))) == ([1], [])


@pytest.mark.parametrize(
    ("mode", "steps"), [("sigterm-in-wait", [1]), ("sigterm-in-save", [1, 2]), ("sigterm-in-copy", [1])]
)
def test_sigterm_while_the_main_thread_is_inside_the_checkpointer_flushes_without_a_hang(
    tmp_path: Path, worker, mode: str, steps: list[int]
) -> None:  # type: ignore[no-untyped-def]
    # The handler runs on the main thread. Inside wait() or save()'s wait for a slot, it used to
    # find nothing in flight (the future was already taken off the queue) and let the process die
    # mid-save; inside the snapshot copy, it waited for a save that waited for that copy: a hang.
    proc = worker(mode)
    if mode != "sigterm-in-copy":
        _wait_for(worker.marker / "writing", proc)
        _wait_for(worker.marker / ("waiting" if mode == "sigterm-in-save" else "saved"), proc)
        os.kill(proc.pid, signal.SIGTERM)
        (worker.marker / "go").touch()
    assert proc.wait(timeout=60) == -signal.SIGTERM
    assert committed_steps(open_storage(str(tmp_path / "ck"))) == (steps, [])


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_fails_the_save_clearly_and_leaves_the_committed_one_alone(
    small_disk: Path, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    ck = Checkpointer(
        str(small_disk / "ck"), CheckpointConfig(memory_tier=False, flush_on_sigterm=False), registry=registry
    )
    small = {"w": torch.ones(128, 1024)}  # 512 KiB
    ck.save(1, small, blocking=True)
    big = {"w": torch.ones(128, 1024), "extra": torch.ones(1024, 1024)}  # 4.5 MiB
    assert ck.save(2, big).result() is None
    assert "disk full while writing" in caplog.text
    assert registry.get_sample_value("stalwart_checkpoint_save_failures_total") == 1.0
    assert not (small_disk / "ck/step-000000002/rank-00000.safetensors").exists()  # space given back
    target = {"w": torch.zeros(128, 1024)}
    assert ck.load_latest(target) == 1
    assert torch.equal(target["w"], small["w"])
    ck.save(3, {"w": torch.full((128, 1024), 3.0)}, blocking=True)  # training went on; the next save works
    assert committed_steps(open_storage(str(small_disk / "ck")))[0] == [1, 3]
    ck.close()
