"""Driven by test_pid1.py: a stand-in agent run through ``run_as_init``.

Usage: ``python pid1_script.py MODE [ARG]``; it prints one JSON line with what it saw.

- ``orphans N``: make N orphans that exit (double fork), then poll ``/proc`` until they are gone.
- ``signal``: print ``ready``, wait for a signal, report it, return 7 (``EXTRA_SIGNALS``: more
  signals for init to forward, numbers separated by commas).
- ``selfkill``: SIGKILL itself (init must exit 128 + 9).
- ``leftover``: leave a ``sleep`` behind in its own session (like a worker) and return 3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from stalwart.launcher.pid1 import run_as_init


def _orphans(n: int) -> int:
    r, w = os.pipe()
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            if os.fork() == 0:  # the grandchild: becomes an orphan, exits at once
                os.write(w, f"{os.getpid()}\n".encode())
                os._exit(0)
            os._exit(0)  # the middle process: exits, orphaning the grandchild
        os.waitpid(pid, 0)
    os.close(w)
    with os.fdopen(r) as f:
        pids = [int(x) for x in f.read().split()]
    deadline = time.monotonic() + float(os.environ.get("ORPHAN_DEADLINE", "10"))
    while time.monotonic() < deadline:
        left = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if not left:
            break
        time.sleep(0.05)
    states = {}
    for p in left:
        try:
            with open(f"/proc/{p}/stat") as f:
                states[p] = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            pass
    print(json.dumps({"pid": os.getpid(), "orphans": pids, "left": states}), flush=True)
    return 0


def _signal() -> int:
    # Wait with sigtimedwait, not a handler that sets a threading.Event: a handler runs between two
    # bytecodes of the main thread, and if that thread holds the Event's lock (inside wait()),
    # set() blocks on it forever.
    waited = {signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGINT, signal.SIGXCPU}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    print("ready", flush=True)
    info = signal.sigtimedwait(waited, 60)
    got = [info.si_signo] if info is not None else []
    print(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "got": got}), flush=True)
    return 7


def _leftover() -> int:
    p = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    print(json.dumps({"pid": os.getpid(), "leftover": p.pid}), flush=True)
    return 3


def main() -> int:
    mode = sys.argv[1]
    if mode == "orphans":
        return _orphans(int(sys.argv[2]))
    if mode == "signal":
        return _signal()
    if mode == "selfkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "leftover":
        return _leftover()
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    # EXTRA_SIGNALS: what ``stalwart run --signals-to-handle`` adds to the forwarded set
    extra = [int(s) for s in os.environ.get("EXTRA_SIGNALS", "").split(",") if s]
    sys.exit(run_as_init(main, signals=extra))
