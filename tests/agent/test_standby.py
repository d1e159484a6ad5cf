"""Warm standby workers: real bootstrap processes, promoted to workers through ``StandbyPool``."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from stalwart.agent.standby import LaunchSpec, StandbyPool, _PoolState
from stalwart.errors import ConfigError

pytestmark = pytest.mark.timeout(240)

READY_TIMEOUT = 150.0  # imports take ~2 s alone; the suite shares 2 cores with other test runs


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _bootstraps(pool: str, parent: int | None = None) -> set[int]:
    """Live standby (not fresh) processes of the pool whose env has ``H6_POOL=pool``."""
    pids = set()
    for child in psutil.Process(parent or os.getpid()).children():
        try:
            cmd = child.cmdline()
            if (
                child.status() == psutil.STATUS_ZOMBIE
                or "stalwart.worker.bootstrap" not in cmd
                or "--fresh" in cmd
                or child.environ().get("H6_POOL") != pool
            ):
                continue
        except psutil.NoSuchProcess:
            continue
        pids.add(child.pid)
    return pids


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@pytest.fixture(scope="module")
def preload_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("preload")
    # A heavy import that also installs a signal handler: the worker must not inherit it.
    (d / "h6_heavy.py").write_text("import signal\nsignal.signal(signal.SIGTERM, lambda *a: None)\n")
    return d


@pytest.fixture(scope="module")
def base_env(preload_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STALWART_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = str(preload_dir)
    env["GLOO_SOCKET_IFNAME"] = "lo"
    env["H6_POOL"] = "warm"  # tells this module's pools apart in the process table
    return env


@pytest.fixture(scope="module")
def warm_pool(base_env: dict[str, str]) -> Iterator[StandbyPool]:
    pool = StandbyPool(2, preload=["h6_heavy", "h6_missing_module"], env=base_env)
    pool.start()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def launched() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            _kill_group(proc)


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_promoted_standby_runs_the_script_as_main_with_warm_imports_then_refills(
    warm_pool: StandbyPool, base_env: dict[str, str], tmp_path: Path, launched: list
) -> None:
    _script(
        tmp_path,
        """
        import json, os, signal, sys
        print(json.dumps({
            "name": __name__, "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0],
            "env": dict(os.environ), "pid": os.getpid(),
            "warm": [m for m in ("torch", "torch._dynamo", "torch.distributed", "h6_heavy") if m in sys.modules],
            "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            "sigint_python": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        }))
        """,
    )
    _wait_for(lambda: warm_pool.ready_count() == 2, "2 ready standbys")
    standbys = _bootstraps("warm")
    assert len(standbys) == 2
    env = {**base_env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "FOO": "bar"}
    proc = warm_pool.launch(LaunchSpec(str(tmp_path / "script.py"), ("--steps", "5"), env, str(tmp_path)))
    launched.append(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out)
    assert proc.pid in standbys and seen["pid"] == proc.pid
    assert seen["name"] == "__main__"
    assert seen["argv"] == [str(tmp_path / "script.py"), "--steps", "5"]
    assert seen["cwd"] == seen["path0"] == str(tmp_path)
    assert seen["env"] == env
    assert seen["warm"] == ["torch", "torch._dynamo", "torch.distributed", "h6_heavy"]
    assert seen["sigterm_default"] and seen["sigint_python"]
    # A preload that fails to import is reported in the worker's log, and the standby still served.
    assert "preload module 'h6_missing_module' failed to import" in err.decode()

    _wait_for(lambda: warm_pool.ready_count() == 2, "the pool to refill")
    refilled = _bootstraps("warm")
    assert len(refilled) == 2 and proc.pid not in refilled


def test_a_different_import_time_env_gets_a_fresh_process(
    warm_pool: StandbyPool, base_env: dict[str, str], tmp_path: Path, launched: list
) -> None:
    _script(tmp_path, "import os\nprint(os.environ['OMP_NUM_THREADS'], os.getpid())\n")
    _wait_for(lambda: warm_pool.ready_count() == 2, "2 ready standbys")
    standbys = _bootstraps("warm")
    env = {**base_env, "OMP_NUM_THREADS": "7"}
    proc = warm_pool.launch(LaunchSpec("script.py", (), env, str(tmp_path)))
    launched.append(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["7", str(proc.pid)]
    assert proc.pid not in standbys
    assert warm_pool.ready_count() == 2 and _bootstraps("warm") == standbys  # none consumed


def test_gloo_all_reduce_through_promoted_standbys(
    warm_pool: StandbyPool, base_env: dict[str, str], tmp_path: Path, launched: list
) -> None:
    _script(
        tmp_path,
        """
        import os
        import torch
        import torch.distributed as dist
        dist.init_process_group("gloo")  # env:// from the promoted environment
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        print(f"rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item()}", flush=True)
        # gloo sometimes aborts at interpreter exit (also under plain python); not what we test.
        os._exit(0)
        """,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _wait_for(lambda: warm_pool.ready_count() == 2, "2 ready standbys")
    standbys = _bootstraps("warm")
    procs = []
    for rank in range(2):
        env = {**base_env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank)}
        env.update(WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        proc = warm_pool.launch(LaunchSpec("script.py", (), env, str(tmp_path)))
        launched.append(proc)
        procs.append(proc)
    assert {p.pid for p in procs} == standbys
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == f"rank={rank} world=2 sum=3.0"


def test_a_standby_that_dies_while_waiting_is_replaced(warm_pool: StandbyPool) -> None:
    _wait_for(lambda: warm_pool.ready_count() == 2, "2 ready standbys")
    victim = min(_bootstraps("warm"))
    os.killpg(victim, signal.SIGKILL)  # as the OOM killer would
    # The pool reaps the victim (a killed thread-group leader shows as a zombie a little earlier).
    _wait_for(lambda: warm_pool.ready_count() == 2 and not psutil.pid_exists(victim), "a replacement")
    assert len(_bootstraps("warm")) == 2


def test_standbys_that_keep_failing_at_start_up_are_given_up_with_a_clear_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'cannot import torch' >&2\nexit 3\n")
    broken.chmod(0o755)
    with (
        caplog.at_level(logging.WARNING, logger="stalwart.agent.standby"),
        StandbyPool(2, python=str(broken)) as pool,
    ):
        _wait_for(
            lambda: pool.ready_count() == 0 and "not starting more" in caplog.text, "the pool to give up", 60
        )
        assert "exited with 3 during start-up" in caplog.text and "cannot import torch" in caplog.text
        # The pool stays usable: launches start fresh processes (here the broken interpreter again).
        proc = pool.launch(LaunchSpec("x.py", (), {}, str(tmp_path)))
        assert proc.wait(timeout=30) == 3
        for pipe in (proc.stdout, proc.stderr):
            assert pipe is not None
            pipe.close()


def test_size_zero_starts_no_standbys_and_launches_fresh(
    base_env: dict[str, str], tmp_path: Path, launched: list
) -> None:
    _script(tmp_path, "import sys\nprint('torch' in sys.modules)\n")
    env = {**base_env, "H6_POOL": "zero"}
    with StandbyPool(0, env=env) as pool:
        assert pool.ready_count() == 0 and _bootstraps("zero") == set()
        proc = pool.launch(LaunchSpec("script.py", (), env, str(tmp_path)))
        launched.append(proc)
        out, _ = proc.communicate(timeout=60)
        assert (proc.returncode, out) == (0, b"False\n")  # a fresh worker imports only what it uses
        assert _bootstraps("zero") == set()


def test_close_kills_standbys_but_not_launched_workers(
    base_env: dict[str, str], tmp_path: Path, launched: list
) -> None:
    _script(tmp_path, "import time\nprint('up', flush=True)\ntime.sleep(300)\n")
    env = {**base_env, "H6_POOL": "close"}
    pool = StandbyPool(2, env=env)
    pool.start()
    try:
        _wait_for(lambda: len(_bootstraps("close")) == 2, "2 standby processes")
        # None is ready yet: launch promotes one that is still importing.
        worker = pool.launch(LaunchSpec("script.py", (), env, str(tmp_path)))
        launched.append(worker)
        standbys = _bootstraps("close") - {worker.pid}
        assert standbys  # the other one, and maybe already its replacement
    finally:
        pool.close()
    assert all(_gone(pid) for pid in standbys)
    # A replacement whose spawn was in flight during close() is killed as it arrives.
    _wait_for(lambda: not _bootstraps("close") - {worker.pid}, "no standby left", 30)
    assert worker.stdout is not None and worker.stdout.readline() == b"up\n"
    assert worker.poll() is None
    with pytest.raises(RuntimeError, match="after close"):
        pool.launch(LaunchSpec("script.py", (), base_env, str(tmp_path)))


def test_close_waits_for_a_spawn_in_flight(base_env: dict[str, str]) -> None:
    started = threading.Event()

    class ParkedPool(StandbyPool):
        """Parks the spawner thread after starting a standby until close() has begun: the
        window in which close() used to return with that standby still alive."""

        def _spawn(self, env, cwd, fresh):  # type: ignore[no-untyped-def]
            standby = super()._spawn(env, cwd, fresh)
            started.set()
            _wait_for(lambda: self._state is _PoolState.CLOSED, "close()", 30)
            return standby

    pool = ParkedPool(1, env={**base_env, "H6_POOL": "inflight"})
    pool.start()
    assert started.wait(30)
    assert _bootstraps("inflight")
    pool.close()
    assert _bootstraps("inflight") == set()


def test_standbys_and_workers_die_with_the_agent(base_env: dict[str, str], tmp_path: Path) -> None:
    _script(tmp_path, "import time\ntime.sleep(300)\n")
    agent = tmp_path / "agent.py"
    agent.write_text(
        textwrap.dedent(
            f"""
            import os, sys, time
            from stalwart.agent.standby import LaunchSpec, StandbyPool, _PoolState
            pool = StandbyPool(1)
            pool.start()
            while pool.ready_count() < 1:
                time.sleep(0.05)
            worker = pool.launch(LaunchSpec("script.py", (), dict(os.environ), {str(tmp_path)!r}))
            print(worker.pid, flush=True)
            time.sleep(300)
            """
        )
    )
    parent = subprocess.Popen(
        [sys.executable, str(agent)],
        env={**base_env, "H6_POOL": "death"},
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    children: set[int] = set()
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        _wait_for(lambda: len(_bootstraps("death", parent.pid)) == 2, "the worker and a refilled standby")
        children = _bootstraps("death", parent.pid)
        assert worker_pid in children
        parent.kill()
        parent.wait(timeout=10)
        _wait_for(lambda: all(_gone(pid) for pid in children), "children to die with the agent", 30)
    finally:
        _kill_group(parent)
        for pid in children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_bad_arguments_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="size must be >= 0"):
        StandbyPool(-1)
    with pytest.raises(ConfigError, match="not a module name"):
        StandbyPool(1, preload=["torch nn"])
    with StandbyPool(0) as pool, pytest.raises(ConfigError, match="is not a directory"):
        pool.launch(LaunchSpec("x.py", (), {}, str(tmp_path / "missing")))
