"""One sqlite3 connection on a thread of its own (sqlite3 blocks; the event loop must not), and
the deadline each call to it gets: past it the caller hears a `StoreError` at once, a call still
queued is not run, and a running one stops at its next statement step or lock wait and rolls
back. (Between statements the thread needs the GIL back from the event loop: under a busy loop
that can take a switch interval, 5 ms, per statement, so a running call may end later than its
deadline; its caller has heard by then, and what it committed is handed to `late`.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from app.store.base import StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")
Opener = Callable[[Path, float], sqlite3.Connection]  # (path, longest wait for a lock in s)

# SQLite asks the progress handler every this many virtual machine steps (~0.13 ms of a large
# read; its cost there was not measurable): how soon a running statement notices its deadline.
PROGRESS_STEPS = 2000


class DbThread:
    """Calls run in the order made, each within its own deadline."""

    def __init__(self, path: Path, name: str, opener: Opener) -> None:
        self.path = path
        self._open = opener
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._db: sqlite3.Connection | None = None  # opened on the thread, used only there
        self._deadline = math.inf  # the running call's (monotonic s), read by the progress handler
        self._closed = False

    def call(
        self, timeout_s: float, job: Callable[..., T], *args: Any, late: Callable[[T], None] | None = None
    ) -> asyncio.Future[T]:
        """Queue `job(db, *args)` now. Its future fails with a `StoreError` after `timeout_s`; a
        job that still completed after that (or after its caller cancelled the future) hands its
        result to `late`, so the caller can undo what nobody will use."""
        if self._closed:
            raise StoreError(f"sqlite {self.path}: the store is closed")
        loop = asyncio.get_running_loop()
        call = _Call(self, job, args, late, timeout_s, time.monotonic() + timeout_s, loop.create_future(), loop)
        call.timer = loop.call_later(timeout_s, call.expire)
        try:
            self._executor.submit(self._serve, call)
        except RuntimeError as exc:  # shut down meanwhile
            call.timer.cancel()
            raise StoreError(f"sqlite {self.path}: the store is closed") from exc
        return call.reply

    def _serve(self, call: _Call[Any]) -> None:
        """On the thread: run the job, then hand its outcome to the loop."""
        try:
            outcome: tuple[bool, Any] = (True, self._run(call))
        except Exception as exc:
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            call.loop.call_soon_threadsafe(call.deliver, outcome)

    def _run(self, call: _Call[T]) -> T:
        """The one place sqlite3's errors become `StoreError`."""
        left = call.deadline - time.monotonic()
        if left <= 0:  # it waited in line past its deadline: its caller has heard so already
            raise call.late_error("not run: it waited in line that long")
        try:
            if self._db is None:
                self._db = self._open(self.path, left)
                self._db.set_progress_handler(self._overdue, PROGRESS_STEPS)
            else:  # a lock is never waited for past the deadline (~1 µs; executescript skips the statement cache)
                self._db.executescript(f"PRAGMA busy_timeout = {max(1, int(left * 1000))}")
            self._deadline = call.deadline
            return call.job(self._db, *call.args)
        except (sqlite3.Error, OSError) as exc:
            if self._db is not None and self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.rollback()
                if self._db.in_transaction:  # never let the next call's statements commit half a job
                    self._close_db()
            if time.monotonic() >= call.deadline:
                raise call.late_error(str(exc)) from exc
            raise StoreError(f"sqlite {self.path}: {exc}") from exc
        finally:
            self._deadline = math.inf

    def _overdue(self) -> bool:
        return time.monotonic() > self._deadline

    async def close(self, timeout_s: float) -> None:
        """Refuse new calls, let the queued ones end (each within its deadline), close the
        connection: the last one closed checkpoints the WAL into the file."""
        if self._closed:
            return
        self._closed = True
        closing = asyncio.wrap_future(self._executor.submit(self._close_db))
        try:
            await asyncio.wait_for(closing, timeout_s)
        except (TimeoutError, sqlite3.Error) as exc:
            log.warning("closing sqlite %s: %s", self.path, exc or "timed out")
        self._executor.shutdown(wait=False)

    def _close_db(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


@dataclass(slots=True)
class _Call(Generic[T]):
    """One call, from the loop to the thread and back."""

    thread: DbThread
    job: Callable[..., T]
    args: tuple[Any, ...]
    late: Callable[[T], None] | None
    timeout_s: float
    deadline: float  # monotonic s
    reply: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    timer: asyncio.TimerHandle | None = None

    def late_error(self, why: str = "") -> StoreError:
        """What the caller hears when the deadline passed, from either side."""
        said = f"sqlite {self.thread.path}: no answer within {self.timeout_s:g}s"
        return StoreError(f"{said} ({why})" if why else said)

    def expire(self) -> None:
        if not self.reply.done():
            self.reply.set_exception(self.late_error())

    def deliver(self, outcome: tuple[bool, Any]) -> None:
        """On the loop: the outcome to the caller, or a late result to `late`."""
        if self.timer is not None:
            self.timer.cancel()
        ok, value = outcome
        if not self.reply.done():
            if ok:
                self.reply.set_result(value)
            else:
                self.reply.set_exception(value)
        elif ok and self.late is not None:
            self.late(value)
