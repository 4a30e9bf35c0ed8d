"""Reservations made ahead (`limits.admit_ahead`): for each principal, its next requests' worth
reserved in the store when one of its requests ends, so that the next is admitted without a store
round trip. This module keeps the book: which principal has which reservations made or on their
way, what this process holds ahead on each limit (within `limits.ahead_max_share` of it), which
reservation a request fits, and which have been idle too long. Sending them to the store is the
settlement outbox's job (they go with its batches); giving them back is admission's."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from app.limits.checks import Check, Verdict
from app.limits.reservation import Reservation
from app.settings import LimitsSettings

AHEAD_HEADROOM = 2  # a reservation ahead is made only while every limit has room for it and one more
AHEAD_MARGIN = 4  # ... tokens and cost a quarter above the last request's, compounded per spare (conversations grow)


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
class OnWay:
    """A reservation ahead sent with a settlement batch, until its verdict lands."""

    owner: str
    state: _Ahead
    member: str
    checks: list[Check]


class AheadBook:
    def __init__(self, settings: LimitsSettings) -> None:
        self.settings = settings
        self._owners: dict[str, _Ahead] = {}  # by plan owner
        self._held: dict[str, int] = {}  # check name -> amount this process holds ahead

    async def take(self, owner: str, checks: list[Check]) -> tuple[Reservation | None, list[Reservation]]:
        """The principal's oldest reservation ahead that `checks` fit, and those before it that
        they do not fit (to give back)."""
        state = self._owners.get(owner)
        if state is None:
            return None, []
        state.used = time.monotonic()
        while not state.spares and len(state.on_way) > state.waiting:
            state.waiting += 1  # one request waits for each reservation on its way; the rest do not
            if state.landed is None:
                state.landed = asyncio.get_running_loop().create_future()
            try:
                await asyncio.shield(state.landed)  # never fails: `land` sets it whatever the batch met
            finally:
                state.waiting -= 1
        unfit: list[Reservation] = []
        taken = None
        while state.spares:
            spare = state.spares.popleft()
            self._unhold(spare.checks)  # a request's reservation now, or given back: no longer held ahead
            if fits(spare.checks, checks):
                taken = spare
                break
            unfit.append(spare)
        self._forget_if_empty(owner, state)
        return taken, unfit

    def wanted(self, owner: str, checks: list[Check], new_member: Callable[[], str]) -> list[OnWay]:
        """The reservations ahead to make for `owner` (sent with the next settlement batch)."""
        state = self._owners.get(owner)
        wanted = self.settings.ahead_spares - (len(state.spares) + len(state.on_way) if state else 0)
        if wanted <= 0:
            return []
        checks = [with_margin(c, self.settings.ahead_spares) for c in checks]
        # What this process holds ahead on a limit, over all keys, stays within its share: many
        # keys of a team must not fill the team's limit with reservations nobody may use.
        share, held = self.settings.ahead_max_share, self._held
        made: list[OnWay] = []
        for _ in range(wanted):
            for check in checks:
                if held.get(check.name, 0) + check.amount > check.limit * share:
                    return made
            for check in checks:
                held[check.name] = held.get(check.name, 0) + check.amount
            if state is None:
                state = self._owners[owner] = _Ahead()
            state.used = time.monotonic()
            member = new_member()
            state.on_way.add(member)
            made.append(OnWay(owner, state, member, checks))
        return made

    def land(self, way: OnWay, verdict: Verdict | None) -> Reservation | None:
        """A reservation ahead made by the store (returned), or not: refused, or its batch failed."""
        spare = None
        if verdict is None or not verdict.ok:
            self._unhold(way.checks)
        else:
            spare = Reservation(way.member, way.checks, verdict)
            way.state.spares.append(spare)
        way.state.on_way.discard(way.member)
        way.state.wake()
        self._forget_if_empty(way.owner, way.state)
        return spare

    def idle(self, idle_s: float) -> list[Reservation]:
        """Take out the reservations ahead of principals that sent no request for `idle_s` (all of
        them with 0), to give back."""
        cutoff = time.monotonic() - idle_s
        out: list[Reservation] = []
        for owner, state in list(self._owners.items()):
            if state.used <= cutoff:
                for spare in state.spares:
                    self._unhold(spare.checks)
                out.extend(state.spares)
                state.spares.clear()
            self._forget_if_empty(owner, state)
        return out

    def _forget_if_empty(self, owner: str, state: _Ahead) -> None:
        if not state.spares and not state.on_way and self._owners.get(owner) is state:
            del self._owners[owner]

    def _unhold(self, checks: list[Check]) -> None:
        held = self._held
        for check in checks:
            left = held.get(check.name, 0) - check.amount
            if left > 0:
                held[check.name] = left
            else:
                held.pop(check.name, None)


def fits(spare: list[Check], checks: list[Check]) -> bool:
    """Whether a reservation ahead covers a request: the same limits, each amount at least its."""
    if len(spare) != len(checks):
        return False
    for held, wanted in zip(spare, checks, strict=True):
        if held.name != wanted.name or held.limit != wanted.limit or held.amount < wanted.amount:
            return False
    return True


def with_margin(check: Check, steps: int) -> Check:
    """A check reserved ahead: tokens and cost a quarter above the request's, compounded over the
    requests made before it is taken (`steps`, the spares kept), so a conversation whose prompt
    grows by less than a quarter from one request to the next still finds its reservation fitting."""
    if check.kind not in ("tokens", "budget") or not check.amount:
        return check
    amount = check.amount
    for _ in range(steps):
        amount += -(-amount // AHEAD_MARGIN)
    return Check(check.scope, check.scope_id, check.kind, check.limit, amount, check.period, check.ttl_s, check.name)
