"""Kubernetes manifests for a job, one renderer per flavour; every pod runs ``stalwart run``.

========== ==================================================================== ======================
flavour    objects                                                               rendezvous endpoint
========== ==================================================================== ======================
hyperpod   HyperPodPyTorchJob (sagemaker.amazonaws.com/v1, the shape ``hyp``      <job>-pod-0.<job>
           renders) + headless Service
pytorchjob PyTorchJob (kubeflow.org/v1), Worker replicas, elasticPolicy c10d      <job>-worker-0
jobset     JobSet (jobset.x-k8s.io/v1alpha2), one indexed Job, DNS hostnames      <job>-node-0-0.<job>
batch      indexed batch/v1 Job + headless Service (no operator needed)           <job>-0.<job>
========== ==================================================================== ======================

The endpoints above are ``rendezvous.store: first-node``. By default (``store: pod``) every
flavour also gets ``<job>-rdzv``, a one-pod Deployment serving the c10d store and a Service in
front of it: the endpoint is ``<job>-rdzv:<port>`` and every node joins as a client, so replacing
any node, the first included, leaves the store and the job-wide restart budget in place.
``rendezvous.endpoint`` in the spec replaces both. Renderers are pure: spec in, list of plain
dicts out, the flavour's main object last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stalwart.job.command import hyperpod_rule, job_env, run_args
from stalwart.job.spec import JobSpec

__all__ = ["LABEL_JOB", "LABEL_MANAGED", "LABEL_ROLE", "RENDERERS", "endpoint", "render", "store_name"]

LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_JOB = "stalwart.dev/job"
LABEL_FLAVOUR = "stalwart.dev/flavour"
LABEL_ROLE = "stalwart.dev/role"
ROLE_STORE = "rdzv-store"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"
KUEUE_PREFERRED = "kueue.x-k8s.io/podset-preferred-topology"
KUEUE_REQUIRED = "kueue.x-k8s.io/podset-required-topology"
GPU = "nvidia.com/gpu"
EFA = "vpc.amazonaws.com/efa"

Manifest = dict[str, Any]


def _labels(spec: JobSpec) -> dict[str, str]:
    labels = {LABEL_MANAGED: "stalwart", LABEL_JOB: spec.name, LABEL_FLAVOUR: spec.kubernetes.flavour}
    if spec.scheduling.queue:
        labels[KUEUE_QUEUE] = spec.scheduling.queue
    if spec.scheduling.priority:
        labels[KUEUE_PRIORITY] = spec.scheduling.priority
    return labels


def _pod_annotations(spec: JobSpec) -> dict[str, str]:
    ann = {}
    if spec.scheduling.topology.preferred:
        ann[KUEUE_PREFERRED] = spec.scheduling.topology.preferred
    if spec.scheduling.topology.required:
        ann[KUEUE_REQUIRED] = spec.scheduling.topology.required
    return ann


def _meta(spec: JobSpec, name: str | None = None) -> dict[str, Any]:
    return {"name": name or spec.name, "namespace": spec.kubernetes.namespace, "labels": _labels(spec)}


def store_name(job: str) -> str:
    """The name of the Deployment and the Service of ``job``'s rendezvous store."""
    return f"{job}-rdzv"


def _own_store(spec: JobSpec) -> bool:
    return spec.rendezvous.endpoint is None and spec.rendezvous.store == "pod"


def endpoint(spec: JobSpec) -> str:
    """The c10d rendezvous endpoint the pods of ``spec``'s flavour use."""
    if spec.rendezvous.endpoint:
        return spec.rendezvous.endpoint
    name, port = spec.name, spec.rendezvous.port
    if _own_store(spec):
        return f"{store_name(name)}:{port}"
    host = {
        "hyperpod": f"{name}-pod-0.{name}",
        "pytorchjob": f"{name}-worker-0",
        "jobset": f"{name}-node-0-0.{name}",
        "batch": f"{name}-0.{name}",
    }[spec.kubernetes.flavour]
    return f"{host}:{port}"


def _resources(spec: JobSpec) -> dict[str, Any]:
    r = spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if r.gpus:
        requests[GPU] = limits[GPU] = str(r.gpus)
    if r.efa:
        requests[EFA] = limits[EFA] = str(r.efa)
    if r.cpu:
        requests["cpu"] = r.cpu
    if r.memory:
        requests["memory"] = limits["memory"] = r.memory
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container(spec: JobSpec, name: str) -> dict[str, Any]:
    env = [{"name": k, "value": v} for k, v in job_env(spec).items()]
    env.append({"name": "STALWART_NODE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    mounts = [
        {"name": v.name, "mountPath": v.mount_path, **({"readOnly": True} if v.read_only else {})}
        for v in spec.volumes
    ]
    if spec.resources.shm:
        mounts.append({"name": "stalwart-dshm", "mountPath": "/dev/shm"})
    c: dict[str, Any] = {
        "name": name,
        "image": spec.image or "",
        "command": ["stalwart", "run"],
        # $(STALWART_NODE) is expanded by the kubelet from the env below: the pod's name.
        "args": run_args(
            spec,
            endpoint=endpoint(spec),
            is_host=False if _own_store(spec) else None,  # None: torch's hostname match decides
            node_name="$(STALWART_NODE)",
            log_events=True,
        ),
        "env": env,
        "ports": [{"name": "rdzv", "containerPort": spec.rendezvous.port, "protocol": "TCP"}],
    }
    if spec.kubernetes.image_pull_policy:
        c["imagePullPolicy"] = spec.kubernetes.image_pull_policy
    if mounts:
        c["volumeMounts"] = mounts
    res = _resources(spec)
    if res:
        c["resources"] = res
    return c


def _place(spec: JobSpec, pod: dict[str, Any]) -> None:
    """The spec's node selection (``nodeSelector``, instance type) and service account."""
    selector = dict(spec.scheduling.node_selector)
    if spec.scheduling.instance_type:
        selector["node.kubernetes.io/instance-type"] = spec.scheduling.instance_type
    if selector:
        pod["nodeSelector"] = selector
    if spec.scheduling.service_account:
        pod["serviceAccountName"] = spec.scheduling.service_account


def _pod_spec(spec: JobSpec, container: str, *, restart_policy: str | None, subdomain: str | None) -> dict:
    # stalwart run gives its workers --shutdown-timeout (30 s) after SIGTERM; leave it that and more.
    pod: dict[str, Any] = {"containers": [_container(spec, container)], "terminationGracePeriodSeconds": 60}
    if restart_policy:
        pod["restartPolicy"] = restart_policy
    if subdomain:
        pod["subdomain"] = subdomain
    _place(spec, pod)
    if spec.scheduling.scheduler_name:
        pod["schedulerName"] = spec.scheduling.scheduler_name
    volumes: list[dict[str, Any]] = []
    for v in spec.volumes:
        if v.host_path is not None:
            volumes.append({"name": v.name, "hostPath": {"path": v.host_path}})
        else:
            pvc: dict[str, Any] = {"claimName": v.pvc}
            if v.read_only:
                pvc["readOnly"] = True
            volumes.append({"name": v.name, "persistentVolumeClaim": pvc})
    if spec.resources.shm:
        volumes.append(
            {"name": "stalwart-dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm}}
        )
    if volumes:
        pod["volumes"] = volumes
    return pod


def _pod_template(
    spec: JobSpec, container: str, *, restart_policy: str | None, subdomain: str | None
) -> dict:
    meta: dict[str, Any] = {"labels": _labels(spec)}
    ann = _pod_annotations(spec)
    if ann:
        meta["annotations"] = ann
    return {
        "metadata": meta,
        "spec": _pod_spec(spec, container, restart_policy=restart_policy, subdomain=subdomain),
    }


def _headless_service(spec: JobSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(spec),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_JOB: spec.name},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rdzv", "port": spec.rendezvous.port, "targetPort": spec.rendezvous.port}],
        },
    }


def _store_objects(spec: JobSpec) -> list[Manifest]:
    """The rendezvous store's Service and one-pod Deployment (``stalwart rdzv-store PORT``).

    No Kueue labels: the store is not queued with the job. It is scheduled like the nodes
    (``nodeSelector``, service account), asks for a quarter of a CPU, and is ready once it listens.
    """
    name, port = store_name(spec.name), spec.rendezvous.port
    selector = {LABEL_JOB: spec.name, LABEL_ROLE: ROLE_STORE}
    labels = {LABEL_MANAGED: "stalwart", LABEL_FLAVOUR: spec.kubernetes.flavour, **selector}
    meta = {"name": name, "namespace": spec.kubernetes.namespace, "labels": labels}
    container: dict[str, Any] = {
        "name": "store",
        "image": spec.image or "",
        # the `stalwart` command, as the nodes run it: whatever environment the image installed it in
        "command": ["stalwart", "rdzv-store", str(port)],
        "ports": [{"name": "rdzv", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 2},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    }
    if spec.kubernetes.image_pull_policy:
        container["imagePullPolicy"] = spec.kubernetes.image_pull_policy
    pod: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": 10,
        # GPU nodes are commonly tainted for pods that ask for GPUs; the store asks for none, and
        # on a cluster of GPU nodes alone it would otherwise never be scheduled
        "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
    }
    _place(spec, pod)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"selector": selector, "ports": [{"name": "rdzv", "port": port, "targetPort": port}]},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            # never two stores at once: a second one would split the job's nodes between them
            "strategy": {"type": "Recreate"},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    return [service, deployment]


def render_hyperpod(spec: JobSpec) -> list[Manifest]:
    """A ``HyperPodPyTorchJob`` in the shape ``hyp create hyp-pytorch-job`` (template 1.1) renders."""
    meta = _meta(spec)
    ann = _pod_annotations(spec)
    if ann:
        meta["annotations"] = ann
    template = _pod_template(spec, "pytorch-job-container", restart_policy=None, subdomain=spec.name)
    # hyp names the pod template and asks for zero GPUs explicitly on CPU jobs; do the same.
    template["metadata"] = {"name": spec.name, "namespace": spec.kubernetes.namespace, **template["metadata"]}
    if not spec.resources.gpus:
        res = template["spec"]["containers"][0].setdefault("resources", {})
        res.setdefault("requests", {})[GPU] = "0"
        res.setdefault("limits", {})[GPU] = "0"
    replica: dict[str, Any] = {"name": "pod", "replicas": spec.nodes.max, "template": template}
    if spec.spares:
        replica["spares"] = spec.spares
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "jobMaxRetryCount": spec.restart.max_restarts}
    rules = [hyperpod_rule(r, integer_threshold=True) for r in spec.health.log_rules]  # CRD: integer
    if rules:
        run_policy["logMonitoringConfiguration"] = rules
    body: dict[str, Any] = {
        "nprocPerNode": str(spec.nproc_per_node),
        "replicaSpecs": [replica],
        "runPolicy": run_policy,
    }
    if spec.nodes.min != spec.nodes.max:
        replica["maxReplicas"] = spec.nodes.max
        body["elasticPolicy"] = {"minReplicas": spec.nodes.min, "maxReplicas": spec.nodes.max}
    job = {
        "apiVersion": "sagemaker.amazonaws.com/v1",
        "kind": "HyperPodPyTorchJob",
        "metadata": meta,
        "spec": body,
    }
    return [_headless_service(spec), job]


def render_pytorchjob(spec: JobSpec) -> list[Manifest]:
    """A Kubeflow ``PyTorchJob`` with Worker replicas only and an elastic c10d policy."""
    template = _pod_template(spec, "pytorch", restart_policy=None, subdomain=None)
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": spec.restart.max_restarts}
    if spec.scheduling.queue or spec.scheduling.priority:
        sched: dict[str, Any] = {}
        if spec.scheduling.queue:
            sched["queue"] = spec.scheduling.queue
        if spec.scheduling.priority:
            sched["priorityClass"] = spec.scheduling.priority
        run_policy["schedulingPolicy"] = sched
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _meta(spec),
        "spec": {
            "nprocPerNode": str(spec.nproc_per_node),
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "rdzvPort": spec.rendezvous.port,
                "minReplicas": spec.nodes.min,
                "maxReplicas": spec.nodes.max,
                "maxRestarts": spec.restart.max_restarts,
            },
            "pytorchReplicaSpecs": {
                "Worker": {"replicas": spec.nodes.max, "restartPolicy": "OnFailure", "template": template}
            },
            "runPolicy": run_policy,
        },
    }
    return [job]


# ``stalwart run`` exit codes that no pod restart can fix: 1 the job failed (another node closed the
# rendezvous), 2 usage error, 3 user error (the script failed the same way twice at start-up), 4 a
# pre- or post-train script failed (that node closed the rendezvous: a replacement could only find
# it closed). 75 (a sick node, or a rendezvous that timed out) and 76 (the agents' restart budget
# is spent) are the ladder's last rung: the pod is replaced, up to the job's backoff limit.
_FATAL_EXIT_CODES = [1, 2, 3, 4]


def _pod_failure_policy(container: str) -> dict[str, Any]:
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": container, "operator": "In", "values": _FATAL_EXIT_CODES},
            }
        ]
    }


def render_jobset(spec: JobSpec) -> list[Manifest]:
    """A ``JobSet`` with one indexed Job of ``nodes.max`` pods, reachable by DNS hostname."""
    n = spec.nodes.max
    template = _pod_template(spec, "stalwart", restart_policy="Never", subdomain=None)
    job_template = {
        "metadata": {"labels": _labels(spec)},
        "spec": {
            "completionMode": "Indexed",
            "completions": n,
            "parallelism": n,
            "backoffLimit": spec.restart.max_restarts,
            "podFailurePolicy": _pod_failure_policy("stalwart"),
            "template": template,
        },
    }
    jobset = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": _meta(spec),
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": spec.name, "publishNotReadyAddresses": True},
            "failurePolicy": {"maxRestarts": 0},
            "replicatedJobs": [{"name": "node", "replicas": 1, "template": job_template}],
        },
    }
    return [jobset]


def render_batch(spec: JobSpec) -> list[Manifest]:
    """An indexed ``batch/v1`` Job plus the headless Service that names its pods."""
    n = spec.nodes.max
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(spec),
        "spec": {
            "completionMode": "Indexed",
            "completions": n,
            "parallelism": n,
            "backoffLimit": spec.restart.max_restarts,
            "podFailurePolicy": _pod_failure_policy("stalwart"),
            "template": _pod_template(spec, "stalwart", restart_policy="Never", subdomain=spec.name),
        },
    }
    return [_headless_service(spec), job]


RENDERERS: dict[str, Callable[[JobSpec], list[Manifest]]] = {
    "hyperpod": render_hyperpod,
    "pytorchjob": render_pytorchjob,
    "jobset": render_jobset,
    "batch": render_batch,
}


def render(spec: JobSpec) -> list[Manifest]:
    """Every object ``spec`` needs on Kubernetes, in creation order (the store first, so that it
    is up before the nodes look for it; the flavour's main object last)."""
    store = _store_objects(spec) if _own_store(spec) else []
    return [*store, *RENDERERS[spec.kubernetes.flavour](spec)]
