"""Validate rendered manifests the way an API server with strict field validation would.

Core objects: kubernetes-validate --strict (the published OpenAPI of Kubernetes 1.33) and the
official client's pydantic models. Custom resources: their published CRD schemas (schemas/),
made strict the way the API server prunes unknown fields, and the pod templates inside them again
through kubernetes-validate.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from kubernetes import client

SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.33"

_MODELS = {
    "Job": client.V1Job,
    "Service": client.V1Service,
    "Deployment": client.V1Deployment,
    "PodTemplate": client.V1PodTemplate,
}


def _strict(schema: Any) -> Any:
    """Forbid unknown fields in every object schema that does not preserve them (structural CRDs)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_schema(name: str, version: str) -> dict[str, Any]:
    data = json.loads((SCHEMAS / f"{name}.crd.schema.json").read_text())
    return _strict(data["versions"][version])


@functools.cache
def hyperpod_spec_schema() -> dict[str, Any]:
    return json.loads((SCHEMAS / "hyperpodpytorchjob.spec.schema.json").read_text())


def _errors(validator: jsonschema.protocols.Validator, instance: Any) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    ]


def validate_core(obj: dict[str, Any]) -> list[str]:
    """Problems kubernetes-validate --strict and the client models find in a core object."""
    problems = []
    try:
        kubernetes_validate.validate(copy.deepcopy(obj), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        problems.append(f"kubernetes-validate: {exc.message}")
    model = _MODELS.get(obj["kind"])
    if model is not None:
        try:
            model.model_validate(obj)
        except Exception as exc:  # pydantic.ValidationError
            problems.append(f"{model.__name__}: {exc}")
    return problems


def validate_pod_template(template: dict[str, Any]) -> list[str]:
    return validate_core(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    )


def validate_manifest(obj: dict[str, Any]) -> list[str]:
    """Every problem found in one rendered object, whatever its kind."""
    kind = obj.get("kind")
    if kind == "PyTorchJob":
        problems = _errors(jsonschema.Draft7Validator(crd_schema("pytorchjob", "v1")), obj)
        for name, rs in obj["spec"]["pytorchReplicaSpecs"].items():
            problems += [f"{name}: {p}" for p in validate_pod_template(rs["template"])]
        return problems
    if kind == "JobSet":
        problems = _errors(jsonschema.Draft7Validator(crd_schema("jobset", "v1alpha2")), obj)
        for rj in obj["spec"]["replicatedJobs"]:
            problems += [
                f"{rj['name']}: {p}" for p in validate_pod_template(rj["template"]["spec"]["template"])
            ]
        return problems
    if kind == "HyperPodPyTorchJob":
        problems = []
        if obj.get("apiVersion") != "sagemaker.amazonaws.com/v1":
            problems.append(f"apiVersion {obj.get('apiVersion')!r}")
        extra = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
        if extra:
            problems.append(f"unknown top-level fields {sorted(extra)}")
        spec_schema = hyperpod_spec_schema()
        unknown = set(obj["spec"]) - set(spec_schema["properties"])
        if unknown:
            problems.append(f"spec: unknown fields {sorted(unknown)}")
        problems += _errors(jsonschema.Draft202012Validator(spec_schema), obj["spec"])
        for rs in obj["spec"]["replicaSpecs"]:
            problems += [f"{rs['name']}: {p}" for p in validate_pod_template(rs["template"])]
        return problems
    return validate_core(obj)
