"""Rendered Kubernetes manifests validate against published schemas and run ``stalwart run``."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jinja2
import jsonschema
import pytest
import yaml
from k8s_validate import SCHEMAS, validate_manifest

from stalwart.job.render import LABEL_JOB, endpoint, render
from stalwart.job.spec import FLAVOURS, parse_spec

MINIMAL = {
    "apiVersion": "stalwart.dev/v1",
    "name": "tiny",
    "backend": "kubernetes",
    "image": "stalwart:cpu",
    "script": "train.py",
}


def _spec(data: dict[str, Any], flavour: str) -> Any:
    return parse_spec({**data, "kubernetes": {"flavour": flavour, "namespace": "ml"}})


def _pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    kind = obj["kind"]
    if kind == "HyperPodPyTorchJob":
        return [rs["template"] for rs in obj["spec"]["replicaSpecs"]]
    if kind == "PyTorchJob":
        return [rs["template"] for rs in obj["spec"]["pytorchReplicaSpecs"].values()]
    if kind == "JobSet":
        return [rj["template"]["spec"]["template"] for rj in obj["spec"]["replicatedJobs"]]
    if kind == "Job":
        return [obj["spec"]["template"]]
    return []


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("which", ["full", "minimal"])
def test_every_rendered_object_validates_against_its_published_schema(
    flavour: str, which: str, full_spec: dict[str, Any]
) -> None:
    spec = _spec(full_spec if which == "full" else MINIMAL, flavour)
    objects = render(spec)
    assert objects
    for obj in objects:
        assert validate_manifest(obj) == [], obj["kind"]
        assert obj["metadata"]["labels"][LABEL_JOB] == spec.name
        assert obj["metadata"]["namespace"] == "ml"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_validators_reject_an_unknown_field_in_each_flavour(
    flavour: str, full_spec: dict[str, Any]
) -> None:
    objects = render(_spec(full_spec, flavour))
    main = objects[-1]
    bad = copy.deepcopy(main)
    _pod_templates(bad)[0]["spec"]["containers"][0]["portz"] = [1]
    assert any("portz" in p for p in validate_manifest(bad))
    bad = copy.deepcopy(main)
    bad["spec"]["replicaz"] = 3
    assert any("replicaz" in p for p in validate_manifest(bad))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_pod_runs_stalwart_run_with_the_flavours_rendezvous(
    flavour: str, full_spec: dict[str, Any]
) -> None:
    spec = _spec(full_spec, flavour)
    templates = [t for obj in render(spec) for t in _pod_templates(obj)]
    assert len(templates) == 1
    container = templates[0]["spec"]["containers"][0]
    args = list(container["args"])
    assert container["command"] == ["stalwart", "run"]
    args.remove("--log-events")  # pods print their recovery events: describe reads them from the log
    pairs = list(zip(args[:-5:2], args[1:-5:2], strict=True))
    flags = dict(pairs)
    assert flags["--nnodes"] == "2:4"
    assert flags["--nproc-per-node"] == "8"
    assert flags["--rdzv-backend"] == "c10d"
    assert flags["--rdzv-id"] == "llama-ft"
    assert flags["--max-restarts"] == "5"
    assert flags["--rdzv-endpoint"] == endpoint(spec)
    # the script and its arguments come last, verbatim: no shell ever parses them
    assert args[-5:] == ["/workspace/examples/train.py", "--lr", "3e-4", "--name", "a b; rm -rf /"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STALWART_CHECKPOINT_URI"] == "/fsx/llama-ft"
    assert env["STALWART_CHECKPOINT_MIRRORS"] == "s3://bucket/llama-ft"
    assert env["NCCL_DEBUG"] == "INFO"
    rules = [json.loads(v) for k, v in pairs if k == "--log-rule"]
    assert rules[1] == {
        "name": "tflops",
        "logPattern": r".*TFLOPs: (\d+).*",
        "metricThreshold": 100,
        "operator": "lt",
    }
    assert flags["--hang-floor"] == "300"
    # the agent names itself after its pod: the kubelet expands $(STALWART_NODE) from the env
    assert flags["--node-name"] == "$(STALWART_NODE)"
    assert {"name": "STALWART_NODE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container[
        "env"
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["limits"]["vpc.amazonaws.com/efa"] == "32"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/fsx", "/data", "/dev/shm"}
    assert templates[0]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] == "ml.p5.48xlarge"


@pytest.mark.parametrize(
    ("flavour", "host"),
    [
        ("hyperpod", "llama-ft-pod-0.llama-ft"),
        ("pytorchjob", "llama-ft-worker-0"),
        ("jobset", "llama-ft-node-0-0.llama-ft"),
        ("batch", "llama-ft-0.llama-ft"),
    ],
)
def test_with_store_first_node_the_rendezvous_host_is_the_first_pods_dns_name(
    flavour: str, host: str, full_spec: dict[str, Any]
) -> None:
    spec = _spec({**full_spec, "rendezvous": {"store": "first-node"}}, flavour)
    assert endpoint(spec) == f"{host}:29400"
    objects = render(spec)
    assert not [o for o in objects if o["kind"] == "Deployment"]
    args = _pod_templates(objects[-1])[0]["spec"]["containers"][0]["args"]
    # the first pod hosts it (torch's hostname match decides); replacements may be slow to come
    assert args[args.index("--rdzv-conf") + 1] == "join_timeout=1800"
    if "." in host:  # a pod hostname under a subdomain: something must publish that subdomain
        services = [o for o in objects if o["kind"] == "Service"]
        jobsets = [o for o in objects if o["kind"] == "JobSet"]
        if services:
            assert services[0]["spec"]["clusterIP"] == "None"
            assert services[0]["metadata"]["name"] == host.split(".")[1]
            assert _pod_templates(objects[-1])[0]["spec"]["subdomain"] == host.split(".")[1]
        else:
            assert jobsets[0]["spec"]["network"] == {
                "enableDNSHostnames": True,
                "subdomain": "llama-ft",
                "publishNotReadyAddresses": True,
            }
    override = _spec({**full_spec, "rendezvous": {"endpoint": "etcd.infra:2379"}}, flavour)
    assert "etcd.infra:2379" in _pod_templates(render(override)[-1])[0]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_by_default_the_rendezvous_store_has_a_pod_of_its_own_and_every_node_is_a_client(
    flavour: str, full_spec: dict[str, Any]
) -> None:
    spec = _spec(full_spec, flavour)
    objects = render(spec)
    service, deployment = objects[0], objects[1]
    assert (service["kind"], deployment["kind"]) == ("Service", "Deployment")  # up before the nodes
    assert service["metadata"]["name"] == deployment["metadata"]["name"] == "llama-ft-rdzv"
    assert endpoint(spec) == "llama-ft-rdzv:29400"
    assert service["spec"]["ports"] == [{"name": "rdzv", "port": 29400, "targetPort": 29400}]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    assert pod_labels["stalwart.dev/role"] == "rdzv-store"
    assert not any(k.startswith("kueue.x-k8s.io") for k in pod_labels)  # not queued with the job
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    store = pod["containers"][0]
    assert store["command"] == ["stalwart", "rdzv-store", "29400"]  # as the nodes run `stalwart run`
    assert store["image"] == full_spec["image"]
    assert "nvidia.com/gpu" not in json.dumps(store["resources"])
    assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == "ml.p5.48xlarge"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for template in _pod_templates(objects[-1]):
        args = template["spec"]["containers"][0]["args"]
        assert args[args.index("--rdzv-conf") + 1] == "join_timeout=1800,is_host=0,read_timeout=300"
        assert args[args.index("--rdzv-endpoint") + 1] == "llama-ft-rdzv:29400"
    explicit = render(_spec({**full_spec, "rendezvous": {"endpoint": "etcd.infra:2379"}}, flavour))
    assert not [o for o in explicit if o["kind"] == "Deployment"]


@pytest.mark.parametrize("flavour", ["jobset", "batch"])
def test_exit_codes_no_pod_restart_can_fix_fail_the_job_at_once(
    flavour: str, full_spec: dict[str, Any]
) -> None:
    job = render(_spec(full_spec, flavour))[-1]
    job_spec = job["spec"] if flavour == "batch" else job["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job_spec["podFailurePolicy"]["rules"] == [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "stalwart", "operator": "In", "values": [1, 2, 3, 4]},
        }
    ]
    assert job_spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy


def _hyp_config(spec: Any) -> dict[str, Any]:
    """What a user would pass to `hyp create hyp-pytorch-job` for the same job."""
    container = _pod_templates(render(spec)[-1])[0]["spec"]["containers"][0]
    return {
        "job_name": spec.name,
        "image": spec.image,
        "namespace": spec.kubernetes.namespace,
        "command": container["command"],
        "args": container["args"],
        "environment": dict(spec.env),
        "instance_type": spec.scheduling.instance_type,
        "replica_count": spec.nodes.max,
        "tasks_per_node": str(spec.nproc_per_node),
        "label_selector": spec.scheduling.node_selector,
        "queue_name": spec.scheduling.queue,
        "priority": spec.scheduling.priority,
        "accelerators": spec.resources.gpus,
        "accelerators_limit": spec.resources.gpus,
        "vcpu": float(spec.resources.cpu),
        "memory": float(spec.resources.memory.removesuffix("Gi")),
        "memory_limit": float(spec.resources.memory.removesuffix("Gi")),
        "efa": spec.resources.efa,
        "efa_limit": spec.resources.efa,
        "max_retry": spec.restart.max_restarts,
        "service_account_name": spec.scheduling.service_account,
        "preferred_topology": spec.scheduling.topology.preferred,
        "volume": [
            {"name": v.name, "type": "pvc", "mount_path": v.mount_path, "claim_name": v.pvc}
            if v.pvc
            else {"name": v.name, "type": "hostPath", "mount_path": v.mount_path, "path": v.host_path}
            for v in spec.volumes
        ],
    }


def _norm(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(v))
    return (float(m.group(1)), m.group(2)) if m else v


def _covers(theirs: Any, ours: Any, path: str = "") -> list[str]:
    """Paths where ``ours`` lacks or disagrees with a value ``theirs`` sets."""
    if isinstance(theirs, dict):
        if not isinstance(ours, dict):
            return [f"{path}: not a mapping"]
        return [
            p
            for k, v in theirs.items()
            for p in (_covers(v, ours[k], f"{path}.{k}") if k in ours else [f"{path}.{k}: missing"])
        ]
    if isinstance(theirs, list):
        if theirs and isinstance(theirs[0], dict) and "name" in theirs[0]:
            by_name = {o.get("name"): o for o in ours}
            return [p for t in theirs for p in _covers(t, by_name.get(t["name"]), f"{path}[{t['name']}]")]
        return [] if theirs == ours[: len(theirs)] else [f"{path}: {theirs!r} != {ours!r}"]
    return [] if _norm(theirs) == _norm(ours) else [f"{path}: {theirs!r} != {ours!r}"]


def test_hyperpod_manifest_contains_everything_hyp_renders_for_the_same_job(
    full_spec: dict[str, Any],
) -> None:
    full_spec.pop("spares")  # hyp 1.1 has no flag for spares; stalwart adds replicaSpecs[].spares
    full_spec["nodes"] = 4  # hyp renders elastic bounds only through its elastic_* flags
    spec = _spec(full_spec, "hyperpod")
    config = _hyp_config(spec)
    hyp_schema = json.loads((SCHEMAS / "hyp-pytorch-job-config-v1_1.schema.json").read_text())
    # hyp's schema.json spells number as "float"; teach the validator that one word.
    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "float", lambda _c, v: isinstance(v, int | float) and not isinstance(v, bool)
    )
    validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)
    validator(hyp_schema).validate(config)  # a valid `hyp` input
    template = jinja2.Environment().from_string((SCHEMAS / "hyp-pytorch-job-v1_1.yaml.j2").read_text())
    theirs = yaml.safe_load(template.render(**config))
    ours = render(spec)[-1]
    assert theirs["kind"] == ours["kind"] == "HyperPodPyTorchJob"
    assert _covers(theirs, ours) == []
    assert validate_manifest(ours) == []
    # and the comparison has teeth: drop what hyp sets and it notices
    worse = copy.deepcopy(ours)
    del worse["spec"]["replicaSpecs"][0]["template"]["spec"]["nodeSelector"]["pool"]
    worse["spec"]["runPolicy"]["jobMaxRetryCount"] = 1
    assert len(_covers(theirs, worse)) == 2


def test_hyperpod_log_rules_become_log_monitoring_configuration(full_spec: dict[str, Any]) -> None:
    job = render(_spec(full_spec, "hyperpod"))[-1]
    rules = job["spec"]["runPolicy"]["logMonitoringConfiguration"]
    assert rules == [
        {"name": "heartbeat", "logPattern": ".*loss.*", "expectedRecurringFrequencyInSeconds": 600},
        {"name": "tflops", "logPattern": r".*TFLOPs: (\d+).*", "metricThreshold": 100, "operator": "lt"},
    ]
    assert job["spec"]["replicaSpecs"][0]["spares"] == 1
    assert job["spec"]["elasticPolicy"] == {"minReplicas": 2, "maxReplicas": 4}


def test_stalwart_run_accepts_the_rendered_command_line(full_spec: dict[str, Any]) -> None:
    from stalwart.health.config import build_monitors
    from stalwart.launcher.args import parse

    spec = _spec(full_spec, "jobset")
    args = _pod_templates(render(spec)[-1])[0]["spec"]["containers"][0]["args"]
    assert "$(STALWART_NODE)" in args
    # The kubelet expands $(VAR) references from the container's env before the command runs.
    ns = parse([a.replace("$(STALWART_NODE)", "train-worker-0-0-x7k2p") for a in args])
    assert ns.node_name == "train-worker-0-0-x7k2p"
    assert (ns.nnodes, ns.nproc_per_node, ns.rdzv_endpoint) == ("2:4", "8", endpoint(spec))
    assert (ns.training_script, ns.training_script_args) == (spec.script, list(spec.args))
    assert ns.hang_floor == 300.0
    assert build_monitors(ns)  # the log rules parse as the health package reads them
