"""The job spec: one versioned YAML file, validated once, overridable field by field.

``load_spec(path, overrides)`` reads the file, applies ``path=value`` overrides (``--set``),
validates, and raises ``SpecError`` listing every problem with its field path. Field names are
snake_case; only ``apiVersion`` follows the Kubernetes spelling.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stalwart.agent.policy import ladder_from_names
from stalwart.errors import JobError

__all__ = [
    "API_VERSION",
    "FLAVOURS",
    "MAX_NAME_LEN",
    "RUNGS",
    "JobSpec",
    "SpecError",
    "apply_overrides",
    "check_combinations",
    "load_spec",
    "parse_spec",
]

API_VERSION = "stalwart.dev/v1"
FLAVOURS = ("hyperpod", "pytorchjob", "jobset", "batch")
# The agent's restart rungs (stalwart.agent.policy.Rung), spelled here so that the job package
# never imports the agent; a test checks that the two agree.
RUNGS = ("in_process", "startup_retry", "restart_workers", "exit")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# DNS-1035: a job's name also names Services, which must start with a letter
_JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
# Pod hostnames are "<job>-node-<i>-<j>" (JobSet) and must stay within 63 characters.
MAX_NAME_LEN = 40


class SpecError(JobError):
    """Raised when a job spec is invalid; ``problems`` holds ``(field path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "job spec") -> None:
        self.problems = problems
        lines = "\n".join(f"  {path or '(top level)'}: {msg}" for path, msg in problems)
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}\n{lines}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Nodes(_Model):
    """How many nodes the job runs on: ``min`` to ``max`` (elastic when they differ)."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("use a node count such as 2, or a range MIN:MAX such as 1:4")
        if isinstance(v, int):
            return {"min": v, "max": v}
        if isinstance(v, str):
            lo, sep, hi = v.partition(":")
            try:
                a = int(lo)
                b = int(hi) if sep else a
            except ValueError:
                raise ValueError(
                    f"{v!r} is not a node count such as 2 or a range MIN:MAX such as 1:4"
                ) from None
            return {"min": a, "max": b}
        return v

    @model_validator(mode="after")
    def _order(self) -> Nodes:
        if self.max < self.min:
            raise ValueError(f"max nodes ({self.max}) is below min nodes ({self.min}); write MIN:MAX")
        return self

    def __str__(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}:{self.max}"


class Resources(_Model):
    """Per-node resources. ``gpus`` and ``efa`` are device counts; cpu and memory are quantities."""

    gpus: int = Field(0, ge=0)
    efa: int = Field(0, ge=0)
    cpu: str | None = None
    memory: str | None = None
    shm: str | None = "8Gi"

    @field_validator("cpu", "memory", "shm")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not _QUANTITY.match(str(v)):
            raise ValueError(f"{v!r} is not a Kubernetes quantity such as 8, 500m or 64Gi")
        return v


class Volume(_Model):
    """A volume mounted on every node: a host path, or a PVC (FSx for Lustre, EFS...)."""

    name: str
    mount_path: str
    host_path: str | None = None
    pvc: str | None = None
    read_only: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > 63:
            raise ValueError(f"{v!r} is not a DNS label (lower-case letters, digits and '-')")
        return v

    @field_validator("mount_path")
    @classmethod
    def _abs(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r} must be an absolute path")
        return v.rstrip("/") or "/"

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        if (self.host_path is None) == (self.pvc is None):
            raise ValueError("set exactly one of host_path or pvc")
        return self


class Checkpoint(_Model):
    """Where workers save and resume: a local path, ``file://``, ``s3://`` or an FSx mount path,
    and further tiers that keep a copy of every checkpoint (``mirrors``, e.g. an S3 prefix)."""

    uri: str | None = None
    mirrors: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _mirrors(self) -> Checkpoint:
        if self.mirrors and not self.uri:
            raise ValueError("mirrors need a uri: set checkpoint.uri to the first (fastest) tier")
        for m in self.mirrors:
            if not m or "," in m:
                raise ValueError(f"mirror {m!r} must be a non-empty location without commas")
        where = [self.uri, *self.mirrors]
        if len(set(where)) != len(where):
            raise ValueError(f"checkpoint.uri and mirrors repeat a location: {where}")
        return self


class Restart(_Model):
    """The restart budget and which rungs of the agent's ladder are enabled, in order."""

    max_restarts: int = Field(3, ge=0)
    ladder: tuple[Literal["in_process", "startup_retry", "restart_workers", "exit"], ...] = (
        "startup_retry",
        "restart_workers",
        "exit",
    )


class LogRule(_Model):
    """A log rule (HyperPod ``logMonitoringConfiguration`` semantics, snake_case)."""

    name: str
    log_pattern: str
    expected_start_cutoff_s: int | None = Field(None, ge=1)
    expected_recurring_frequency_s: int | None = Field(None, ge=1)
    stop_pattern: str | None = None
    metric_threshold: float | None = None
    operator: Literal["gt", "lt", "eq", "gteq", "lteq"] | None = None
    metric_evaluation_data_points: int | None = Field(None, ge=1)
    fault_on_match: bool = False

    @field_validator("log_pattern", "stop_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _metric(self) -> LogRule:
        if (self.metric_threshold is None) != (self.operator is None):
            raise ValueError("metric_threshold and operator go together: set both or neither")
        return self


class Health(_Model):
    """Health rules: the hang timeout and log rules the agents apply."""

    hang_timeout_s: float | None = Field(None, gt=0)
    log_rules: tuple[LogRule, ...] = ()


class Topology(_Model):
    """Kueue topology-aware placement: a node label all pods prefer or must share."""

    preferred: str | None = None
    required: str | None = None


class Scheduling(_Model):
    """Where pods may go and how they queue (Kubernetes only)."""

    queue: str | None = None
    priority: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    instance_type: str | None = None
    topology: Topology = Field(default_factory=Topology)
    scheduler_name: str | None = None
    service_account: str | None = None


class Kubernetes(_Model):
    """Kubernetes submission: which object kind renders the job, and where."""

    flavour: Literal["hyperpod", "pytorchjob", "jobset", "batch"] = "jobset"
    namespace: str = "default"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None


class Rendezvous(_Model):
    """The c10d rendezvous: its port, where its store runs on Kubernetes, and an explicit endpoint
    when the default cannot work.

    ``store: pod`` (the default) serves the store from a pod of its own (``<job>-rdzv``: a
    Deployment and a Service), so that any node can be replaced; ``first-node`` has the first
    pod's agent host it, as torchrun does (replacing that pod then fails the job). Kubernetes
    only: local jobs always give the store a process of its own. Ignored with ``endpoint``.
    """

    port: int = Field(29400, ge=1, le=65535)
    endpoint: str | None = None
    store: Literal["pod", "first-node"] = "pod"
    join_timeout_s: int = Field(1800, ge=1)
    """How long nodes wait for each other at a rendezvous (torch: 600 s): at the start, and for a
    replacement node, which on a cluster may need a new instance first. A node that waits longer
    asks to be replaced (exit 75) and leaves the rendezvous open."""


class JobSpec(_Model):
    """The blueprint of a job: what to run, on how many nodes, how to keep it running."""

    api_version: Literal["stalwart.dev/v1"] = Field(alias="apiVersion")
    kind: Literal["Job"] = "Job"
    name: str
    backend: Literal["local", "kubernetes"] = "local"
    image: str | None = None
    script: str
    args: tuple[str, ...] = ()
    nodes: Nodes = Field(default_factory=lambda: Nodes(min=1, max=1))
    nproc_per_node: int = Field(1, ge=1)
    resources: Resources = Field(default_factory=Resources)
    volumes: tuple[Volume, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    restart: Restart = Field(default_factory=Restart)
    health: Health = Field(default_factory=Health)
    spares: int = Field(0, ge=0)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    kubernetes: Kubernetes = Field(default_factory=Kubernetes)
    rendezvous: Rendezvous = Field(default_factory=Rendezvous)
    fault: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _JOB_NAME.match(v):
            raise ValueError(
                f"{v!r} is not a valid job name: use lower-case letters, digits and '-', "
                "starting with a letter and ending with a letter or digit"
            )
        if len(v) > MAX_NAME_LEN:
            raise ValueError(f"{v!r} is longer than {MAX_NAME_LEN} characters")
        return v

    @field_validator("script")
    @classmethod
    def _script(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the training script is empty; set script: path/to/train.py")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not _ENV_NAME.match(k)]
        if bad:
            raise ValueError(f"not valid environment variable names: {', '.join(map(repr, bad))}")
        return {k: str(val) for k, val in v.items()}

    @field_validator("fault")
    @classmethod
    def _fault(cls, v: str | None) -> str | None:
        if v:
            from stalwart.worker.faults import parse_faults

            try:
                parse_faults(v)
            except JobError as exc:  # pragma: no cover - parse_faults raises ConfigError
                raise ValueError(str(exc)) from None
            except Exception as exc:
                raise ValueError(str(exc).removeprefix("stalwart: ")) from None
        return v or None

    def dump(self) -> dict[str, Any]:
        """The spec as plain data, in file form (``apiVersion`` spelled as in the file)."""
        d = self.model_dump(mode="json", by_alias=True)
        d["nodes"] = str(self.nodes)
        return d


def check_combinations(spec: JobSpec) -> list[tuple[str, str]]:
    """Problems no single field shows: impossible combinations, with the field path to fix."""
    problems: list[tuple[str, str]] = []
    gpus = spec.resources.gpus
    if gpus and spec.nproc_per_node > gpus:
        problems.append(
            (
                "nproc_per_node",
                f"{spec.nproc_per_node} processes per node but resources.gpus is {gpus}; "
                "lower nproc_per_node or raise resources.gpus",
            )
        )
    seen_paths: dict[str, int] = {}
    seen_names: dict[str, int] = {}
    for i, vol in enumerate(spec.volumes):
        if vol.mount_path in seen_paths:
            problems.append(
                (
                    f"volumes[{i}].mount_path",
                    f"{vol.mount_path} is already mounted by volumes[{seen_paths[vol.mount_path]}]; "
                    "give each volume its own mount_path",
                )
            )
        seen_paths.setdefault(vol.mount_path, i)
        if vol.name in seen_names:
            problems.append(
                (f"volumes[{i}].name", f"{vol.name!r} is already used by volumes[{seen_names[vol.name]}]")
            )
        seen_names.setdefault(vol.name, i)
        if spec.resources.shm and vol.mount_path == "/dev/shm":
            problems.append(
                (
                    f"volumes[{i}].mount_path",
                    "/dev/shm is mounted by stalwart (resources.shm); set resources.shm: null to mount your own",
                )
            )
    if spec.backend == "kubernetes" and not spec.image:
        problems.append(("image", "required for the kubernetes backend; set image: REGISTRY/IMAGE:TAG"))
    try:
        ladder_from_names(spec.restart.ladder)
    except ValueError as exc:
        problems.append(("restart.ladder", str(exc)))
    return problems


def _path(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part:  # pydantic's validator frames, e.g. "function-after[...]"
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", ""))
    if kind == "extra_forbidden":
        return "unknown field; check its spelling against `stalwart job init`'s job.yaml"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return msg.replace("Input should be", "must be one of")
    msg = msg.removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{msg} (got {err.get('input')!r})"
    return msg


def parse_spec(data: Any, source: str = "job spec") -> JobSpec:
    """Validate plain data into a ``JobSpec``; raises ``SpecError`` listing every problem."""
    if not isinstance(data, Mapping):
        raise SpecError([("", f"expected a mapping of fields, got {type(data).__name__}")], source)
    version = data.get("apiVersion")
    if version is not None and version != API_VERSION:
        raise SpecError(
            [("apiVersion", f"unsupported version {version!r}; this stalwart reads {API_VERSION!r}")], source
        )
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = [(_path(err["loc"]), _message(err)) for err in exc.errors()]
        raise SpecError(problems, source) from None
    problems = check_combinations(spec)
    if problems:
        raise SpecError(problems, source)
    return spec


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without base-60 integers, so that ``nodes: 2:4`` stays the string "2:4"."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:int"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _coerce(text: str) -> Any:
    try:
        return _yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to ``data``; returns a new dict.

    ``env.KEY=VALUE`` sets one variable; list items are addressed by index (``volumes.0.name=x``).
    """
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise SpecError([(path or item, "an override must be FIELD=VALUE, e.g. nodes=2 or env.FOO=bar")])
        keys = path.split(".")
        cur: Any = out
        for i, key in enumerate(keys[:-1]):
            if isinstance(cur, list) and key.isdigit() and int(key) >= len(cur):
                raise SpecError(
                    [(".".join(keys[: i + 1]), f"there is no item {key}: the list has {len(cur)}")]
                )
            nxt = cur[int(key)] if isinstance(cur, list) and key.isdigit() else None
            if isinstance(cur, dict):
                nxt = cur.setdefault(key, {})
            if not isinstance(nxt, dict | list):
                raise SpecError(
                    [(".".join(keys[: i + 1]), "cannot set a field inside a value that is not a mapping")]
                )
            cur = nxt
        last = keys[-1]
        value = raw if keys[0] == "env" or path in ("name", "image", "script") else _coerce(raw)
        if isinstance(cur, list) and last.isdigit():
            if int(last) > len(cur):
                raise SpecError(
                    [(path, f"there is no item {last}: the list has {len(cur)} (add item {len(cur)})")]
                )
            if int(last) == len(cur):
                cur.append(value)
            else:
                cur[int(last)] = value
        else:
            cur[last] = value
    return out


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> JobSpec:
    """Read, override and validate a job spec file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise JobError(f"{p}: no such job spec; create one with `stalwart job init`") from None
    except OSError as exc:
        raise JobError(f"{p}: cannot read the job spec: {exc.strerror}") from None
    try:
        data = _yaml(text)
    except yaml.YAMLError as exc:
        raise SpecError([("", f"not valid YAML: {exc}")], str(p)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([("", f"expected a mapping of fields, got {type(data).__name__}")], str(p))
    return parse_spec(apply_overrides(data, overrides), str(p))
