"""The SQLite store's limits: `app/limits/windows.py` over the `buckets`, `leases` and `spend`
tables, each call one `BEGIN IMMEDIATE` transaction (concurrent workers see one order). The
rows a call needs are read in a few statements up front and its writes go in a few at the end:
a statement costs a few µs, more than the arithmetic around it (as a Redis call in Lua)."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator, Sequence

from app.limits import windows
from app.limits.checks import BUCKET_KINDS, Check, Reserve, Settlement, Verdict
from app.store.sqlite_tables import now_ms, transaction

CHUNK = 500  # names per IN (...): old SQLite builds take at most 999 variables a statement
SETTLED_KEEP_MS = 10 * 60_000  # settlement batch markers: a retry comes within seconds
SWEEP_EVERY_MS = 60_000

_ADD_SPENT = """
INSERT INTO spend (name, total, expires) VALUES (?1, ?2, ?3)
ON CONFLICT (name) DO UPDATE SET
  total = CASE WHEN expires <= ?4 THEN excluded.total ELSE total + excluded.total END,
  expires = CASE WHEN expires <= ?4 THEN excluded.expires ELSE expires END
"""


_HOLD = "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)"
_RELEASE = "DELETE FROM leases WHERE name = ? AND member = ?"


class Tables:
    """A `windows.LimitState` over an open transaction at one moment (`now`). What it has read
    it keeps, and keeps equal to what the tables will hold once `flush` writes its changes."""

    def __init__(self, db: sqlite3.Connection, now: int) -> None:
        self.db, self.now = db, now
        self._buckets: dict[str, tuple[float, int] | None] = {}
        self._held: dict[str, int] = {}
        self._spent: dict[str, int] = {}
        self._changed: set[str] = set()  # buckets to write
        self._leases: list[tuple[str, tuple[str, str, int, int] | tuple[str, str]]] = []  # in call order
        self._spends: list[tuple[str, int, int | None, int]] = []

    def load(self, checks: Sequence[Check]) -> None:
        """Read what judging `checks` needs, in a statement per table (after writing what is
        pending, so the reads see it)."""
        self.flush()
        self._read_buckets({c.name for c in checks if c.kind in BUCKET_KINDS} - self._buckets.keys())
        self._read_leases({c.name for c in checks if c.kind in ("concurrency", "budget")} - self._held.keys())
        self._read_spend({c.name for c in checks if c.kind == "budget"} - self._spent.keys())

    def _read_buckets(self, names: set[str]) -> None:
        self._buckets.update(dict.fromkeys(names))
        for chunk, marks in _chunks(names):
            for name, tokens, stamp in self.db.execute(f"SELECT * FROM buckets WHERE name IN ({marks})", chunk):
                self._buckets[name] = (tokens, stamp)

    def _read_leases(self, names: set[str]) -> None:
        """What each limit's leases hold, expired ones dropped first (as the memory store)."""
        self._held.update(dict.fromkeys(names, 0))
        for chunk, marks in _chunks(names):
            self.db.execute(f"DELETE FROM leases WHERE name IN ({marks}) AND expiry <= ?", [*chunk, self.now])
            sums = f"SELECT name, sum(weight) FROM leases WHERE name IN ({marks}) GROUP BY name"
            self._held.update(self.db.execute(sums, chunk).fetchall())

    def _read_spend(self, names: set[str]) -> None:
        self._spent.update(dict.fromkeys(names, 0))
        for chunk, marks in _chunks(names):
            live = f"SELECT name, total FROM spend WHERE name IN ({marks}) AND (expires IS NULL OR expires > ?)"
            self._spent.update(self.db.execute(live, [*chunk, self.now]).fetchall())

    def bucket(self, name: str) -> tuple[float, int] | None:
        if name not in self._buckets:
            self._read_buckets({name})
        return self._buckets[name]

    def set_bucket(self, name: str, tokens: float, stamp: int) -> None:
        self._buckets[name] = (tokens, stamp)
        self._changed.add(name)

    def held(self, name: str, now: int) -> int:
        if name not in self._held:
            self.flush()
            self._read_leases({name})
        return self._held[name]

    def hold(self, name: str, member: str, weight: int, expiry: int) -> None:
        self._leases.append((_HOLD, (name, member, expiry, weight)))
        if name in self._held:
            self._held[name] += weight  # members are unique: a new lease

    def release(self, name: str, member: str) -> None:
        self._leases.append((_RELEASE, (name, member)))
        self._held.pop(name, None)  # by how much is known once written: read again if needed

    def extend(self, name: str, member: str, expiry: int) -> None:
        self.flush()
        self.db.execute("UPDATE leases SET expiry = ? WHERE name = ? AND member = ?", (expiry, name, member))

    def spent(self, name: str, now: int) -> int:
        if name not in self._spent:
            self.flush()
            self._read_spend({name})
        return self._spent[name]

    def add_spent(self, name: str, value: int, ttl_s: int, now: int) -> None:
        """As Redis's INCRBY on a key given its TTL when made: an expired period starts anew."""
        self._spends.append((name, value, now + ttl_s * 1000 if ttl_s > 0 else None, now))
        self._spent.pop(name, None)

    def flush(self) -> None:
        db = self.db
        for statement, ops in itertools.groupby(self._leases, key=lambda op: op[0]):  # runs of one kind, in order
            db.executemany(statement, [row for _, row in ops])
        if self._spends:
            db.executemany(_ADD_SPENT, self._spends)
        if self._changed:
            rows = [(name, *bucket) for name in self._changed if (bucket := self._buckets[name]) is not None]
            db.executemany("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?)", rows)
        self._leases, self._spends = [], []
        self._changed.clear()


def _chunks(names: set[str]) -> Iterator[tuple[list[str], str]]:
    ordered = sorted(names)
    for start in range(0, len(ordered), CHUNK):
        chunk = ordered[start : start + CHUNK]
        yield chunk, ",".join("?" * len(chunk))


def _admit_all(state: Tables, asks: Sequence[Reserve]) -> list[Verdict]:
    state.load([check for ask in asks for check in ask.checks])
    return [windows.admit(state, a.checks, a.member, a.lease_ms, a.headroom, state.now) for a in asks]


def admit(db: sqlite3.Connection, asks: list[Reserve]) -> list[Verdict]:
    """Admissions judged in turn, each seeing the ones before it, in one transaction."""
    with transaction(db):
        state = Tables(db, now_ms())
        verdicts = _admit_all(state, asks)
        state.flush()
    return verdicts


def settle(db: sqlite3.Connection, items: list[Settlement], batch: str, reserve: list[Reserve]) -> list[Verdict]:
    """Settlements (at most once per non-empty `batch`), then the reservations sent with them."""
    with transaction(db):
        state = Tables(db, now_ms())
        if items and (not batch or _first_time(db, batch, state.now)):
            state.load([item.check for item in items if item.check.kind in BUCKET_KINDS])
            windows.settle(state, items, state.now)
        verdicts = _admit_all(state, reserve) if reserve else []
        state.flush()
    return verdicts


def _first_time(db: sqlite3.Connection, batch: str, now: int) -> bool:
    return bool(db.execute("INSERT OR IGNORE INTO settled VALUES (?, ?)", (batch, now)).rowcount)


def renew(db: sqlite3.Connection, leases: list[tuple[Check, str]], lease_ms: int) -> None:
    with transaction(db):
        now = now_ms()
        windows.renew(Tables(db, now), leases, lease_ms, now)


def budget_spent(db: sqlite3.Connection, name: str) -> int:
    state = Tables(db, now_ms())
    return state.spent(name, state.now)


def sweep_turn(db: sqlite3.Connection) -> int | None:
    """Whether it is this process's turn to sweep (one process a minute over all that share the
    file, as on Redis): then how many limits there are, else None."""
    with transaction(db):
        now = now_ms()
        turn = db.execute(
            "INSERT INTO marks VALUES ('sweep', ?1) ON CONFLICT (name) DO UPDATE SET at = ?1 WHERE at <= ?2",
            (now, now - SWEEP_EVERY_MS),
        ).rowcount
        if not turn:
            return None
        seen: int = db.execute(
            "SELECT (SELECT count(*) FROM buckets) + (SELECT count(DISTINCT name) FROM leases)"
        ).fetchone()[0]
    return seen


def expired(now: int) -> list[tuple[str, str, str, int]]:
    """What the limits keep no longer (idle buckets, expired leases and spends, old settlement
    markers): (table, key, column, cutoff)."""
    return [
        ("buckets", "name", "stamp", now - windows.IDLE_MS),
        ("leases", "name, member", "expiry", now),
        ("spend", "name", "expires", now),
        ("settled", "batch", "at", now - SETTLED_KEEP_MS),
    ]
