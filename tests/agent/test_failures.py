"""Worker failures as data: root cause, traceback (error file or stderr), and the user-error signature."""

from __future__ import annotations

import json
from pathlib import Path

from stalwart.agent.failures import WorkerFailure, exit_fault, format_failure, root_cause
from stalwart.health.api import Action, FaultKind

TB = [
    "some output",
    "Traceback (most recent call last):",
    '  File "train.py", line 1, in <module>',
    "ModuleNotFoundError: No module named 'foo'",
]


def _failure(
    tmp_path: Path, rank: int = 0, exitcode: int = 1, at: float = 10.0, **kw: object
) -> WorkerFailure:
    args: dict = dict(
        rank=rank,
        local_rank=rank,
        pid=100 + rank,
        exitcode=exitcode,
        exited_at=at,
        startup=False,
        stderr_tail=TB,
        error_file=str(tmp_path / f"error-{rank}.json"),
    )
    args.update(kw)
    return WorkerFailure.build(**args)


def test_the_traceback_comes_from_stderr_without_an_error_file(tmp_path: Path) -> None:
    f = _failure(tmp_path)
    assert f.traceback.splitlines()[0].startswith("Traceback") and "No module named 'foo'" in f.traceback
    assert f.signature == "1|ModuleNotFoundError: No module named 'foo'"
    assert f.how == "exit code 1"


def test_the_traceback_comes_from_torchs_error_file_when_the_worker_used_record(tmp_path: Path) -> None:
    data = {
        "message": {
            "message": "RuntimeError: boom",
            "extraInfo": {"py_callstack": "TB FROM FILE", "timestamp": "1"},
        }
    }
    (tmp_path / "error-0.json").write_text(json.dumps(data))
    assert _failure(tmp_path).traceback == "TB FROM FILE"


def test_a_corrupt_error_file_falls_back_to_stderr(tmp_path: Path) -> None:
    (tmp_path / "error-0.json").write_text("{truncated")
    assert "No module named 'foo'" in _failure(tmp_path).traceback


def test_the_root_cause_is_the_earliest_and_a_signal_wins_a_tie(tmp_path: Path) -> None:
    late = _failure(tmp_path, rank=0, at=11.0)
    errored = _failure(tmp_path, rank=1, at=10.0)
    killed = _failure(tmp_path, rank=2, exitcode=-9, at=10.0)
    assert root_cause([late, errored, killed]) is killed
    assert root_cause([late, errored]) is errored
    assert killed.how == "signal SIGKILL"


def test_the_summary_names_rank_node_pid_and_how(tmp_path: Path) -> None:
    text = format_failure(_failure(tmp_path, rank=3, exitcode=-9, stderr_tail=[]), "node-b")
    assert "rank 3 (local rank 3 on node-b), pid 103, signal SIGKILL" in text


def test_the_same_startup_failure_twice_is_a_user_error(tmp_path: Path) -> None:
    first = _failure(tmp_path, startup=True)
    fault, cause = exit_fault([first], None, "n")
    assert (fault.kind, fault.action, cause) == (FaultKind.WORKER_EXIT, Action.RESTART, first)
    assert fault.evidence["startup"] is True and "at start-up" in fault.message
    again, _ = exit_fault([_failure(tmp_path, startup=True)], first.signature, "n")
    assert (again.kind, again.action) == (FaultKind.USER_ERROR, Action.STOP)


def test_a_signal_or_a_failure_after_progress_is_never_a_user_error(tmp_path: Path) -> None:
    killed = _failure(tmp_path, exitcode=-9, startup=True)
    assert exit_fault([killed], killed.signature, "n")[0].kind is FaultKind.WORKER_EXIT
    later = _failure(tmp_path, startup=False)
    assert exit_fault([later], later.signature, "n")[0].kind is FaultKind.WORKER_EXIT
