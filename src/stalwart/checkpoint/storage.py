"""Pick a storage backend from a URI: ``s3://bucket/prefix``, ``file:///path`` or a plain path."""

from __future__ import annotations

from typing import Any

from fsspec.utils import infer_storage_options

from stalwart.checkpoint.api import Storage
from stalwart.checkpoint.storage_posix import PosixStorage
from stalwart.errors import ConfigError

__all__ = ["open_storage"]


def open_storage(uri: str, *, threads: int = 2, **s3_options: Any) -> Storage:
    """The ``Storage`` for ``uri``. Extra keyword arguments go to ``S3Storage``."""
    if not uri:
        raise ConfigError("a checkpoint URI is empty: pass a directory, file:///path or s3://bucket/prefix")
    options = infer_storage_options(uri)
    protocol = options["protocol"]
    if protocol == "file":
        return PosixStorage(options["path"], threads=threads)
    if protocol in ("s3", "s3a"):
        from stalwart.checkpoint.storage_s3 import S3Storage  # boto3 only when needed

        return S3Storage(uri, threads=max(threads, 8), **s3_options)
    raise ConfigError(
        f"checkpoint URI {uri!r} has an unsupported scheme {protocol!r}: use a path, file:// or s3://"
    )
