"""Finding committed checkpoints and removing old ones (keep the last N and every K-th)."""

from __future__ import annotations

import logging

from stalwart.checkpoint.api import MANIFEST_NAME, Storage, parse_step_dir, step_dir

__all__ = ["apply_retention", "committed_steps", "plan_retention"]

logger = logging.getLogger(__name__)


def committed_steps(storage: Storage) -> tuple[list[int], list[int]]:
    """(committed, incomplete) step numbers in ``storage``, each ascending."""
    committed: list[int] = []
    incomplete: list[int] = []
    for name in storage.list(""):
        step = parse_step_dir(name)
        if step is None:
            continue
        (committed if storage.exists(f"{step_dir(step)}/{MANIFEST_NAME}") else incomplete).append(step)
    return sorted(committed), sorted(incomplete)


def plan_retention(committed: list[int], incomplete: list[int], keep_last: int, keep_every: int) -> list[int]:
    """The steps to delete: committed ones outside the keep rules, and crashed attempts.

    An incomplete directory older than the newest commit is a crashed attempt (saves commit in
    order); a newer one may be a save in progress and is left alone.
    """
    keep = set(committed[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        keep |= {s for s in committed if s % keep_every == 0}
    doomed = [s for s in committed if s not in keep]
    doomed += [s for s in incomplete if committed and s < committed[-1]]
    return sorted(doomed)


def apply_retention(
    storage: Storage, keep_last: int, keep_every: int = 0, *, dry_run: bool = False
) -> list[int]:
    """Delete what ``plan_retention`` names; the steps removed (or that would be)."""
    committed, incomplete = committed_steps(storage)
    doomed = plan_retention(committed, incomplete, keep_last, keep_every)
    if dry_run:
        return doomed
    removed = []
    for step in doomed:
        try:
            storage.delete(f"{step_dir(step)}/{MANIFEST_NAME}")  # uncommit first, then delete
            storage.delete(step_dir(step))
            removed.append(step)
        except Exception as exc:
            logger.warning("could not remove old checkpoint step %d: %s", step, exc)
    return removed
