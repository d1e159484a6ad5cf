"""Debian's Prometheus for tests: unpacked once into a cache dir (``apt-get download`` + ``dpkg -x``).

``STALWART_TEST_CACHE`` overrides the cache (default ``~/.cache/stalwart-test``). On a machine
where neither the binaries nor apt are available the tests that need them are skipped, saying why.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "prometheus"


def cache_dir() -> Path:
    return Path(os.environ.get("STALWART_TEST_CACHE", Path.home() / ".cache" / "stalwart-test"))


def prometheus_bin_dir() -> tuple[Path | None, str]:
    """The directory holding ``prometheus`` and ``promtool``, or ``None`` and why not."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return Path(shutil.which("prometheus") or "").parent, ""
    target = cache_dir() / "prometheus"
    bin_dir = target / "usr" / "bin"
    if (bin_dir / "prometheus").exists() and (bin_dir / "promtool").exists():
        return bin_dir, ""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        return None, "Prometheus is not installed and apt-get/dpkg are not available to fetch it"
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        got = subprocess.run(
            ["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True, timeout=300
        )
        if got.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=300)
            got = subprocess.run(
                ["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True, timeout=300
            )
        debs = glob.glob(os.path.join(tmp, f"{PACKAGE}_*.deb"))
        if got.returncode != 0 or not debs:
            return None, f"'apt-get download {PACKAGE}' failed: {got.stderr.strip()[-300:]}"
        root = os.path.join(tmp, "root")
        subprocess.run(["dpkg", "-x", debs[0], root], check=True, timeout=300)
        try:
            os.rename(root, target)  # atomic: a concurrent run either sees all of it or none
        except OSError:
            if not (bin_dir / "prometheus").exists():
                raise
    return bin_dir, ""


if __name__ == "__main__":
    # `make test` fetches Prometheus before the suite enters its offline network namespace.
    path, why = prometheus_bin_dir()
    print(f"prometheus: {path}" if path else f"prometheus: unavailable ({why}); its tests will be skipped")
