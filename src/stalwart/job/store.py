"""A job's rendezvous store, kept apart from its nodes.

``python -m stalwart.job.store PORT JOB_DIR NODES`` (local jobs) serves a c10d ``TCPStore`` on
PORT until every node of the job has finished (each ``JOB_DIR/node-<i>`` has its ``exit.json``,
or its supervisor is gone), or until it is stopped. The local backend starts it (detached,
through ``stalwart.job.node``) before the nodes, which all join it as clients (``--rdzv-conf
is_host=0``). A node that hands itself over and is replaced, node 0 included, then takes nothing
with it: the others wait in the rendezvous for the replacement, and the job-wide restart budget
lives on.

``stalwart rdzv-store PORT`` (Kubernetes: the ``<job>-rdzv`` pod; the ``stalwart`` command is in
every image that runs jobs) or ``python -m stalwart.job.store PORT`` serves until SIGTERM
or SIGINT and then exits 0; as a container's PID 1 it must handle SIGTERM itself. If that pod is
lost, its replacement starts empty and the nodes fail: it holds no training state and asks for
little, so it is much less likely to go than a GPU node.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import click

from stalwart.job.node import EXIT_FILE, PID_FILE

__all__ = ["rdzv_store_command", "serve"]


def serve(port: int, job_dir: Path | None = None, nodes: int = 0, poll_s: float = 0.5) -> int:
    """Serve the store until every node has finished (see ``_finished``), or, without a
    ``job_dir``, until SIGTERM or SIGINT."""
    from torch.distributed import TCPStore  # here, not at import: the CLI stays light

    stop = {signal.SIGTERM, signal.SIGINT}
    if job_dir is None:  # before the store's threads start, so that they inherit the mask
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # binds every address
    print(f"stalwart: the job's rendezvous store listens on port {port}", flush=True)
    if job_dir is None:
        got = signal.sigwait(stop)
        print(f"stalwart: the rendezvous store stops ({signal.Signals(got).name})", flush=True)
    else:
        node_dirs = [job_dir / f"node-{i}" for i in range(nodes)]
        while not all(_finished(d) for d in node_dirs):
            time.sleep(poll_s)  # nodes finish in seconds to days; a cheap stat twice a second
    del store
    return 0


def _finished(node_dir: Path) -> bool:
    """The node wrote its exit record, or its supervisor is gone without one (killed)."""
    if (node_dir / EXIT_FILE).exists():
        return True
    try:
        pid = int((node_dir / PID_FILE).read_text())
    except (OSError, ValueError):
        return False  # not started yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True  # killed before it could write one
    except PermissionError:
        pass  # alive, under another user
    return False


@click.command("rdzv-store")
@click.argument("port", type=click.IntRange(1, 65535))
def rdzv_store_command(port: int) -> None:
    """Serve a job's c10d rendezvous store on PORT until SIGTERM (a Kubernetes job's <job>-rdzv pod)."""
    sys.exit(serve(port))


def main(argv: list[str]) -> int:
    if len(argv) == 1 and argv[0].isdigit():
        return serve(int(argv[0]))
    if len(argv) != 3 or not argv[0].isdigit() or not argv[2].isdigit():
        print("usage: python -m stalwart.job.store PORT [JOB_DIR NODES]", file=sys.stderr)
        return 2
    return serve(int(argv[0]), Path(argv[1]), int(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
