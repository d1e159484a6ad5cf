"""The worker bootstrap makes a process look like ``python script.py args...`` to the user's code.

These run through ``StandbyPool(0)`` (every launch is a fresh bootstrap); promoted standbys run the
same ``_run`` code and are covered in ``tests/agent/test_standby.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stalwart.agent.standby import LaunchSpec, StandbyPool
from stalwart.worker.api import STACK_DUMP_SIGNAL, stack_dump_path

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pool() -> Iterator[StandbyPool]:
    p = StandbyPool(0)
    p.start()
    procs: list[subprocess.Popen[bytes]] = []
    orig = p.launch

    def launch(spec: LaunchSpec) -> subprocess.Popen[bytes]:
        proc = orig(spec)
        procs.append(proc)
        return proc

    p.launch = launch  # type: ignore[method-assign]
    try:
        yield p
    finally:
        p.close()
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STALWART_", "TORCHELASTIC_"))}
    env.update(extra)
    return env


def _script(tmp_path: Path, body: str, name: str = "script.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _run(pool: StandbyPool, spec: LaunchSpec, timeout: float = 60) -> tuple[int, str, str]:
    proc = pool.launch(spec)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def test_runs_a_script_as_main_with_its_argv_env_cwd_and_sys_path(pool: StandbyPool, tmp_path: Path) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    _script(
        scripts,
        """
        import json, os, sys
        print(json.dumps({"name": __name__, "file": __file__, "argv": sys.argv, "cwd": os.getcwd(),
                          "path0": sys.path[0], "env": dict(os.environ),
                          "main_is_me": sys.modules["__main__"].__dict__ is globals()}))
        """,
    )
    env = _env(RANK="1", FOO="bar")
    code, out, err = _run(pool, LaunchSpec("scripts/script.py", ("--lr", "0.1", "x y"), env, str(tmp_path)))
    assert code == 0, err
    seen = json.loads(out)
    assert seen["name"] == "__main__"
    assert seen["main_is_me"] is True
    assert seen["argv"] == ["scripts/script.py", "--lr", "0.1", "x y"]
    assert seen["file"] == str(tmp_path / "scripts/script.py")
    assert seen["cwd"] == str(tmp_path)
    assert seen["path0"] == str(scripts)
    assert seen["env"] == env


def test_module_mode_runs_the_module_as_main_with_cwd_on_sys_path(pool: StandbyPool, tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _script(
        pkg,
        "import json, sys\nprint(json.dumps({'name': __name__, 'argv': sys.argv, 'path0': sys.path[0]}))\n",
        name="train.py",
    )
    code, out, err = _run(pool, LaunchSpec("pkg.train", ("a",), _env(), str(tmp_path), module=True))
    assert code == 0, err
    seen = json.loads(out)
    assert seen == {"name": "__main__", "argv": [str(pkg / "train.py"), "a"], "path0": str(tmp_path)}


def test_no_python_execs_the_program_with_default_signal_dispositions(
    pool: StandbyPool, tmp_path: Path
) -> None:
    cmd = 'echo "$FOO $(pwd) $0"; grep SigIgn /proc/self/status'
    code, out, err = _run(
        pool, LaunchSpec("sh", ("-c", cmd, "zero"), _env(FOO="hi"), str(tmp_path), no_python=True)
    )
    assert code == 0, err
    first, sigign = out.splitlines()
    assert first == f"hi {tmp_path} zero"
    # Python ignores SIGPIPE; a program started by exec must not inherit that.
    assert int(sigign.split()[1], 16) & (1 << (signal.SIGPIPE - 1)) == 0


def test_no_python_with_a_missing_program_exits_127_with_a_clear_message(
    pool: StandbyPool, tmp_path: Path
) -> None:
    spec = LaunchSpec("no-such-program-h6", (), _env(), str(tmp_path), no_python=True)
    code, _, err = _run(pool, spec)
    assert code == 127
    assert "cannot run 'no-such-program-h6'" in err


@pytest.mark.parametrize(
    ("body", "expected", "stderr_has"),
    [
        ("import sys\nsys.exit(3)\n", 3, ""),
        ("import sys\nsys.exit('bad config')\n", 1, "bad config"),
        ("import sys\nsys.exit()\n", 0, ""),
        ("x = 1\n", 0, ""),
    ],
)
def test_exit_status_follows_pythons_rules(
    pool: StandbyPool, tmp_path: Path, body: str, expected: int, stderr_has: str
) -> None:
    _script(tmp_path, body)
    code, _, err = _run(pool, LaunchSpec("script.py", (), _env(), str(tmp_path)))
    assert code == expected
    assert stderr_has in err


def test_uncaught_exception_exits_1_and_writes_an_error_file_torch_can_read(
    pool: StandbyPool, tmp_path: Path
) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    _script(tmp_path, "def train():\n    raise ValueError('boom at step 7')\n\ntrain()\n")
    error_file = tmp_path / "error.json"
    spec = LaunchSpec("script.py", (), _env(TORCHELASTIC_ERROR_FILE=str(error_file)), str(tmp_path))
    proc = pool.launch(spec)
    _, err_b = proc.communicate(timeout=60)
    err = err_b.decode()
    assert proc.returncode == 1
    assert err.startswith("Traceback (most recent call last):"), err
    assert "ValueError: boom at step 7" in err
    assert "bootstrap.py" not in err  # the traceback starts in the user's script, as with plain python
    failure = ProcessFailure(local_rank=0, pid=proc.pid, exitcode=1, error_file=str(error_file))
    # torch keeps the record's "message" object as the failure message, as for its own @record.
    assert isinstance(failure.message, dict)
    assert failure.message["message"] == "ValueError: boom at step 7"
    callstack = failure.message["extraInfo"]["py_callstack"]
    assert 'script.py", line 2, in train' in callstack
    assert "bootstrap.py" not in callstack


def test_missing_script_exits_2_like_python(pool: StandbyPool, tmp_path: Path) -> None:
    code, _, err = _run(pool, LaunchSpec("nope.py", (), _env(), str(tmp_path)))
    assert code == 2
    assert "can't open file" in err and "nope.py" in err


def test_stack_dump_file_appears_after_the_signal(pool: StandbyPool, tmp_path: Path) -> None:
    _script(
        tmp_path,
        """
        import signal, time
        signal.signal(signal.SIGUSR1, lambda *a: open("usr1-handled", "w").close())  # like SLURM's
        def wait_forever():
            print("sleeping", flush=True)
            time.sleep(300)
        wait_forever()
        """,
    )
    stacks = tmp_path / "stacks"
    env = _env(STALWART_STACK_DIR=str(stacks), RANK="3")
    proc = pool.launch(LaunchSpec("script.py", (), env, str(tmp_path)))
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"sleeping\n"  # blocks until the script is in its sleep
    dump = Path(stack_dump_path(str(stacks), 3, proc.pid))
    os.kill(proc.pid, STACK_DUMP_SIGNAL)
    deadline = time.monotonic() + 30
    # faulthandler writes the innermost frame first and the script's <module> frame last.
    while "in <module>" not in (dump.read_text() if dump.exists() else ""):
        assert time.monotonic() < deadline, "no stack dump written"
        assert proc.poll() is None, "the worker died from the stack-dump signal"
        time.sleep(0.05)
    text = dump.read_text()
    # The frame's line is the sleep, or the print if the signal beat the flush's return.
    assert re.search(r'script\.py", line [56] in wait_forever', text), text
    assert proc.poll() is None
    assert not (tmp_path / "usr1-handled").exists(), "the dump request set off the script's SIGUSR1 handler"


def test_keyboard_interrupt_exits_by_sigint_like_python(pool: StandbyPool, tmp_path: Path) -> None:
    _script(tmp_path, "raise KeyboardInterrupt\n")
    code, _, err = _run(pool, LaunchSpec("script.py", (), _env(), str(tmp_path)))
    assert code == -signal.SIGINT
    assert "KeyboardInterrupt" in err


def test_bootstrap_without_a_control_fd_says_how_it_is_started() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "stalwart.worker.bootstrap"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 1
    assert "--control-fd is required" in res.stderr
