"""The SQLite store, the default: embedded and persistent, one database file (WAL) shared by the
worker processes of one machine. Each admission and settlement is one `BEGIN IMMEDIATE`
transaction, so limits and budgets hold exactly across workers; changes reach the other
processes through a table each one reads every `POLL_S`."""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from app.auth.records import KeyRecord, TeamRecord
from app.limits.checks import Check, Reserve, Settlement, Verdict
from app.store import sqlite_limits as limits
from app.store import sqlite_schema as schema
from app.store import sqlite_tables as tables
from app.store.base import ChangeListener, LedgerBatch, StoreError, notify
from app.store.sqlite_thread import DbThread

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_S = 0.25  # how often each process reads the changes the others made
OPEN_TIMEOUT_S = 10.0  # at start, the first open may wait while another worker migrates the file
CLOSE_TIMEOUT_S = 2.0
_Asked = tuple[Reserve, "asyncio.Future[Verdict]"]


class SqliteStore:
    """Writes run on one thread and connection, in the order made: a settlement sent before an
    admission is applied before it, as on one Redis connection. Reads (records, reports, the
    change feed) run on another, beside the writes (WAL), so authentication never waits behind
    them. Every call answers within `timeout_s`, or fails with a `StoreError`."""

    def __init__(self, path: str | Path, timeout_s: float = 0.5) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._writer = DbThread(self.path, "sqlite-writer", schema.connect)
        self._reader = DbThread(self.path, "sqlite-reader", _connect_reader)
        self._origin = secrets.token_hex(8)  # marks this store's own changes, heard at once
        self._closed = False
        self._listeners: list[ChangeListener] = []
        self._follower: asyncio.Task[None] | None = None
        self._asked: list[_Asked] = []  # admissions asked for in this loop turn: one transaction
        self._releasing: set[asyncio.Future[Any]] = set()  # unused admissions being given back

    async def _write(self, job: Callable[..., T], *args: Any, late: Callable[[T], None] | None = None) -> T:
        return await self._writer.call(self.timeout_s, job, *args, late=late)

    async def _read(self, job: Callable[..., T], *args: Any) -> T:
        return await self._reader.call(self.timeout_s, job, *args)

    async def ping(self) -> None:
        await self._write(tables.ping)

    async def prepare(self) -> None:
        """Open the file (migrating it if need be) on both connections now, not on first use."""
        try:
            await self._writer.call(OPEN_TIMEOUT_S, tables.ping)
            await self._reader.call(OPEN_TIMEOUT_S, tables.ping)
        except StoreError as exc:
            log.warning("store not usable at start (%s); opening it again on first use", exc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.wait({self._follower}, timeout=CLOSE_TIMEOUT_S)
        await asyncio.gather(self._reader.close(CLOSE_TIMEOUT_S), self._writer.close(CLOSE_TIMEOUT_S))

    # -- teams and keys ------------------------------------------------------------------------
    async def create_team(self, team: TeamRecord) -> bool:
        return await self._write(tables.create_team, team.name, team.model_dump_json())

    async def get_team(self, name: str) -> TeamRecord | None:
        raw = await self._read(tables.get_team, name)
        return TeamRecord.model_validate_json(raw) if raw else None

    async def list_teams(self) -> list[TeamRecord]:
        return [TeamRecord.model_validate_json(raw) for raw in await self._read(tables.list_teams)]

    async def update_team(self, team: TeamRecord) -> bool:
        return await self._write(tables.update_team, team.name, team.model_dump_json())

    async def delete_team(self, name: str) -> bool:
        return await self._write(tables.delete_team, name)

    async def create_key(self, key: KeyRecord) -> str | None:
        return await self._write(tables.create_key, key.id, key.team, key.name, key.model_dump_json())

    async def get_key(self, key_id: str) -> KeyRecord | None:
        row = await self._read(tables.get_key, key_id)
        return _key(*row) if row else None

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]:
        keys = [_key(*row) for row in await self._read(tables.list_keys, team)]
        return sorted(keys, key=lambda k: k.created_at)

    async def update_key(self, key: KeyRecord, old_name: str) -> str | None:
        return await self._write(tables.update_key, key.id, key.team, key.name, old_name, key.model_dump_json())

    async def delete_key(self, key_id: str) -> bool:
        return await self._write(tables.delete_key, key_id)

    async def touch_keys(self, last_used: dict[str, datetime]) -> None:
        if last_used:
            await self._write(tables.touch_keys, [(_micros(when), key_id) for key_id, when in last_used.items()])

    # -- admission -----------------------------------------------------------------------------
    async def admit(self, checks: Sequence[Check], member: str, lease_ms: int, headroom: int = 1) -> Verdict:
        """Admissions asked for in one loop turn are judged in turn in one transaction."""
        loop = asyncio.get_running_loop()
        verdict: asyncio.Future[Verdict] = loop.create_future()
        if not self._asked:
            loop.call_soon(self._send_admissions)
        self._asked.append((Reserve(checks, member, lease_ms, headroom), verdict))
        return await verdict

    def _send_admissions(self) -> None:
        asked, self._asked = self._asked, []
        asks = [ask for ask, _ in asked]
        try:
            reply = self._writer.call(self.timeout_s, limits.admit, asks, late=partial(self._give_back, asks))
        except StoreError as exc:
            _fail(asked, exc)
            return
        reply.add_done_callback(partial(self._answer, asked))

    def _answer(self, asked: list[_Asked], reply: asyncio.Future[list[Verdict]]) -> None:
        """Each admission gets its verdict, or the batch's error (its deadline passed: then the
        transaction, if it still commits, is given back whole by `late`)."""
        error = StoreError(f"sqlite {self.path}: admission cancelled") if reply.cancelled() else reply.exception()
        if error is not None:
            _fail(asked, error)
            return
        gone: list[tuple[Reserve, Verdict]] = []
        for (ask, waiter), verdict in zip(asked, reply.result(), strict=True):
            if waiter.done():
                gone.append((ask, verdict))
            else:
                waiter.set_result(verdict)
        if gone:
            self._give_back([ask for ask, _ in gone], [verdict for _, verdict in gone])

    def _give_back(self, asks: Sequence[Reserve], verdicts: Sequence[Verdict]) -> None:
        """Release at once the admissions made for callers that gave up (their own, or their
        deadline passed while the transaction ran): nobody would settle them, and their slots
        and holds would wait for their leases to expire."""
        gone = [
            Settlement(c, ask.member, c.amount if c.kind == "tokens" else 0)
            for ask, verdict in zip(asks, verdicts, strict=True)
            if verdict.ok
            for c in ask.checks
        ]
        if gone and not self._closed:
            task = asyncio.ensure_future(self.settle(gone))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
            task.add_done_callback(_quietly)  # best effort: a lease still ends it

    async def settle(
        self, settlements: Sequence[Settlement], batch: str = "", reserve: Sequence[Reserve] = ()
    ) -> list[Verdict]:
        """A batch applied after its deadline is not applied again when sent again under its id;
        the reservations made with it are given back then."""
        if not settlements and not reserve:
            return []
        ahead = list(reserve)
        return await self._write(limits.settle, list(settlements), batch, ahead, late=partial(self._give_back, ahead))

    async def renew(self, leases: Sequence[tuple[Check, str]], lease_ms: int) -> None:
        if leases:
            await self._write(limits.renew, list(leases), lease_ms)

    async def budget_spent(self, check: Check) -> int:
        return await self._read(limits.budget_spent, check.name)

    async def sweep(self) -> int:
        """One process a minute drops what says nothing any more, in short transactions of a
        bounded number of rows each (a backlog never holds the write lock past a deadline)."""
        seen = await self._write(limits.sweep_turn)
        if seen is None:
            return 0  # another process's turn
        now = tables.now_ms()
        for table, key, column, cutoff in [*limits.expired(now), *tables.expired(now)]:
            while await self._write(tables.delete_expired, table, key, column, cutoff) == tables.DELETE_CHUNK:
                pass
        return seen

    # -- the usage ledger ----------------------------------------------------------------------
    async def ledger_apply(self, batch: LedgerBatch) -> None:
        await self._write(tables.ledger_apply, batch)

    async def ledger_read(self, days: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
        return await self._read(tables.ledger_read, days)

    # -- changes -------------------------------------------------------------------------------
    async def publish(self, change: str) -> None:
        try:
            await self._write(tables.publish, self._origin, change)
        finally:  # this process at once (if the write failed, at least its own cache is fresh)
            await notify(self._listeners, change)  # the others within POLL_S

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
        if self._follower is None:
            self._follower = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        """Hear the changes other processes made, for as long as the store is open. After any
        gap (a start, an error, a pause longer than the changes are kept) everything is stale."""
        cursor: int | None = None
        heard = time.monotonic()
        lost = False
        while not self._closed:
            try:
                if cursor is None or time.monotonic() - heard > tables.CHANGES_KEEP_MS / 2000:
                    cursor = await self._read(tables.last_change)
                    await notify(self._listeners, "*")
                for seq, origin, change in await self._read(tables.changes_after, cursor):
                    cursor = seq
                    if origin != self._origin:
                        await notify(self._listeners, change)
                heard = time.monotonic()
                if lost:
                    log.warning("change feed followed again")
                    lost = False
            except Exception as exc:  # the feed must outlive a store error and a listener's bug alike
                if not lost:
                    if isinstance(exc, StoreError):
                        log.warning("change feed unreadable (%s); retrying until it returns", exc)
                    else:
                        log.exception("a change listener failed; all caches dropped and the feed goes on")
                    lost = True
                cursor = None
            await asyncio.sleep(POLL_S)


def _connect_reader(path: Path, busy_s: float) -> sqlite3.Connection:
    db = schema.connect(path, busy_s)
    db.execute("PRAGMA query_only = 1")  # its calls only read: a write by mistake fails
    return db


def _key(raw: str, last_used_us: int | None) -> KeyRecord:
    key = KeyRecord.model_validate_json(raw)
    if last_used_us is not None:
        key.last_used_at = _EPOCH + timedelta(microseconds=last_used_us)
    return key


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(when: datetime) -> int:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(microseconds=1)


def _fail(asked: list[_Asked], exc: BaseException) -> None:
    """The batch's error to each admission: the store's (its policy applies), or a bug's, as it is
    (a bug must not pass for an outage, which rate limits answer by letting requests in)."""
    error = exc
    if not isinstance(exc, StoreError):
        log.error("admission failed on a bug, not on the store", exc_info=exc)
    for _, waiter in asked:
        if not waiter.done():
            waiter.set_exception(error)


def _quietly(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("releasing an abandoned admission failed: %s", task.exception())
