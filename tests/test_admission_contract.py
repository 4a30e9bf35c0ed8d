"""Admission semantics, the same on both stores: token buckets (RPM, TPM), leases,
budgets, all-or-nothing reservation, and exactness under concurrency; one admission reads buckets,
spend and expired holds together; budget periods turn at UTC midnight."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from app.limits.admission import Admission
from app.limits.checks import Check, Reserve, Settlement, budget_period, format_duration
from app.settings import LimitsSettings
from app.store.base import Store

pytestmark = pytest.mark.anyio
LEASE_MS = 60_000


def member() -> str:
    return uuid.uuid4().hex


async def test_requests_bucket(store: Store) -> None:
    check = Check("key", "k1", "requests", 3)
    verdicts = [await store.admit([check], member(), LEASE_MS) for _ in range(4)]
    assert [v.ok for v in verdicts] == [True, True, True, False]
    assert [v.states[0][0] for v in verdicts[:3]] == [2, 1, 0]  # remaining
    assert all(0 < v.states[0][1] <= 60_000 for v in verdicts[:3])  # reset in ms
    refused = verdicts[3]
    assert refused.failed == 0 and refused.used == 3 and 0 < refused.retry_after_ms <= 60_000


async def test_all_or_nothing(store: Store) -> None:
    rpm = Check("key", "k2", "requests", 10)
    slots = Check("team", "t2", "concurrency", 1)
    first = member()
    assert (await store.admit([rpm, slots], first, LEASE_MS)).ok
    refused = await store.admit([rpm, slots], member(), LEASE_MS)
    assert not refused.ok and refused.failed == 1
    await store.settle([Settlement(slots, first, 0)])
    again = await store.admit([rpm, slots], member(), LEASE_MS)
    assert again.ok and again.states[0][0] == 8  # the refused request took no RPM slot


async def test_tokens_reserve_estimate_and_settle_to_actual(store: Store) -> None:
    def tokens(amount: int) -> Check:
        return Check("key", "k3", "tokens", 100, amount)

    first = member()
    assert (await store.admit([tokens(60)], first, LEASE_MS)).ok
    refused = await store.admit([tokens(60)], member(), LEASE_MS)
    assert not refused.ok and refused.used == 60 and 0 < refused.retry_after_ms <= 60_000
    await store.settle([Settlement(tokens(60), first, 60 - 10)])  # it used 10: 50 go back
    admitted = await store.admit([tokens(60)], member(), LEASE_MS)
    assert admitted.ok and admitted.states[0][0] == 30
    never = await store.admit([tokens(101)], member(), LEASE_MS)
    assert not never.ok and never.retry_after_ms == -1


async def test_concurrency_leases(store: Store) -> None:
    check = Check("global", "global", "concurrency", 2)
    first, second = member(), member()
    assert (await store.admit([check], first, LEASE_MS)).ok
    assert (await store.admit([check], second, 300)).ok  # a short lease: its holder "crashed"
    assert not (await store.admit([check], member(), LEASE_MS)).ok
    await store.settle([Settlement(check, first, 0)])
    assert (await store.admit([check], member(), LEASE_MS)).ok
    assert not (await store.admit([check], member(), LEASE_MS)).ok
    await asyncio.sleep(0.4)  # the crashed holder's lease runs out: no leak
    assert (await store.admit([check], member(), LEASE_MS)).ok


async def test_renewed_leases_stay(store: Store) -> None:
    check = Check("key", "k4", "concurrency", 1)
    holder = member()
    assert (await store.admit([check], holder, 300)).ok
    for _ in range(3):
        await asyncio.sleep(0.15)
        await store.renew([(check, holder)], 300)
    assert not (await store.admit([check], member(), LEASE_MS)).ok


async def test_budget_holds_and_settles(store: Store) -> None:
    period, ttl = budget_period("day")

    def budget(amount: int) -> Check:
        return Check("key", "k5", "budget", 1000, amount, period, ttl)

    first, second = member(), member()
    assert (await store.admit([budget(400)], first, LEASE_MS)).ok
    assert (await store.admit([budget(400)], second, LEASE_MS)).ok
    refused = await store.admit([budget(400)], member(), LEASE_MS)
    assert not refused.ok and refused.used == 800 and refused.retry_after_ms == -1
    await store.settle([Settlement(budget(400), first, 100)])
    assert await store.budget_spent(budget(0)) == 100
    third = await store.admit([budget(400)], member(), LEASE_MS)
    assert third.ok and third.states[0][0] == 100  # 1000 - 100 spent - 800 held
    await store.settle([Settlement(budget(400), second, 400)])
    assert await store.budget_spent(budget(0)) == 500


async def test_budget_hold_of_a_crashed_request_expires(store: Store) -> None:
    check = Check("team", "t6", "budget", 1000, 900, "total", 0)
    assert (await store.admit([check], member(), 300)).ok
    assert not (await store.admit([check], member(), LEASE_MS)).ok
    await asyncio.sleep(0.4)
    assert (await store.admit([check], member(), LEASE_MS)).ok


async def test_exact_under_concurrency(store: Store) -> None:
    rpm = Check("key", "k7", "requests", 37)
    slots = Check("key", "k7", "concurrency", 1000)
    verdicts = await asyncio.gather(*(store.admit([rpm, slots], member(), LEASE_MS) for _ in range(200)))
    assert sum(v.ok for v in verdicts) == 37


async def test_one_batch_settles_many_requests_of_one_limit(store: Store) -> None:
    """Requests ending together are settled in one store call: each frees its own slot and hold."""
    period, ttl = budget_period("day")
    slots = Check("key", "k8", "concurrency", 3)

    def budget(amount: int) -> Check:
        return Check("key", "k8", "budget", 1000, amount, period, ttl)

    holders = [member() for _ in range(3)]
    for holder in holders:
        assert (await store.admit([slots, budget(300)], holder, LEASE_MS)).ok
    refused = await store.admit([slots, budget(1)], member(), LEASE_MS)
    assert not refused.ok and refused.failed == 0 and refused.used == 3
    settlements = [Settlement(slots, h, 0) for h in holders]
    settlements += [Settlement(budget(300), h, spent) for h, spent in zip(holders, (10, 20, 30), strict=True)]
    await store.settle(settlements)
    assert await store.budget_spent(budget(0)) == 60
    verdict = await store.admit([slots, budget(900)], member(), LEASE_MS)
    assert verdict.ok and verdict.states == [(2, 0), (40, 0)]  # 3 - 1 slots; 1000 - 60 spent - 900 held
    # A late adjustment of a settled request changes the spend and frees nothing twice.
    await store.settle([Settlement(budget(300), holders[0], 5)])
    assert await store.budget_spent(budget(0)) == 65
    assert not (await store.admit([budget(36)], member(), LEASE_MS)).ok
    assert (await store.admit([budget(35)], member(), LEASE_MS)).ok


async def test_sweep_forgets_expired_leases_and_nothing_in_use(store: Store) -> None:
    period, ttl = budget_period("day")
    slots = Check("team", "t9", "concurrency", 2)
    rpm = Check("team", "t9", "requests", 2)

    def budget(amount: int) -> Check:
        return Check("team", "t9", "budget", 1000, amount, period, ttl)

    assert (await store.admit([slots, budget(600)], member(), 300)).ok  # its holder "crashes"
    live = member()
    assert (await store.admit([slots, budget(300), rpm], live, LEASE_MS)).ok
    assert (await store.admit([rpm], member(), LEASE_MS)).ok
    await asyncio.sleep(0.4)
    assert await store.sweep() > 0
    assert not (await store.admit([rpm], member(), LEASE_MS)).ok  # a bucket in use stays as it was
    verdict = await store.admit([slots, budget(700)], member(), LEASE_MS)  # the crashed lease went
    assert verdict.ok and verdict.states == [(0, 0), (0, 0)]  # the live one stays: 1 slot, 300 held
    assert not (await store.admit([slots], member(), LEASE_MS)).ok


async def test_thousands_of_settlements_ending_together_all_land(store: Store) -> None:
    """2,700 requests ending in one loop turn: 8,100 settlements (more values than one Lua call
    can unpack), every token, slot, hold and nano-USD of them settled exactly once."""
    period, ttl = budget_period("day")
    checks = [
        Check("key", "k10", "tokens", 10**9, 100),
        Check("key", "k10", "concurrency", 10_000),
        Check("key", "k10", "budget", 10**15, 5000, period, ttl),
    ]
    admission = Admission(store, LimitsSettings())
    reservations = [await admission.admit(f"req-{i}", checks) for i in range(2700)]
    for reservation in reservations:
        assert reservation is not None
        admission.settle(reservation, 40, Decimal("0.000001"))  # 1,000 nano-USD each
    await admission.flush()
    assert admission.pending_settlements == 0
    assert await store.budget_spent(checks[2]) == 2700 * 1000
    verdict = await store.admit(checks, member(), LEASE_MS)
    assert verdict.ok
    assert verdict.states[1][0] == 10_000 - 1  # every slot came back
    assert verdict.states[2][0] == 10**15 - 2700 * 1000 - 5000  # every hold came back
    assert verdict.states[0][0] >= 10**9 - 2700 * 40 - 100  # the unused tokens came back


async def test_a_batch_sent_again_is_not_applied_again(store: Store) -> None:
    """A settlement whose reply was lost (a timeout after the store applied it) is sent again under
    the same batch id: the spend, the tokens and the slot count once."""
    period, ttl = budget_period("day")
    slots = Check("key", "k11", "concurrency", 1)
    tokens = Check("key", "k11", "tokens", 100, 60)
    budget = Check("key", "k11", "budget", 1000, 400, period, ttl)
    holder = member()
    assert (await store.admit([slots, tokens, budget], holder, LEASE_MS)).ok
    batch = [Settlement(slots, holder, 0), Settlement(tokens, holder, 50), Settlement(budget, holder, 300)]
    for _ in range(3):
        await store.settle(batch, "batch-1")
    assert await store.budget_spent(budget) == 300
    after = await store.admit([slots, tokens, budget], member(), LEASE_MS)
    assert after.ok and after.states == [(0, 0), (after.states[1][0], after.states[1][1]), (1000 - 300 - 400, 0)]
    assert 30 <= after.states[1][0] <= 31  # 100 - 60 + 50 given back once - 60 (+ refill)
    await store.settle([Settlement(budget, holder, 5)], "batch-2")  # another batch counts
    assert await store.budget_spent(budget) == 305


def test_budget_periods_are_calendar_utc() -> None:
    from datetime import UTC, datetime

    moment = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC)
    assert budget_period("day", moment)[0] == "d20261231"
    assert budget_period("month", moment)[0] == "m202612"
    assert budget_period("total", moment) == ("total", 0)
    assert budget_period("day", moment)[1] == 30 + 2 * 86400


@pytest.mark.parametrize(
    ("ms", "text"), [(0, "0ms"), (20, "20ms"), (1000, "1s"), (1500, "1.5s"), (360_000, "6m0s"), (3_723_000, "1h2m3s")]
)
def test_durations_in_openai_style(ms: int, text: str) -> None:
    assert format_duration(ms) == text


async def test_a_settlement_batch_makes_the_reservations_sent_with_it(store: Store) -> None:
    """Reservations ahead sent with a settlement batch are judged after its settlements, in turn,
    each seeing the ones before it, as separate admissions would be; a batch sent again is not
    applied again, but the reservations sent with it are judged; a batch of reservations alone
    works too."""
    period, ttl = budget_period("day")
    slots = Check("key", "k12", "concurrency", 2)
    tokens = Check("key", "k12", "tokens", 100, 40)
    budget = Check("key", "k12", "budget", 1000, 300, period, ttl)
    checks = [slots, tokens, budget]
    holder = member()
    assert (await store.admit(checks, holder, LEASE_MS)).ok  # slots 1 of 2, 60 tokens left, 300 held
    batch = [Settlement(slots, holder, 0), Settlement(tokens, holder, 40 - 10), Settlement(budget, holder, 100)]
    ahead = [Reserve(checks, f"ahead-{i}", LEASE_MS, 1) for i in range(3)]
    verdicts = await store.settle(batch, "batch-r", ahead)
    # settled first: no slot used, 90 tokens, 100 spent; then a1 and a2 fit, a3 finds both slots taken
    assert [v.ok for v in verdicts] == [True, True, False]
    assert [v.states[0][0] for v in verdicts[:2]] == [1, 0]  # slots left
    assert [v.states[1][0] for v in verdicts[:2]] in ([50, 10], [50, 11], [51, 11])  # tokens left (+ refill)
    assert [v.states[2][0] for v in verdicts[:2]] == [1000 - 100 - 300, 1000 - 100 - 600]  # budget left
    assert verdicts[2].failed == 0 and verdicts[2].used == 2
    # Sent again (a lost reply): the settlements count once; a reservation sent with it is judged.
    again = await store.settle(batch, "batch-r", [Reserve([tokens], "ahead-3", LEASE_MS, 1)])
    assert len(again) == 1 and not again[0].ok  # 10 tokens left (not 40 more given back): 40 do not fit
    assert await store.budget_spent(budget) == 100
    alone = await store.settle([], "", [Reserve([tokens], "ahead-4", LEASE_MS, 1), Reserve([slots], "x", LEASE_MS)])
    assert [v.ok for v in alone] == [False, False]
    assert await store.settle([], "", []) == []


@pytest.mark.anyio
async def test_one_admission_sees_buckets_spend_and_expired_holds(store: Store) -> None:
    """Buckets, a budget's spend and its held sum are read together; a hold that expired is
    dropped from the held sum before the budget is decided, and the verdict's states say so."""
    scope = "k" + uuid.uuid4().hex[:8]
    rpm, tpm = Check("key", scope, "requests", 10), Check("key", scope, "tokens", 1000, 100)

    def budget(amount: int) -> Check:
        return Check("key", scope, "budget", 1000, amount, "total", 0)

    crashed, paid, late = (uuid.uuid4().hex for _ in range(3))
    started = time.monotonic()
    assert (await store.admit([rpm, tpm, budget(500)], crashed, 200)).ok  # never settled: expires
    assert (await store.admit([rpm, tpm, budget(300)], paid, 60_000)).ok
    await store.settle([Settlement(tpm, paid, 100 - 40), Settlement(budget(300), paid, 250)])  # 40 tokens, 250 spent
    assert not (await store.admit([rpm, tpm, budget(300)], late, 60_000)).ok  # 250 spent + 500 held
    await asyncio.sleep(0.3)  # the crashed request's lease (200 ms) runs out
    verdict = await store.admit([rpm, tpm, budget(300)], late, 60_000)
    refill = (time.monotonic() - started) * 1000 / 60  # TPM 1000: the bucket refills 1000 a minute
    assert verdict.ok
    (rpm_left, _), (tpm_left, _), (budget_left, _) = verdict.states
    assert rpm_left == 10 - 3  # three admissions; the refused one took nothing (all or nothing)
    assert 1000 - 100 - 40 - 100 <= tpm_left <= 1000 - 100 - 40 - 100 + refill + 1  # 100 held, 40 used, 100 held
    assert budget_left == 1000 - 250 - 300  # the expired 500 is no longer held


@pytest.mark.parametrize(
    ("last", "first"),
    [
        (datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC), datetime(2026, 4, 1, 0, 0, 0, tzinfo=UTC)),
        (datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2027, 1, 1, 0, 0, 0, tzinfo=UTC)),
        (datetime(2028, 2, 29, 23, 59, 59, tzinfo=UTC), datetime(2028, 3, 1, 0, 0, 0, tzinfo=UTC)),
    ],
    ids=["month-end", "year-end", "leap-day"],
)
def test_budget_periods_turn_at_utc_midnight(last: datetime, first: datetime) -> None:
    day_before, kept_before = budget_period("day", last)
    day_after, kept_after = budget_period("day", first)
    assert day_before == "d" + last.strftime("%Y%m%d") and day_after == "d" + first.strftime("%Y%m%d")
    assert kept_before >= 1 and kept_after >= 86_400  # the spend outlives its period
    assert budget_period("month", last)[0] == "m" + last.strftime("%Y%m")
    assert budget_period("month", first)[0] == "m" + first.strftime("%Y%m")
    assert budget_period("total", last) == budget_period("total", first) == ("total", 0)
    # The same instants given in another zone are the same UTC periods.
    tokyo = timezone(timedelta(hours=9))
    assert budget_period("day", last.astimezone(tokyo))[0] == day_before
    assert budget_period("month", first.astimezone(tokyo))[0] == budget_period("month", first)[0]
    # And the current period is the UTC one.
    now = datetime.now(UTC)
    if now.strftime("%H%M") != "2359":
        assert budget_period("day")[0] == "d" + now.strftime("%Y%m%d")
        assert budget_period("month")[0] == "m" + now.strftime("%Y%m")


@pytest.mark.anyio
async def test_a_new_day_starts_with_a_fresh_budget(store: Store) -> None:
    scope = uuid.uuid4().hex[:8]
    last = datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC)
    first = last + timedelta(seconds=1)

    def check(moment: datetime, amount: int) -> Check:
        period, ttl = budget_period("day", moment)
        return Check("key", scope, "budget", 1000, amount, period, ttl)

    member = uuid.uuid4().hex
    assert (await store.admit([check(last, 1000)], member, 60_000)).ok
    await store.settle([Settlement(check(last, 1000), member, 1000)])  # the whole day's budget spent
    assert not (await store.admit([check(last, 1)], uuid.uuid4().hex, 60_000)).ok
    assert await store.budget_spent(check(first, 0)) == 0
    fresh = await store.admit([check(first, 1000)], uuid.uuid4().hex, 60_000)
    assert fresh.ok  # one second later, a new UTC day: its own spend, from zero
    assert await store.budget_spent(check(last, 0)) == 1000
