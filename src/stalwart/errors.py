"""The stalwart error hierarchy.

Every error a user can cause (bad flags, configs, manifests, checkpoints, unreachable storage)
is a ``StalwartError`` whose message names the problem and the fix. The CLI prints it without a
traceback and exits non-zero.
"""

from __future__ import annotations

__all__ = [
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointNotFound",
    "ConfigError",
    "GracefulExit",
    "HealthProbeError",
    "JobError",
    "JobSubmitError",
    "SignalReceived",
    "StalwartError",
]


class StalwartError(Exception):
    """Base of every error stalwart raises on purpose."""

    exit_code: int = 2


class ConfigError(StalwartError):
    """Raised when a flag, config file or environment variable is invalid."""


class CheckpointError(StalwartError):
    """Raised when a checkpoint cannot be saved or loaded."""


class CheckpointNotFound(CheckpointError):
    """Raised when no complete checkpoint exists where one was required."""


class CheckpointCorrupt(CheckpointError):
    """Raised when a checkpoint file is missing, truncated or fails its checksum."""


class HealthProbeError(StalwartError):
    """Raised when a health probe (NVML, sysfs, a log stream) cannot be read."""


class JobError(StalwartError):
    """Raised when a job spec is invalid or a job operation fails."""


class JobSubmitError(JobError):
    """Raised when a job cannot be submitted to its backend."""


class GracefulExit(StalwartError):
    """Raised to unwind on a requested stop. Not a failure."""

    exit_code = 0


class SignalReceived(StalwartError):
    """Raised in the agent when it receives a termination signal."""

    def __init__(self, sigval: int) -> None:
        super().__init__(f"received signal {sigval}")
        self.sigval = sigval
