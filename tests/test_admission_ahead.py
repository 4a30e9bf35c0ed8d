"""Admission ahead: a principal's next request is reserved in the background, so it is admitted
without waiting for the store. Shown here: the request path does not touch the store when a
reservation waits for it; limits are never overshot (two replicas on one Redis); small limits and
a limit's last room are never reserved ahead; what was reserved ahead and not used is given back
(after idle, at shutdown, and when a larger request comes); accounting stays exact on both stores;
and a reservation made before a store outage admits its request during it."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
import redis

from app.auth.records import LimitValues
from app.limits.admission import Admission
from app.limits.checks import Check, Settlement, budget_period
from app.limits.plan import Demand, Plan
from app.settings import LimitsSettings
from app.simulator import SimulatorThread
from app.store.base import Store
from app.store.memory import MemoryStore
from tests.admission_support import (
    HELLO,
    MINI,
    budget_of,
    chat,
    held_stream,
    make_key,
    make_team,
    redis_gateway,
)
from tests.metering_support import metric
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, GatewayServer, gateway_settings, wait_until

BODY = {"model": MINI, "messages": HELLO, "max_tokens": 10}
SPARES = LimitsSettings().ahead_spares  # reservations a key keeps ahead, by default
HELD = 2 * SPARES  # their leases for a key with a concurrency limit and a budget: a slot and a hold each
BIG = {"rpm": 1000, "tpm": 1_000_000, "max_concurrency": 1000, "budget_usd": 5, "budget_period": "day"}


def lease_members(server: RedisServer, prefix: str) -> dict[str, list[str]]:
    """Every lease zset under the gateway's prefix: its members (concurrency slots, budget holds)."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        return {
            key: client.zrange(key, 0, -1) for key in client.scan_iter(match="{" + prefix + "}:leases:*", count=1000)
        }
    finally:
        client.close()


def ahead_held(server: RedisServer, prefix: str) -> int:
    return sum(m.startswith("ahead:") for members in lease_members(server, prefix).values() for m in members)


def ahead_metric(gateway: GatewayServer, outcome: str) -> float:
    return metric(gateway.url, "gateway_admissions_ahead_total", outcome=outcome)


def remaining(response: Any, kind: str) -> int:
    return int(response.headers[f"x-ratelimit-remaining-{kind}"])


# -- the request path ---------------------------------------------------------------------------
def test_the_next_request_is_admitted_without_waiting_for_the_store(
    simulator: SimulatorThread, own_redis: RedisServer
) -> None:
    """With Redis frozen (connections open, nothing answers) a request that waited on the store
    would take the whole store timeout (3 s here); the ones with a reservation ahead do not. A key
    keeps two: the request after next, arriving before the next one's settlement and new
    reservation are answered (here: never), finds one made too."""
    assert own_redis.process is not None and SPARES == 2
    with redis_gateway(simulator, own_redis, store_timeout_s=3, limits={"ahead_idle_s": 60}) as gateway:
        key = make_key(gateway, make_team(gateway), **BIG)
        first = chat(gateway, key["key"], BODY)
        assert first.status_code == 200, first.text
        prefix = gateway.settings.store_prefix
        wait_until(lambda: ahead_held(own_redis, prefix) == HELD, 10, "the next requests reserved ahead")
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            took, responses = [], []
            for _ in range(SPARES):
                started = time.monotonic()
                responses.append(chat(gateway, key["key"], BODY))
                took.append(time.monotonic() - started)
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        assert [r.status_code for r in responses] == [200] * SPARES, responses[-1].text
        assert max(took) < 2, f"a request waited for the store ({took})"
        # Reserved for them and counted: the headers go on from the first request's.
        assert [remaining(r, "requests") for r in responses] == [remaining(first, "requests") - n for n in (1, 2)]
        assert ahead_metric(gateway, "taken") == SPARES and ahead_metric(gateway, "released") == 0
        assert chat(gateway, key["key"], BODY).status_code == 200  # and on, once Redis answers again


def test_limits_are_never_overshot_across_two_replicas(simulator: SimulatorThread, own_redis: RedisServer) -> None:
    """Ten a minute on one key, thirty requests alternating between two replicas that both reserve
    ahead (a share of one half lets this small limit do so): ten pass, whichever replica holds what."""

    def replica() -> GatewayServer:
        return GatewayServer(
            gateway_settings(
                simulator.base_url,
                admin_key=ADMIN_KEY,
                store=own_redis.url,
                store_prefix=prefix,
                limits={"ahead_max_share": 0.5, "ahead_idle_s": 60},
            )
        )

    prefix = "a" + uuid.uuid4().hex[:8]
    with replica() as one, replica() as two:
        key = make_key(one, make_team(one), rpm=10)
        wait_until(lambda: chat(two, key["key"], BODY).status_code == 200, 10, "the key known to both")
        statuses = [chat((one, two)[i % 2], key["key"], BODY).status_code for i in range(30)]
        assert statuses.count(200) == 9, statuses  # one of the ten went to the probe above
        assert ahead_metric(one, "taken") > 0 and ahead_metric(two, "taken") > 0  # both reserved ahead
        assert set(statuses) == {200, 429}


def test_small_limits_and_a_limits_last_room_are_never_reserved_ahead(
    simulator: SimulatorThread, own_redis: RedisServer
) -> None:
    with redis_gateway(simulator, own_redis, limits={"ahead_idle_s": 60}) as gateway:
        prefix = gateway.settings.store_prefix
        # A team of 10 concurrent requests: one request is 10% of it, more than the 1% share.
        small = make_key(gateway, make_team(gateway, max_concurrency=10), **BIG)
        assert chat(gateway, small["key"], BODY).status_code == 200
        big = make_key(gateway, make_team(gateway), **BIG)
        assert chat(gateway, big["key"], BODY).status_code == 200
        wait_until(lambda: ahead_held(own_redis, prefix) == HELD, 10, "the big key's next requests reserved")
        held = lease_members(own_redis, prefix)
        assert not any(m.startswith("ahead:") for k, ms in held.items() if small["id"] in k for m in ms)
        # Teammates of a small team limit see it whole: three a minute, three requests of two keys.
        team = make_team(gateway, rpm=3)
        first, second = make_key(gateway, team, **BIG), make_key(gateway, team, **BIG)
        statuses = [chat(gateway, k["key"], BODY).status_code for k in (first, second, second)]
        assert statuses == [200, 200, 200]


@pytest.mark.anyio
async def test_a_reservation_ahead_needs_room_for_one_more(store: Store) -> None:
    """The store's headroom: reserve one request's worth only if two would fit."""
    period, ttl = budget_period("day")
    rpm = Check("key", "h1", "requests", 3)
    slots = Check("key", "h1", "concurrency", 2)
    budget = Check("key", "h1", "budget", 1000, 300, period, ttl)
    assert (await store.admit([rpm], "m1", 60_000, headroom=2)).ok  # 3 -> 2
    assert (await store.admit([rpm], "m2", 60_000, headroom=2)).ok  # 2 -> 1
    refused = await store.admit([rpm], "m3", 60_000, headroom=2)
    assert not refused.ok and refused.failed == 0
    last = await store.admit([rpm], "m4", 60_000)  # a request itself still takes the last one
    assert last.ok and last.states[0][0] == 0
    assert (await store.admit([slots, budget], "s1", 60_000, headroom=2)).ok  # 1 slot, 300 held
    refused = await store.admit([slots, budget], "s2", 60_000, headroom=2)
    assert not refused.ok and refused.failed == 0  # 1 + 2 slots > 2
    assert not (await store.admit([budget], "s3", 60_000, headroom=3)).ok  # 300 + 900 > 1000
    assert (await store.admit([budget], "s4", 60_000, headroom=2)).ok  # 300 + 600 <= 1000


@pytest.mark.anyio
async def test_an_unused_request_is_given_back_to_its_bucket(store: Store) -> None:
    rpm = Check("key", "g1", "requests", 2)
    assert (await store.admit([rpm], "m1", 60_000)).ok
    assert (await store.admit([rpm], "m2", 60_000)).ok
    assert not (await store.admit([rpm], "m3", 60_000)).ok
    await store.settle([Settlement(rpm, "m2", 1)])  # m2 was a reservation ahead, never used
    again = await store.admit([rpm], "m4", 60_000)
    assert again.ok and again.states[0][0] == 0
    await store.settle([Settlement(rpm, "m4", 1), Settlement(rpm, "m1", 1), Settlement(rpm, "m5", 1)])
    full = await store.admit([rpm], "m6", 60_000)
    assert full.ok and full.states[0][0] == 1  # given back, but never above the limit


# -- given back ---------------------------------------------------------------------------------
def test_what_was_reserved_ahead_is_given_back_when_idle_and_at_shutdown(
    simulator: SimulatorThread, own_redis: RedisServer
) -> None:
    limits = {"ahead_max_share": 0.5, "ahead_idle_s": 0.2}
    with redis_gateway(simulator, own_redis, limits=limits) as gateway:
        prefix = gateway.settings.store_prefix
        tpm = 240  # room for the reservations ahead (two, each needing room for one more) after two requests
        key = make_key(gateway, make_team(gateway), rpm=6, tpm=tpm, max_concurrency=10, budget_usd=5)
        first = chat(gateway, key["key"], BODY)
        assert first.status_code == 200 and remaining(first, "requests") == 5
        used = first.json()["usage"]
        wait_until(lambda: ahead_held(own_redis, prefix) == HELD, 10, "the next requests reserved ahead")
        wait_until(lambda: ahead_held(own_redis, prefix) == 0, 10, "given back after idle")
        assert all(members == [] for members in lease_members(own_redis, prefix).values())  # no slot, no hold
        assert ahead_metric(gateway, "released") == SPARES and ahead_metric(gateway, "taken") == 0
        wait_until(
            lambda: Decimal(str(budget_of(gateway, f"/keys/{key['id']}")["spent_usd"])) == Decimal(str(used["cost"])),
            10,
            "the first request's cost, and nothing for the reservation",
        )
        second = chat(gateway, key["key"], BODY)
        # 6 a minute refill one every 10 s: the reservations' requests came back, so 6 - 1 - 1 remain
        # (2 had they not); their tokens too: at least tpm - the first's use - this one's estimate.
        assert remaining(second, "requests") == 4
        estimate = tpm - remaining(first, "tokens")  # the first's estimate (the bucket was full)
        assert remaining(second, "tokens") >= tpm - used["total_tokens"] - estimate
        wait_until(lambda: ahead_held(own_redis, prefix) == HELD, 10, "reserved ahead again")
    assert all(members == [] for members in lease_members(own_redis, prefix).values()), "held past shutdown"


@pytest.mark.parametrize("spares", [1, 2])
def test_a_larger_request_than_the_reservation_is_admitted_and_spend_stays_exact(
    simulator: SimulatorThread, own_redis: RedisServer, spares: int
) -> None:
    limits = {"ahead_idle_s": 3.0, "ahead_spares": spares}
    with redis_gateway(simulator, own_redis, limits=limits) as gateway:
        prefix = gateway.settings.store_prefix
        key = make_key(gateway, make_team(gateway), **BIG)
        costs = []
        for i, max_tokens in enumerate((10, 10, 200, 10, 400)):  # each larger one finds its reservations too small
            response = chat(gateway, key["key"], {**BODY, "max_tokens": max_tokens})
            assert response.status_code == 200, response.text
            costs.append(Decimal(str(response.json()["usage"]["cost"])))
            if i < 4:  # the next request finds every reservation made (a slot and a hold each)
                wait_until(lambda: ahead_held(own_redis, prefix) == 2 * spares, 10, "the next requests reserved")
        wait_until(lambda: ahead_held(own_redis, prefix) == 0, 10, "given back after idle")
        assert all(members == [] for members in lease_members(own_redis, prefix).values())
        # Taken by the 2nd and 4th requests; given back (all of them) for the 3rd and 5th, and after idle.
        assert ahead_metric(gateway, "taken") == 2 and ahead_metric(gateway, "released") == 3 * spares
        wait_until(
            lambda: Decimal(str(budget_of(gateway, f"/keys/{key['id']}")["spent_usd"])) == sum(costs),
            10,
            "spend: exactly what the five requests cost",
        )


@pytest.mark.anyio
@pytest.mark.parametrize("spares", [1, 2, 4])
async def test_accounting_is_exact_with_reservations_ahead(store: Store, spares: int) -> None:
    """Admission's own path on both stores: requests of varied sizes, some taking a reservation
    ahead, some too large for it; in the end every slot and hold is back and spend is exact."""
    outcomes: Counter[str] = Counter()
    settings = LimitsSettings(ahead_max_share=0.5, ahead_spares=spares)
    admission = Admission(store, settings, on_ahead=lambda o: outcomes.update([o]))
    values = LimitValues(rpm=100, tpm=10_000_000, max_concurrency=100, budget_usd=1000, budget_period="day")
    scope = "x" + uuid.uuid4().hex[:8]
    plan = Plan([("key", scope, values)])
    spent = 0
    taken = 0
    for i in range(40):
        demand = Demand(tokens=(100, 100, 400, 400)[i % 4], cost_nano=1000 + (i % 5) * 700)  # larger by turns
        reservation = await admission.admit(f"r{i}", plan.checks(demand), plan)
        assert reservation is not None
        taken += reservation.member.startswith("ahead:")
        cost = Decimal(500 + i) / 10**9
        admission.settle(reservation, 90, cost)
        spent += 500 + i
        await admission.flush()  # the settlement goes, and the next one's reservation lands (as at c=1)
    # Both paths, many times: taken when the next request fits (a quarter above the last one's
    # amounts), given back first when it is larger.
    assert outcomes["taken"] == taken >= 10 and outcomes["released"] >= 20
    await admission.release_spares()
    await admission.flush()
    checks = plan.checks(Demand(tokens=1, cost_nano=1))
    budget = next(c for c in checks if c.kind == "budget")
    assert await store.budget_spent(budget) == spent
    slots = Check("key", scope, "concurrency", 1)  # every slot came back: one fits under a limit of 1
    assert (await store.admit([slots], "probe", 60_000)).ok
    verdict = await store.admit(checks, "probe2", 60_000)
    assert verdict.ok
    kinds = [c.kind for c in checks]
    assert verdict.states[kinds.index("budget")][0] == 1000 * 10**9 - spent - 1  # no hold left
    assert verdict.states[kinds.index("requests")][0] == 100 - 40 - 1  # the unused one came back


# -- a store outage -----------------------------------------------------------------------------
def test_a_reservation_made_before_an_outage_admits_its_request_during_it(
    simulator: SimulatorThread, own_redis: RedisServer
) -> None:
    """Budgets close in an outage (the default policy), but requests whose budget holds were
    reserved ahead before it (one per spare) were checked then: they go through, with their
    rate-limit headers; the key's next request meets the policy."""
    with redis_gateway(simulator, own_redis, store_timeout_s=0.2, limits={"ahead_idle_s": 60}) as gateway:
        prefix = gateway.settings.store_prefix
        key = make_key(gateway, make_team(gateway), **BIG)
        assert chat(gateway, key["key"], BODY).status_code == 200
        wait_until(lambda: ahead_held(own_redis, prefix) == HELD, 10, "the next requests reserved ahead")
        own_redis.stop()
        for _ in range(SPARES):
            reserved = chat(gateway, key["key"], BODY)
            assert reserved.status_code == 200 and "x-ratelimit-remaining-requests" in reserved.headers
        refused = chat(gateway, key["key"], BODY)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"


@pytest.mark.parametrize("enabled", [True, False], ids=["ahead", "not-ahead"])
def test_the_setting_switches_it_off(simulator: SimulatorThread, own_redis: RedisServer, enabled: bool) -> None:
    with redis_gateway(simulator, own_redis, limits={"admit_ahead": enabled, "ahead_idle_s": 60}) as gateway:
        prefix = gateway.settings.store_prefix
        key = make_key(gateway, make_team(gateway), **BIG)
        for _ in range(3):
            assert chat(gateway, key["key"], BODY).status_code == 200
        if enabled:
            wait_until(lambda: ahead_held(own_redis, prefix) == HELD, 10, "reserved ahead")
        else:
            wait_until(lambda: all(m == [] for m in lease_members(own_redis, prefix).values()), 10, "all settled")
            assert ahead_held(own_redis, prefix) == 0


# -- review findings: shared limits, order, lost replies -------------------------------------------
def test_what_one_process_holds_ahead_on_a_shared_limit_stays_within_its_share(
    simulator: SimulatorThread, own_redis: RedisServer
) -> None:
    """Ten keys under a global limit of 100 concurrent requests: one request is 1% of it, so one
    key's next request may be held ahead, not ten (nobody could use the other keys' ones)."""
    limits = {"global": {"max_concurrency": 100}, "ahead_idle_s": 60}
    with redis_gateway(simulator, own_redis, limits=limits) as gateway:
        prefix = gateway.settings.store_prefix
        team = make_team(gateway)
        for key in [make_key(gateway, team, **BIG) for _ in range(10)]:
            assert chat(gateway, key["key"], BODY).status_code == 200
        wait_until(lambda: ahead_held(own_redis, prefix) > 0, 10, "a reservation ahead")
        held = lease_members(own_redis, prefix)
        on_global = [m for k, ms in held.items() if k.endswith(":concurrency:global:global") for m in ms]
        assert len([m for m in on_global if m.startswith("ahead:")]) == 1
        assert ahead_held(own_redis, prefix) == 3  # that key's own slot and hold, and the global slot


@pytest.mark.anyio
async def test_a_reservation_too_small_is_given_back_before_the_request_is_judged(store: Store) -> None:
    """9,000 tokens left, ~3,100 of them held ahead (two reservations of the last request's 1,000
    tokens and their margin), and a request for 8,500: it fits once they are given back, so that
    must happen first."""
    admission = Admission(store, LimitsSettings(ahead_max_share=0.5))
    plan = Plan([("key", "o" + uuid.uuid4().hex[:8], LimitValues(tpm=10_000))])
    started = time.monotonic()
    first = await admission.admit("r1", plan.checks(Demand(tokens=1000)), plan)
    assert first is not None
    admission.settle(first, 1000, Decimal(0))  # used what it reserved
    await admission.flush()  # and the next requests are reserved ahead: ~5,900 left
    second = await admission.admit("r2", plan.checks(Demand(tokens=8500)), plan)
    assert second is not None and second.verdict is not None and second.verdict.ok
    # 10,000 - 1,000 - 8,500, plus what refilled meanwhile (10,000 a minute: one token each 6 ms)
    refilled = math.ceil(10_000 * (time.monotonic() - started) / 60)
    assert 500 <= second.verdict.states[0][0] <= 501 + refilled, refilled


@pytest.mark.anyio
async def test_a_reservation_ahead_never_takes_a_limits_last_room(store: Store) -> None:
    """Two keys of a team of 4 a minute: key a's reservations ahead stop while the team has room
    for fewer than two more, so key b still gets the team's last request."""
    admission = Admission(store, LimitsSettings(ahead_max_share=0.5))
    team = ("team", "t" + uuid.uuid4().hex[:8], LimitValues(rpm=4))
    a = Plan([("key", "a", LimitValues()), team])
    b = Plan([("key", "b", LimitValues()), team])
    for _ in range(3):  # 4 -> 3, two reserved ahead -> 1; taken, none more (room for one); taken
        reservation = await admission.admit("a", a.checks(Demand()), a)
        assert reservation is not None
        admission.settle(reservation, 0, Decimal(0))
        await admission.flush()
    last = await admission.admit("b", b.checks(Demand()), b)
    assert last is not None and last.verdict is not None and last.verdict.states[0][0] == 0


def test_a_reservation_whose_reply_was_lost_frees_its_slot_and_hold(
    simulator: SimulatorThread, own_redis: RedisServer
) -> None:
    """Redis frozen as a request ends: its settlement and the next request's reservation time out
    in the gateway but run in Redis once it thaws. The reservation's slot and hold are freed then,
    not after the 120 s lease."""
    assert own_redis.process is not None
    pid = own_redis.process.pid
    with redis_gateway(simulator, own_redis, store_timeout_s=0.3, limits={"ahead_idle_s": 60}) as gateway:
        prefix = gateway.settings.store_prefix
        key = make_key(gateway, make_team(gateway), **BIG)
        slow = {**BODY, "simulator": {"words": 8, "chunk_delay_ms": 100}}
        errors = metric(gateway.url, "gateway_store_errors_total")
        with held_stream(gateway, key["key"], slow) as response:
            assert response.status_code == 200
            os.kill(pid, signal.SIGSTOP)
            try:
                assert b"[DONE]" in response.read()
                wait_until(
                    lambda: metric(gateway.url, "gateway_store_errors_total") >= errors + 2,
                    10,
                    "settlement and reservation timed out",
                )
            finally:
                os.kill(pid, signal.SIGCONT)
        wait_until(lambda: ahead_held(own_redis, prefix) == 0, 10, "the lost reservation's slot and hold freed")
        wait_until(lambda: all(m == [] for m in lease_members(own_redis, prefix).values()), 10, "nothing held")


@pytest.mark.anyio
async def test_a_growing_conversation_keeps_finding_its_reservation(store: Store) -> None:
    """Each request's prompt a little longer than the last (a chat): a reservation ahead holds a
    quarter more tokens and cost than the last request, so each next one fits it."""
    admission = Admission(store, LimitsSettings())
    plan = Plan([("key", "g" + uuid.uuid4().hex[:8], LimitValues(tpm=10_000_000, budget_usd=1000))])
    members = []
    for turn in range(10):
        demand = Demand(tokens=1000 + 200 * turn, cost_nano=10_000 + 2000 * turn)  # +20% or less each turn
        reservation = await admission.admit(f"t{turn}", plan.checks(demand), plan)
        assert reservation is not None
        members.append(reservation.member)
        admission.settle(reservation, 900, Decimal(5) / 10**6)
        await admission.flush()
    assert all(m.startswith("ahead:") for m in members[1:]), members


@pytest.mark.anyio
async def test_a_reservation_outlives_the_plan_it_was_made_for(store: Store) -> None:
    """A principal is rebuilt on every key-cache refresh and change, and with it its plan: the
    reservation made under the old one is taken by the next request under the new one."""
    admission = Admission(store, LimitsSettings())
    scopes = [("key", "p" + uuid.uuid4().hex[:8], LimitValues(rpm=1000))]
    old, new = Plan(scopes), Plan(list(scopes))
    first = await admission.admit("r1", old.checks(Demand()), old)
    assert first is not None
    admission.settle(first, 0, Decimal(0))
    await admission.flush()
    second = await admission.admit("r2", new.checks(Demand()), new)
    assert second is not None and second.member.startswith("ahead:")


# -- two spares: waiting, taking, idleness --------------------------------------------------------
class SlowAheadStore(MemoryStore):
    """The memory store, with its answers to settlement batches that carry reservations ahead
    arriving when the test lets them (as from a Redis far away): requests can then come while
    reservations are on their way."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[asyncio.Event] = []
        self.reserved: list[int] = []  # how many reservations each gated batch carried
        self.judged: list[str] = []  # members of requests admitted by the store itself

    async def admit(self, checks: list[Check], member: str, lease_ms: int, headroom: int = 1) -> Any:
        self.judged.append(member)
        return await super().admit(checks, member, lease_ms, headroom)

    async def settle(self, settlements: Any, batch: str = "", reserve: Any = ()) -> Any:
        if reserve:
            gate = asyncio.Event()
            self.gates.append(gate)
            self.reserved.append(len(reserve))
            await gate.wait()
        return await super().settle(settlements, batch, reserve)


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.anyio
async def test_requests_arriving_while_both_reservations_are_on_their_way_each_take_one() -> None:
    """Two requests wait for the two reservations on their way (made with one settlement batch):
    when they land, each takes one and neither goes to the store; a third, one too many, goes to
    the store at once; and a waiting request that is cancelled leaves nothing behind."""
    store = SlowAheadStore()
    admission = Admission(store, LimitsSettings(ahead_max_share=0.5))
    plan = Plan([("key", "w" + uuid.uuid4().hex[:8], LimitValues(rpm=1000, max_concurrency=1000))])
    first = await admission.admit("r0", plan.checks(Demand()), plan)
    assert first is not None
    admission.settle(first, 0, Decimal(0))
    await turns()
    assert store.reserved == [SPARES] == [2]  # both in the settlement's one round trip
    a = asyncio.ensure_future(admission.admit("a", plan.checks(Demand()), plan))
    b = asyncio.ensure_future(admission.admit("b", plan.checks(Demand()), plan))
    c = asyncio.ensure_future(admission.admit("c", plan.checks(Demand()), plan))  # one too many: the store
    await turns(10)
    assert c.done() and store.judged == [first.member, c.result().member]
    assert not a.done() and not b.done()  # waiting for the two on their way, not at the store
    store.gates[0].set()
    taken_a, taken_b = await a, await b
    assert len(store.judged) == 2
    assert taken_a is not None and taken_a.member.startswith("ahead:")
    assert taken_b is not None and taken_b.member.startswith("ahead:") and taken_b.member != taken_a.member
    # A waiting request cancelled: the reservation it waited for stays for the next one.
    for reservation in (taken_a, taken_b):
        admission.settle(reservation, 0, Decimal(0))
    await turns()
    waiting = asyncio.ensure_future(admission.admit("d", plan.checks(Demand()), plan))
    await turns()
    waiting.cancel()
    await turns()
    for gate in store.gates[1:]:  # the next batch, with the reservations d waited for
        gate.set()
    await turns(10)
    after = await admission.admit("e", plan.checks(Demand()), plan)
    assert after is not None and after.member.startswith("ahead:")
    admission.settle(after, 0, Decimal(0))
    for gate in store.gates:
        gate.set()
    await admission.release_spares()
    await admission.flush()
    slots = next(c for c in plan.checks(Demand()) if c.kind == "concurrency")
    verdict = await store.admit([slots], "probe", 60_000)
    assert verdict.ok and verdict.states[0][0] == 1000 - 1 - 1  # c's slot (never settled here) and the probe


@pytest.mark.anyio
async def test_a_request_takes_the_spare_it_fits_and_gives_back_the_older_one(store: Store) -> None:
    """Spares made for a small and then a larger request: a larger request skips the small one
    (given back with the next settlements) and takes the larger; spend and slots stay exact."""
    outcomes: Counter[str] = Counter()
    admission = Admission(store, LimitsSettings(ahead_max_share=0.5), on_ahead=lambda o: outcomes.update([o]))
    values = LimitValues(tpm=1_000_000, max_concurrency=100)
    plan = Plan([("key", "f" + uuid.uuid4().hex[:8], values)])
    small, large = Demand(tokens=100), Demand(tokens=1000)
    first = await admission.admit("r1", plan.checks(small), plan)  # its end: two spares of ~156 tokens
    assert first is not None
    admission.settle(first, 100, Decimal(0))
    await admission.flush()
    second = await admission.admit("r2", plan.checks(small), plan)  # takes one; its end tops up: 1 small
    assert second is not None and second.member.startswith("ahead:")
    admission.settle(second, 100, Decimal(0))
    await admission.flush()
    big = await admission.admit("r3", plan.checks(large), plan)  # fits neither: both given back first
    assert big is not None and not big.member.startswith("ahead:")
    assert outcomes == {"taken": 1, "released": 2}
    admission.settle(big, 1000, Decimal(0))  # its end: two spares of ~1,563 tokens
    await admission.flush()
    third = await admission.admit("r4", plan.checks(small), plan)  # takes a large one; tops up: 1 small
    assert third is not None and third.member.startswith("ahead:")
    admission.settle(third, 100, Decimal(0))
    await admission.flush()
    # Now a large spare, then a small one: a large request takes the large (oldest) one; a small
    # request next takes the small one.
    fourth = await admission.admit("r5", plan.checks(large), plan)
    assert fourth is not None and fourth.member.startswith("ahead:")
    assert outcomes == {"taken": 3, "released": 2}
    admission.settle(fourth, 1000, Decimal(0))
    await admission.flush()
    await admission.release_spares()
    await admission.flush()
    checks = plan.checks(Demand(tokens=1))
    verdict = await store.admit(checks, "probe", 60_000)
    kinds = [c.kind for c in checks]
    assert verdict.ok and verdict.states[kinds.index("concurrency")][0] == 100 - 1  # every slot back


@pytest.mark.anyio
async def test_a_key_that_keeps_sending_keeps_its_reservations(store: Store) -> None:
    """Idleness is the key's, not a reservation's age: a key sending a request more often than
    `ahead_idle_s` finds every one of its requests reserved, none given back; once it stops,
    all are given back."""
    outcomes: Counter[str] = Counter()
    settings = LimitsSettings(ahead_max_share=0.5, ahead_idle_s=0.3)
    admission = Admission(store, settings, on_ahead=lambda o: outcomes.update([o]))
    plan = Plan([("key", "i" + uuid.uuid4().hex[:8], LimitValues(rpm=1000, max_concurrency=1000))])
    for i in range(8):
        reservation = await admission.admit(f"r{i}", plan.checks(Demand()), plan)
        assert reservation is not None
        admission.settle(reservation, 0, Decimal(0))
        await admission.flush()
        await asyncio.sleep(0.2)  # the key's pace: the oldest spare is two requests (0.4 s) old when taken
        assert admission.release_idle() == 0
    assert outcomes == {"taken": 7}
    await asyncio.sleep(0.35)
    assert admission.release_idle() == SPARES
    await admission.flush()
    slots = next(c for c in plan.checks(Demand()) if c.kind == "concurrency")
    assert (await store.admit([slots], "probe", 60_000)).states[0][0] == 1000 - 1  # every slot back
