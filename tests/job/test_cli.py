"""``stalwart job`` in-process through ``stalwart.cli.main``: exit codes, messages, --output json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from k8s_validate import validate_manifest

from stalwart.cli import main
from stalwart.job.local import LocalBackend


def run(*args: str) -> int:
    try:
        main(["job", *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_init_then_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("init", str(tmp_path), "--name", "demo") == 0
    assert run("validate", "-f", str(tmp_path / "job.yaml")) == 0
    assert "valid: job 'demo', 1 node(s) x 2 process(es), backend local" in capsys.readouterr().out
    assert run("init", str(tmp_path)) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert run("init", str(tmp_path / "x"), "--name", "Bad Name") == 2
    assert "'Bad Name' is not a valid job name" in capsys.readouterr().err


def test_validate_prints_every_problem_with_its_field_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run("init", str(tmp_path))
    capsys.readouterr()
    path = str(tmp_path / "job.yaml")
    assert run("validate", "-f", path, "--nodes", "4:2", "--set", "volumez=[]", "--nproc-per-node", "x") == 2
    err = capsys.readouterr().err
    assert "stalwart: error:" in err and "3 problems" in err
    for line in (
        "nodes: max nodes (2) is below min nodes (4)",
        "volumez: unknown field",
        "nproc_per_node: Input",
    ):
        assert line in err
    assert run("validate", "-f", path, "--set", "resources.gpus=1", "-o", "json") == 2
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is False
    assert out["problems"] == [
        {"field": "nproc_per_node", "message": "2 processes per node but resources.gpus is 1; "
         "lower nproc_per_node or raise resources.gpus"}
    ]  # fmt: skip


def test_create_dry_run_prints_valid_manifests_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run("init", str(tmp_path))
    capsys.readouterr()
    path = str(tmp_path / "job.yaml")
    base = ("create", "-f", path, "--dry-run", "--backend", "kubernetes", "--image", "stalwart:cpu")
    assert run(*base, "--flavour", "hyperpod") == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["Service", "Deployment", "Service", "HyperPodPyTorchJob"]
    assert all(validate_manifest(d) == [] for d in docs)
    assert run(*base, "--flavour", "batch", "-o", "json") == 0
    assert [d["kind"] for d in json.loads(capsys.readouterr().out)] == [
        "Service",
        "Deployment",
        "Service",
        "Job",
    ]
    assert run(*base[:-2]) == 2  # kubernetes without an image
    assert "image: required for the kubernetes backend" in capsys.readouterr().err
    assert run("create", "-f", path, "--dry-run", "--nodes", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["store", "node-0", "node-1"]
    assert "stalwart.job.store PORT JOB_DIR 2" in lines[0]  # the rendezvous store is no node's
    assert "is_host=0" in lines[1] and "is_host=0" in lines[2]


def test_missing_jobs_and_scripts_are_clear_errors_and_leave_nothing_behind(
    tmp_path: Path, jobs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("list") == 0
    assert capsys.readouterr().out.strip() == "no jobs"
    assert run("list", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out) == []
    for cmd in (("describe", "ghost"), ("logs", "ghost"), ("delete", "ghost"), ("events", "ghost")):
        assert run(*cmd) == 3
        assert "no local job named 'ghost'" in capsys.readouterr().err
    run("init", str(tmp_path), "--name", "nope")
    capsys.readouterr()
    assert run("create", "-f", str(tmp_path / "job.yaml"), "--set", "script=/no/such/train.py") == 2
    assert "script: /no/such/train.py does not exist" in capsys.readouterr().err
    assert not (jobs_dir / "nope").exists()
    assert run("create", "-f", str(tmp_path / "missing.yaml")) == 2
    assert "no such job spec" in capsys.readouterr().err


def test_a_node_supervisor_records_a_command_that_cannot_start(tmp_path: Path) -> None:
    node = tmp_path / "node-0"
    node.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "stalwart.job.node", str(node), "--", str(tmp_path / "no-such-binary")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0  # the intermediate parent exits at once
    pid = int((node / "pid").read_text())
    import psutil

    try:
        psutil.Process(pid).wait(timeout=20)
    except psutil.NoSuchProcess:
        pass
    assert json.loads((node / "exit.json").read_text())["returncode"] == 127
    state = {"name": "node-0", "pid": pid}
    assert LocalBackend._job_state([LocalBackend(tmp_path)._node_status(tmp_path, state)]).value == "failed"


@pytest.mark.parametrize(
    ("exits", "replacements", "final", "replaced"),
    [
        ([75, 0], 2, 0, 1),  # replaced once, then the job finished
        ([76, 75, 75], 2, 75, 2),  # the backoff limit is reached
        ([3], 2, 3, 0),  # a user error is never retried by the orchestrator
    ],
)
def test_a_node_that_hands_itself_over_is_replaced_up_to_the_limit(
    tmp_path: Path, exits: list[int], replacements: int, final: int, replaced: int
) -> None:
    """The local stand-in for Kubernetes replacing a pod that exited 75/76 (up to backoffLimit)."""
    node = tmp_path / "node-0"
    node.mkdir()
    runs = tmp_path / "runs"
    child = (
        "import os, sys; p = sys.argv[1]; n = len(open(p).read()) if os.path.exists(p) else 0;"
        "open(p, 'a').write('x'); sys.exit([int(c) for c in sys.argv[2].split(',')][n])"
    )
    argv = [sys.executable, "-c", child, str(runs), ",".join(map(str, exits))]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stalwart.job.node",
            "--replacements",
            str(replacements),
            str(node),
            "--",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    pid = int((node / "pid").read_text())
    import psutil

    try:
        psutil.Process(pid).wait(timeout=20)
    except psutil.NoSuchProcess:
        pass
    record = json.loads((node / "exit.json").read_text())
    assert (record["returncode"], record["replacements"]) == (final, replaced)
    assert runs.read_text() == "x" * (replaced + 1)


def test_the_store_counts_a_node_finished_once_it_exited_or_its_supervisor_is_gone(tmp_path: Path) -> None:
    from stalwart.job.store import _finished

    dead = subprocess.Popen(["true"])  # reaped below: its pid is free again
    dead.wait()
    cases = {"exited": None, "killed": dead.pid, "running": os.getpid(), "starting": None}
    for name, pid in cases.items():
        (tmp_path / name).mkdir()
        if pid is not None:
            (tmp_path / name / "pid").write_text(str(pid))
    (tmp_path / "exited" / "exit.json").write_text('{"returncode": 0}')
    assert {name: _finished(tmp_path / name) for name in cases} == {
        "exited": True,
        "killed": True,
        "running": False,
        "starting": False,
    }
