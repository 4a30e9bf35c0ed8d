"""The SQLite store, the default: embedded and persistent, one database file (WAL) shared by the
worker processes of one machine. Each admission and settlement is one `BEGIN IMMEDIATE`
transaction, so limits and budgets hold exactly across workers; changes reach the other
processes through a table each one reads every `POLL_S`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from app.auth.records import KeyRecord, TeamRecord
from app.limits.checks import Check, Reserve, Settlement, Verdict
from app.store import sqlite_limits as limits
from app.store import sqlite_tables as tables
from app.store.base import ChangeListener, LedgerBatch, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_S = 0.25  # how often each process reads the changes the others made
OPEN_TIMEOUT_S = 10.0  # the first open may wait while another worker creates the schema
CLOSE_TIMEOUT_S = 2.0
_Asked = tuple[Reserve, "asyncio.Future[Verdict]"]


class SqliteStore:
    """Every call runs on the store's own thread, on its own connection, in the order made:
    sqlite3 blocks, and the event loop must not. A settlement sent before an admission is
    applied before it, as on one Redis connection."""

    def __init__(self, path: str | Path, timeout_s: float = 0.5) -> None:
        self.path = Path(path)
        self._busy_ms = int(timeout_s * 1000)  # how long a write waits for another process's
        self._origin = secrets.token_hex(8)  # marks this store's own changes, heard at once
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None  # opened on the store's thread, used only there
        self._closed = False
        self._listeners: list[ChangeListener] = []
        self._follower: asyncio.Task[None] | None = None
        self._asked: list[_Asked] = []  # admissions asked for in this loop turn: one transaction
        self._releasing: set[asyncio.Future[Any]] = set()  # abandoned admissions being released

    # -- the store's thread --------------------------------------------------------------------
    def _submit(self, job: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue `job(db, *args)` on the store's thread now; jobs run in the order queued."""
        if self._closed:
            raise StoreError(f"sqlite {self.path}: the store is closed")
        return asyncio.get_running_loop().run_in_executor(self._executor, self._call, job, args)

    async def _run(self, job: Callable[..., T], *args: Any) -> T:
        return await self._submit(job, *args)

    def _call(self, job: Callable[..., T], args: tuple[Any, ...]) -> T:
        """On the store's thread: the one place sqlite3's errors become `StoreError`."""
        try:
            if self._db is None:
                self._db = tables.connect(self.path, OPEN_TIMEOUT_S, self._busy_ms)
            return job(self._db, *args)
        except (sqlite3.Error, OSError) as exc:
            if self._db is not None and self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.rollback()
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    def _close_db(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()  # the last connection to close checkpoints the WAL into the file

    async def ping(self) -> None:
        await self._run(tables.ping)

    async def prepare(self) -> None:
        """Open the file and create the schema now, not on the first request."""
        try:
            await self._run(tables.ping)
        except StoreError as exc:
            log.warning("store not usable at start (%s); opening it again on first use", exc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.wait({self._follower}, timeout=CLOSE_TIMEOUT_S)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(sqlite3.Error):
            await loop.run_in_executor(self._executor, self._close_db)
        self._executor.shutdown(wait=False)

    # -- teams and keys ------------------------------------------------------------------------
    async def create_team(self, team: TeamRecord) -> bool:
        return await self._run(tables.create_team, team.name, team.model_dump_json())

    async def get_team(self, name: str) -> TeamRecord | None:
        raw = await self._run(tables.get_team, name)
        return TeamRecord.model_validate_json(raw) if raw else None

    async def list_teams(self) -> list[TeamRecord]:
        return [TeamRecord.model_validate_json(raw) for raw in await self._run(tables.list_teams)]

    async def update_team(self, team: TeamRecord) -> bool:
        return await self._run(tables.update_team, team.name, team.model_dump_json())

    async def delete_team(self, name: str) -> bool:
        return await self._run(tables.delete_team, name)

    async def create_key(self, key: KeyRecord) -> str | None:
        return await self._run(tables.create_key, key.id, key.team, key.name, key.model_dump_json())

    async def get_key(self, key_id: str) -> KeyRecord | None:
        row = await self._run(tables.get_key, key_id)
        return _key(*row) if row else None

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]:
        keys = [_key(*row) for row in await self._run(tables.list_keys, team)]
        return sorted(keys, key=lambda k: k.created_at)

    async def update_key(self, key: KeyRecord, old_name: str) -> str | None:
        return await self._run(tables.update_key, key.id, key.team, key.name, old_name, key.model_dump_json())

    async def delete_key(self, key_id: str) -> bool:
        return await self._run(tables.delete_key, key_id)

    async def touch_keys(self, last_used: dict[str, datetime]) -> None:
        if last_used:
            await self._run(tables.touch_keys, [(_micros(when), key_id) for key_id, when in last_used.items()])

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
        try:
            reply = self._submit(limits.admit, [ask for ask, _ in asked])
        except StoreError as exc:
            _fail(asked, exc)
            return
        reply.add_done_callback(partial(self._answer, asked))

    def _answer(self, asked: list[_Asked], reply: asyncio.Future[list[Verdict]]) -> None:
        """Each admission gets its verdict, or the batch's error. One whose caller gave up while
        it was on its way is released at once: nobody would settle it."""
        error = StoreError(f"sqlite {self.path}: admission cancelled") if reply.cancelled() else reply.exception()
        if error is not None:
            _fail(asked, error)
            return
        gone: list[Settlement] = []
        for (ask, waiter), verdict in zip(asked, reply.result(), strict=True):
            if not waiter.done():
                waiter.set_result(verdict)
            elif verdict.ok:
                gone += (Settlement(c, ask.member, c.amount if c.kind == "tokens" else 0) for c in ask.checks)
        if gone and not self._closed:
            task = asyncio.ensure_future(self.settle(gone))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
            task.add_done_callback(_quietly)  # best effort: a lease still ends it

    async def settle(
        self, settlements: Sequence[Settlement], batch: str = "", reserve: Sequence[Reserve] = ()
    ) -> list[Verdict]:
        if not settlements and not reserve:
            return []
        return await self._run(limits.settle, list(settlements), batch, list(reserve))

    async def renew(self, leases: Sequence[tuple[Check, str]], lease_ms: int) -> None:
        if leases:
            await self._run(limits.renew, list(leases), lease_ms)

    async def budget_spent(self, check: Check) -> int:
        return await self._run(limits.budget_spent, check.name)

    async def sweep(self) -> int:
        await self._run(tables.prune)
        return await self._run(limits.sweep)

    # -- the usage ledger ----------------------------------------------------------------------
    async def ledger_apply(self, batch: LedgerBatch) -> None:
        await self._run(tables.ledger_apply, batch)

    async def ledger_read(self, days: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
        return await self._run(tables.ledger_read, days)

    # -- changes -------------------------------------------------------------------------------
    async def publish(self, change: str) -> None:
        await self._run(tables.publish, self._origin, change)
        await self._notify(change)  # this process at once; the others within POLL_S

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
        if self._follower is None:
            self._follower = asyncio.ensure_future(self._follow())

    async def _notify(self, change: str) -> None:
        for listener in self._listeners:
            result = listener(change)
            if inspect.isawaitable(result):
                await result

    async def _follow(self) -> None:
        """Hear the changes other processes made, for as long as the store is open. After any
        gap (a start, an error, a pause longer than the changes are kept) everything is stale."""
        cursor: int | None = None
        heard = time.monotonic()
        lost = False
        while not self._closed:
            try:
                if cursor is None or time.monotonic() - heard > tables.CHANGES_KEEP_MS / 2000:
                    cursor = await self._run(tables.last_change)
                    await self._notify("*")
                for seq, origin, change in await self._run(tables.changes_after, cursor):
                    cursor = seq
                    if origin != self._origin:
                        await self._notify(change)
                heard = time.monotonic()
                if lost:
                    log.warning("change feed readable again")
                    lost = False
            except StoreError as exc:
                if not lost:
                    log.warning("change feed unreadable (%s); retrying until it returns", exc)
                    lost = True
                cursor = None
            await asyncio.sleep(POLL_S)


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
    error = exc if isinstance(exc, StoreError) else StoreError(f"sqlite: {exc}")
    for _, waiter in asked:
        if not waiter.done():
            waiter.set_exception(error)


def _quietly(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("releasing an abandoned admission failed: %s", task.exception())
