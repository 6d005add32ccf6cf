"""The outbox's rows: the table, the item an outbox row stands for, and how a row is read.

``outbox.py`` owns the queue's operations; this module owns the format they share: the
``hybrid_outbox`` schema (and the columns added to older files), ``OutboxItem`` and
``OutboxStatus``, ``decode_item`` (a row, or ``ValueError`` naming what is unreadable) and
``lenient_item`` (an unreadable row shown as well as it can be), and ``rerun_key``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlite_file import parse_timestamp

MAX_ERROR_CHARS = 1000
MAX_KEY_CHARS = 200


class OutboxStatus(StrEnum):
    PENDING = "pending"
    DEAD = "dead"
    INDETERMINATE = "indeterminate"  # a dead letter that may have run: a person decides


DEAD_STATES = (OutboxStatus.DEAD.value, OutboxStatus.INDETERMINATE.value)


def rerun_key(key: str) -> str:
    """A fresh idempotency key for running ``key``'s action again: ``<key>~r1``, ``~r2`` …

    Derived, not random, so that the re-run itself is replayed under one key.
    """
    base, sep, count = key.rpartition("~r")
    if not (sep and count.isdigit()):
        base, count = key, "0"
    fresh = f"{base}~r{int(count) + 1}"
    if len(fresh) > MAX_KEY_CHARS:
        fresh = f"{hashlib.sha256(base.encode()).hexdigest()}~r{int(count) + 1}"
    return fresh


OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS hybrid_outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    action          TEXT NOT NULL,
    params_json     TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at      TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    status          TEXT NOT NULL DEFAULT 'pending',
    last_error      TEXT,
    updated_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS hybrid_outbox_status_seq ON hybrid_outbox (status, seq);
"""
# Added after the first release: an outbox file of an older version gets them when opened.
# not_before: Unix seconds before which the item is not sent (NULL: at once); pace_slot: the
# pacing slot booked for it (claimed when it is sent, released when it is cancelled).
ADDED_COLUMNS = {"not_before": "REAL", "pace_slot": "TEXT"}
OUTBOX_COLUMNS = (
    "id, seq, action, params_json, idempotency_key, created_at, attempts, status, last_error, "
    "not_before, pace_slot"
)
DUE = "status = 'pending' AND (not_before IS NULL OR not_before <= ?)"


@dataclass(frozen=True)
class OutboxItem:
    """One queued side-effect action."""

    id: str
    seq: int
    action: str
    params: dict[str, Any]
    idempotency_key: str
    created_at: datetime
    attempts: int
    status: OutboxStatus
    last_error: str | None
    not_before: datetime | None = None  # not sent before this (deferred or scheduled)
    pace_slot: str | None = None  # the pacing slot booked for it


def when(value: Any) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(float(value), UTC)


def decode_item(row: tuple[Any, ...]) -> OutboxItem:
    """Build an item from a row; raise ValueError naming what is unreadable."""
    item_id, seq, action, params_json, key, created_at, attempts, status, last_error = row[:9]
    try:
        params = json.loads(params_json)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"params_json is not valid JSON ({exc})") from None
    if not isinstance(params, dict):
        raise ValueError(f"params_json is a {type(params).__name__}, not an object")
    try:
        created = parse_timestamp(created_at)
        status_value = OutboxStatus(status)
        attempts_count = int(attempts)
        not_before = when(row[9])
    except (TypeError, ValueError, OverflowError, OSError) as exc:
        raise ValueError(str(exc)) from None
    return OutboxItem(
        id=str(item_id),
        seq=int(seq),
        action=str(action),
        params=params,
        idempotency_key=str(key),
        created_at=created,
        attempts=attempts_count,
        status=status_value,
        last_error=last_error,
        not_before=not_before,
        pace_slot=None if row[10] is None else str(row[10]),
    )


def lenient_item(row: tuple[Any, ...], reason: str) -> OutboxItem:
    """An unreadable row, shown as well as it can be (for the dead-letter list)."""
    item_id, seq, action, _params, key, created_at, attempts, status, last_error = row[:9]
    try:
        created = parse_timestamp(created_at)
    except (TypeError, ValueError):
        created = datetime.min.replace(tzinfo=UTC)
    try:
        status_value = OutboxStatus(status)
    except ValueError:
        status_value = OutboxStatus.DEAD
    try:
        attempts_count = int(attempts)
    except (TypeError, ValueError):
        attempts_count = 0
    return OutboxItem(
        id=str(item_id),
        seq=int(seq),
        action=str(action),
        params={},
        idempotency_key=str(key),
        created_at=created,
        attempts=attempts_count,
        status=status_value,
        last_error=last_error or reason,
    )
