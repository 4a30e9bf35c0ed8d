"""The shared store: Redis, for many replicas. `RedisStore` owns the connections and composes
the parts, each a module of its own: records (`redis_records`), limits (`redis_limits`), the
usage ledger (`redis_ledger`) and change notifications (`redis_changes`), all calling through
`redis_calls`. Everything lives under one hash tag (`{gw}`), so the multi-key scripts also run
on Redis Cluster."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

import redis.asyncio as aioredis

from app.auth.records import KeyRecord, TeamRecord
from app.limits.checks import Check, Reserve, Settlement, Verdict
from app.store import resp
from app.store.base import ChangeListener, LedgerBatch, StoreError
from app.store.location import SENTINEL_SCHEMES, sentinel_of
from app.store.redis_calls import CLOSE_TIMEOUT_S, RedisCalls, do
from app.store.redis_changes import RedisChanges
from app.store.redis_ledger import RedisLedger
from app.store.redis_limits import RedisLimits
from app.store.redis_records import RedisRecords

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a method below returns: its part's coroutine, which the caller awaits; a method in
# between adds one plain call and no await to admit and settle.
Pending: TypeAlias = Coroutine[Any, Any, T]


class RedisStore:
    def __init__(self, url: str, prefix: str = "gw", timeout_s: float = 0.5, max_connections: int = 64) -> None:
        self._sentinel: Any = None  # on a Sentinel URL, the sentinels' clients (closed with the rest)
        if url.startswith(SENTINEL_SCHEMES):
            self._sentinel, self.redis, self._pubsub_client, self._resp = _sentinel_clients(
                url, timeout_s, max_connections
            )
        else:
            # A blocking pool: under a burst, requests wait briefly for a connection instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=timeout_s,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                health_check_interval=15,
            )
            self.redis = aioredis.Redis.from_pool(pool)
            # Change notifications wait on a connection of their own, with no read timeout.
            self._pubsub_client = aioredis.from_url(url, socket_connect_timeout=timeout_s, health_check_interval=5)
            self._resp = resp.RespClient(url, timeout_s)  # the request path's calls
        tag = "{" + prefix + "}"
        self.channel = f"{prefix}:changes"
        calls = RedisCalls(self.redis, self._resp)
        self._records = RedisRecords(calls, tag)
        self._limits = RedisLimits(calls, tag)
        self._ledger = RedisLedger(calls, tag)
        self._changes = RedisChanges(self.redis, self._pubsub_client, self.channel)

    async def ping(self) -> None:
        await do(self.redis.ping())

    async def prepare(self) -> None:
        """Load the request path's scripts, so the first admissions and settlements do not meet
        NOSCRIPT and pay an extra round trip (a settlement late by one could refuse a client's
        next request its concurrency slot). If Redis is down now, that happens on first use."""
        try:
            await self._limits.load_scripts()
            await self._ledger.load_scripts()
            await self._resp.call(resp.encode("PING"))  # and open the request path's connection
        except StoreError as exc:
            log.warning("limits store not reachable at start (%s); its scripts load on first use", exc)

    async def close(self) -> None:
        """Stop listening and close every connection; a shutdown never waits on Redis for long."""
        self._resp.close()
        await self._changes.stop()
        clients = [self.redis, self._pubsub_client, *([self._sentinel] if self._sentinel is not None else [])]
        closing = {asyncio.ensure_future(client.aclose()) for client in clients}
        done, late = await asyncio.wait(closing, timeout=CLOSE_TIMEOUT_S)  # never cancels: cannot hang
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning("closing a Redis client: %s", task.exception())
        if late:
            log.warning("Redis clients still closing after %.0fs; not waiting for them", CLOSE_TIMEOUT_S)

    def create_team(self, team: TeamRecord) -> Pending[bool]:
        return self._records.create_team(team)

    def get_team(self, name: str) -> Pending[TeamRecord | None]:
        return self._records.get_team(name)

    def list_teams(self) -> Pending[list[TeamRecord]]:
        return self._records.list_teams()

    def update_team(self, team: TeamRecord) -> Pending[bool]:
        return self._records.update_team(team)

    def delete_team(self, name: str) -> Pending[bool]:
        return self._records.delete_team(name)

    def create_key(self, key: KeyRecord) -> Pending[str | None]:
        return self._records.create_key(key)

    def get_key(self, key_id: str) -> Pending[KeyRecord | None]:
        return self._records.get_key(key_id)

    def list_keys(self, team: str | None = None) -> Pending[list[KeyRecord]]:
        return self._records.list_keys(team)

    def update_key(self, key: KeyRecord, old_name: str) -> Pending[str | None]:
        return self._records.update_key(key, old_name)

    def delete_key(self, key_id: str) -> Pending[bool]:
        return self._records.delete_key(key_id)

    def touch_keys(self, last_used: dict[str, datetime]) -> Pending[None]:
        return self._records.touch_keys(last_used)

    def admit(self, checks: Sequence[Check], member: str, lease_ms: int, headroom: int = 1) -> Pending[Verdict]:
        return self._limits.admit(checks, member, lease_ms, headroom)

    def settle(
        self, settlements: Sequence[Settlement], batch: str = "", reserve: Sequence[Reserve] = ()
    ) -> Pending[list[Verdict]]:
        return self._limits.settle(settlements, batch, reserve)

    def renew(self, leases: Sequence[tuple[Check, str]], lease_ms: int) -> Pending[None]:
        return self._limits.renew(leases, lease_ms)

    def budget_spent(self, check: Check) -> Pending[int]:
        return self._limits.budget_spent(check)

    def sweep(self, scan_count: int = 500) -> Pending[int]:
        return self._limits.sweep(scan_count)

    def ledger_apply(self, batch: LedgerBatch) -> Pending[None]:
        return self._ledger.ledger_apply(batch)

    def ledger_read(self, days: list[str]) -> Pending[tuple[dict[str, dict[str, int]], dict[str, str]]]:
        return self._ledger.ledger_read(days)

    def publish(self, change: str) -> Pending[None]:
        return self._changes.publish(change)

    def on_change(self, listener: ChangeListener) -> None:
        self._changes.on_change(listener)


def _sentinel_clients(
    url: str, timeout_s: float, max_connections: int
) -> tuple[Any, aioredis.Redis, aioredis.Redis, resp.RespClient]:
    """The three clients on a Sentinel-managed master: each finds it by asking the sentinels (one
    `Sentinel`, redis-py's), when it connects and again after a failover (a connection lost, or a
    READONLY reply from a master demoted since)."""
    from redis.asyncio.sentinel import Sentinel

    where = sentinel_of(url)
    options = dict(aioredis.BlockingConnectionPool.from_url(where.data_url).connection_kwargs)
    for address in ("host", "port"):
        options.pop(address, None)
    if where.data_url.startswith("rediss://"):
        options["ssl"] = True  # redis-py's Sentinel pool then opens TLS connections, with the URL's ssl_* options
    asking = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, **where.sentinel_auth}
    sentinel = Sentinel(where.sentinels, sentinel_kwargs=asking, **options)
    master = sentinel.master_for(
        where.master,
        max_connections=max_connections,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=15,
    )
    pubsub = sentinel.master_for(where.master, socket_connect_timeout=timeout_s, health_check_interval=5)
    lean = resp.RespClient(where.data_url, timeout_s, locate=lambda: sentinel.discover_master(where.master))
    return sentinel, master, pubsub, lean
