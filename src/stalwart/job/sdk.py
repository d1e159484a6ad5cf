"""The Python SDK: ``Job.from_file("job.yaml").create()``, ``Job.list()``, usable in a notebook.

The CLI is a thin layer over this module. A ``Job`` pairs a spec (or just a name, for a job that
already exists) with the backend it runs on::

    job = Job.from_file("job.yaml", overrides=["nodes=2"])
    job.create()
    for line in job.logs(follow=True):
        print(line.render())
    print(job.status().state)
    job.delete()
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stalwart.errors import JobError
from stalwart.job.api import Backend, JobDescription, JobStatus, LogLine
from stalwart.job.spec import JobSpec, SpecError, check_combinations, load_spec, parse_spec

__all__ = ["Job", "get_backend"]


def get_backend(
    name: str = "local",
    *,
    jobs_dir: str | Path | None = None,
    namespace: str | None = None,
    kubeconfig: str | None = None,
    context: str | None = None,
    flavour: str | None = None,
) -> Backend:
    """The backend called ``name`` ("local" or "kubernetes"), configured by the keyword options."""
    if name == "local":
        from stalwart.job.local import LocalBackend

        return LocalBackend(jobs_dir)
    if name == "kubernetes":
        from stalwart.job.kube import KubernetesBackend

        return KubernetesBackend(namespace=namespace, kubeconfig=kubeconfig, context=context, flavour=flavour)
    raise JobError(f"unknown backend {name!r}; use local or kubernetes")


class Job:
    """One job: its spec (when known), its name and the backend it lives on."""

    def __init__(
        self, spec: JobSpec | None = None, *, name: str | None = None, backend: Backend | None = None
    ):
        if spec is None and name is None:
            raise JobError("a Job needs a spec or the name of an existing job")
        if spec is not None:
            problems = check_combinations(spec)
            if problems:
                raise SpecError(problems)
        self.spec = spec
        self.name = spec.name if spec is not None else str(name)
        self.backend: Backend = backend if backend is not None else self._default_backend(spec)

    @staticmethod
    def _default_backend(spec: JobSpec | None) -> Backend:
        if spec is not None and spec.backend == "kubernetes":
            return get_backend(
                "kubernetes", namespace=spec.kubernetes.namespace, flavour=spec.kubernetes.flavour
            )
        return get_backend("local")

    @classmethod
    def from_file(
        cls, path: str | Path, overrides: Iterable[str] = (), backend: Backend | None = None
    ) -> Job:
        """Load, override (``FIELD=VALUE``) and validate a job spec file."""
        return cls(load_spec(path, overrides), backend=backend)

    @classmethod
    def from_dict(cls, data: dict[str, Any], backend: Backend | None = None) -> Job:
        return cls(parse_spec(data), backend=backend)

    @classmethod
    def get(cls, name: str, backend: Backend | None = None) -> Job:
        """An existing job by name; raises ``JobNotFound`` if the backend has no such job."""
        job = cls(name=name, backend=backend)
        job.status()
        return job

    @staticmethod
    def list(backend: Backend | None = None) -> list[JobStatus]:
        """Every job on ``backend`` (the local one by default)."""
        return (backend or get_backend("local")).list()

    def create(self) -> JobStatus:
        if self.spec is None:
            raise JobError(f"job {self.name!r} was opened by name; create needs a spec (Job.from_file)")
        return self.backend.create(self.spec)

    def status(self) -> JobStatus:
        return self.backend.status(self.name)

    def describe(self) -> JobDescription:
        return self.backend.describe(self.name)

    def logs(
        self, follow: bool = False, node: str | None = None, rank: int | None = None
    ) -> Iterator[LogLine]:
        return self.backend.logs(self.name, follow=follow, node=node, rank=rank)

    def events(self) -> list[dict[str, Any]]:
        return self.backend.events(self.name)

    def delete(self) -> None:
        self.backend.delete(self.name)

    def manifests(self) -> list[dict[str, Any]]:
        """The Kubernetes objects this job renders to (what ``create --dry-run`` prints)."""
        if self.spec is None:
            raise JobError("manifests need a spec")
        from stalwart.job.render import render

        return render(self.spec)

    def __repr__(self) -> str:
        return f"Job(name={self.name!r}, backend={self.backend.name!r})"
