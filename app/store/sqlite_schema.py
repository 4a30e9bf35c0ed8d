"""The SQLite store's file: creating it for its owner's eyes only, opening it in WAL mode, and
its schema, brought up to date by migrations applied in order from the file's own version.

Durability: WAL with `synchronous=NORMAL`. A commit is in the WAL file when it returns, so a
killed process (even `kill -9`) loses nothing it committed; only an OS crash or a power cut can
undo the last commits before the next checkpoint. `FULL` would add an fsync to every admission
and settlement.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

# Marks a file as ours (`PRAGMA application_id`, "ORGW"): a database of another application,
# named by mistake, is refused instead of getting our tables added to it.
APPLICATION_ID = 0x4F524757
WAL_RETRY_S = 0.005

_V1 = """
CREATE TABLE teams (name TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE keys (
  id TEXT PRIMARY KEY, team TEXT NOT NULL, name TEXT NOT NULL, record TEXT NOT NULL,
  last_used_us INTEGER, UNIQUE (team, name)
) WITHOUT ROWID;
CREATE TABLE buckets (name TEXT PRIMARY KEY, tokens REAL NOT NULL, stamp INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE leases (
  name TEXT NOT NULL, member TEXT NOT NULL, expiry INTEGER NOT NULL, weight INTEGER NOT NULL,
  PRIMARY KEY (name, member)
) WITHOUT ROWID;
CREATE INDEX leases_by_expiry ON leases (name, expiry);
CREATE TABLE spend (name TEXT PRIMARY KEY, total INTEGER NOT NULL, expires INTEGER) WITHOUT ROWID;
CREATE TABLE settled (batch TEXT PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX settled_by_age ON settled (at);
CREATE TABLE ledger (
  day TEXT NOT NULL, field TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (day, field)
) WITHOUT ROWID;
CREATE TABLE ledger_batches (id TEXT PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX ledger_batches_by_age ON ledger_batches (at);
CREATE TABLE key_names (id TEXT PRIMARY KEY, name TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE changes (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, origin TEXT NOT NULL, change TEXT NOT NULL, at INTEGER NOT NULL
)
"""


def _statements(script: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in script.split(";") if s.strip())


# MIGRATIONS[n] takes a file from schema version n to n + 1 (its statements, in order). Append
# only: a file at version n gets MIGRATIONS[n:] in one transaction, so an upgrade is all or nothing.
Migration = Sequence[str]
# v2: whose turn it is to sweep (one process a minute), and leases found by expiry alone.
_V2 = """
CREATE TABLE marks (name TEXT PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX leases_by_age ON leases (expiry);
CREATE INDEX spend_by_age ON spend (expires);
CREATE INDEX buckets_by_age ON buckets (stamp)
"""
MIGRATIONS: tuple[Migration, ...] = (_statements(_V1), _statements(_V2))


class SchemaError(sqlite3.DatabaseError):
    """The file is not a database of ours that this gateway can use."""


def connect(path: Path, busy_s: float, migrations: Sequence[Migration] = MIGRATIONS) -> sqlite3.Connection:
    """Open in WAL mode (creating the directory and the file if missing) with the schema brought
    up to date; waits at most `busy_s` for another process's lock."""
    _create(path)
    db = sqlite3.connect(path, timeout=busy_s, isolation_level=None)
    try:
        _use_wal(db, time.monotonic() + busy_s)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN")  # its three reads in one snapshot: never another process's migration half seen
        try:
            current = _version(db, len(migrations))
        finally:
            db.execute("COMMIT")
        if current < len(migrations):  # read first: no write lock when up to date
            migrate(db, migrations)
    except BaseException:
        db.close()
        raise
    return db


def _use_wal(db: sqlite3.Connection, deadline: float) -> None:
    """WAL mode (once set, it stays with the file). Setting it on a new file that another
    connection is opening too fails at once, the busy timeout notwithstanding: try again."""
    while True:
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(WAL_RETRY_S)
    if mode != "wal":  # e.g. some network file systems
        raise sqlite3.OperationalError(f"cannot use WAL mode here (journal mode {mode})")


def _create(path: Path) -> None:
    """The directory (0700) and the file (0600) if missing: spend and key names are for the
    owner's eyes only. SQLite gives the -wal and -shm files the database file's mode. What
    exists already, made by the user, is left as it is."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def migrate(db: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> None:
    """Apply the migrations the file lacks, all in one write transaction (a file another process
    has just brought up to date gets none)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = _version(db, len(migrations))
        for migration in migrations[version:]:
            for statement in migration:
                db.execute(statement)
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")  # also on a file made before the marker
        db.execute(f"PRAGMA user_version = {len(migrations)}")
    except BaseException:
        db.rollback()
        raise
    db.execute("COMMIT")


def _version(db: sqlite3.Connection, latest: int) -> int:
    """The file's schema version (0: a new, empty file); SchemaError if it is not ours or newer
    than this gateway knows."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    owner = int(db.execute("PRAGMA application_id").fetchone()[0])
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    # Files of schema 1 were made before the marker: ours if they hold our tables.
    legacy = owner == 0 and version == 1 and {"teams", "keys", "changes"} <= tables
    if owner != APPLICATION_ID and not legacy and (tables or version or owner):
        raise SchemaError(
            "not a database of this gateway (it holds another application's tables); "
            "name a new file with GATEWAY_STORE or GATEWAY_DATA_DIR"
        )
    if version > latest:
        raise SchemaError(
            f"made by a newer gateway (schema version {version}; this one knows up to {latest}): "
            "run that version, or a newer one, on it"
        )
    return version
