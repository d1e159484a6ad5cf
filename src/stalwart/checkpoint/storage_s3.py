"""S3 storage through boto3: parallel multipart uploads, parallel ranged GETs, conditional commits.

Data files go up as multipart uploads of ``part_size`` parts, ``threads`` at a time (aborted on
failure so no orphaned parts stay billed); reads are ranged GETs of ``part_size`` in parallel.
botocore's standard retry mode retries 500/503/SlowDown and throttling with exponential backoff.
Commit records use ``If-None-Match: *`` when ``exclusive``: S3 (and SeaweedFS) then refuse to
overwrite an existing manifest, the object-store equivalent of an atomic create.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from stalwart.checkpoint.api import cancel_and_wait
from stalwart.errors import CheckpointCorrupt, CheckpointError, ConfigError

__all__ = ["S3Storage"]

_T = TypeVar("_T")

_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}


class S3Storage:
    """A ``Storage`` under ``s3://bucket/prefix``."""

    def __init__(
        self,
        uri: str,
        *,
        threads: int = 8,
        part_size: int = 32 << 20,
        endpoint_url: str | None = None,
        client: Any = None,
        max_attempts: int = 8,
        **client_kwargs: Any,
    ) -> None:
        if not uri.startswith(("s3://", "s3a://")):
            raise ConfigError(f"{uri!r} is not an s3:// URI")
        bucket, _, prefix = uri.split("://", 1)[1].partition("/")
        if len(bucket) < 3:
            raise ConfigError(f"S3 bucket name {bucket!r} in {uri!r} is too short (3-63 characters)")
        if part_size < 5 << 20:
            raise ConfigError(f"S3 part_size={part_size} is below S3's 5 MiB minimum part")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.part_size = part_size
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max(10, threads * 2),
            connect_timeout=10,
            read_timeout=120,
        )
        self._s3 = client or boto3.client("s3", endpoint_url=endpoint_url, config=config, **client_kwargs)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="stalwart-s3")
        self._window = 2 * max(1, threads)  # transfers in flight or queued: bounds the part copies
        self._call("head_bucket", self.uri, Bucket=bucket)

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def _call(self, op: str, what: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._s3, op)(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",) or (op == "head_bucket" and status == 404):
                raise CheckpointError(
                    f"S3 bucket {self.bucket!r} does not exist: create it or fix the URI"
                ) from None
            if code in _DENIED or status == 403:
                raise CheckpointError(
                    f"access to {what} was denied ({code}): check the AWS credentials and the bucket policy"
                ) from None
            if code in _MISSING or status == 404:
                raise FileNotFoundError(what) from None
            if code in ("PreconditionFailed", "412") or status == 412:
                raise FileExistsError(what) from None
            if code == "InvalidRange" or status == 416:
                raise CheckpointCorrupt(f"{what} is truncated: a ranged read went past its end") from None
            raise CheckpointError(f"S3 {op} on {what} failed: {code or status}: {exc}") from None
        except NoCredentialsError:
            raise CheckpointError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
            ) from None
        except EndpointConnectionError as exc:
            raise CheckpointError(f"cannot reach the S3 endpoint for {what}: {exc}") from None
        except BotoCoreError as exc:
            raise CheckpointError(f"S3 {op} on {what} failed: {exc}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def write(self, path: str, buffers: Sequence[memoryview]) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(v) for v in views)
        key = self._key(path)
        what = f"s3://{self.bucket}/{key}"
        if total <= self.part_size:
            self._call("put_object", what, Bucket=self.bucket, Key=key, Body=_gather(views, 0, total))
            return
        upload = self._call("create_multipart_upload", what, Bucket=self.bucket, Key=key)["UploadId"]
        try:
            ranges = [
                (i + 1, start, min(start + self.part_size, total))
                for i, start in enumerate(range(0, total, self.part_size))
            ]

            def upload_part(number: int, start: int, end: int) -> dict[str, Any]:
                body = _gather(views, start, end)  # copied here: only the parts in flight exist
                part = self._call(
                    "upload_part",
                    what,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload,
                    PartNumber=number,
                    Body=body,
                )
                return {"PartNumber": number, "ETag": part["ETag"]}

            parts = self._in_parallel(lambda r=r: upload_part(*r) for r in ranges)
            self._call(
                "complete_multipart_upload",
                what,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            try:
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            except Exception:
                pass  # the bucket's lifecycle rule (or `stalwart ckpt gc`) removes it later
            raise

    def write_atomic(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        key = self._key(path)
        extra = {"IfNoneMatch": "*"} if exclusive else {}
        self._call("put_object", f"s3://{self.bucket}/{key}", Bucket=self.bucket, Key=key, Body=data, **extra)

    def read(self, path: str) -> bytes:
        key = self._key(path)
        return self._call("get_object", f"s3://{self.bucket}/{key}", Bucket=self.bucket, Key=key)[
            "Body"
        ].read()

    def read_into(self, path: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        key = self._key(path)
        what = f"s3://{self.bucket}/{key}"
        ranges = []
        for offset, buf in requests:
            view = memoryview(buf).cast("B")
            ranges += [
                (offset + i, view[i : i + self.part_size]) for i in range(0, len(view), self.part_size)
            ]
        self._in_parallel(lambda r=r: self._get_range(key, what, *r) for r in ranges)

    def _in_parallel(self, tasks: Iterable[Callable[[], _T]]) -> list[_T]:
        """Run ``tasks`` on the pool, at most ``_window`` at a time; their results in order. The
        first failure is raised once no task runs any more: none still writes into a buffer the
        caller reuses (a load falls back to an older checkpoint into the same tensors), and no
        part is still uploading when the upload is aborted."""
        results: list[_T] = []
        running: deque[Future[_T]] = deque()
        try:
            for task in tasks:
                if len(running) >= self._window:
                    results.append(running.popleft().result())
                running.append(self._pool.submit(task))
            while running:
                results.append(running.popleft().result())
        except BaseException:
            cancel_and_wait(running)
            raise
        return results

    def _get_range(self, key: str, what: str, offset: int, view: memoryview) -> None:
        end = offset + len(view) - 1
        body = self._call("get_object", what, Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{end}")[
            "Body"
        ]
        data = body.read()
        if len(data) != len(view):
            raise CheckpointCorrupt(
                f"{what} is truncated: wanted {len(view)} bytes at {offset}, got {len(data)}"
            )
        view[:] = data

    def list(self, prefix: str = "") -> list[str]:
        base = self._key(prefix).rstrip("/")
        base = f"{base}/" if base else ""
        names: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self._call(
                "list_objects_v2",
                f"s3://{self.bucket}/{base}",
                Bucket=self.bucket,
                Prefix=base,
                Delimiter="/",
                **token,
            )
            names += [p["Prefix"][len(base) :] for p in page.get("CommonPrefixes", [])]
            names += [o["Key"][len(base) :] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(n for n in names if n)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def exists(self, path: str) -> bool:
        key = self._key(path)
        try:
            self._call("head_object", f"s3://{self.bucket}/{key}", Bucket=self.bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    def delete(self, prefix: str) -> None:
        key = self._key(prefix).rstrip("/")
        keys = [key]
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", key, Bucket=self.bucket, Prefix=key + "/", **token)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                break
            token = {"ContinuationToken": page["NextContinuationToken"]}
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self._call("delete_objects", key, Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def abort_uploads(self, prefix: str = "", older_than_s: float = 24 * 3600, page_size: int = 1000) -> int:
        """Abort multipart uploads under ``prefix`` started more than ``older_than_s`` ago (left
        by crashed saves; younger ones may belong to a save in progress); how many were aborted."""
        key = self._key(prefix)
        cutoff = time.time() - older_than_s
        marker: dict[str, str] = {}
        aborted = 0
        while True:
            page = self._call(
                "list_multipart_uploads", key, Bucket=self.bucket, Prefix=key, MaxUploads=page_size, **marker
            )
            for up in page.get("Uploads", []):
                started = up.get("Initiated")
                if started is not None and started.timestamp() > cutoff:
                    continue
                self._call(
                    "abort_multipart_upload",
                    up["Key"],
                    Bucket=self.bucket,
                    Key=up["Key"],
                    UploadId=up["UploadId"],
                )
                aborted += 1
            # back exactly the markers the server gave: S3 pages by key then upload id, SeaweedFS
            # by upload id alone (it sends no NextKeyMarker)
            following = {
                name: page[f"Next{name}"]
                for name in ("KeyMarker", "UploadIdMarker")
                if page.get(f"Next{name}")
            }
            if not page.get("IsTruncated") or not following or following == marker:
                return aborted
            marker = following


def _gather(views: Sequence[memoryview], start: int, end: int) -> bytes:
    """The bytes [start, end) of the concatenation of ``views``, copied once."""
    pieces = []
    pos = 0
    for view in views:
        lo, hi = max(start, pos), min(end, pos + len(view))
        if lo < hi:
            pieces.append(view[lo - pos : hi - pos])
        pos += len(view)
        if pos >= end:
            break
    return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)
