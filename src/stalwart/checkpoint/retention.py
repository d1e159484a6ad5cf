"""Finding committed checkpoints and removing old ones (keep the last N and every K-th)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

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


def plan_retention(
    committed: list[int],
    incomplete: list[int],
    keep_last: int,
    keep_every: int,
    *,
    newest: int | None = None,
    superseded: frozenset[int] = frozenset(),
) -> list[int]:
    """The steps to delete: committed ones outside the keep rules, and crashed attempts.

    ``newest`` is the step just committed (default: the newest committed step). Saves commit in
    order, so an incomplete directory below it is a crashed attempt, and one above it may be a
    save in progress. Committed steps above it are another timeline's (a run that resumed from an
    older step, because the newer ones were damaged, or a new run in an old directory): they are
    neither counted nor deleted here. ``superseded``: steps the resumed run skipped on load; once
    it has saved past one, it is deleted.
    """
    if newest is None:
        newest = committed[-1] if committed else -1
    current = [s for s in committed if s <= newest and not (s in superseded and s < newest)]
    keep = set(current[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        keep |= {s for s in current if s % keep_every == 0}
    doomed = [s for s in current if s not in keep]
    doomed += [s for s in committed if s in superseded and s < newest]
    doomed += [s for s in incomplete if s < newest]
    return sorted(doomed)


_warned_ahead: set[tuple[str, tuple[int, ...]]] = set()


def apply_retention(
    storage: Storage,
    keep_last: int,
    keep_every: int = 0,
    *,
    newest: int | None = None,
    superseded: frozenset[int] = frozenset(),
    ours: Callable[[], Collection[int]] = frozenset,
    dry_run: bool = False,
) -> list[int]:
    """Delete what ``plan_retention`` names; the steps removed (or that would be). Committed steps
    above ``newest`` that are neither ``superseded`` nor in ``ours()`` (the steps this run
    committed, asked after the listing: a purge can run after later saves) are named in a
    warning, once."""
    committed, incomplete = committed_steps(storage)
    mine = ours()
    ahead = tuple(
        s for s in committed if newest is not None and s > newest and s not in superseded and s not in mine
    )
    if ahead and (storage.uri, ahead) not in _warned_ahead:
        _warned_ahead.add((storage.uri, ahead))
        logger.warning(
            "checkpoint steps %s in %s are newer than step %s just saved and were not loaded by this "
            "run: load_latest prefers them after a restart. If they belong to an earlier run, remove "
            "them (or save this run elsewhere)",
            list(ahead),
            storage.uri,
            newest,
        )
    doomed = plan_retention(
        committed, incomplete, keep_last, keep_every, newest=newest, superseded=superseded
    )
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
