"""What the SQLite store's calls on records, the ledger and the change feed do to its file,
run on the store's threads (`app/store/sqlite.py`; the limits are `sqlite_limits.py`, the file
and its schema `sqlite_schema.py`)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator

from app.store.base import LedgerBatch

CHANGES_KEEP_MS = 60_000  # change rows older than this are pruned
# A ledger batch is sent again within a second of a try whose answer was lost, or when the store
# is back from an outage; a day covers both. (Under steady traffic a process writes ~4 a second:
# a week of markers, as Redis keeps, would be ~200 MB per process.)
LEDGER_BATCHES_KEEP_MS = 86_400_000
DELETE_CHUNK = 2000  # rows per pruning transaction: ~7 ms, well inside a call's deadline


def now_ms() -> int:
    """Wall-clock ms: every process sharing the file reads the same clock (monotonic is per boot
    and per process on some systems). Read inside a transaction, times follow commit order."""
    return int(time.time() * 1000)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction, holding the file's write lock from its start (BEGIN IMMEDIATE): what
    it reads no other process changes before it commits."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.rollback()
        raise
    db.execute("COMMIT")


def ping(db: sqlite3.Connection) -> None:
    db.execute("SELECT 1").fetchone()


# -- teams and keys --------------------------------------------------------------------------------
def create_team(db: sqlite3.Connection, name: str, record: str) -> bool:
    return db.execute("INSERT INTO teams VALUES (?, ?) ON CONFLICT DO NOTHING", (name, record)).rowcount == 1


def get_team(db: sqlite3.Connection, name: str) -> str | None:
    row = db.execute("SELECT record FROM teams WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def list_teams(db: sqlite3.Connection) -> list[str]:
    return [row[0] for row in db.execute("SELECT record FROM teams ORDER BY name")]


def update_team(db: sqlite3.Connection, name: str, record: str) -> bool:
    return db.execute("UPDATE teams SET record = ? WHERE name = ?", (record, name)).rowcount == 1


def delete_team(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("DELETE FROM teams WHERE name = ?", (name,)).rowcount == 1


_PUT_KEY = """
INSERT INTO keys (id, team, name, record) VALUES (?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET team = excluded.team, name = excluded.name, record = excluded.record
"""


def _holder(db: sqlite3.Connection, team: str, name: str) -> str | None:
    row = db.execute("SELECT id FROM keys WHERE team = ? AND name = ?", (team, name)).fetchone()
    return row[0] if row else None


def create_key(db: sqlite3.Connection, key_id: str, team: str, name: str, record: str) -> str | None:
    with transaction(db):
        holder = _holder(db, team, name)
        if holder is None:
            db.execute(_PUT_KEY, (key_id, team, name, record))
    return holder


def update_key(db: sqlite3.Connection, key_id: str, team: str, name: str, old_name: str, record: str) -> str | None:
    with transaction(db):
        if name != old_name:
            holder = _holder(db, team, name)
            if holder is not None and holder != key_id:
                return holder
        db.execute(_PUT_KEY, (key_id, team, name, record))
    return None


def get_key(db: sqlite3.Connection, key_id: str) -> tuple[str, int | None] | None:
    row: tuple[str, int | None] | None = db.execute(
        "SELECT record, last_used_us FROM keys WHERE id = ?", (key_id,)
    ).fetchone()
    return row


def list_keys(db: sqlite3.Connection, team: str | None) -> list[tuple[str, int | None]]:
    if team is None:
        return db.execute("SELECT record, last_used_us FROM keys").fetchall()
    return db.execute("SELECT record, last_used_us FROM keys WHERE team = ?", (team,)).fetchall()


def delete_key(db: sqlite3.Connection, key_id: str) -> bool:
    return db.execute("DELETE FROM keys WHERE id = ?", (key_id,)).rowcount == 1


def touch_keys(db: sqlite3.Connection, stamps: list[tuple[int, str]]) -> None:
    """Last-used times in µs, never moved back (as the memory store)."""
    with transaction(db):
        db.executemany("UPDATE keys SET last_used_us = max(coalesce(last_used_us, ?1), ?1) WHERE id = ?2", stamps)


# -- the usage ledger ------------------------------------------------------------------------------
def ledger_apply(db: sqlite3.Connection, batch: LedgerBatch) -> None:
    with transaction(db):
        if not db.execute("INSERT OR IGNORE INTO ledger_batches VALUES (?, ?)", (batch.id, now_ms())).rowcount:
            return  # applied before
        db.executemany(
            "INSERT INTO ledger VALUES (?, ?, ?) ON CONFLICT (day, field) DO UPDATE SET value = value + excluded.value",
            [(day, f"{group}|{measure}", delta) for day, group, measure, delta in batch.increments],
        )
        db.executemany("INSERT OR REPLACE INTO key_names VALUES (?, ?)", list(batch.key_names.items()))


def ledger_read(db: sqlite3.Connection, days: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    stored: dict[str, dict[str, int]] = {}
    if days:
        wanted = ",".join("?" * len(days))
        for day, name, value in db.execute(f"SELECT day, field, value FROM ledger WHERE day IN ({wanted})", days):
            stored.setdefault(day, {})[name] = value
    return stored, dict(db.execute("SELECT id, name FROM key_names").fetchall())


# -- changes ---------------------------------------------------------------------------------------
def publish(db: sqlite3.Connection, origin: str, change: str) -> None:
    db.execute("INSERT INTO changes (origin, change, at) VALUES (?, ?, ?)", (origin, change, now_ms()))


def last_change(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])


def changes_after(db: sqlite3.Connection, seq: int) -> list[tuple[int, str, str]]:
    rows: list[tuple[int, str, str]] = db.execute(
        "SELECT seq, origin, change FROM changes WHERE seq > ? ORDER BY seq", (seq,)
    ).fetchall()
    return rows


def delete_expired(db: sqlite3.Connection, table: str, key: str, column: str, cutoff: int) -> int:
    """Delete up to DELETE_CHUNK rows of `table` whose `column` is at most `cutoff`, in one short
    transaction (a backlog of millions after a long stop goes in many, never past a deadline);
    returns how many went."""
    with transaction(db):
        deleted: int = db.execute(
            f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {column} <= ? LIMIT ?)",
            (cutoff, DELETE_CHUNK),
        ).rowcount
    return deleted


def expired(now: int) -> list[tuple[str, str, str, int]]:
    """What the records, the ledger and the change feed keep no longer: (table, key, column, cutoff)."""
    return [
        ("ledger_batches", "id", "at", now - LEDGER_BATCHES_KEEP_MS),
        ("changes", "seq", "at", now - CHANGES_KEEP_MS),
    ]
