"""The shared store: Redis, for many replicas. Records are JSON strings under one hash tag
(`{gw}`), so the multi-key scripts also run on Redis Cluster. Changes go out on a pub/sub
channel; every replica drops what it cached within milliseconds, and drops everything if it
ever loses the channel (it may have missed a message)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.auth.records import KeyRecord, TeamRecord
from app.limits.checks import WINDOW_MS, Check, Reserve, Settlement, Verdict
from app.store import lua, resp
from app.store.base import ChangeListener, LedgerBatch, StoreError, notify

log = logging.getLogger(__name__)
SWEEP_EVERY_MS = 60_000
SETTLE_CHUNK = 1000  # settlements per script call (Lua's unpack limit is ~8,000 values)
SWEEP_CHUNK = 500  # limit fields per sweep call
CLOSE_TIMEOUT_S = 2.0

_CREATE_TEAM = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX') then
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
_DELETE_TEAM = """
redis.call('SREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""
# KEYS: key record, key-id set, names hash of the team; ARGV: id, name, json
_CREATE_KEY = """
if redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[1]) == 0 then
  return redis.call('HGET', KEYS[3], ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return false
"""
# KEYS: key record, names hash; ARGV: id, old name, new name, json
_UPDATE_KEY = """
if ARGV[2] ~= ARGV[3] then
  local holder = redis.call('HGET', KEYS[2], ARGV[3])
  if holder and holder ~= ARGV[1] then return holder end
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
end
redis.call('SET', KEYS[1], ARGV[4])
return false
"""
# KEYS: key record, key-id set, names hash, last-used hash; ARGV: id, name
_DELETE_KEY = """
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[3], ARGV[2]) end
redis.call('HDEL', KEYS[4], ARGV[1])
return redis.call('DEL', KEYS[1])
"""


class RedisStore:
    def __init__(self, url: str, prefix: str = "gw", timeout_s: float = 0.5, max_connections: int = 64) -> None:
        # A blocking pool: under a burst, requests wait briefly for a connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=15,
        )
        self.redis: aioredis.Redis = aioredis.Redis.from_pool(pool)
        # Change notifications wait on a connection of their own, with no read timeout.
        self._pubsub_client: aioredis.Redis = aioredis.from_url(
            url, socket_connect_timeout=timeout_s, health_check_interval=5
        )
        tag = "{" + prefix + "}"
        self._teams_key = f"{tag}:teams"
        self._keys_key = f"{tag}:keys"
        self._last_used_key = f"{tag}:lastused"
        self._tag = tag
        self._limits_key = f"{tag}:limits"
        self.channel = f"{prefix}:changes"
        self._scripts = {
            name: self.redis.register_script(src)
            for name, src in (
                ("create_team", _CREATE_TEAM),
                ("delete_team", _DELETE_TEAM),
                ("create_key", _CREATE_KEY),
                ("update_key", _UPDATE_KEY),
                ("delete_key", _DELETE_KEY),
                ("admit", lua.ADMIT),
                ("settle", lua.SETTLE),
                ("renew", lua.RENEW),
                ("sweep", lua.SWEEP),
                ("ledger_apply", lua.LEDGER_APPLY),
            )
        }
        self._listeners: list[ChangeListener] = []
        self._listener_task: asyncio.Task[None] | None = None
        self._closed = False
        self._resp = resp.RespClient(url, timeout_s)
        self._settle_encodings: dict[str, tuple[list[bytes], bytes, bytes]] = {}
        self._plan_encodings: dict[tuple[Any, ...], _PlanParts] = {}
        self._admissions: list[_Asked] = []  # asked for in this loop turn: sent together at its end
        self._releasing: set[asyncio.Future[Any]] = set()  # abandoned admissions being released

    def _team(self, name: str) -> str:
        return f"{self._tag}:team:{name}"

    def _key(self, key_id: str) -> str:
        return f"{self._tag}:key:{key_id}"

    def _names(self, team: str) -> str:
        return f"{self._tag}:keynames:{team}"

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._scripts[name](keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def _fast(self, name: str, keys: list[str], args: list[Any]) -> Any:
        command = resp.encode(b"EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)
        return await self._fast_command(command, name)

    async def _fast_command(self, command: bytes, name: str) -> Any:
        """EVALSHA on the lean client; the script is loaded on first use (or after a flush)."""
        try:
            return await self._resp.call(command)
        except StoreError as exc:
            return await self._without_script(exc, command, name)

    async def _without_script(self, exc: StoreError, command: bytes, name: str) -> Any:
        """An EVALSHA failed: if Redis lacked the script, load it and send the command again."""
        if "NOSCRIPT" not in str(exc):
            raise exc
        await self._do(self.redis.script_load(self._scripts[name].script))
        return await self._resp.call(command)

    async def _do(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def ping(self) -> None:
        await self._do(self.redis.ping())

    async def prepare(self) -> None:
        """Load the request path's scripts, so the first admissions and settlements do not meet
        NOSCRIPT and pay an extra round trip (a settlement late by one could refuse a client's
        next request its concurrency slot). If Redis is down now, that happens on first use."""
        try:
            for name in ("admit", "settle", "ledger_apply"):
                await self._do(self.redis.script_load(self._scripts[name].script))
            await self._resp.call(resp.encode("PING"))  # and open the request path's connection
        except StoreError as exc:
            log.warning("limits store not reachable at start (%s); its scripts load on first use", exc)

    async def close(self) -> None:
        """Stop listening and close every connection; a shutdown never waits on Redis for long."""
        self._closed = True
        self._resp.close()
        if self._listener_task is not None:
            self._listener_task.cancel()
            await asyncio.wait({self._listener_task}, timeout=CLOSE_TIMEOUT_S)
        closing = {asyncio.ensure_future(client.aclose()) for client in (self.redis, self._pubsub_client)}
        done, late = await asyncio.wait(closing, timeout=CLOSE_TIMEOUT_S)  # never cancels: cannot hang
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning("closing a Redis client: %s", task.exception())
        if late:
            log.warning("Redis clients still closing after %.0fs; not waiting for them", CLOSE_TIMEOUT_S)

    # -- teams -----------------------------------------------------------------------------
    async def create_team(self, team: TeamRecord) -> bool:
        created = await self._call(
            "create_team", [self._team(team.name), self._teams_key], [team.name, team.model_dump_json()]
        )
        return bool(created)

    async def get_team(self, name: str) -> TeamRecord | None:
        raw = await self._do(self.redis.get(self._team(name)))
        return TeamRecord.model_validate_json(raw) if raw else None

    async def list_teams(self) -> list[TeamRecord]:
        names = sorted(n.decode() for n in await self._do(self.redis.smembers(self._teams_key)))
        if not names:
            return []
        raws = await self._do(self.redis.mget([self._team(n) for n in names]))
        return [TeamRecord.model_validate_json(raw) for raw in raws if raw]

    async def update_team(self, team: TeamRecord) -> bool:
        updated = await self._do(self.redis.set(self._team(team.name), team.model_dump_json(), xx=True))
        return bool(updated)

    async def delete_team(self, name: str) -> bool:
        return bool(await self._call("delete_team", [self._team(name), self._teams_key], [name]))

    # -- keys ------------------------------------------------------------------------------
    async def create_key(self, key: KeyRecord) -> str | None:
        holder = await self._call(
            "create_key",
            [self._key(key.id), self._keys_key, self._names(key.team)],
            [key.id, key.name, key.model_dump_json()],
        )
        return holder.decode() if holder else None

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self._key(key_id))
            pipe.hget(self._last_used_key, key_id)
            raw, last_used = await self._do(pipe.execute())
        return self._with_last_used(raw, last_used) if raw else None

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]:
        ids = [i.decode() for i in await self._do(self.redis.smembers(self._keys_key))]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.mget([self._key(i) for i in ids])
            pipe.hmget(self._last_used_key, ids)
            raws, used = await self._do(pipe.execute())
        keys = [self._with_last_used(raw, u) for raw, u in zip(raws, used, strict=True) if raw]
        return sorted((k for k in keys if team is None or k.team == team), key=lambda k: k.created_at)

    @staticmethod
    def _with_last_used(raw: bytes, last_used: bytes | None) -> KeyRecord:
        key = KeyRecord.model_validate_json(raw)
        if last_used:
            key.last_used_at = datetime.fromisoformat(last_used.decode())
        return key

    async def update_key(self, key: KeyRecord, old_name: str) -> str | None:
        holder = await self._call(
            "update_key",
            [self._key(key.id), self._names(key.team)],
            [key.id, old_name, key.name, key.model_dump_json(exclude={"last_used_at"})],
        )
        return holder.decode() if holder else None

    async def delete_key(self, key_id: str) -> bool:
        key = await self.get_key(key_id)
        if key is None:
            return False
        keys = [self._key(key_id), self._keys_key, self._names(key.team), self._last_used_key]
        return bool(await self._call("delete_key", keys, [key_id, key.name]))

    async def touch_keys(self, last_used: dict[str, datetime]) -> None:
        if last_used:
            await self._do(
                self.redis.hset(self._last_used_key, mapping={k: v.isoformat() for k, v in last_used.items()})
            )

    # -- admission -------------------------------------------------------------------------
    def _leases(self, name: str) -> str:
        """The lease zset of a concurrency or budget limit (by the check's name)."""
        return f"{self._tag}:leases:{name}"

    def _spend(self, check: Check) -> str:
        return f"{self._tag}:lim:{check.name}:spent"

    def _limit_keys(self, check: Check) -> list[str]:
        """A check's keys besides the limits hash (see `lua`): buckets have none of their own."""
        if check.kind == "budget":
            return [self._leases(check.name), self._spend(check)]
        if check.kind == "concurrency":
            return [self._leases(check.name)]
        return []

    async def admit(self, checks: Sequence[Check], member: str, lease_ms: int, headroom: int = 1) -> Verdict:
        """Admissions asked for in one loop turn go to Redis as one script call (at c=64 several
        requests reach admission in a turn): the limits' fields are then read, parsed, formatted
        and written once for all of them, each judged in turn. One alone goes as ADMIT."""
        loop = asyncio.get_running_loop()
        verdict: asyncio.Future[Verdict] = loop.create_future()
        if not self._admissions:
            loop.call_soon(self._send_admissions)
        self._admissions.append((Reserve(checks, member, lease_ms, headroom), verdict))
        return await verdict

    def _send_admissions(self) -> None:
        asked, self._admissions = self._admissions, []
        for batch in _by_names([ask for ask, _ in asked], SETTLE_CHUNK):
            group, asked = asked[: len(batch)], asked[len(batch) :]
            try:
                self._send_batch(group)
            except Exception as exc:  # a loop callback: its callers must hear of it, not wait forever
                _fail(group, exc)

    def _send_batch(self, batch: list[_Asked]) -> None:
        if len(batch) == 1:
            ask = batch[0][0]
            command, name = self._admit_command(ask), "admit"
        else:
            command, name = self._settle_command([], "admissions", [ask for ask, _ in batch]), "settle"
        reply = self._resp.submit(command)
        if reply is None:  # no connection yet (or it is gone): the waiting way
            task = asyncio.ensure_future(self._fast_command(command, name))
            task.add_done_callback(partial(self._answer, batch))
        else:
            reply.add_done_callback(partial(self._admitted, batch, command, name))

    def _admitted(self, batch: list[_Asked], command: bytes, name: str, reply: asyncio.Future[Any]) -> None:
        if not reply.cancelled() and reply.exception() is None and isinstance(reply.result(), hiredis.ReplyError):
            # As `_fast_command`: Redis lost its scripts (a restart, SCRIPT FLUSH): load, send again.
            retry = asyncio.ensure_future(self._without_script(StoreError(f"redis: {reply.result()}"), command, name))
            retry.add_done_callback(partial(self._answer, batch))
            return
        self._answer(batch, reply)

    def _answer(self, batch: list[_Asked], reply: asyncio.Future[Any]) -> None:
        """Each admission of a batch gets its verdict, or the batch's error. An admission whose
        caller gave up while it was on its way is released at once: nobody would settle it, and
        its slots and holds would wait for their lease to expire."""
        try:
            if reply.cancelled():
                raise StoreError("redis: admission cancelled")
            result = reply.result()
            if isinstance(result, hiredis.ReplyError):
                raise StoreError(f"redis: {result}")
            verdicts = [_verdict(result)] if len(batch) == 1 else [_verdict(one) for one in result[1:]]
        except Exception as exc:
            _fail(batch, exc)
            return
        gone: list[Settlement] = []
        for (ask, waiter), verdict in zip(batch, verdicts, strict=True):
            if not waiter.done():
                waiter.set_result(verdict)
            elif verdict.ok:
                gone += (Settlement(c, ask.member, c.amount if c.kind == "tokens" else 0) for c in ask.checks)
        if gone:
            task = asyncio.ensure_future(self.settle(gone))
            task.add_done_callback(_quietly)  # best effort: a lease still ends it if Redis is away
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    def _admit_command(self, ask: Reserve) -> bytes:
        """EVALSHA admit (layout in `lua`): the plan's part encoded once (`_plan_parts`)."""
        plan, bulk_int = self._plan_parts(ask.checks), resp.bulk_int
        out = [
            b"*%d\r\n" % (3 + 1 + plan.nkeys + 6 + 4 * len(ask.checks)),
            resp.bulk(b"EVALSHA"),
            resp.bulk(self._scripts["admit"].sha),
            bulk_int(1 + plan.nkeys),
            resp.bulk(self._limits_key),
            plan.keys,
            resp.bulk(ask.member),
            bulk_int(ask.lease_ms),
            bulk_int(WINDOW_MS),
            bulk_int(len(ask.checks)),
            bulk_int(ask.headroom),
            bulk_int(plan.budgets),
            plan.names,
        ]
        out += (static + bulk_int(check.amount) for check, static in zip(ask.checks, plan.statics, strict=True))
        return b"".join(out)

    async def settle(
        self, settlements: Sequence[Settlement], batch: str = "", reserve: Sequence[Reserve] = ()
    ) -> list[Verdict]:
        """At most SETTLE_CHUNK names (a settlement's or a reserved check's) per script call: Lua
        unpacks at most ~8,000 values, and the script unpacks every name, and a name and value per
        field it writes. The reservations go with the first chunk while they fit, the rest after.
        Each chunk is applied at most once, so a batch that failed half way is completed, not
        doubled, when sent again under the same id."""
        items = [s for s in settlements if s.check.kind != "requests" or s.value]  # RPM: only give-backs
        batch = batch or secrets.token_hex(12)
        first = items[:SETTLE_CHUNK]
        groups = list(_by_names(reserve, SETTLE_CHUNK, len(first)))
        verdicts = await self._settle(first, f"{batch}:0", groups.pop(0) if groups else ())
        for start in range(SETTLE_CHUNK, len(items), SETTLE_CHUNK):
            await self._settle(items[start : start + SETTLE_CHUNK], f"{batch}:{start // SETTLE_CHUNK}")
        for group in groups:
            verdicts += await self._settle([], "", group)
        return verdicts

    async def _settle(self, items: Sequence[Settlement], marker: str, reserve: Sequence[Reserve] = ()) -> list[Verdict]:
        if not items and not reserve:
            return []
        result = await self._fast_command(self._settle_command(items, marker, reserve), "settle")
        return [_verdict(reply) for reply in result[1:]]

    def _settle_command(self, items: Sequence[Settlement], marker: str, reserve: Sequence[Reserve]) -> bytes:
        """EVALSHA settle (layout in `lua`): what each settlement's check and each reservation's
        plan contribute besides amounts and members is encoded once."""
        keys: list[bytes] = [resp.bulk(self._limits_key), resp.bulk(f"{self._tag}:settled:{marker}")]
        names: list[bytes] = []
        args: list[bytes] = []
        nkeys, nnames, argc = 2, len(items), 4 + 6 * len(items)  # entries of the lists may hold several
        bulk_int = resp.bulk_int
        member, member_bulk = "", b""  # a request's settlements come together: its member encoded once
        for item in items:
            check = item.check
            check_keys, name, kind = self._settle_parts(check)
            keys += check_keys
            nkeys += len(check_keys)
            names.append(name)
            if item.member != member:
                member, member_bulk = item.member, resp.bulk(item.member)
            args += (
                kind,
                member_bulk,
                bulk_int(item.value),
                bulk_int(check.limit) + bulk_int(check.amount) + bulk_int(check.ttl_s),
            )
        for ahead in reserve:
            checks, plan = ahead.checks, self._plan_parts(ahead.checks)
            keys.append(plan.keys)
            names.append(plan.names)
            args += (resp.bulk(ahead.member), bulk_int(ahead.lease_ms), bulk_int(ahead.headroom))
            args += (bulk_int(len(checks)), bulk_int(plan.budgets), bulk_int(plan.nkeys - plan.budgets))
            args += (static + bulk_int(check.amount) for check, static in zip(checks, plan.statics, strict=True))
            nkeys, nnames, argc = nkeys + plan.nkeys, nnames + len(checks), argc + 6 + 3 * len(checks)
        sha: str = self._scripts["settle"].sha
        head = b"*%d\r\n" % (3 + nkeys + argc + nnames)
        script = [head, resp.bulk(b"EVALSHA"), resp.bulk(sha), resp.bulk(nkeys)]
        counts = [bulk_int(WINDOW_MS), bulk_int(len(items)), bulk_int(len(reserve)), bulk_int(nnames)]
        return b"".join([*script, *keys, *counts, *names, *args])

    def _plan_parts(self, checks: Sequence[Check]) -> _PlanParts:
        """What an admission of these checks sends besides its member and amounts (the same for
        ADMIT and for a reservation in SETTLE), encoded once per plan."""
        signature = tuple((c.name, c.limit) for c in checks)
        parts = self._plan_encodings.get(signature)
        if parts is None:
            spends = [self._spend(c) for c in checks if c.kind == "budget"]
            leases = [self._leases(c.name) for c in checks if c.kind in ("concurrency", "budget")]
            parts = _PlanParts(
                b"".join(map(resp.bulk, [*spends, *leases])),
                len(spends) + len(leases),
                len(spends),
                b"".join(resp.bulk(c.name) for c in checks),
                [resp.bulk(lua.KIND_CODE[c.kind]) + resp.bulk(c.limit) for c in checks],
            )
            if len(self._plan_encodings) > 10_000:
                self._plan_encodings.clear()
            self._plan_encodings[signature] = parts
        return parts

    def _settle_parts(self, check: Check) -> tuple[list[bytes], bytes, bytes]:
        """A check's keys, its name and its kind, encoded once."""
        parts = self._settle_encodings.get(check.name)
        if parts is None:
            if len(self._settle_encodings) > 10_000:
                self._settle_encodings.clear()
            parts = self._settle_encodings[check.name] = (
                [resp.bulk(key) for key in self._limit_keys(check)],
                resp.bulk(check.name),
                resp.bulk(lua.KIND_CODE[check.kind]),
            )
        return parts

    async def renew(self, leases: Sequence[tuple[Check, str]], lease_ms: int) -> None:
        if leases:
            keys = [self._leases(check.name) for check, _ in leases]
            members = [f"{member}|{check.amount}" if check.kind == "budget" else member for check, member in leases]
            await self._call("renew", keys, [lease_ms, *members])

    async def budget_spent(self, check: Check) -> int:
        raw = await self._do(self.redis.get(self._spend(check)))
        return int(raw or 0)

    async def sweep(self, scan_count: int = 500) -> int:
        """Drop what the limits hash no longer needs (full buckets, fields with no lease left) and
        leases that expired unrenewed (a crashed replica's). One replica a minute does it."""
        if not await self._do(self.redis.set(self._limits_key + ":sweeping", 1, nx=True, px=SWEEP_EVERY_MS)):
            return 0
        seen, cursor = 0, 0
        while True:
            cursor, fields = await self._do(self.redis.hscan(self._limits_key, cursor, count=scan_count))
            names = [f.decode() for f in fields]
            seen += len(names)
            for start in range(0, len(names), SWEEP_CHUNK):
                chunk = names[start : start + SWEEP_CHUNK]
                keys = [self._limits_key, *map(self._leases, chunk)]
                await self._call("sweep", keys, [WINDOW_MS, *chunk])
            if cursor == 0:
                return seen

    # -- ledger --------------------------------------------------------------------------------
    async def ledger_apply(self, batch: LedgerBatch) -> None:
        by_day: dict[str, list[tuple[str, int]]] = {}
        for day, group, measure, delta in batch.increments:
            by_day.setdefault(day, []).append((f"{group}|{measure}", delta))
        keys = [f"{self._tag}:ledger:batch:{batch.id}", f"{self._tag}:ledger:keynames"]
        args: list[Any] = [7 * 86400, len(by_day)]
        for day, items in by_day.items():
            keys.append(f"{self._tag}:ledger:{day}")
            args.append(len(items))
            for name, delta in items:
                args += [name, delta]
        for key_id, name in batch.key_names.items():
            args += [key_id, name]
        await self._fast("ledger_apply", keys, args)  # the lean client: redis-py costs ~1.5% of c=64 CPU here

    async def ledger_read(self, days: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(f"{self._tag}:ledger:{day}")
            pipe.hgetall(f"{self._tag}:ledger:keynames")
            results = await self._do(pipe.execute())
        stored = {
            day: {k.decode(): int(v) for k, v in fields.items()}
            for day, fields in zip(days, results[:-1], strict=True)
            if fields
        }
        return stored, {k.decode(): v.decode() for k, v in results[-1].items()}

    # -- changes ---------------------------------------------------------------------------
    async def publish(self, change: str) -> None:
        await self._do(self.redis.publish(self.channel, change))
        await notify(self._listeners, change)  # this replica too, without waiting for the round trip

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
        if self._listener_task is None:
            self._listener_task = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        """Follow the change channel for as long as the store is open, reconnecting as needed."""
        lost = False
        while not self._closed:  # not only cancellation: a library that swallows it must not keep us
            pubsub = self._pubsub_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if lost:
                    log.warning("change channel restored")
                    lost = False
                await notify(self._listeners, "*")  # anything could have changed while we were not listening
                while not self._closed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        await notify(self._listeners, message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the listener must outlive any Redis trouble
                if not lost:
                    log.warning("change channel lost (%s); reconnecting until it returns", exc)
                    lost = True
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):  # also when cancelled: a bounded wait
                        await pubsub.aclose()


def _verdict(result: list[Any]) -> Verdict:
    """An admission's verdict from the script's reply: {1, remaining, reset, ...} or
    {0, index (from 1), retry_ms, used}."""
    if result[0] == 0:
        return Verdict(False, int(result[1]) - 1, int(result[2]), int(result[3]))
    values = [int(v) for v in result[1:]]
    return Verdict(True, states=list(zip(values[0::2], values[1::2], strict=True)))


_Asked = tuple[Reserve, "asyncio.Future[Verdict]"]


@dataclass(frozen=True, slots=True)
class _PlanParts:
    keys: bytes  # its budgets' spends, then its concurrency and budget leases
    nkeys: int
    budgets: int
    names: bytes  # its checks' names
    statics: list[bytes]  # per check: kind and limit


def _fail(batch: list[_Asked], exc: BaseException) -> None:
    error = exc if isinstance(exc, StoreError) else StoreError(f"redis: {exc}")
    for _, waiter in batch:
        if not waiter.done():
            waiter.set_exception(error)


def _quietly(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("releasing an abandoned admission failed: %s", task.exception())


def _by_names(asks: Sequence[Reserve], limit: int, used: int = 0) -> Iterator[list[Reserve]]:
    """`asks` in order, in groups of at most `limit` check names (the first group has `used` of
    them taken already); one ask larger than `limit` goes alone."""
    group: list[Reserve] = []
    for ask in asks:
        if group and used + len(ask.checks) > limit:
            yield group
            group, used = [], 0
        group.append(ask)
        used += len(ask.checks)
    if group:
        yield group
