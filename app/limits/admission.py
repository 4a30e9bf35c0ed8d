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

The parts, each a module of its own: which limits apply and how much a request asks of them
(`plan`), what an admitted request holds (`reservation`), the reservations kept ahead (`ahead`),
refusals in the client's terms (`refusal`) and settlement in batches (`settlement`). This module
decides: it asks the store, takes a reservation ahead when one fits, applies the outage policy.

Store outages follow an explicit policy per concern (`limits.on_store_error`): rate limits
open by default, budgets closed. An outage is logged once when it starts and once when it
ends; while it lasts, the store is probed at most once a second instead of on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from app.auth.keys import Principal
from app.errors import StoreUnavailableError
from app.limits.ahead import AheadBook, OnWay
from app.limits.checks import NANO, Check, Settlement, Verdict, budget_period
from app.limits.plan import Plan, Scope, merged
from app.limits.refusal import refusal
from app.limits.reservation import Reservation
from app.limits.settlement import Outbox, adjustment_of, given_back, settlement_of
from app.settings import LimitsSettings
from app.store.base import Store, StoreError

log = logging.getLogger(__name__)

RATE_KINDS = ("requests", "tokens", "concurrency")
PROBE_INTERVAL_S = 1.0
SWEEP_INTERVAL_S = 60.0  # limit state that says nothing any more goes (one replica does it)


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
        self._members = itertools.count()
        self._members_prefix = secrets.token_hex(4)
        self._ahead = settings.admit_ahead
        self._book = AheadBook(settings)
        self._outbox = Outbox(
            store, self.lease_ms, self._reserve_ahead, self._land, self._store_failed, self._store_recovered
        )

    # -- which limits apply ------------------------------------------------------------------
    def plan(self, principal: Principal, shared_key: bool) -> Plan:
        """The key's, the team's and (on the shared OpenRouter key) the global limits, cached per
        principal (a key or team change makes a new principal)."""
        cached: Plan | None = principal.cache.get(("plan", shared_key))
        if cached is None:
            cached = principal.cache[("plan", shared_key)] = Plan(self._scopes(principal, shared_key))
        return cached

    def _scopes(self, principal: Principal, shared_key: bool) -> list[Scope]:
        scopes = [("key", principal.key_id, merged(principal.record, self.settings.key_defaults))]
        if principal.team is not None:
            scopes.append(("team", principal.team.name, merged(principal.team.record, self.settings.team_defaults)))
        if shared_key:
            scopes.append(("global", "global", self.settings.global_))
        return scopes

    async def budget_state(self, scope: str, scope_id: str, record: Any) -> dict[str, Any] | None:
        """The current period's settled spend of a key's or team's budget, for the admin API."""
        defaults = self.settings.key_defaults if scope == "key" else self.settings.team_defaults
        values = merged(record, defaults)
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
            spare, unfit = await self._book.take(plan.owner, checks)
            if spare is not None:
                spare.owner, spare.ahead = plan.owner, checks
                if self._on_ahead:
                    self._on_ahead("taken")
                if unfit:
                    self._outbox.queue([item for old in unfit for item in self._given_back(old)])
                return spare
            if unfit:
                # Made for a smaller request, under other limits or in an earlier budget period:
                # given back before this request is judged, so that their room counts.
                await self._outbox.send_first([item for spare in unfit for item in self._given_back(spare)])
        # The holder's name in the store: the request id (which a client may choose, and reuse)
        # made unique by this process, so two requests never share one slot or one budget hold.
        member = f"{request_id}:{self._members_prefix}{next(self._members):x}"
        verdict = await self._decide(member, checks)
        if verdict is None:
            return Reservation(member, checks, None)  # admitted blind; its spend is still settled
        if not verdict.ok:
            assert verdict.failed is not None
            check = checks[verdict.failed]
            self.counters.rejected[check.kind] = self.counters.rejected.get(check.kind, 0) + 1
            raise refusal(check, verdict)
        reservation = Reservation(member, checks, verdict)
        if reservation.leases:
            self._active[member] = reservation
        if ahead is not None and plan is not None:
            reservation.owner, reservation.ahead = plan.owner, ahead
        return reservation

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

    # -- admission ahead -----------------------------------------------------------------------
    def _reserve_ahead(self, owner: str, checks: list[Check]) -> list[OnWay]:
        """The reservations ahead to make for `owner` with the batch being sent."""
        if not self._ahead or self._down_since is not None:
            return []
        return self._book.wanted(owner, checks, self._ahead_member)

    def _ahead_member(self) -> str:
        return f"ahead:{self._members_prefix}{next(self._members):x}"

    def _land(self, way: OnWay, verdict: Verdict | None) -> None:
        """A reservation ahead made (or not: refused, or its batch failed) by the store."""
        if verdict is None:
            # Its reply may be lost after the store made it: free the slots and holds it may have
            # (unknown members are ignored); tokens taken, if any, come back by refill.
            held = [c for c in way.checks if c.kind in ("concurrency", "budget")]
            self._outbox.queue([Settlement(c, way.member, 0) for c in held])
        spare = self._book.land(way, verdict)
        if spare is not None and spare.leases:
            self._active[way.member] = spare

    def _given_back(self, spare: Reservation) -> list[Settlement]:
        """A reservation never used, marked settled: what gives it back."""
        if spare.settled:
            return []
        spare.settled = True
        self._active.pop(spare.member, None)
        if self._on_ahead:
            self._on_ahead("released")
        return given_back(spare)

    def release(self, spare: Reservation) -> None:
        """Give back a reservation never used (with the next settlements)."""
        self._outbox.queue(self._given_back(spare))

    def release_idle(self, idle_s: float | None = None) -> int:
        """Release the reservations ahead of principals that sent no request for `idle_s` (all of
        them with 0); returns how many."""
        spares = self._book.idle(self.settings.ahead_idle_s if idle_s is None else idle_s)
        for spare in spares:
            self.release(spare)
        return len(spares)

    async def release_spares(self) -> None:
        """At shutdown: let reservations on their way land, then give every one back."""
        self._ahead = False
        await self._outbox.sent()  # reservations on their way go with its batches; never raises
        self.release_idle(0)

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
        await self._outbox.send_first([Settlement(c, member, 0) for c in reservation.checks if c.kind == "concurrency"])

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
            self._outbox.want(reservation.owner, reservation.ahead)
        self._outbox.queue(settlement_of(reservation, tokens, cost))

    def adjust(self, reservation: Reservation, tokens: int, cost_delta: Decimal) -> None:
        """A settled request's real use became known later: tokens as a new total, cost as a delta."""
        self._outbox.queue(adjustment_of(reservation, tokens, cost_delta))

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
        await self._outbox.flush()

    async def renew(self) -> None:
        leases = [lease for r in self._active.values() for lease in r.leases]
        if leases:
            with contextlib.suppress(StoreError):
                await self.store.renew(leases, self.lease_ms)

    @property
    def pending_settlements(self) -> int:
        return self._outbox.pending
