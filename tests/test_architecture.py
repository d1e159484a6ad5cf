"""The package layout is the architecture: dependencies point one way, and the job CLI stays light.

job -> launcher -> agent -> {health, checkpoint, worker}. Each package is imported in a fresh
interpreter and the set of stalwart packages it pulled in is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# package -> stalwart packages it must never import (directly or transitively)
FORBIDDEN = {
    "stalwart.worker": {
        "stalwart.agent",
        "stalwart.launcher",
        "stalwart.job",
        "stalwart.checkpoint",
        "stalwart.health",
    },
    "stalwart.health": {"stalwart.agent", "stalwart.launcher", "stalwart.job", "stalwart.checkpoint"},
    "stalwart.checkpoint": {"stalwart.agent", "stalwart.launcher", "stalwart.job", "stalwart.health"},
    "stalwart.agent": {"stalwart.launcher", "stalwart.job"},
    "stalwart.launcher": {"stalwart.job"},
    "stalwart.job": set(),
}


def _imported_after(module: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_its_dependencies(package: str) -> None:
    loaded = _imported_after(package)
    assert package in loaded
    bad = {m for m in loaded for f in FORBIDDEN[package] if m == f or m.startswith(f + ".")}
    assert not bad, f"{package} imports {sorted(bad)}"


def test_job_package_and_cli_import_without_torch() -> None:
    for module in ("stalwart.job", "stalwart.cli"):
        loaded = _imported_after(module)
        assert "torch" not in loaded, f"{module} imports torch"


def test_stalwart_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stalwart.cli", "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    for name in ("run", "events", "doctor", "ckpt", "health", "job"):
        assert name in out.stdout
