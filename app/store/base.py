"""The store interface (DESIGN §7): one Protocol, three backends (SQLite, memory, Redis), the
same contract tests for all. This layer holds key and team records and announces changes so
every worker and replica can drop what it cached."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from app.auth.records import KeyRecord, TeamRecord
from app.limits.checks import Check, Reserve, Settlement, Verdict

ChangeListener = Callable[[str], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class LedgerBatch:
    """Usage increments for the ledger, applied at most once (by `id`)."""

    id: str
    increments: list[tuple[str, str, str, int]]  # (day YYYYMMDD, "team|key_id|model", measure, delta)
    key_names: dict[str, str] = field(default_factory=dict)


async def notify(listeners: list[ChangeListener], change: str) -> None:
    """Tell this process's listeners (its caches) that `change` is stale; every store's one way."""
    for listener in listeners:
        result = listener(change)
        if inspect.isawaitable(result):
            await result


class StoreError(Exception):
    """The store could not be reached or answered wrongly."""


class Store(Protocol):
    async def ping(self) -> None: ...

    async def prepare(self) -> None:
        """At start: make the request path's first calls as fast as the rest (never raises)."""

    async def close(self) -> None: ...

    # teams
    async def create_team(self, team: TeamRecord) -> bool:
        """False if a team of that name exists."""

    async def get_team(self, name: str) -> TeamRecord | None: ...

    async def list_teams(self) -> list[TeamRecord]: ...

    async def update_team(self, team: TeamRecord) -> bool:
        """False if the team does not exist."""

    async def delete_team(self, name: str) -> bool: ...

    # keys
    async def create_key(self, key: KeyRecord) -> str | None:
        """Stores the key unless its name is taken in its team; returns the holder's id then."""

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]: ...

    async def update_key(self, key: KeyRecord, old_name: str) -> str | None:
        """Replaces the record; if renamed onto a taken name, returns the holder's id instead."""

    async def delete_key(self, key_id: str) -> bool: ...

    async def touch_keys(self, last_used: dict[str, datetime]) -> None:
        """Record when keys were last used (flushed in batches, not per request)."""

    # admission (one round trip each)
    async def admit(self, checks: Sequence[Check], member: str, lease_ms: int, headroom: int = 1) -> Verdict:
        """Decide every check; reserve all of them only if all pass. With `headroom` n > 1, a check
        passes only if n requests of its amount would fit (one is still reserved)."""

    async def settle(
        self, settlements: Sequence[Settlement], batch: str = "", reserve: Sequence[Reserve] = ()
    ) -> list[Verdict]:
        """Replace estimates by actual use (tokens given back to a TPM bucket, or to an RPM bucket
        for a reservation never used); free concurrency slots and budget holds. A batch sent
        again under the same non-empty `batch` id is not applied again. Then, in the same round
        trip, admit each of `reserve` in turn (admission ahead); returns their verdicts."""

    async def renew(self, leases: Sequence[tuple[Check, str]], lease_ms: int) -> None:
        """Extend the leases of requests still running."""

    async def budget_spent(self, check: Check) -> int:
        """Settled nano-USD of a budget check's period."""

    async def sweep(self) -> int:
        """Drop limit state that says nothing any more (full buckets, expired leases); returns how
        many entries it looked at. Called about once a minute."""

    # the usage ledger
    async def ledger_apply(self, batch: LedgerBatch) -> None:
        """Add a batch of increments, at most once whatever the retries."""

    async def ledger_read(self, days: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
        """Per day, the stored sums by field; and the key names by id."""

    # changes
    async def publish(self, change: str) -> None:
        """Tell every replica that `change` ("key:<id>", "team:<name>" or "*") is stale."""

    def on_change(self, listener: ChangeListener) -> None: ...
