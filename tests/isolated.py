"""Run a command (the test suite) in a private network namespace where only loopback is up.

torch's TCPStore, which the agents and workers start, binds the wildcard address. Inside this
namespace every server a test starts is reachable from this machine's loopback alone, and no test
can send traffic anywhere else. Needs root and util-linux ``unshare`` (as in CI); elsewhere the
command runs as is, after saying so. ``STALWART_TEST_NETNS=0`` turns the namespace off.

    python tests/isolated.py python -m pytest tests
"""

from __future__ import annotations

import os
import shutil
import sys


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: isolated.py COMMAND [ARG...]")
    wanted = os.environ.get("STALWART_TEST_NETNS", "1") != "0"
    able = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")
    if wanted and able:
        script = 'ip link set lo up && exec "$@"'
        os.execvp("unshare", ["unshare", "--net", "--", "sh", "-c", script, "sh", *argv])
    why = "STALWART_TEST_NETNS=0" if not wanted else "not root, or no unshare/ip"
    print(f"isolated.py: running without a private network namespace ({why})", file=sys.stderr)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
