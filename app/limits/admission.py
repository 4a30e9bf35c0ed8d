"""Admission: every limit of a request (key, team, global) decided and reserved in one store
round trip, settled to real use when the request ends, and told to the client in OpenAI's
headers.

Admission ahead (`limits.admit_ahead`, on by default): when a principal's request ends, its
reservations ahead are topped up to `limits.ahead_spares` (2), each that request's worth (tokens
and cost a quarter higher per spare, compounded), in the same script call as the settlement, so the
principal's next request is admitted without waiting for the store; with two, also a request
that arrives before the last one's settlement is answered. What one process holds ahead on a
limit, over all principals, stays within `limits.ahead_max_share` (1%) of it, and a reservation
is made only while every limit has room for it and one more. A request takes the oldest one it
fits. Unused, one is given back whole: once its principal has sent no request for
`limits.ahead_idle_s`, at shutdown, or when a request does not fit it (first, if that request
fits none). Limits are never overshot: what is reserved ahead is held in the store like any
request's reservation.

Store outages follow an explicit policy per concern (`limits.on_store_error`): rate limits
open by default, budgets closed. An outage is logged once when it starts and once when it
ends; while it lasts, the store is probed at most once a second instead of on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import Any

from app.auth.keys import Principal
from app.auth.records import LimitValues
from app.errors import BudgetExceededError, RateLimitError, StoreUnavailableError
from app.limits import estimate
from app.limits.checks import BUCKET_KINDS, NANO, Check, Reserve, Settlement, Verdict, budget_period, format_duration
from app.settings import LimitsSettings
from app.store.base import Store, StoreError

log = logging.getLogger(__name__)

RATE_KINDS = ("requests", "tokens", "concurrency")
Scope = tuple[str, str, LimitValues]
PROBE_INTERVAL_S = 1.0
SWEEP_INTERVAL_S = 60.0  # limit state that says nothing any more goes (one replica does it)
MAX_PENDING_SETTLEMENTS = 100_000
AHEAD_HEADROOM = 2  # a reservation ahead is made only while every limit has room for it and one more
AHEAD_MARGIN = 4  # ... tokens and cost a quarter above the last request's, compounded per spare (conversations grow)


@dataclass(slots=True)
class Reservation:
    """What one request holds: its checks as admitted, to settle when it ends."""

    member: str
    checks: list[Check]
    verdict: Verdict | None  # None: admitted without the store (an outage, with an open policy)
    settled: bool = False
    tokens: int = 0  # what it was settled at
    owner: str = ""  # admission ahead: whose next request to reserve when this one ends ...
    ahead: list[Check] | None = None  # ... and with what amounts

    def headers(self) -> dict[str, str]:
        """x-ratelimit-* of the tightest requests and tokens limits."""
        headers: dict[str, str] = {}
        if self.verdict is None:
            return headers
        states, checks = self.verdict.states, self.checks
        tightest = {"requests": -1, "tokens": -1}  # kind -> index of its check with the least left
        for i, check in enumerate(checks):
            best = tightest.get(check.kind)
            if best is not None and (best < 0 or states[i][0] < states[best][0]):
                tightest[check.kind] = i
        for kind, i in tightest.items():
            if i >= 0:
                remaining, reset_ms = states[i]
                headers[f"x-ratelimit-limit-{kind}"] = str(checks[i].limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, remaining))
                headers[f"x-ratelimit-reset-{kind}"] = format_duration(reset_ms)
        return headers

    @property
    def leases(self) -> list[tuple[Check, str]]:
        return [(c, self.member) for c in self.checks if c.kind in ("concurrency", "budget")]


@dataclass(slots=True)
class Demand:
    """What the request may use at most, known before it runs."""

    tokens: int = 0
    cost_nano: int = 0


class Plan:
    """The checks of one principal, built once; only the demand changes per request."""

    def __init__(self, scopes: list[Scope]) -> None:
        # Whose reservations ahead these checks take: the same across a key's plans (a principal
        # is rebuilt on every cache refresh and change; a reservation made under other limits
        # than the request's does not fit it and is given back).
        self.owner = "|".join(f"{scope}:{scope_id}" for scope, scope_id, _ in scopes)
        self.needs_demand = any(v.tpm is not None or v.budget_usd is not None for _, _, v in scopes)
        self._fixed: list[Check | tuple[str, str, str, int, str, str]] = []
        for scope, scope_id, values in scopes:
            if values.rpm is not None:
                self._fixed.append(Check(scope, scope_id, "requests", values.rpm))
            if values.tpm is not None:
                stem = Check(scope, scope_id, "tokens", values.tpm).name
                self._fixed.append((scope, scope_id, "tokens", values.tpm, "", stem))
            if values.max_concurrency is not None:
                self._fixed.append(Check(scope, scope_id, "concurrency", values.max_concurrency))
            if values.budget_usd is not None:
                limit = int(Decimal(str(values.budget_usd)) * NANO)
                stem = Check(scope, scope_id, "budget", limit).name
                self._fixed.append((scope, scope_id, "budget", limit, values.budget_period or "month", stem))

    def checks(self, wanted: Demand) -> list[Check]:
        out: list[Check] = []
        for item in self._fixed:
            if isinstance(item, Check):
                out.append(item)
                continue
            scope, scope_id, kind, limit, period, stem = item
            if kind == "tokens":
                out.append(Check(scope, scope_id, kind, limit, wanted.tokens, "", 0, stem))
            else:
                period_id, ttl = budget_period(period)
                out.append(Check(scope, scope_id, kind, limit, wanted.cost_nano, period_id, ttl, f"{stem}:{period_id}"))
        return out


@dataclass(slots=True)
class _Ahead:
    """A principal's reservations made ahead (oldest first), and those on their way."""

    spares: deque[Reservation] = field(default_factory=deque)
    on_way: set[str] = field(default_factory=set)  # members of the reservations on their way
    waiting: int = 0  # requests waiting for one on its way: at most one each
    landed: asyncio.Future[None] | None = None  # what they wait on: done when one lands (made or not)
    used: float = 0.0  # when the principal last asked for one or topped them up (monotonic)

    def wake(self) -> None:
        landed, self.landed = self.landed, None
        if landed is not None and not landed.done():
            landed.set_result(None)


@dataclass(slots=True)
class _OnWay:
    """A reservation ahead sent with a settlement batch, until its verdict lands."""

    owner: str
    state: _Ahead
    member: str
    checks: list[Check]


@dataclass
class AdmissionCounters:
    store_errors: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class Admission:
    def __init__(
        self,
        store: Store,
        settings: LimitsSettings,
        on_store_error: Callable[[], None] | None = None,
        on_ahead: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.lease_ms = int(settings.lease_s * 1000)
        self.counters = AdmissionCounters()
        self._on_store_error = on_store_error
        self._on_ahead = on_ahead  # "taken" | "released", for the metrics
        self._down_since: float | None = None
        self._next_probe = 0.0
        self._active: dict[str, Reservation] = {}
        self._pending: deque[tuple[str, list[Settlement]]] = deque(maxlen=MAX_PENDING_SETTLEMENTS)
        self._outbox: list[Settlement] = []
        self._sending: asyncio.Future[None] | None = None
        self._members = itertools.count()
        self._batches = itertools.count()
        self._batches_prefix = secrets.token_hex(8)  # batch ids must never collide across processes
        self._members_prefix = secrets.token_hex(4)
        self._ahead = settings.admit_ahead
        self._aheads: dict[str, _Ahead] = {}  # by plan owner
        self._held_ahead: dict[str, int] = {}  # check name -> amount this process holds ahead
        self._tasks: set[asyncio.Future[None]] = set()  # referenced: the loop holds tasks weakly
        self._wanted: list[tuple[str, list[Check]]] = []  # reservations ahead to send with settlements

    # -- which limits apply ------------------------------------------------------------------
    def plan(self, principal: Principal, shared_key: bool) -> Plan:
        """The key's, the team's and (on the shared OpenRouter key) the global limits, cached per
        principal (a key or team change makes a new principal)."""
        cached: Plan | None = principal.cache.get(("plan", shared_key))
        if cached is None:
            cached = principal.cache[("plan", shared_key)] = Plan(self._scopes(principal, shared_key))
        return cached

    def _scopes(self, principal: Principal, shared_key: bool) -> list[Scope]:
        scopes = [("key", principal.key_id, _merged(principal.record, self.settings.key_defaults))]
        if principal.team is not None:
            scopes.append(("team", principal.team.name, _merged(principal.team.record, self.settings.team_defaults)))
        if shared_key:
            scopes.append(("global", "global", self.settings.global_))
        return scopes

    async def budget_state(self, scope: str, scope_id: str, record: Any) -> dict[str, Any] | None:
        """The current period's settled spend of a key's or team's budget, for the admin API."""
        defaults = self.settings.key_defaults if scope == "key" else self.settings.team_defaults
        values = _merged(record, defaults)
        if values.budget_usd is None:
            return None
        period, ttl = budget_period(values.budget_period or "month")
        spent = await self.store.budget_spent(Check(scope, scope_id, "budget", 0, 0, period, ttl))
        return {"period": period, "limit_usd": values.budget_usd, "spent_usd": float(Decimal(spent) / NANO)}

    # -- admit ---------------------------------------------------------------------------------
    async def admit(self, request_id: str, checks: list[Check], plan: Plan | None = None) -> Reservation | None:
        """Reserve `checks` for a request, or raise the refusal. With the request's `plan`, a
        reservation made ahead for the principal is taken if the request fits it."""
        if not checks:
            return None
        ahead = None
        if plan is not None and self._ahead:
            ahead = checks
            spare, unfit = await self._take_spare(plan.owner, checks)
            if spare is not None:
                spare.owner, spare.ahead = plan.owner, checks
                if self._on_ahead:
                    self._on_ahead("taken")
                if unfit:
                    self._queue([item for old in unfit for item in self._given_back(old)])
                return spare
            if unfit:
                # Made for a smaller request, under other limits or in an earlier budget period:
                # given back before this request is judged, so that their room counts.
                await self._give_back_first(unfit)
        # The holder's name in the store: the request id (which a client may choose, and reuse)
        # made unique by this process, so two requests never share one slot or one budget hold.
        member = f"{request_id}:{self._members_prefix}{next(self._members):x}"
        verdict = await self._decide(member, checks)
        if verdict is None:
            return Reservation(member, checks, None)  # admitted blind; its spend is still settled
        if not verdict.ok:
            assert verdict.failed is not None
            raise self._refusal(checks[verdict.failed], verdict)
        reservation = Reservation(member, checks, verdict)
        if reservation.leases:
            self._active[member] = reservation
        if ahead is not None and plan is not None:
            reservation.owner, reservation.ahead = plan.owner, ahead
        return reservation

    # -- admission ahead -----------------------------------------------------------------------
    async def _take_spare(self, owner: str, checks: list[Check]) -> tuple[Reservation | None, list[Reservation]]:
        """The principal's oldest reservation ahead that `checks` fit, and those before it that
        they do not fit (to give back)."""
        state = self._aheads.get(owner)
        if state is None:
            return None, []
        state.used = time.monotonic()
        while not state.spares and len(state.on_way) > state.waiting:
            state.waiting += 1  # one request waits for each reservation on its way; the rest do not
            if state.landed is None:
                state.landed = asyncio.get_running_loop().create_future()
            try:
                await asyncio.shield(state.landed)  # never fails: _land sets it whatever the batch met
            finally:
                state.waiting -= 1
        unfit: list[Reservation] = []
        taken = None
        while state.spares:
            spare = state.spares.popleft()
            self._unhold(spare.checks)  # a request's reservation now, or given back: no longer held ahead
            if _fits(spare.checks, checks):
                taken = spare
                break
            unfit.append(spare)
        self._forget_if_empty(owner, state)
        return taken, unfit

    def _forget_if_empty(self, owner: str, state: _Ahead) -> None:
        if not state.spares and not state.on_way and self._aheads.get(owner) is state:
            del self._aheads[owner]

    def _reserve_ahead(self, owner: str, checks: list[Check]) -> list[_OnWay]:
        """The reservations ahead to make for `owner` (sent with the next settlement batch)."""
        if not self._ahead or self._down_since is not None:
            return []
        state = self._aheads.get(owner)
        wanted = self.settings.ahead_spares - (len(state.spares) + len(state.on_way) if state else 0)
        if wanted <= 0:
            return []
        checks = [_with_margin(c, self.settings.ahead_spares) for c in checks]
        # What this process holds ahead on a limit, over all keys, stays within its share: many
        # keys of a team must not fill the team's limit with reservations nobody may use.
        share, held = self.settings.ahead_max_share, self._held_ahead
        made: list[_OnWay] = []
        for _ in range(wanted):
            for check in checks:
                if held.get(check.name, 0) + check.amount > check.limit * share:
                    return made
            for check in checks:
                held[check.name] = held.get(check.name, 0) + check.amount
            if state is None:
                state = self._aheads[owner] = _Ahead()
            state.used = time.monotonic()
            member = f"ahead:{self._members_prefix}{next(self._members):x}"
            state.on_way.add(member)
            made.append(_OnWay(owner, state, member, checks))
        return made

    def _land(self, way: _OnWay, verdict: Verdict | None) -> None:
        """A reservation ahead made (or not: refused, or its batch failed) by the store."""
        if verdict is None:
            # Its reply may be lost after the store made it: free the slots and holds it may have
            # (unknown members are ignored); tokens taken, if any, come back by refill.
            self._queue([Settlement(c, way.member, 0) for c in way.checks if c.kind in ("concurrency", "budget")])
        if verdict is None or not verdict.ok:
            self._unhold(way.checks)
        else:
            spare = Reservation(way.member, way.checks, verdict)
            way.state.spares.append(spare)
            if spare.leases:
                self._active[way.member] = spare
        self._landed(way.owner, way.state, way.member)

    def _landed(self, owner: str, state: _Ahead, member: str) -> None:
        state.on_way.discard(member)
        state.wake()
        self._forget_if_empty(owner, state)

    def _unhold(self, checks: list[Check]) -> None:
        held = self._held_ahead
        for check in checks:
            left = held.get(check.name, 0) - check.amount
            if left > 0:
                held[check.name] = left
            else:
                held.pop(check.name, None)

    def _keep(self, task: asyncio.Future[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _given_back(self, spare: Reservation) -> list[Settlement]:
        """A reservation never used, marked settled: what gives back its request and tokens and
        frees its slots and holds."""
        if spare.settled:
            return []
        spare.settled = True
        self._active.pop(spare.member, None)
        if self._on_ahead:
            self._on_ahead("released")
        return [Settlement(c, spare.member, c.amount if c.kind in BUCKET_KINDS else 0) for c in spare.checks]

    def release(self, spare: Reservation) -> None:
        """Give back a reservation never used (with the next settlements)."""
        self._queue(self._given_back(spare))

    async def _give_back_first(self, spares: list[Reservation]) -> None:
        """Give back reservations never used ahead of the next command to the store: their batch
        is sent in this loop turn (on Redis, commands of one connection run in the order sent;
        the memory store applies it at once)."""
        await self._settle_first([item for spare in spares for item in self._given_back(spare)])

    async def _settle_first(self, items: list[Settlement]) -> None:
        """Send `items` as a batch of their own in this loop turn, ahead of the caller's next
        command to the store or answer to the client (on Redis, commands of one connection run
        in the order sent; the memory store applies them at once). Not awaited beyond that."""
        if items:
            self._keep(asyncio.ensure_future(self._settle_batch(items)))
            await asyncio.sleep(0)  # its first step sends it

    def release_idle(self, idle_s: float | None = None) -> int:
        """Release the reservations ahead of principals that sent no request for `idle_s` (all of
        them with 0); returns how many."""
        idle_s = self.settings.ahead_idle_s if idle_s is None else idle_s
        cutoff = time.monotonic() - idle_s
        released = 0
        for owner, state in list(self._aheads.items()):
            if state.used <= cutoff:
                for spare in state.spares:
                    self._unhold(spare.checks)
                    self.release(spare)
                released += len(state.spares)
                state.spares.clear()
            self._forget_if_empty(owner, state)
        return released

    async def release_spares(self) -> None:
        """At shutdown: let reservations on their way land, then give every one back."""
        self._ahead = False
        if self._sending is not None:
            await asyncio.wait({self._sending})  # reservations on their way go with its batches; never raises
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        self.release_idle(0)

    async def _decide(self, member: str, checks: list[Check]) -> Verdict | None:
        """The store's verdict, or None when the store is down and the policy lets the request in."""
        if self._down_since is None or time.monotonic() >= self._next_probe:
            try:
                verdict = await self.store.admit(checks, member, self.lease_ms)
            except StoreError as exc:
                self._store_failed(exc)
            else:
                self._store_recovered()
                return verdict
        else:
            self.counters.store_errors += 1
            if self._on_store_error:
                self._on_store_error()
        policy = self.settings.on_store_error
        if any(c.kind == "budget" for c in checks) and policy.budgets == "closed":
            raise StoreUnavailableError("Budgets cannot be checked right now (the limits store is unreachable).")
        if any(c.kind in RATE_KINDS for c in checks) and policy.rate_limits == "closed":
            raise StoreUnavailableError("Rate limits cannot be checked right now (the limits store is unreachable).")
        return None

    def _store_failed(self, exc: Exception) -> None:
        self.counters.store_errors += 1
        if self._on_store_error:
            self._on_store_error()
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning("limits store unreachable (%s); applying on_store_error policy until it returns", exc)
        self._next_probe = now + PROBE_INTERVAL_S

    def _store_recovered(self) -> None:
        if self._down_since is not None:
            log.warning("limits store reachable again after %.1fs", time.monotonic() - self._down_since)
            self._down_since = None

    def _refusal(self, check: Check, verdict: Verdict) -> RateLimitError:
        self.counters.rejected[check.kind] = self.counters.rejected.get(check.kind, 0) + 1
        if check.kind == "budget":
            return BudgetExceededError(
                _budget_message(check, verdict.used),
                metadata={"scope": check.scope, "period": check.period, "limit": "budget"},
            )
        never = verdict.retry_after_ms < 0
        headers: dict[str, str] = {}
        if not never:
            headers["retry-after"] = str(max(1, math.ceil(verdict.retry_after_ms / 1000)))
            headers["retry-after-ms"] = str(max(0, verdict.retry_after_ms))
        else:
            headers["x-should-retry"] = "false"
        if check.kind in ("requests", "tokens"):
            headers[f"x-ratelimit-limit-{check.kind}"] = str(check.limit)
            headers[f"x-ratelimit-remaining-{check.kind}"] = str(max(0, check.limit - verdict.used))
            headers[f"x-ratelimit-reset-{check.kind}"] = format_duration(max(0, verdict.retry_after_ms))
        what = {"requests": "requests per minute", "tokens": "tokens per minute", "concurrency": "concurrent requests"}[
            check.kind
        ]
        message = f"Rate limit of the {check.scope}: {check.limit} {what}."
        if check.kind == "tokens" and never:
            message = (
                f"This request may use {check.amount} tokens, more than the {check.scope}'s limit of "
                f"{check.limit} tokens per minute; lower max_tokens (max_output_tokens on Responses)."
            )
        return RateLimitError(
            message,
            type="tokens" if check.kind == "tokens" else "requests",
            headers=headers,
            metadata={"scope": check.scope, "limit": check.kind},
        )

    # -- settle --------------------------------------------------------------------------------
    async def free_slots(self, reservation: Reservation | None) -> None:
        """A request's concurrency slots, freed just before its answer is sent, ahead of its
        settlement (which then finds them gone: freeing twice is a no-op in both stores). The
        client may send its next request to another replica the moment the answer arrives; that
        replica must find the slot free. Written first, not answered first: waiting for the reply
        would put the store back on every such request's wait (and an outage's timeout on it),
        which admission ahead takes off it; Redis serves its connections in no set order, so in
        rare cases the other replica's admission is still served first."""
        if reservation is None or reservation.settled or self._down_since is not None:
            return
        member = reservation.member
        await self._settle_first([Settlement(c, member, 0) for c in reservation.checks if c.kind == "concurrency"])

    def settle(self, reservation: Reservation, tokens: int, cost: Decimal) -> None:
        """Replace the estimates by what the request used (0 if it failed before upstream).

        Queued, not awaited: settlements of requests ending together go in one store round trip."""
        if reservation.settled:
            return
        reservation.settled = True
        reservation.tokens = tokens
        self._active.pop(reservation.member, None)
        if reservation.ahead is not None and self._ahead:
            # Reserved when a request ends, made in the same script call as its settlement: the store's
            # work then overlaps the client's next request arriving.
            self._wanted.append((reservation.owner, reservation.ahead))
        cost_nano = int((cost * NANO).to_integral_value(ROUND_HALF_UP)) if cost else 0
        member = reservation.member
        self._queue(
            [
                Settlement(c, member, cost_nano if c.kind == "budget" else c.amount - tokens)
                for c in reservation.checks
                if c.kind != "requests"
            ]
        )

    def adjust(self, reservation: Reservation, tokens: int, cost_delta: Decimal) -> None:
        """A settled request's real use became known later: tokens as a new total, cost as a delta."""
        delta_nano = int((cost_delta * NANO).to_integral_value(ROUND_HALF_UP))
        given_back = reservation.tokens - tokens
        reservation.tokens = tokens
        self._queue(
            [
                Settlement(c, reservation.member, delta_nano if c.kind == "budget" else given_back)
                for c in reservation.checks
                if c.kind in ("tokens", "budget")
            ]
        )

    def _queue(self, items: list[Settlement]) -> None:
        self._outbox.extend(items)
        if self._sending is None and (self._outbox or self._wanted):
            self._sending = asyncio.ensure_future(self._send_outbox())

    async def _send_outbox(self) -> None:
        try:
            await asyncio.sleep(0)  # let every request ending in this loop turn join the batch
            while self._outbox or self._wanted:
                wanted, self._wanted = self._wanted, []
                ahead = [way for owner, checks in wanted for way in self._reserve_ahead(owner, checks)]
                items, self._outbox = self._outbox, []
                if not items and not ahead:
                    break
                await self._settle_batch(items, ahead)
        finally:
            self._sending = None

    async def _settle_batch(self, items: list[Settlement], ahead: list[_OnWay] | None = None) -> None:
        """Settle `items` and make the reservations `ahead` in one store round trip."""
        # Retried under this id if it fails: the store applies a batch once, however often sent.
        batch = f"{self._batches_prefix}{next(self._batches):x}"
        verdicts: list[Verdict] = []
        reserve = [Reserve(way.checks, way.member, self.lease_ms, AHEAD_HEADROOM) for way in ahead or ()]
        try:
            verdicts = await self.store.settle(items, batch, reserve)
        except StoreError as exc:
            self._store_failed(exc)  # the policy applies from the next request without a spare
            if items:
                self._pending.append((batch, items))  # settled later (alone): spend must not be lost
        except asyncio.CancelledError:
            if items:
                self._pending.append((batch, items))  # sent or not: applied once when flushed
            raise
        except Exception:  # a bug, not an outage: still, spend must not be lost
            log.exception("settlement batch failed")
            if items:
                self._pending.append((batch, items))
        finally:  # a request may wait on a reservation ahead: each lands, whatever happened
            for i, way in enumerate(ahead or ()):
                self._land(way, verdicts[i] if i < len(verdicts) else None)

    async def run(self) -> None:
        """Background duty: flush settlements held back, renew leases of running requests, sweep."""
        every = self.settings.lease_s / 4
        renewed = swept = time.monotonic()
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            self.release_idle()
            await self.flush()
            if time.monotonic() - renewed >= every:
                renewed = time.monotonic()
                await self.renew()
            if time.monotonic() - swept >= SWEEP_INTERVAL_S:
                swept = time.monotonic()
                with contextlib.suppress(StoreError):
                    await self.store.sweep()

    async def flush(self) -> None:
        """Send what is queued; retry what failed; let reservations ahead on their way land."""
        if self._sending is not None:
            await asyncio.shield(self._sending)
        if self._tasks:
            await asyncio.wait(list(self._tasks))  # a cancelled flush must not cancel them
        while self._pending:
            batch, items = self._pending[0]
            try:
                await self.store.settle(items, batch)
            except StoreError:
                return
            self._pending.popleft()
            self._store_recovered()

    async def renew(self) -> None:
        leases = [lease for r in self._active.values() for lease in r.leases]
        if leases:
            with contextlib.suppress(StoreError):
                await self.store.renew(leases, self.lease_ms)

    @property
    def pending_settlements(self) -> int:
        return len(self._pending)


def _budget_message(check: Check, used: int) -> str:
    """Why a budget refused a request: used up, or this request's worst-case cost (reserved before
    it runs, from the model's price and max_tokens) larger than what is left of it."""
    budget, spent = f"{check.scope} budget of ${Decimal(check.limit) / NANO}", f"${Decimal(used) / NANO:.6f}"
    if used >= check.limit:
        return f"The {budget} for this period is used up ({spent} spent or held)."
    worst = f"This request may cost up to ${Decimal(check.amount) / NANO:.6f} (the model's price for its output limit)"
    if check.amount > check.limit:
        return f"{worst}, more than the whole {budget} per period; lower max_tokens (max_output_tokens on Responses)."
    left = f"more than is left of the {budget} for this period ({spent} spent or held)"
    return f"{worst}, {left}; lower max_tokens (max_output_tokens on Responses)."


def _fits(spare: list[Check], checks: list[Check]) -> bool:
    """Whether a reservation ahead covers a request: the same limits, each amount at least its."""
    if len(spare) != len(checks):
        return False
    for held, wanted in zip(spare, checks, strict=True):
        if held.name != wanted.name or held.limit != wanted.limit or held.amount < wanted.amount:
            return False
    return True


def _with_margin(check: Check, steps: int) -> Check:
    """A check reserved ahead: tokens and cost a quarter above the request's, compounded over the
    requests made before it is taken (`steps`, the spares kept), so a conversation whose prompt
    grows by less than a quarter from one request to the next still finds its reservation fitting."""
    if check.kind not in ("tokens", "budget") or not check.amount:
        return check
    amount = check.amount
    for _ in range(steps):
        amount += -(-amount // AHEAD_MARGIN)
    return Check(check.scope, check.scope_id, check.kind, check.limit, amount, check.period, check.ttl_s, check.name)


def _merged(record: Any, defaults: LimitValues) -> LimitValues:
    """A key's or team's own limits, each missing one taken from the configured defaults."""
    if record is None:
        return defaults
    values = {name: getattr(record, name) for name in LimitValues.model_fields}
    for name in LimitValues.model_fields:
        if values[name] is None:
            values[name] = getattr(defaults, name)
    if record.budget_usd is not None:
        values["budget_period"] = record.budget_period
    return LimitValues.model_construct(**values)


def demand_of(
    payload: dict[str, Any],
    model_entry: dict[str, Any] | None,
    prices: Any,
    embeddings: bool,
    limits: tuple[str, ...] = ("max_completion_tokens", "max_tokens"),
) -> Demand:
    prompt = estimate.prompt_tokens(payload)
    completion = estimate.completion_tokens(payload, model_entry, embeddings, limits)
    cost = estimate.worst_case_cost(prompt, completion, prices)
    return Demand(prompt + completion, int((cost * NANO).to_integral_value(ROUND_CEILING)))
