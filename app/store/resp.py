"""A lean pipelined Redis client for the request path's two calls (admit, settle).

redis-py spends more CPU packing and routing one EVALSHA than Redis spends running it. This
client keeps one connection open, writes pre-encoded RESP, parses replies with hiredis, and
matches replies to callers in order (Redis answers a connection's commands in order). Anything
that is not on the hot path still uses redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

from app.store.base import StoreError


def encode(*parts: bytes | str | int) -> bytes:
    """One command in RESP."""
    return b"".join([b"*%d\r\n" % len(parts), *(bulk(part) for part in parts)])


def bulk(part: bytes | str | int) -> bytes:
    """One argument in RESP."""
    data = part if isinstance(part, bytes) else str(part).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


_INTS: dict[int, bytes] = {}


def bulk_int(number: int) -> bytes:
    """One integer argument in RESP: the request path sends the same few amounts, limits and
    leases again and again, so the encodings are kept (a few thousand at most)."""
    encoded = _INTS.get(number)
    if encoded is None:
        if len(_INTS) >= 4096:
            _INTS.clear()
        data = b"%d" % number
        encoded = _INTS[number] = b"$%d\r\n%s\r\n" % (len(data), data)
    return encoded


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._outgoing: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def send(self, command: bytes) -> None:
        """Queue a command; every command queued in this loop turn goes out in one write (at c=64
        several requests reach admission in the same turn: one system call instead of several)."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._write)
        self._outgoing.append(command)

    def _write(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if outgoing and self.transport is not None and not self.lost:  # empty: written early by `submit`
            self.transport.write(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(StoreError(f"redis connection lost: {exc or 'closed'}"))


class RespClient:
    """`await client.call(encode(...))` -> the reply (a hiredis.ReplyError is raised as StoreError).

    One connection: Redis runs commands one at a time anyway, and on one connection they are run
    in the order they were sent (a request's settlement before its client's next admission)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parsed = urlparse(url)
        self._unix = parsed.path if parsed.scheme == "unix" else None
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._ssl = ssl.create_default_context() if parsed.scheme == "rediss" else None
        self._password = unquote(parsed.password) if parsed.password else None
        self._username = unquote(parsed.username) if parsed.username else None
        path = parsed.path.strip("/") if parsed.scheme != "unix" else ""
        query_db = parse_qs(parsed.query).get("db", [""])[0]  # redis-py reads `?db=N` too
        self._db = int(query_db) if query_db.isdigit() else int(path) if path.isdigit() else 0
        self._timeout = timeout_s
        self._live: _Connection | None = None  # set once AUTH/SELECT are done
        self._connecting: asyncio.Future[_Connection] | None = None

    async def call(self, command: bytes) -> Any:
        connection = self._live
        if connection is None or connection.lost:
            connection = await self._connection()
        return await self._call_on(connection, command)

    def submit(self, command: bytes) -> asyncio.Future[Any] | None:
        """For code that cannot wait (a loop callback): send `command` now, after every command
        queued before it, and return the future of its raw reply (a hiredis.ReplyError is a
        value); None when no connection is up (use `call`)."""
        connection = self._live
        if connection is None or connection.lost:
            return None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        connection.waiters.append(waiter)
        connection.send(command)
        connection._write()  # now: this turn's queued commands are already due
        timer = loop.call_later(self._timeout, _expire, waiter, connection)
        waiter.add_done_callback(lambda _: timer.cancel())
        return waiter

    async def _call_on(self, connection: _Connection, command: bytes) -> Any:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        connection.waiters.append(waiter)
        connection.send(command)  # in order with every other command on this connection
        timer = loop.call_later(self._timeout, _expire, waiter, connection)
        try:
            reply = await waiter
        finally:
            timer.cancel()
        if isinstance(reply, hiredis.ReplyError):
            raise StoreError(f"redis: {reply}")
        return reply

    async def _connection(self) -> _Connection:
        pending = self._connecting
        if pending is None:
            pending = self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(pending)
        finally:
            if pending.done():
                self._connecting = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                if self._unix:
                    _, connection = await loop.create_unix_connection(_Connection, self._unix)
                else:
                    _, connection = await loop.create_connection(_Connection, self._host, self._port, ssl=self._ssl)
        except (OSError, TimeoutError) as exc:
            raise StoreError(f"redis: cannot connect: {exc}") from None
        setup = []
        if self._password:
            setup.append(encode("AUTH", *([self._username] if self._username else []), self._password))
        if self._db:
            setup.append(encode("SELECT", self._db))
        try:
            for command in setup:
                await self._call_on(connection, command)
        except BaseException:
            if connection.transport is not None:
                connection.transport.close()  # a failed set-up must not leave a socket behind
            raise
        self._live = connection  # only now: no command may overtake the set-up
        return connection

    def close(self) -> None:
        if self._live is not None and self._live.transport is not None:
            self._live.transport.close()


def _expire(waiter: asyncio.Future[Any], connection: _Connection) -> None:
    if not waiter.done():
        waiter.set_exception(StoreError("redis: no answer in time"))
        # Redis answers a connection in order: the commands after this one are as late. A
        # connection that went dead without a reset (a failover, a dropped NAT entry) would
        # otherwise be kept until TCP gives up; the next command connects afresh.
        if connection.transport is not None and not connection.lost:
            connection.lost = True  # no command goes on it from now; its waiters fail as it closes
            connection.transport.close()
