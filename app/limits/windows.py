"""Admission in Python, for the memory and SQLite stores: the same semantics as the Redis Lua
scripts (`app/store/lua.py`).

RPM and TPM are token buckets holding up to the limit and refilled continuously at the limit
per minute (OpenAI's own model: a burst of N, then N a minute). Concurrency slots and budget
holds are leases that expire unless renewed. All checks of a request are decided first and
reserved only if every one passes. `admit`, `settle` and `renew` work on a `LimitState`: the
memory store's dicts (`MemoryLimits`) or the SQLite store's tables inside one transaction.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from app.limits.checks import BUCKET_KINDS, WINDOW_MS, Check, Settlement, Verdict

CONCURRENCY_RETRY_MS = 1000
IDLE_MS = 2 * WINDOW_MS  # a bucket untouched this long is full


def bucket_level(tokens: float, stamp: int, capacity: int, now: int) -> float:
    """A token bucket's level at `now`: refilled at `capacity` per window, never above it."""
    elapsed = max(0, now - stamp)  # a wall clock stepped back refills nothing (the SQLite store's)
    if elapsed >= IDLE_MS:
        return float(capacity)  # idle that long: full, whatever it owed (as in the Redis store)
    return min(float(capacity), tokens + elapsed * capacity / WINDOW_MS)


class LimitState(Protocol):
    """Where a store keeps its limits: buckets as (tokens, stamp ms), leases per limit name,
    settled budget spend. Times are the caller's `now` in ms."""

    def bucket(self, name: str) -> tuple[float, int] | None: ...

    def set_bucket(self, name: str, tokens: float, stamp: int) -> None: ...

    def held(self, name: str, now: int) -> int:
        """What the leases of a limit hold (their weights' sum); expired ones are dropped first."""

    def hold(self, name: str, member: str, weight: int, expiry: int) -> None: ...

    def release(self, name: str, member: str) -> None:
        """End `member`'s lease (nothing if it holds none)."""

    def extend(self, name: str, member: str, expiry: int) -> None:
        """Move the expiry of `member`'s lease, if it holds one."""

    def spent(self, name: str, now: int) -> int: ...

    def add_spent(self, name: str, value: int, ttl_s: int, now: int) -> None: ...


def admit(state: LimitState, checks: Sequence[Check], member: str, lease_ms: int, headroom: int, now: int) -> Verdict:
    """Judge every check on one reading of the state; reserve all of them only if all pass."""
    readings: list[float] = []
    for index, check in enumerate(checks):
        reading = _reading(state, check, now)
        refused = _refusal(check, reading, headroom)
        if refused is not None:
            return Verdict(False, index, refused[1], refused[0])
        readings.append(reading)
    expiry = now + lease_ms
    return Verdict(
        True, states=[_take(state, c, r, member, expiry, now) for c, r in zip(checks, readings, strict=True)]
    )


def _reading(state: LimitState, check: Check, now: int) -> float:
    """A bucket's level, or what a lease limit has in use (a budget: its spend and holds)."""
    if check.kind in BUCKET_KINDS:
        bucket = state.bucket(check.name)
        return bucket_level(bucket[0], bucket[1], check.limit, now) if bucket else float(check.limit)
    held = state.held(check.name, now)
    return held + state.spent(check.name, now) if check.kind == "budget" else held


def _refusal(check: Check, reading: float, headroom: int) -> tuple[int, int] | None:
    """None if `headroom` requests of the check's amount fit; else (used, retry ms; -1: never)."""
    if check.kind in BUCKET_KINDS:
        if reading >= check.amount * headroom:
            return None
        used = check.limit - math.floor(reading)
        if check.amount > check.limit:
            return used, -1
        return used, math.ceil((check.amount - reading) * WINDOW_MS / check.limit)
    used = int(reading)
    if check.kind == "concurrency":
        return None if used + headroom <= check.limit else (used, CONCURRENCY_RETRY_MS)
    return None if used + check.amount * headroom <= check.limit else (used, -1)


def _take(state: LimitState, check: Check, reading: float, member: str, expiry: int, now: int) -> tuple[int, int]:
    """Reserve one check (judged on `reading`); returns (remaining, reset ms)."""
    if check.kind in BUCKET_KINDS:
        level = reading - check.amount
        state.set_bucket(check.name, level, _stamp(state, check.name, now))
        reset = math.ceil((check.limit - level) * WINDOW_MS / check.limit) if check.limit > 0 else 0
        return math.floor(level), reset
    state.hold(check.name, member, check.amount, expiry)
    return check.limit - int(reading) - check.amount, 0


def _stamp(state: LimitState, name: str, now: int) -> int:
    """A bucket's new stamp: `now`, never earlier than its old one. After the wall clock stepped
    back, a level read at `now` is the level at the old stamp (nothing refilled); stamped `now`,
    the time up to the old stamp would be refilled a second time."""
    bucket = state.bucket(name)
    return max(now, bucket[1]) if bucket else now


def settle(state: LimitState, settlements: Sequence[Settlement], now: int) -> None:
    """Tokens given back (requests: a reservation ahead, unused); slots and holds released;
    budget spend added."""
    for item in settlements:
        check = item.check
        if check.kind in BUCKET_KINDS:
            bucket = state.bucket(check.name)
            if bucket is not None and item.value:
                level = bucket_level(bucket[0], bucket[1], check.limit, now) + item.value
                state.set_bucket(check.name, min(float(check.limit), level), max(now, bucket[1]))
        elif check.kind in ("concurrency", "budget"):
            state.release(check.name, item.member)
            if check.kind == "budget":
                state.add_spent(check.name, item.value, check.ttl_s, now)


def renew(state: LimitState, leases: Sequence[tuple[Check, str]], lease_ms: int, now: int) -> None:
    for check, member in leases:
        state.extend(check.name, member, now + lease_ms)


def _monotonic_ms() -> int:
    return int(time.monotonic() * 1000)


@dataclass
class _Leases:
    expiry: dict[str, int] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    total: int = 0

    def evict(self, now: int) -> None:
        for member in [m for m, e in self.expiry.items() if e <= now]:
            del self.expiry[member]
            self.total -= self.weights.pop(member, 0)


class MemoryLimits:
    """The memory store's limits: a `LimitState` in dicts, on `clock` (ms; this process's
    monotonic clock unless a test gives its own)."""

    def __init__(self, clock: Callable[[], int] | None = None) -> None:
        self.now_ms = clock or _monotonic_ms
        self._buckets: dict[str, tuple[float, int]] = {}
        self._leases: dict[str, _Leases] = {}
        self._spent: dict[str, int] = {}

    def admit(self, checks: Sequence[Check], member: str, lease_ms: int, headroom: int = 1) -> Verdict:
        return admit(self, checks, member, lease_ms, headroom, self.now_ms())

    def settle(self, settlements: Sequence[Settlement]) -> None:
        settle(self, settlements, self.now_ms())

    def renew(self, leases: Sequence[tuple[Check, str]], lease_ms: int) -> None:
        renew(self, leases, lease_ms, self.now_ms())

    def sweep(self) -> int:
        """Forget full buckets and lease sets with nothing held; returns how many were looked at."""
        now = self.now_ms()
        seen = len(self._buckets) + len(self._leases)
        for name in [n for n, (_, stamp) in self._buckets.items() if now - stamp >= IDLE_MS]:
            del self._buckets[name]
        for name, leases in list(self._leases.items()):
            leases.evict(now)
            if not leases.expiry:
                del self._leases[name]
        return seen

    # -- LimitState ----------------------------------------------------------------------------
    def bucket(self, name: str) -> tuple[float, int] | None:
        return self._buckets.get(name)

    def set_bucket(self, name: str, tokens: float, stamp: int) -> None:
        self._buckets[name] = (tokens, stamp)

    def held(self, name: str, now: int) -> int:
        leases = self._leases.setdefault(name, _Leases())
        leases.evict(now)
        return leases.total

    def hold(self, name: str, member: str, weight: int, expiry: int) -> None:
        leases = self._leases.setdefault(name, _Leases())
        leases.expiry[member] = expiry
        leases.weights[member] = weight
        leases.total += weight

    def release(self, name: str, member: str) -> None:
        leases = self._leases.get(name)
        if leases is not None and member in leases.expiry:
            del leases.expiry[member]
            leases.total -= leases.weights.pop(member, 0)

    def extend(self, name: str, member: str, expiry: int) -> None:
        leases = self._leases.get(name)
        if leases is not None and member in leases.expiry:
            leases.expiry[member] = expiry

    def spent(self, name: str, now: int = 0) -> int:
        return self._spent.get(name, 0)

    def add_spent(self, name: str, value: int, ttl_s: int, now: int) -> None:
        self._spent[name] = self._spent.get(name, 0) + value
