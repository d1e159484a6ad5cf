"""A local job's rendezvous store, kept apart from its nodes.

``python -m stalwart.job.store PORT JOB_DIR NODES`` serves a c10d ``TCPStore`` on PORT until
every node of the job has finished (each ``JOB_DIR/node-<i>/exit.json`` exists), or until it is
stopped. The local backend starts it (detached, through ``stalwart.job.node``) before the nodes,
which all join it as clients (``--rdzv-conf is_host=0``). A node that hands itself over and is
replaced, node 0 included, then takes nothing with it: the others wait in the rendezvous for the
replacement, and the job-wide restart budget lives on. (On Kubernetes the first pod still hosts
the store; a store outside the pods, such as etcd, does the same there.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from stalwart.job.node import EXIT_FILE

__all__ = ["serve"]


def serve(port: int, job_dir: Path, nodes: int, poll_s: float = 0.5) -> int:
    """Serve the store until every node has written its exit record."""
    from torch.distributed import TCPStore  # here, not at import: the CLI stays light

    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    print(f"stalwart: the job's rendezvous store listens on port {port}", flush=True)
    records = [job_dir / f"node-{i}" / EXIT_FILE for i in range(nodes)]
    while not all(record.exists() for record in records):
        time.sleep(poll_s)  # nodes finish in seconds to days; a cheap stat twice a second
    del store
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[0].isdigit() or not argv[2].isdigit():
        print("usage: python -m stalwart.job.store PORT JOB_DIR NODES", file=sys.stderr)
        return 2
    return serve(int(argv[0]), Path(argv[1]), int(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
