"""Admission for the memory store: the same semantics as the Redis Lua scripts, in Python.

RPM and TPM are token buckets holding up to the limit and refilled continuously at the limit
per minute (OpenAI's own model: a burst of N, then N a minute). Concurrency slots and budget
holds are leases that expire unless renewed. All checks of a request are decided first and
reserved only if every one passes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.limits.checks import BUCKET_KINDS, WINDOW_MS, Check, Settlement, Verdict

CONCURRENCY_RETRY_MS = 1000
IDLE_MS = 2 * WINDOW_MS  # a bucket untouched this long is full


@dataclass
class _Bucket:
    tokens: float
    stamp: int

    def level(self, capacity: int, now: int) -> float:
        if now - self.stamp >= IDLE_MS:
            return float(capacity)  # idle that long: full, whatever it owed (as in the Redis store)
        return min(float(capacity), self.tokens + (now - self.stamp) * capacity / WINDOW_MS)


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
    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._leases: dict[str, _Leases] = {}
        self._spent: dict[str, int] = {}

    @staticmethod
    def now_ms() -> int:
        return int(time.monotonic() * 1000)

    def admit(self, checks: Sequence[Check], member: str, lease_ms: int, headroom: int = 1) -> Verdict:
        now = self.now_ms()
        for index, check in enumerate(checks):
            ok, used, retry = self._check(check, now, headroom)
            if not ok:
                return Verdict(False, index, retry, used)
        states = [self._reserve(check, member, now, lease_ms) for check in checks]
        return Verdict(True, states=states)

    def _check(self, check: Check, now: int, headroom: int) -> tuple[bool, int, int]:
        if check.kind in BUCKET_KINDS:
            bucket = self._buckets.get(check.name)
            level = bucket.level(check.limit, now) if bucket else float(check.limit)
            used = check.limit - math.floor(level)
            if level >= check.amount * headroom:
                return True, used, 0
            if check.amount > check.limit:
                return False, used, -1
            return False, used, math.ceil((check.amount - level) * WINDOW_MS / check.limit)
        leases = self._leases.setdefault(check.name, _Leases())
        leases.evict(now)
        if check.kind == "concurrency":
            return leases.total + headroom <= check.limit, leases.total, CONCURRENCY_RETRY_MS
        used = self._spent.get(check.name, 0) + leases.total
        return used + check.amount * headroom <= check.limit, used, -1

    def _reserve(self, check: Check, member: str, now: int, lease_ms: int) -> tuple[int, int]:
        if check.kind in BUCKET_KINDS:
            bucket = self._buckets.get(check.name)
            level = (bucket.level(check.limit, now) if bucket else float(check.limit)) - check.amount
            self._buckets[check.name] = _Bucket(level, now)
            return math.floor(level), math.ceil((check.limit - level) * WINDOW_MS / check.limit)
        leases = self._leases[check.name]
        leases.expiry[member] = now + lease_ms
        leases.weights[member] = check.amount
        leases.total += check.amount
        spent = self._spent.get(check.name, 0) if check.kind == "budget" else 0
        return check.limit - leases.total - spent, 0

    def settle(self, settlements: Sequence[Settlement]) -> None:
        now = self.now_ms()
        for item in settlements:
            check = item.check
            if check.kind in BUCKET_KINDS:  # tokens given back (requests: a reservation ahead, unused)
                bucket = self._buckets.get(check.name)
                if bucket is not None and item.value:
                    self._buckets[check.name] = _Bucket(
                        min(float(check.limit), bucket.level(check.limit, now) + item.value), now
                    )
            elif check.kind in ("concurrency", "budget"):
                leases = self._leases.get(check.name)
                if leases is not None and item.member in leases.expiry:
                    del leases.expiry[item.member]
                    leases.total -= leases.weights.pop(item.member, 0)
                if check.kind == "budget":
                    self._spent[check.name] = self._spent.get(check.name, 0) + item.value

    def renew(self, leases: Sequence[tuple[Check, str]], lease_ms: int) -> None:
        now = self.now_ms()
        for check, member in leases:
            held = self._leases.get(check.name)
            if held is not None and member in held.expiry:
                held.expiry[member] = now + lease_ms

    def sweep(self) -> int:
        """Forget full buckets and lease sets with nothing held; returns how many were looked at."""
        now = self.now_ms()
        seen = len(self._buckets) + len(self._leases)
        for name in [n for n, b in self._buckets.items() if now - b.stamp >= IDLE_MS]:
            del self._buckets[name]
        for name, leases in list(self._leases.items()):
            leases.evict(now)
            if not leases.expiry:
                del self._leases[name]
        return seen

    def spent(self, check: Check) -> int:
        return self._spent.get(check.name, 0)
