"""``stalwart ckpt ls|inspect|verify|gc URI``: readable tables of checkpoints, checks and cleanup."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from stalwart.checkpoint.api import MANIFEST_NAME, Manifest, Storage, step_dir
from stalwart.checkpoint.retention import apply_retention, committed_steps
from stalwart.checkpoint.storage import open_storage
from stalwart.errors import CheckpointCorrupt, CheckpointNotFound

__all__ = ["ckpt"]

_endpoint = click.option(
    "--endpoint-url", envvar="AWS_ENDPOINT_URL", default=None, help="S3 endpoint (SeaweedFS, MinIO...)."
)


def _open(uri: str, endpoint_url: str | None) -> Storage:
    options: dict[str, Any] = {"endpoint_url": endpoint_url} if endpoint_url and uri.startswith("s3") else {}
    return open_storage(uri, **options)


def _manifest(storage: Storage, step: int) -> Manifest:
    try:
        raw = storage.read(f"{step_dir(step)}/{MANIFEST_NAME}")
    except FileNotFoundError:
        raise CheckpointNotFound(
            f"step {step} has no committed checkpoint in {storage.uri}: see `stalwart ckpt ls`"
        ) from None
    try:
        return Manifest.from_json(raw)
    except ValueError as exc:
        raise CheckpointCorrupt(
            f"the manifest of step {step} in {storage.uri} is unreadable: {exc}"
        ) from None


def _pick(storage: Storage, step: int | None) -> int:
    committed, _ = committed_steps(storage)
    if step is not None:
        return step
    if not committed:
        raise CheckpointNotFound(f"no committed checkpoint in {storage.uri}")
    return committed[-1]


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@click.group()
def ckpt() -> None:
    """List, inspect, verify and clean checkpoints (a path, file:// or s3:// URI)."""


@ckpt.command("ls")
@click.argument("uri")
@_endpoint
def ls_command(uri: str, endpoint_url: str | None) -> None:
    """List the checkpoints under URI, newest last."""
    storage = _open(uri, endpoint_url)
    committed, incomplete = committed_steps(storage)
    table = Table(title=f"checkpoints in {storage.uri}")
    for column in ("step", "status", "world size", "files", "size", "saved at (UTC)"):
        table.add_column(
            column, justify="right" if column in ("step", "files", "size", "world size") else "left"
        )
    for step in sorted(committed + incomplete):
        if step in incomplete:
            table.add_row(str(step), "[yellow]incomplete[/]", "-", "-", "-", "-")
            continue
        try:
            m = _manifest(storage, step)
        except CheckpointCorrupt:
            table.add_row(str(step), "[red]bad manifest[/]", "-", "-", "-", "-")
            continue
        try:
            saved = dt.datetime.fromtimestamp(m.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        except (OverflowError, OSError, ValueError):  # a hand-made manifest: show the rest
            saved = "?"
        table.add_row(
            str(step),
            "[green]committed[/]",
            str(m.world_size),
            str(len(m.files)),
            _size(m.total_bytes),
            saved,
        )
    Console().print(table)


@ckpt.command("inspect")
@click.argument("uri")
@click.option("--step", type=int, default=None, help="Step to show (default: the newest committed).")
@_endpoint
def inspect_command(uri: str, step: int | None, endpoint_url: str | None) -> None:
    """Show one checkpoint's files, tensors and values."""
    storage = _open(uri, endpoint_url)
    m = _manifest(storage, _pick(storage, step))
    console = Console()
    console.print(f"step {m.step}  world size {m.world_size}  {_size(m.total_bytes)}  attempt {m.attempt}")
    files = Table(title="files")
    for column in ("file", "size", "crc32c"):
        files.add_column(column)
    for name, entry in sorted(m.files.items()):
        files.add_row(name, _size(entry.size), f"{entry.crc32c:08x}")
    console.print(files)
    tensors = Table(title="tensors")
    for column in ("path", "dtype", "global shape", "pieces", "bytes", "per rank"):
        tensors.add_column(column)
    for t in sorted(m.tensors, key=lambda t: (t.path, t.rank or 0)):
        tensors.add_row(
            "/".join(t.path),
            t.dtype,
            str(t.global_shape),
            str(len(t.chunks)),
            _size(sum(c.nbytes for c in t.chunks)),
            "-" if t.rank is None else str(t.rank),
        )
    console.print(tensors)
    if m.values and m.values[0]:
        console.print("values (rank 0): " + json.dumps(m.values[0], sort_keys=True)[:2000])


@ckpt.command("verify")
@click.argument("uri")
@click.option("--step", type=int, default=None, help="Verify only this step.")
@_endpoint
def verify_command(uri: str, step: int | None, endpoint_url: str | None) -> None:
    """Read every byte of the committed checkpoints and check sizes and checksums."""
    from stalwart.checkpoint.loader import Source, verify_source  # numpy and torch only here

    storage = _open(uri, endpoint_url)
    committed, _ = committed_steps(storage)
    steps = [step] if step is not None else committed
    if not steps:
        raise CheckpointNotFound(f"no committed checkpoint in {storage.uri}")
    table = Table(title=f"verify {storage.uri}")
    for column in ("step", "result", "problems"):
        table.add_column(column)
    bad = 0
    details: list[str] = []
    for s in steps:
        try:
            problems = verify_source(Source.from_manifest("durable", storage, _manifest(storage, s)))
        except CheckpointCorrupt as exc:
            problems = [str(exc)]
        bad += bool(problems)
        details += [f"step {s}: {p}" for p in problems]
        table.add_row(str(s), "[red]CORRUPT[/]" if problems else "[green]ok[/]", str(len(problems)))
    Console().print(table)
    for line in details:  # whole lines: paths are too long for a table cell
        click.echo(line)
    if bad:
        raise CheckpointCorrupt(
            f"{bad} of {len(steps)} checkpoints failed verification; the lines above name the files"
        )


@ckpt.command("gc")
@click.argument("uri")
@click.option("--keep-last", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--keep-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also keep steps divisible by this.",
)
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--memory-job", default=None, help="Also free this job's /dev/shm snapshots on this node.")
@click.option(
    "--uploads-older-than",
    type=click.FloatRange(min=0),
    default=24.0,
    show_default=True,
    help="S3: abort unfinished multipart uploads started this many hours ago (younger ones may be saves in progress).",
)
@_endpoint
def gc_command(
    uri: str,
    keep_last: int,
    keep_every: int,
    dry_run: bool,
    memory_job: str | None,
    uploads_older_than: float,
    endpoint_url: str | None,
) -> None:
    """Remove old checkpoints and crashed attempts (and stale S3 multipart uploads)."""
    storage = _open(uri, endpoint_url)
    removed = apply_retention(storage, keep_last, keep_every, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(removed)} checkpoint(s): {', '.join(map(str, removed)) or 'none'}")
    abort = getattr(storage, "abort_uploads", None)
    if abort is not None and not dry_run:
        n = abort(older_than_s=uploads_older_than * 3600)
        click.echo(f"aborted {n} unfinished multipart upload(s) older than {uploads_older_than:g} h")
    if memory_job and not dry_run:
        from stalwart.checkpoint.memory import remove_job

        remove_job(memory_job)
        click.echo(f"freed the memory tier of job {memory_job}")
