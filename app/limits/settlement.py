"""Settlement: what a request used, replacing what it reserved, sent to the store in batches.

`settlement_of` and `adjustment_of` say what one request gives back or adds; the `Outbox` sends
them. Settlements of requests ending in one loop turn go in one store round trip, with the
reservations ahead wanted by then (made in the same script call, so the store's work overlaps the
client's next request). A batch has an id, so the store applies it once however often it is sent:
one that fails (an outage, a bug, a cancellation) is kept and sent again alone by `flush`, since
spend must not be lost."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal

from app.limits.ahead import AHEAD_HEADROOM, OnWay
from app.limits.checks import BUCKET_KINDS, NANO, Check, Reserve, Settlement, Verdict
from app.limits.reservation import Reservation
from app.store.base import Store, StoreError

log = logging.getLogger(__name__)
MAX_PENDING_SETTLEMENTS = 100_000


def settlement_of(reservation: Reservation, tokens: int, cost: Decimal) -> list[Settlement]:
    """A request's estimates replaced by what it used: tokens given back, cost settled."""
    cost_nano = int((cost * NANO).to_integral_value(ROUND_HALF_UP)) if cost else 0
    member = reservation.member
    return [
        Settlement(c, member, cost_nano if c.kind == "budget" else c.amount - tokens)
        for c in reservation.checks
        if c.kind != "requests"
    ]


def adjustment_of(reservation: Reservation, tokens: int, cost_delta: Decimal) -> list[Settlement]:
    """A settled request's real use known later: tokens as a new total, cost as a delta."""
    delta_nano = int((cost_delta * NANO).to_integral_value(ROUND_HALF_UP))
    given_back = reservation.tokens - tokens
    reservation.tokens = tokens
    return [
        Settlement(c, reservation.member, delta_nano if c.kind == "budget" else given_back)
        for c in reservation.checks
        if c.kind in ("tokens", "budget")
    ]


def given_back(spare: Reservation) -> list[Settlement]:
    """A reservation never used: what gives back its request and tokens and frees its slots and holds."""
    return [Settlement(c, spare.member, c.amount if c.kind in BUCKET_KINDS else 0) for c in spare.checks]


class Outbox:
    def __init__(
        self,
        store: Store,
        lease_ms: int,
        reserve: Callable[[str, list[Check]], list[OnWay]],
        land: Callable[[OnWay, Verdict | None], None],
        failed: Callable[[Exception], None],
        recovered: Callable[[], None],
    ) -> None:
        self.store = store
        self.lease_ms = lease_ms
        self._reserve = reserve  # the reservations ahead to make for a principal, now
        self._land = land  # one of them made (its verdict) or not (None)
        self._failed = failed  # the store did not answer
        self._recovered = recovered  # ... and now it does
        self._outbox: list[Settlement] = []
        self._wanted: list[tuple[str, list[Check]]] = []  # reservations ahead to send with settlements
        self._pending: deque[tuple[str, list[Settlement]]] = deque(maxlen=MAX_PENDING_SETTLEMENTS)
        self._sending: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()  # referenced: the loop holds tasks weakly
        self._batches = itertools.count()
        self._batches_prefix = secrets.token_hex(8)  # batch ids must never collide across processes

    def want(self, owner: str, checks: list[Check]) -> None:
        """Reserve ahead for `owner` with the next batch (sent with the settlement queued next)."""
        self._wanted.append((owner, checks))

    def queue(self, items: list[Settlement]) -> None:
        self._outbox.extend(items)
        if self._sending is None and (self._outbox or self._wanted):
            self._sending = asyncio.ensure_future(self._send())

    async def send_first(self, items: list[Settlement]) -> None:
        """Send `items` as a batch of their own in this loop turn, ahead of the caller's next
        command to the store or answer to the client (on Redis, commands of one connection run
        in the order sent; the memory store applies them at once). Not awaited beyond that."""
        if items:
            task = asyncio.ensure_future(self._batch(items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(0)  # its first step sends it

    async def _send(self) -> None:
        try:
            await asyncio.sleep(0)  # let every request ending in this loop turn join the batch
            while self._outbox or self._wanted:
                wanted, self._wanted = self._wanted, []
                ahead = [way for owner, checks in wanted for way in self._reserve(owner, checks)]
                items, self._outbox = self._outbox, []
                if not items and not ahead:
                    break
                await self._batch(items, ahead)
        finally:
            self._sending = None

    async def _batch(self, items: list[Settlement], ahead: list[OnWay] | None = None) -> None:
        """Settle `items` and make the reservations `ahead` in one store round trip."""
        # Retried under this id if it fails: the store applies a batch once, however often sent.
        batch = f"{self._batches_prefix}{next(self._batches):x}"
        verdicts: list[Verdict] = []
        reserve = [Reserve(way.checks, way.member, self.lease_ms, AHEAD_HEADROOM) for way in ahead or ()]
        try:
            verdicts = await self.store.settle(items, batch, reserve)
        except StoreError as exc:
            self._failed(exc)  # the policy applies from the next request without a spare
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

    async def sent(self) -> None:
        """Wait until what is being sent was sent (reservations ahead on their way land); never raises."""
        if self._sending is not None:
            await asyncio.wait({self._sending})
        if self._tasks:
            await asyncio.wait(list(self._tasks))

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
            self._recovered()

    @property
    def pending(self) -> int:
        return len(self._pending)
