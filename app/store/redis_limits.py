"""The Redis store's limits, on the request path: admissions asked for in one loop turn sent as
one script call on the lean client (`resp`), settlements (with the admissions ahead), lease
renewal, the sweep and budget reads. Scripts and layout in `lua`."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import hiredis
from redis.commands.core import AsyncScript

from app.limits.checks import WINDOW_MS, Check, Reserve, Settlement, Verdict
from app.store import lua, resp
from app.store.base import StoreError
from app.store.redis_calls import RedisCalls, do

log = logging.getLogger(__name__)
SWEEP_EVERY_MS = 60_000
SETTLE_CHUNK = 1000  # settlements per script call (Lua's unpack limit is ~8,000 values)
SWEEP_CHUNK = 500  # limit fields per sweep call


class RedisLimits:
    def __init__(self, calls: RedisCalls, tag: str) -> None:
        self._calls = calls
        self._redis = calls.redis
        self._lean = calls.lean
        self._tag = tag
        self._limits_key = f"{tag}:limits"
        self._scripts = calls.register(
            {"admit": lua.ADMIT, "settle": lua.SETTLE, "renew": lua.RENEW, "sweep": lua.SWEEP}
        )
        self._settle_encodings: dict[str, tuple[list[bytes], bytes, bytes]] = {}
        self._plan_encodings: dict[tuple[Any, ...], _PlanParts] = {}
        self._admissions: list[_Asked] = []  # asked for in this loop turn: sent together at its end
        self._releasing: set[asyncio.Future[Any]] = set()  # abandoned admissions being released

    async def load_scripts(self) -> None:
        """Load the scripts of admission and settlement now (see `RedisStore.prepare`)."""
        for name in ("admit", "settle"):
            await self._calls.load(self._scripts[name])

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
            command, script = self._admit_command(ask), self._scripts["admit"]
        else:
            command, script = self._settle_command([], "admissions", [ask for ask, _ in batch]), self._scripts["settle"]
        reply = self._lean.submit(command)
        if reply is None:  # no connection yet (or it is gone): the waiting way
            task = asyncio.ensure_future(self._calls.fast_command(command, script))
            task.add_done_callback(partial(self._answer, batch))
        else:
            reply.add_done_callback(partial(self._admitted, batch, command, script))

    def _admitted(self, batch: list[_Asked], command: bytes, script: AsyncScript, reply: asyncio.Future[Any]) -> None:
        if not reply.cancelled() and reply.exception() is None and isinstance(reply.result(), hiredis.ReplyError):
            # As `fast_command`: Redis lost its scripts (a restart, SCRIPT FLUSH): load, send again.
            lost = StoreError(f"redis: {reply.result()}")
            retry = asyncio.ensure_future(self._calls.without_script(lost, command, script))
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
        result = await self._calls.fast_command(self._settle_command(items, marker, reserve), self._scripts["settle"])
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
            await self._calls.run(self._scripts["renew"], keys, [lease_ms, *members])

    async def budget_spent(self, check: Check) -> int:
        raw = await do(self._redis.get(self._spend(check)))
        return int(raw or 0)

    async def sweep(self, scan_count: int = 500) -> int:
        """Drop what the limits hash no longer needs (full buckets, fields with no lease left) and
        leases that expired unrenewed (a crashed replica's). One replica a minute does it."""
        if not await do(self._redis.set(self._limits_key + ":sweeping", 1, nx=True, px=SWEEP_EVERY_MS)):
            return 0
        seen, cursor = 0, 0
        while True:
            cursor, fields = await do(self._redis.hscan(self._limits_key, cursor, count=scan_count))
            names = [f.decode() for f in fields]
            seen += len(names)
            for start in range(0, len(names), SWEEP_CHUNK):
                chunk = names[start : start + SWEEP_CHUNK]
                keys = [self._limits_key, *map(self._leases, chunk)]
                await self._calls.run(self._scripts["sweep"], keys, [WINDOW_MS, *chunk])
            if cursor == 0:
                return seen


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
