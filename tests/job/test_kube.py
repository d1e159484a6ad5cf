"""The Kubernetes backend against kmock's API emulator over HTTP on 127.0.0.1.

The emulator stores objects and serves them back; it runs no controllers, so pods and status
are put in by the tests where a controller would have made them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from k8s_validate import validate_manifest
from kubernetes import client

from stalwart.cli import main
from stalwart.errors import JobSubmitError
from stalwart.job import Job, JobExists, JobNotFound, JobState
from stalwart.job.kube import KubernetesBackend

NS = "ml"


class Emulator:
    """kmock's KubernetesEmulator served from a thread; ``react`` adds canned responses."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._reactions: list[tuple[str, list[Any]]] = []
        self.url = ""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        async with kmock.KubernetesEmulator() as emu, kmock.Server(emu) as srv:
            self.emu, self.url = emu, str(srv.url).rstrip("/")
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def start(self) -> Emulator:
        self._thread.start()
        assert self._ready.wait(10), "kmock did not start"
        return self

    def react(self, criteria: str, *payloads: Any) -> None:
        done = threading.Event()

        def add() -> None:
            r = self.emu[criteria]
            for p in payloads:
                r = r << p
            done.set()

        self._loop.call_soon_threadsafe(add)
        assert done.wait(5)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def api(self) -> client.ApiClient:
        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator().start()
    try:
        yield emu
    finally:
        emu.stop()


def _incident(node: str) -> list[dict[str, Any]]:
    """One node's events of a crash on pod 1 and the recovery into generation 1."""
    t = 1000.0
    fault = {"kind": "worker_exit", "rank": 8, "message": "exit code 1", "observed_at": t}
    out = []
    if node.endswith("1"):
        out.append(
            {"time": t, "node": node, "event": "fault", "generation": 0, "fault": fault, "verdict": "restart"}
        )
    for dt, kind, gen in [
        (0.01, "restart", 0), (0.05, "workers_stopped", 0), (0.07, "rendezvous", 1),
        (0.08, "workers_started", 1), (0.2, "first_step", 1),
    ]:  # fmt: skip
        out.append({"time": t + dt, "node": node, "event": kind, "generation": gen, "reason": "worker_exit"})
    rank = 8 if node.endswith("1") else 0  # local rank 0 of each pod reports its reload
    loaded = {"step": 40, "tier": "memory tier", "seconds": 0.05, "rank": rank}
    out.insert(-1, {"time": t + 0.15, "node": node, "event": "checkpoint_loaded", "generation": 1, **loaded})
    return out


def _spec(full_spec: dict[str, Any], flavour: str) -> dict[str, Any]:
    return {**full_spec, "kubernetes": {"flavour": flavour, "namespace": NS}}


def _backend(emu: Emulator, **kw: Any) -> KubernetesBackend:
    return KubernetesBackend(namespace=NS, api_client=emu.api(), **kw)


def _get(api: client.ApiClient, obj: dict[str, Any]) -> dict[str, Any]:
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind == "Service":
        return api.sanitize_for_serialization(client.CoreV1Api(api).read_namespaced_service(name, NS))
    if kind == "Deployment":
        return api.sanitize_for_serialization(client.AppsV1Api(api).read_namespaced_deployment(name, NS))
    if kind == "Job":
        return api.sanitize_for_serialization(client.BatchV1Api(api).read_namespaced_job(name, NS))
    group, version = obj["apiVersion"].split("/")
    plural = kind.lower() + "s"
    return client.CustomObjectsApi(api).get_namespaced_custom_object(group, version, NS, plural, name)


@pytest.mark.parametrize("flavour", ["hyperpod", "pytorchjob", "jobset", "batch"])
def test_create_list_describe_delete_each_flavour(
    emulator: Emulator, full_spec: dict[str, Any], flavour: str
) -> None:
    backend = _backend(emulator)
    job = Job.from_dict(_spec(full_spec, flavour), backend=backend)
    status = job.create()
    assert status.state == JobState.PENDING
    api = emulator.api()
    for obj in job.manifests():
        stored = _get(api, obj)
        assert stored["metadata"]["labels"]["stalwart.dev/job"] == "llama-ft"
        assert validate_manifest(stored) == []
    assert [(s.name, s.kind) for s in Job.list(backend)] == [("llama-ft", job.manifests()[-1]["kind"])]
    d = job.describe()
    assert d.status.name == "llama-ft" and NS in d.where
    job.delete()
    assert Job.list(backend) == []
    with pytest.raises(JobNotFound):
        job.status()
    for obj in job.manifests():  # the headless Service went with the job
        with pytest.raises(client.exceptions.ApiException):
            _get(api, obj)


def test_deleting_a_job_leaves_another_jobs_objects_that_share_a_name(
    emulator: Emulator, full_spec: dict[str, Any]
) -> None:
    backend = _backend(emulator)
    foo = Job.from_dict(
        _spec({**full_spec, "name": "foo", "rendezvous": {"store": "first-node"}}, "batch"), backend=backend
    )
    other = Job.from_dict(_spec({**full_spec, "name": "foo-rdzv"}, "batch"), backend=backend)
    foo.create()
    other.create()  # its headless Service is called foo-rdzv, as foo's store would be
    foo.delete()
    api = emulator.api()
    for obj in other.manifests():
        assert _get(api, obj)["metadata"]["labels"]["stalwart.dev/job"] == "foo-rdzv"
    assert [s.name for s in Job.list(backend)] == ["foo-rdzv"]


def test_a_name_that_exists_is_refused_and_nothing_is_created(
    emulator: Emulator, full_spec: dict[str, Any]
) -> None:
    backend = _backend(emulator)
    Job.from_dict(_spec(full_spec, "jobset"), backend=backend).create()
    with pytest.raises(JobExists, match="already exists in namespace 'ml'"):
        Job.from_dict(_spec(full_spec, "batch"), backend=backend).create()
    with pytest.raises(client.exceptions.ApiException):  # no Service from the refused batch flavour
        client.CoreV1Api(emulator.api()).read_namespaced_service("llama-ft", NS)


def test_a_failed_submission_rolls_back_what_it_created(
    emulator: Emulator, full_spec: dict[str, Any]
) -> None:
    emulator.react(f"post /apis/batch/v1/namespaces/{NS}/jobs", 500, {"kind": "Status", "code": 500})
    job = Job.from_dict(_spec(full_spec, "batch"), backend=_backend(emulator))
    with pytest.raises(JobSubmitError, match="creating Job/llama-ft failed: 500"):
        job.create()
    for made_before in job.manifests()[:-1]:  # the store's Service and Deployment, the headless Service
        with pytest.raises(client.exceptions.ApiException) as info:
            _get(emulator.api(), made_before)
        assert info.value.status == 404, made_before["kind"]  # deleted again


def test_the_rendezvous_store_becomes_part_of_the_job_so_it_goes_with_it(
    emulator: Emulator, full_spec: dict[str, Any]
) -> None:
    # the emulator assigns no uid; a real API server answers the create with one
    made = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "llama-ft", "namespace": NS, "uid": "5e1f-uid"},
    }
    emulator.react(f"post /apis/batch/v1/namespaces/{NS}/jobs", made)
    job = Job.from_dict(_spec(full_spec, "batch"), backend=_backend(emulator))
    job.create()
    api = emulator.api()
    for obj in job.manifests()[:2]:
        assert obj["metadata"]["name"] == "llama-ft-rdzv"
        refs = _get(api, obj)["metadata"]["ownerReferences"]
        assert refs == [{"apiVersion": "batch/v1", "kind": "Job", "name": "llama-ft", "uid": "5e1f-uid"}]
    assert "ownerReferences" not in _get(api, job.manifests()[2])["metadata"]  # the nodes' own Service


def test_status_describe_and_logs_follow_what_the_cluster_reports(
    emulator: Emulator, full_spec: dict[str, Any]
) -> None:
    backend = _backend(emulator)
    job = Job.from_dict(_spec(full_spec, "hyperpod"), backend=backend)
    job.create()
    api = emulator.api()
    # what the operator would do: run pods and report status
    status = {"conditions": [{"type": "Running", "status": "True"}], "restartCount": 2}
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        "sagemaker.amazonaws.com", "v1", NS, "hyperpodpytorchjobs", "llama-ft", {"status": status}
    )
    for i in range(2):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"llama-ft-pod-{i}", "labels": {"stalwart.dev/job": "llama-ft"}},
            "spec": {"containers": [{"name": "pytorch-job-container", "image": "x"}]},
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": "c", "image": "x", "imageID": "x", "ready": True, "restartCount": i}
                ],
            },
        }
        client.CoreV1Api(api).create_namespaced_pod(NS, pod)
        text = f"[stalwart llama-ft-pod-{i}] agent up\n[llama-ft-pod-{i}/{8 * i}] step 1 loss 0.5\n"
        text += "".join(
            f"[stalwart llama-ft-pod-{i}] event {json.dumps(e)}\n" for e in _incident(f"llama-ft-pod-{i}")
        )
        emulator.react(
            f"get /api/v1/namespaces/{NS}/pods/llama-ft-pod-{i}/log",
            kmock.headers({"Content-Type": "text/plain"}),
            kmock.body(text.encode()),
        )
    store_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "llama-ft-rdzv-7c9f",
            "labels": {"stalwart.dev/job": "llama-ft", "stalwart.dev/role": "rdzv-store"},
        },
        "spec": {"containers": [{"name": "store", "image": "x"}]},
        "status": {"phase": "Running"},
    }
    client.CoreV1Api(api).create_namespaced_pod(NS, store_pod)
    status = job.status()
    assert (status.state, status.restarts) == (JobState.RUNNING, 2)
    d = job.describe()
    assert [n.name for n in d.node_states] == ["llama-ft-pod-0", "llama-ft-pod-1", "llama-ft-rdzv-7c9f"]
    assert d.node_states[1].detail == "Running, 1 container restarts"
    assert d.node_states[2].detail == "rendezvous store, Running, 0 container restarts"
    # the agents' recovery events, read back from the pods' logs (stalwart run --log-events)
    assert "incident -> generation 1" in d.timeline and "llama-ft-pod-1" in d.timeline
    assert [h["node"] for h in d.history if "node" in h] == ["llama-ft-pod-0", "llama-ft-pod-1"]
    assert len(d.incidents) == 1 and {e["node"] for e in d.incidents[0]} == {
        "llama-ft-pod-0",
        "llama-ft-pod-1",
    }
    assert "checkpoint_loaded" in [e["event"] for e in d.incidents[0]]  # the reload is part of it
    assert d.checkpoints["last_loaded"]["step"] == 40 and d.checkpoints["failed_saves"] == 0
    rendered = [line.render() for line in job.logs()]
    assert sum("] event {" in r for r in rendered) == 13  # the agents' event lines are output too
    assert [r for r in rendered if "] event {" not in r] == [
        "[llama-ft-pod-0 agent] [stalwart llama-ft-pod-0] agent up",
        "[llama-ft-pod-0 rank0] step 1 loss 0.5",
        "[llama-ft-pod-1 agent] [stalwart llama-ft-pod-1] agent up",
        "[llama-ft-pod-1 rank8] step 1 loss 0.5",
    ]
    followed = sorted(line.render() for line in job.logs(follow=True, rank=8))
    assert followed == ["[llama-ft-pod-1 rank8] step 1 loss 0.5"]
    assert [line.node for line in job.logs(node="1")] == ["llama-ft-pod-1"] * 9


def test_an_unreachable_cluster_is_a_clear_error(full_spec: dict[str, Any]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    cfg.retries = 0
    backend = KubernetesBackend(namespace=NS, api_client=client.ApiClient(cfg))
    with pytest.raises(JobSubmitError, match=f"cannot reach the Kubernetes API at http://127.0.0.1:{port}"):
        Job.from_dict(_spec(full_spec, "jobset"), backend=backend).create()


def test_the_cli_drives_a_cluster_through_a_kubeconfig(
    emulator: Emulator, tmp_path: Path, full_spec: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": emulator.url}}],
                "users": [{"name": "me", "user": {"token": "t"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "me"}}],
                "current-context": "kmock",
            }
        )
    )
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(_spec(full_spec, "pytorchjob")))
    kube = ["--kubeconfig", str(kubeconfig), "-n", NS]

    def run(*args: str) -> int:
        try:
            main(list(args))
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    assert run("job", "create", "-f", str(spec), *kube) == 0
    assert "created on kubernetes" in capsys.readouterr().out
    assert run("job", "create", "-f", str(spec), *kube) == 4
    assert "already exists" in capsys.readouterr().err
    assert run("job", "list", "--backend", "kubernetes", *kube) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "STATE", "NODES", "RESTARTS", "AGE", "KIND"]
    assert out[1].split()[:2] == ["llama-ft", "pending"]
    assert run("job", "delete", "llama-ft", "--backend", "kubernetes", *kube) == 0
    assert run("job", "describe", "llama-ft", "--backend", "kubernetes", *kube) == 3
    assert "no stalwart job named 'llama-ft'" in capsys.readouterr().err


def test_a_missing_kubeconfig_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    backend = KubernetesBackend(namespace=NS, kubeconfig=str(tmp_path / "nope"))
    with pytest.raises(JobSubmitError, match="no usable Kubernetes configuration"):
        backend.list()


def test_a_missing_operator_or_namespace_is_named(emulator: Emulator, full_spec: dict[str, Any]) -> None:
    emulator.react(
        f"post /apis/jobset.x-k8s.io/v1alpha2/namespaces/{NS}/jobsets", 404, {"kind": "Status", "code": 404}
    )
    job = Job.from_dict(_spec(full_spec, "jobset"), backend=_backend(emulator))
    with pytest.raises(JobSubmitError, match=r"does the cluster serve jobset.x-k8s.io/v1alpha2 JobSet"):
        job.create()
