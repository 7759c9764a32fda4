"""The snapshot and restore state machines: `status_transition()` is the only code that changes the status
of a Snapshot or a SnapshotRestore (as instances.states.transition is for instances).

One conditional UPDATE: rows move only from a status that allows the target, so a re-delivered task or a
sweep acting on a stale read changes nothing. A backup or restore that a sweep gave up on (its worker
looked dead) and that finishes after all still counts: restic has it.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from snapshots.models import Snapshot, SnapshotRestore

S, R = Snapshot.Status, SnapshotRestore.Status
TRANSITIONS: dict[type, dict[str, frozenset[str]]] = {
    Snapshot: {
        S.PENDING: frozenset({S.RUNNING, S.FAILED}),
        # running again: its previous worker died mid-backup
        S.RUNNING: frozenset({S.RUNNING, S.VERIFIED, S.FAILED}),
        S.VERIFIED: frozenset({S.DELETED}),
        S.FAILED: frozenset({S.VERIFIED, S.DELETED}),
        S.DELETED: frozenset(),
    },
    SnapshotRestore: {
        R.PENDING: frozenset({R.RUNNING, R.FAILED}),
        R.RUNNING: frozenset({R.RUNNING, R.SUCCEEDED, R.FAILED}),
        R.SUCCEEDED: frozenset(),
        R.FAILED: frozenset({R.SUCCEEDED}),
    },
}


def status_transition(rows: QuerySet, target: str, **fields: Any) -> int:
    """Move these rows (of Snapshot or SnapshotRestore) to `target`, each only from a status that allows it,
    setting `fields` in the same UPDATE. Returns how many moved."""
    allowed = [status for status, targets in TRANSITIONS[rows.model].items() if target in targets]
    return rows.filter(status__in=allowed).update(status=target, **fields)
