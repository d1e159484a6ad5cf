"""``run_as_init``: as PID 1 of a new PID namespace it reaps orphans, forwards signals and exits
with the agent's code; forced outside PID 1 it is a subreaper that cleans up what the agent left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stalwart.launcher.pid1 import run_as_init

SCRIPT = str(Path(__file__).with_name("pid1_script.py"))

needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and util-linux unshare"
)


def _json_line(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


@pytest.fixture
def spawn() -> Iterator:
    procs: list[subprocess.Popen] = []

    def _spawn(*args: str, env: dict[str, str] | None = None, namespace: bool = True) -> subprocess.Popen:
        # --kill-child: if unshare dies, the namespace's PID 1 gets SIGKILL and the kernel ends the rest.
        prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] if namespace else []
        p = subprocess.Popen(
            [*prefix, sys.executable, SCRIPT, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


@needs_unshare
def test_init_reaps_orphans_in_a_pid_namespace(spawn) -> None:
    p = spawn("orphans", "5")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    res = _json_line(out)
    assert res["pid"] != 1, "the agent must run as a child of init, not as PID 1"
    assert len(res["orphans"]) == 5
    assert res["left"] == {}, f"orphans left as zombies: {res['left']}"


@needs_unshare
def test_without_init_the_orphans_stay_zombies(spawn) -> None:
    # The control for the test above: PID 1 that is not an init leaves zombies behind.
    p = spawn("orphans", "3", env={"STALWART_INIT": "0", "ORPHAN_DEADLINE": "1"})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    res = _json_line(out)
    assert res["pid"] == 1
    assert set(res["left"].values()) == {"Z"} and len(res["left"]) == 3


def _pid1_of(unshare: subprocess.Popen) -> psutil.Process:
    # unshare --fork: its only child is the namespace's PID 1 (our init)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = psutil.Process(unshare.pid).children()
        if kids:
            return kids[0]
        time.sleep(0.02)
    raise AssertionError("unshare never started its child")


@needs_unshare
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1])
def test_init_forwards_signals_and_exits_with_the_agents_code(spawn, sig: signal.Signals) -> None:
    p = spawn("signal")
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    os.kill(_pid1_of(p).pid, sig)
    out, err = p.communicate(timeout=60)
    res = _json_line(out)
    assert res["got"] == [int(sig)]
    assert res["pgid"] == res["pid"], "the agent runs in its own process group"
    assert p.returncode == 7, err


@needs_unshare
def test_init_forwards_the_extra_signals_the_agent_handles(spawn) -> None:
    # `--signals-to-handle ...,SIGXCPU`: as PID 1, init would drop a signal it has no handler for
    p = spawn("signal", env={"EXTRA_SIGNALS": str(int(signal.SIGXCPU))})
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    os.kill(_pid1_of(p).pid, signal.SIGXCPU)
    out, err = p.communicate(timeout=60)
    assert _json_line(out)["got"] == [int(signal.SIGXCPU)]
    assert p.returncode == 7, err


@needs_unshare
def test_agent_killed_by_a_signal_gives_128_plus_signal(spawn) -> None:
    p = spawn("selfkill")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGKILL, err


def test_forced_init_outside_pid1_stops_and_reaps_leftovers(spawn) -> None:
    p = spawn("leftover", env={"STALWART_INIT": "1"}, namespace=False)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3, err
    leftover = _json_line(out)["leftover"]
    # the subreaper killed and reaped it: no process, not even a zombie, by that pid
    # (a recycled pid would not be our sleep: check its command line if it exists)
    if psutil.pid_exists(leftover):
        try:
            assert "sleep" not in " ".join(psutil.Process(leftover).cmdline())
        except psutil.NoSuchProcess:
            pass


def test_not_pid1_and_not_forced_just_calls_main(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STALWART_INIT", raising=False)
    pid = os.getpid()
    assert run_as_init(lambda: 42 if os.getpid() == pid else -1) == 42


LOOP = """
import sys, time
from stalwart.worker import report
for step in range(1, 100000):
    report(step)
    print(f"step {step}", flush=True)
    time.sleep(0.05)
"""


@needs_unshare
def test_stalwart_run_as_pid1_forwards_sigterm_to_the_agent(spawn_run, tmp_path: Path) -> None:
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    p = spawn_run(
        "--standalone", "--nproc-per-node=2", "--no-standby", f"--log-dir={tmp_path / 'logs'}", str(script)
    )
    assert p.stdout is not None
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        seen.append(line)
        if not line or "step 3" in line:
            break
    assert any("step 3" in s for s in seen), "".join(seen[-30:])
    init = _pid1_of(p)
    agent = init.children()
    assert [c.pid for c in agent] and all(c.pid != init.pid for c in agent)
    os.kill(init.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=90)
    assert "SIGTERM" in out, out[-3000:]  # the agent says it was stopped by the forwarded signal
    assert p.returncode == 128 + signal.SIGTERM, out[-3000:]


@pytest.fixture
def spawn_run() -> Iterator:
    procs: list[subprocess.Popen] = []

    def _spawn(*args: str) -> subprocess.Popen:
        # PID 1 of a new PID namespace, in a new network namespace with only lo up
        stalwart = str(Path(sys.executable).parent / "stalwart")
        shell = "ip link set lo up && exec " + " ".join([stalwart, "run", *args])
        p = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--net", "sh", "-c", shell],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
