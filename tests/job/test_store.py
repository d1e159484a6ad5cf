"""The rendezvous store on its own (the ``<job>-rdzv`` pod of a Kubernetes job): serves until told."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta

import pytest
from torch.distributed import TCPStore


@pytest.mark.parametrize(
    "argv",
    [["-m", "stalwart.cli", "rdzv-store"], ["-m", "stalwart.job.store"]],  # the pod's, and the module's
)
def test_a_store_without_a_job_dir_serves_until_sigterm_then_exits_0(
    free_port: Callable[[], int], argv: list[str]
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *argv, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # torch's c10d warnings (no hostname inside a network namespace)
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert f"listens on port {port}" in proc.stdout.readline()  # printed once it listens
        a = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        b = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        a.set("generation", "3")
        assert b.get("generation") == b"3"  # one store, shared by its clients
        assert b.add("restarts", 2) == 2 and a.add("restarts", 1) == 3
        proc.send_signal(signal.SIGTERM)  # what the kubelet sends when the job's pods go
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        assert "stops (SIGTERM)" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()


def test_bad_arguments_print_the_usage_and_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stalwart.job.store", "29400", "/tmp/x"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage: python -m stalwart.job.store PORT [JOB_DIR NODES]" in done.stderr
