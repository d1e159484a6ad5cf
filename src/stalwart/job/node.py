"""One local node, detached: ``python -m stalwart.job.node [--replacements N] NODE_DIR -- ARGV...``.

The process daemonizes (fork, ``setsid``) so the node outlives the CLI that started it and is
never left a zombie of it, writes ``pid`` into NODE_DIR, runs ARGV (the agent) as its child,
forwards SIGTERM/SIGINT/SIGHUP to it, starts it again when it hands the node over (up to
``--replacements`` times, like a pod replaced by Kubernetes), and on exit writes ``exit.json``
with the return code. The local backend reads those two files; it never has to be the parent.
Only the standard library is imported here, so a node costs no torch import before its agent
starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

PID_FILE = "pid"
EXIT_FILE = "exit.json"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ``stalwart run`` exits with these when the node should be replaced (see stalwart.agent.policy;
# not imported: this module stays standard-library only)
_HAND_OVER = {75: "a monitor asks to replace this node", 76: "the restart budget is spent"}
_stopping: list[int] = []  # signals received: a node being stopped is not replaced
_child: subprocess.Popen[bytes] | None = None  # the agent now running


def _on_signal(signum: int, _frame: object) -> None:
    _stopping.append(signum)
    _signal_child(signum)


def _signal_child(signum: int) -> None:
    try:
        if _child is not None:
            _child.send_signal(signum)  # a no-op once the child was waited for
    except ProcessLookupError:
        pass


def _handle_stop_signals() -> None:
    # installed before the daemon forks (it inherits them) and before any agent starts: no
    # moment where a signal kills the supervisor (the default action), leaving no exit.json, or
    # leaves its agent running without it
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def _run_child(argv: list[str]) -> int:
    """Run the agent to its end; a stop signal that came before it started ends it at once."""
    global _child
    if _stopping:
        return -_stopping[0]  # as Popen reports a child killed by that signal
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    except OSError as exc:
        print(f"stalwart: cannot start {argv[0]!r}: {exc}", file=sys.stderr, flush=True)
        return 127
    _child = child
    if _stopping:  # it came while the agent started, and went to no one (or to the one before)
        _signal_child(_stopping[0])
    while True:
        try:
            return child.wait()
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for safety
            continue


def _supervise(node_dir: str, argv: list[str], replacements: int = 0) -> int:
    """Run the agent; when it hands the node over (exit 75/76), start a replacement, up to
    ``replacements`` times: what Kubernetes does with the job's pods up to its backoff limit."""
    _handle_stop_signals()
    replaced = 0
    while True:
        rc = _run_child(argv)
        if rc not in _HAND_OVER or replaced >= replacements or _stopping:
            break
        replaced += 1
        print(
            f"stalwart: the node's agent exited {rc} ({_HAND_OVER[rc]}): starting a replacement "
            f"({replaced} of {replacements})",
            file=sys.stderr,
            flush=True,
        )
    record = {"returncode": rc, "finished_at": time.time(), "replacements": replaced}
    _write_atomic(os.path.join(node_dir, EXIT_FILE), json.dumps(record))
    return 0 if rc == 0 else 1


def main(argv: list[str]) -> int:
    replacements = 0
    if len(argv) >= 2 and argv[0] == "--replacements":
        if not argv[1].isdigit():
            print("--replacements takes a whole number", file=sys.stderr)
            return 2
        replacements, argv = int(argv[1]), argv[2:]
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m stalwart.job.node [--replacements N] NODE_DIR -- ARGV...", file=sys.stderr)
        return 2
    node_dir, command = argv[0], argv[2:]
    _handle_stop_signals()
    pid = os.fork()
    if pid > 0:
        # The intermediate parent records the daemon's pid, then exits so its caller reaps it.
        _write_atomic(os.path.join(node_dir, PID_FILE), str(pid))
        os._exit(0)
    os.setsid()
    code = 1
    try:
        code = _supervise(node_dir, command, replacements)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
