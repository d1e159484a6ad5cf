"""The Kubernetes backend, through the official ``kubernetes`` client.

``create`` renders the job (render.py), checks the name is free, then creates the objects in
order and deletes the ones already made if a later one fails: a failed submission leaves no
orphans. Jobs are found again by the labels every object carries (``stalwart.dev/job``). The
rendezvous store's Service and Deployment (``<job>-rdzv``) are then made dependents of the job's
main object, so that the cluster's garbage collector removes them with it however it is deleted.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from stalwart.agent.timeline import checkpoint_summary, describe_events, parse_event_line
from stalwart.errors import JobError, JobSubmitError
from stalwart.job.api import (
    JobDescription,
    JobExists,
    JobNotFound,
    JobState,
    JobStatus,
    LogLine,
    NodeStatus,
    parse_log_line,
)
from stalwart.job.render import LABEL_JOB, LABEL_MANAGED, LABEL_ROLE, render, store_name
from stalwart.job.spec import JobSpec

__all__ = ["KINDS", "KubernetesBackend"]

# flavour -> (group, version, plural, kind); group "" is a core/batch object
KINDS: dict[str, tuple[str, str, str, str]] = {
    "hyperpod": ("sagemaker.amazonaws.com", "v1", "hyperpodpytorchjobs", "HyperPodPyTorchJob"),
    "pytorchjob": ("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"),
    "jobset": ("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet"),
    "batch": ("batch", "v1", "jobs", "Job"),
}
_TIMEOUT_S = 15
_SUCCEEDED = {"Complete", "Completed", "Succeeded"}
_RUNNING = {"Running", "PodsRunning", "Restarting"}


class KubernetesBackend:
    """Jobs on a cluster. ``api_client`` (a ``kubernetes.client.ApiClient``) skips kubeconfig."""

    name = "kubernetes"

    def __init__(
        self,
        *,
        namespace: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        flavour: str | None = None,
        api_client: Any = None,
    ) -> None:
        self.namespace = namespace or "default"
        self.kubeconfig = kubeconfig
        self.context = context
        self.flavour = flavour
        self._api = api_client

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def api(self) -> Any:
        if self._api is None:
            from kubernetes import config

            try:
                self._api = config.new_client_from_config(config_file=self.kubeconfig, context=self.context)
            except Exception as exc:  # ConfigException, FileNotFoundError...
                try:
                    config.load_incluster_config()
                    from kubernetes import client

                    self._api = client.ApiClient()
                except Exception:
                    raise JobSubmitError(
                        f"no usable Kubernetes configuration ({exc}); pass --kubeconfig/--context or set KUBECONFIG"
                    ) from None
        return self._api

    @property
    def _host(self) -> str:
        return str(getattr(self.api.configuration, "host", "?"))

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one API call; turn transport failures into a clear ``JobSubmitError``."""
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=_TIMEOUT_S, **kwargs)
        except (HTTPError, OSError) as exc:  # MaxRetryError, timeouts, refused connections
            raise JobSubmitError(
                f"cannot reach the Kubernetes API at {self._host} to {what}: {type(exc).__name__}; "
                "check the cluster is up and your kubeconfig/context points at it"
            ) from None

    def _flavours(self) -> list[str]:
        return [self.flavour] if self.flavour else list(KINDS)

    def _get_main(self, name: str, flavour: str) -> dict[str, Any] | None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        group, version, plural, _ = KINDS[flavour]
        try:
            if flavour == "batch":
                obj = self._call(
                    "read a job", client.BatchV1Api(self.api).read_namespaced_job, name, self.namespace
                )
                obj = self.api.sanitize_for_serialization(obj)
            else:
                obj = self._call(
                    "read a job",
                    client.CustomObjectsApi(self.api).get_namespaced_custom_object,
                    group, version, self.namespace, plural, name,
                )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise JobError(f"reading {plural}/{name}: {exc.status} {exc.reason}") from None
        if not isinstance(obj, dict):
            return None
        labels = obj.get("metadata", {}).get("labels") or {}
        return obj if labels.get(LABEL_MANAGED) == "stalwart" else None

    def _find(self, name: str) -> tuple[str, dict[str, Any]]:
        for flavour in self._flavours():
            obj = self._get_main(name, flavour)
            if obj is not None:
                return flavour, obj
        raise JobNotFound(
            f"no stalwart job named {name!r} in namespace {self.namespace!r}; see `stalwart job list --backend kubernetes`"
        )

    def _create_one(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj``; what the API server made of it."""
        from kubernetes import client

        kind, ns = obj["kind"], obj["metadata"]["namespace"]
        if kind == "Service":
            made = self._call(
                "create a Service", client.CoreV1Api(self.api).create_namespaced_service, ns, obj
            )
        elif kind == "Deployment":
            made = self._call(
                "create a Deployment", client.AppsV1Api(self.api).create_namespaced_deployment, ns, obj
            )
        elif kind == "Job":
            made = self._call("create a Job", client.BatchV1Api(self.api).create_namespaced_job, ns, obj)
        else:
            group, version = obj["apiVersion"].split("/")
            plural = next(p for g, v, p, k in KINDS.values() if k == kind)
            made = self._call(
                f"create a {kind}",
                client.CustomObjectsApi(self.api).create_namespaced_custom_object,
                group, version, ns, plural, obj,
            )  # fmt: skip
        out = made if isinstance(made, dict) else self.api.sanitize_for_serialization(made)
        return out if isinstance(out, dict) else {}

    def _own(self, dependents: list[dict[str, Any]], owner: dict[str, Any]) -> None:
        """Make ``dependents`` (the store's objects) owned by ``owner`` (the job's main object)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        uid = (owner.get("metadata") or {}).get("uid")
        if not uid or not dependents:
            return  # an API server that assigns no uid (an emulator): delete() still removes them
        meta = owner["metadata"]
        ref = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"], "uid": uid}
        patch = [{"op": "add", "path": "/metadata/ownerReferences", "value": [ref]}]
        for obj in dependents:
            kind, name, ns = obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]
            api: Any = client.CoreV1Api(self.api) if kind == "Service" else client.AppsV1Api(self.api)
            fn = api.patch_namespaced_service if kind == "Service" else api.patch_namespaced_deployment
            try:
                self._call(f"make {kind}/{name} part of the job", fn, name, ns, patch)
            except ApiException as exc:
                raise JobSubmitError(
                    f"making {kind}/{name} part of {owner['kind']}/{meta['name']} failed: "
                    f"{exc.status} {exc.reason}"
                ) from None

    def _delete_one(self, obj: dict[str, Any], missing_ok: bool = True) -> bool:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        body = client.V1DeleteOptions(propagation_policy="Background")
        try:
            if kind == "Service":
                self._call("delete a Service", client.CoreV1Api(self.api).delete_namespaced_service, name, ns)
            elif kind == "Deployment":
                self._call(
                    "delete a Deployment",
                    client.AppsV1Api(self.api).delete_namespaced_deployment, name, ns, body=body,
                )  # fmt: skip
            elif kind == "Job":
                self._call(
                    "delete a Job", client.BatchV1Api(self.api).delete_namespaced_job, name, ns, body=body
                )
            else:
                group, version = obj["apiVersion"].split("/")
                plural = next(p for g, v, p, k in KINDS.values() if k == kind)
                self._call(
                    f"delete a {kind}",
                    client.CustomObjectsApi(self.api).delete_namespaced_custom_object,
                    group, version, ns, plural, name, body=body,
                )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return False
            raise JobError(f"deleting {kind}/{name}: {exc.status} {exc.reason}") from None
        return True

    # -- Backend -----------------------------------------------------------------------------

    def create(self, spec: JobSpec) -> JobStatus:
        from kubernetes.client.exceptions import ApiException

        if spec.kubernetes.namespace != self.namespace:
            spec = spec.model_copy(
                update={"kubernetes": spec.kubernetes.model_copy(update={"namespace": self.namespace})}
            )
        objects = render(spec)
        for flavour in KINDS:
            if self._get_main(spec.name, flavour) is not None:
                raise JobExists(
                    f"a job named {spec.name!r} already exists in namespace {self.namespace!r}; "
                    f"delete it with `stalwart job delete {spec.name} --backend kubernetes` or pick another name"
                )
        created: list[dict[str, Any]] = []
        made: dict[str, Any] = {}
        try:
            for obj in objects:
                try:
                    made = self._create_one(obj)
                except ApiException as exc:
                    what = f"{obj['kind']}/{obj['metadata']['name']}"
                    if exc.status == 409:
                        raise JobExists(
                            f"{what} already exists in namespace {self.namespace!r}; delete it or pick another job name"
                        ) from None
                    if exc.status == 404:
                        raise JobSubmitError(
                            f"creating {what}: not found. Does namespace {self.namespace!r} exist, and does the "
                            f"cluster serve {obj['apiVersion']} {obj['kind']} (is its operator installed)? "
                            "Otherwise pick another kubernetes.flavour (hyperpod, pytorchjob, jobset, batch)"
                        ) from None
                    raise JobSubmitError(f"creating {what} failed: {exc.status} {exc.reason}") from None
                created.append(obj)
            store = [o for o in objects if _is_store(o)]
            self._own(store, made)  # made: the main object, created last
        except BaseException:
            for obj in reversed(created):
                try:
                    self._delete_one(obj)
                except JobError:
                    pass  # best effort; the original error is what the user needs to see
            raise
        return self._to_status(spec.name, spec.kubernetes.flavour, objects[-1])

    def _to_status(self, name: str, flavour: str, obj: dict[str, Any]) -> JobStatus:
        status = obj.get("status") or {}
        spec = obj.get("spec") or {}
        meta = obj.get("metadata") or {}
        state = JobState.PENDING
        message = ""
        for cond in status.get("conditions") or []:
            if str(cond.get("status")) != "True":
                continue
            ctype = cond.get("type", "")
            if ctype in _SUCCEEDED:
                state, message = JobState.SUCCEEDED, cond.get("message", "")
            elif ctype == "Failed":
                state, message = JobState.FAILED, cond.get("message", "") or cond.get("reason", "")
            elif ctype in _RUNNING and not state.finished:
                state = JobState.RUNNING
        if flavour == "batch" and not state.finished and (status.get("active") or 0) > 0:
            state = JobState.RUNNING
        restarts = int(status.get("restartCount") or status.get("restarts") or status.get("failed") or 0)
        created = meta.get("creationTimestamp")
        created_at = None
        if isinstance(created, str):
            from datetime import datetime

            try:
                created_at = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
            except ValueError:
                created_at = None
        return JobStatus(
            name=name,
            backend=self.name,
            state=state,
            nodes=_nodes_of(flavour, spec),
            created_at=created_at,
            restarts=restarts,
            message=message,
            kind=KINDS[flavour][3],
        )

    def list(self) -> list[JobStatus]:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        selector = f"{LABEL_MANAGED}=stalwart"
        out: list[JobStatus] = []
        for flavour in self._flavours():
            group, version, plural, _ = KINDS[flavour]
            try:
                if flavour == "batch":
                    res = self._call(
                        "list jobs", client.BatchV1Api(self.api).list_namespaced_job, self.namespace,
                        label_selector=selector,
                    )  # fmt: skip
                    items = self.api.sanitize_for_serialization(res).get("items", [])
                else:
                    res = self._call(
                        "list jobs",
                        client.CustomObjectsApi(self.api).list_namespaced_custom_object,
                        group, version, self.namespace, plural, label_selector=selector,
                    )  # fmt: skip
                    items = res.get("items", [])
            except ApiException as exc:
                if exc.status == 404:
                    continue  # that operator is not installed
                raise JobError(f"listing {plural}: {exc.status} {exc.reason}") from None
            for obj in items:
                labels = (obj.get("metadata") or {}).get("labels") or {}
                if labels.get(LABEL_MANAGED) == "stalwart":  # servers that ignore selectors
                    out.append(self._to_status(obj["metadata"]["name"], flavour, obj))
        return sorted(out, key=lambda s: s.name)

    def status(self, name: str) -> JobStatus:
        flavour, obj = self._find(name)
        return self._to_status(name, flavour, obj)

    def _pods(self, name: str) -> list[dict[str, Any]]:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            res = self._call(
                "list pods", client.CoreV1Api(self.api).list_namespaced_pod, self.namespace,
                label_selector=f"{LABEL_JOB}={name}",
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise JobError(f"listing the pods of {name!r}: {exc.status} {exc.reason}") from None
        pods = self.api.sanitize_for_serialization(res).get("items", [])
        mine = [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(LABEL_JOB) == name]
        return sorted(mine, key=lambda p: p["metadata"]["name"])

    def _node_pods(self, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The job's node pods, and its rendezvous store's pods."""
        pods = self._pods(name)
        store = [p for p in pods if _is_store(p)]
        return [p for p in pods if p not in store], store

    def describe(self, name: str) -> JobDescription:
        flavour, obj = self._find(name)
        status = self._to_status(name, flavour, obj)
        nodes = []
        history = []
        node_pods, store_pods = self._node_pods(name)
        for pod in [*node_pods, *store_pods]:
            phase = (pod.get("status") or {}).get("phase", "Unknown")
            state = {
                "Pending": JobState.PENDING,
                "Running": JobState.RUNNING,
                "Succeeded": JobState.SUCCEEDED,
                "Failed": JobState.FAILED,
            }.get(phase, JobState.UNKNOWN)
            restarts = sum(
                c.get("restartCount", 0) for c in (pod.get("status") or {}).get("containerStatuses") or []
            )
            role = "rendezvous store, " if pod in store_pods else ""
            nodes.append(
                NodeStatus(
                    pod["metadata"]["name"], state, detail=f"{role}{phase}, {restarts} container restarts"
                )
            )
        for cond in (obj.get("status") or {}).get("conditions") or []:
            history.append(
                {k: cond.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime")}
            )
        events = self._agent_events(name)
        restarts, incidents, timeline = describe_events(events)
        return JobDescription(
            status=status,
            node_states=tuple(nodes),
            history=(*history, *restarts),
            incidents=incidents,
            where=f"{self._host} namespace {self.namespace} {obj.get('kind')}/{name}",
            spec=obj.get("spec") or {},
            timeline=timeline,
            checkpoints=checkpoint_summary(events),
        )

    def _agent_events(self, name: str) -> list[dict[str, Any]]:
        """The recovery events the pods' agents printed (``stalwart run --log-events``), by time.
        Best effort: a pod whose log cannot be read (not started, gone) adds none."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(self.api)
        events = []
        for pod in self._node_pods(name)[0]:
            try:
                text = core.read_namespaced_pod_log(pod["metadata"]["name"], self.namespace)
            except (ApiException, OSError):
                continue
            events += [e for e in map(parse_event_line, str(text).splitlines()) if e is not None]
        return sorted(events, key=lambda e: float(e["time"]))

    def events(self, name: str) -> list[dict[str, Any]]:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        self._find(name)
        try:
            res = self._call("list events", client.CoreV1Api(self.api).list_namespaced_event, self.namespace)
        except ApiException:
            return []
        items = self.api.sanitize_for_serialization(res).get("items", [])
        return [
            {"time": e.get("lastTimestamp") or e.get("eventTime"), "reason": e.get("reason"), "message": e.get("message"),
             "object": (e.get("involvedObject") or {}).get("name")}
            for e in items
            if str((e.get("involvedObject") or {}).get("name", "")).startswith(name)
        ]  # fmt: skip

    def logs(
        self, name: str, *, follow: bool = False, node: str | None = None, rank: int | None = None
    ) -> Iterator[LogLine]:
        from kubernetes import client

        self._find(name)
        pods = [p["metadata"]["name"] for p in self._node_pods(name)[0]]
        if node is not None:
            chosen = [p for p in pods if p == node] or (
                [pods[int(node)]] if node.isdigit() and int(node) < len(pods) else []
            )
            if not chosen:
                raise JobError(
                    f"job {name!r} has no pod {node!r}; its pods are {', '.join(pods) or 'none yet'}"
                )
            pods = chosen
        core = client.CoreV1Api(self.api)
        if not follow:
            for pod in pods:
                text = self._call("read pod logs", core.read_namespaced_pod_log, pod, self.namespace)
                for raw in str(text).splitlines():
                    line = parse_log_line(pod, raw)
                    if line.matches(rank):
                        yield line
            return
        lines: queue.Queue[LogLine | None] = queue.Queue()

        def stream(pod: str) -> None:
            try:
                resp = core.read_namespaced_pod_log(pod, self.namespace, follow=True, _preload_content=False)
                buf = b""
                for chunk in resp.stream(4096):
                    buf += chunk
                    *done, buf = buf.split(b"\n")
                    for raw in done:
                        lines.put(parse_log_line(pod, raw.decode(errors="replace")))
                if buf:
                    lines.put(parse_log_line(pod, buf.decode(errors="replace")))
            except Exception as exc:
                lines.put(LogLine(pod, None, f"(log stream ended: {type(exc).__name__})"))
            finally:
                lines.put(None)

        for pod in pods:
            threading.Thread(target=stream, args=(pod,), daemon=True, name=f"logs-{pod}").start()
        open_streams = len(pods)
        while open_streams:
            item = lines.get()
            if item is None:
                open_streams -= 1
            elif item.matches(rank):
                yield item

    def delete(self, name: str) -> None:
        flavour, obj = self._find(name)
        spec = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind")}
        self._delete_one({**spec, "metadata": {"name": name, "namespace": self.namespace}}, missing_ok=False)
        if flavour in ("hyperpod", "batch"):  # their headless Service
            self._delete_if_ours("Service", name, name)
        for kind in ("Deployment", "Service"):  # the rendezvous store, when it has a pod of its own
            self._delete_if_ours(kind, store_name(name), name, store=True)

    def _delete_if_ours(self, kind: str, name: str, job: str, store: bool = False) -> None:
        """Delete ``kind``/``name`` if it is ``job``'s (its labels say so): another job may be
        called ``<job>-rdzv``, and a Service of that name may be its own."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core, apps = client.CoreV1Api(self.api), client.AppsV1Api(self.api)
        read = core.read_namespaced_service if kind == "Service" else apps.read_namespaced_deployment
        try:
            obj = self.api.sanitize_for_serialization(
                self._call(f"read a {kind}", read, name, self.namespace)
            )
        except ApiException as exc:
            if exc.status == 404:
                return
            raise JobError(f"reading {kind}/{name}: {exc.status} {exc.reason}") from None
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if labels.get(LABEL_JOB) != job or _is_store(obj) != store:
            return
        self._delete_one({"kind": kind, "metadata": {"name": name, "namespace": self.namespace}})


def _is_store(obj: dict[str, Any]) -> bool:
    """Whether ``obj`` (a rendered object or a pod) belongs to a job's rendezvous store."""
    return bool(((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_ROLE))


def _nodes_of(flavour: str, spec: dict[str, Any]) -> str:
    try:
        if flavour == "hyperpod":
            nproc = spec.get("nprocPerNode", "?")
            return f"{spec['replicaSpecs'][0].get('replicas', '?')} x {nproc}"
        if flavour == "pytorchjob":
            ep = spec.get("elasticPolicy") or {}
            return (
                f"{ep.get('minReplicas', '?')}:{ep.get('maxReplicas', '?')} x {spec.get('nprocPerNode', '?')}"
            )
        if flavour == "jobset":
            return str(spec["replicatedJobs"][0]["template"]["spec"].get("parallelism", "?"))
        return str(spec.get("parallelism", "?"))
    except (KeyError, IndexError, TypeError):
        return "?"
