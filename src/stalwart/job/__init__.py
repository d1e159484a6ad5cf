"""stalwart.job: submit, watch and manage fault-tolerant jobs, locally or on Kubernetes.

``Job.from_file("job.yaml").create()``; see ``stalwart.job.sdk``. Importing this package never
imports torch or the Kubernetes client.
"""

from stalwart.job.api import JobDescription, JobExists, JobNotFound, JobState, JobStatus, LogLine, NodeStatus
from stalwart.job.sdk import Job, get_backend
from stalwart.job.spec import JobSpec, SpecError, load_spec, parse_spec

__all__ = [
    "Job",
    "JobDescription",
    "JobExists",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "JobStatus",
    "LogLine",
    "NodeStatus",
    "SpecError",
    "get_backend",
    "load_spec",
    "parse_spec",
]
