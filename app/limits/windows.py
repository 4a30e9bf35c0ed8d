"""Admission for the memory store: the same semantics as the Redis Lua scripts, in Python.

Each check names a window (requests, tokens), a lease set (concurrency) or a budget; all checks
of a request are decided first and reserved only if every one passes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.limits.checks import WINDOW_MS, Check, Settlement, Verdict

CONCURRENCY_RETRY_MS = 1000


@dataclass
class _Window:
    """Entries in arrival order, each with a weight; `total` is the sum of live weights."""

    entries: deque[tuple[int, str]] = field(default_factory=deque)
    weights: dict[str, int] = field(default_factory=dict)
    total: int = 0

    def evict(self, upto: int) -> None:
        while self.entries and self.entries[0][0] <= upto:
            _, member = self.entries.popleft()
            self.total -= self.weights.pop(member, 0)


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
        self._windows: dict[str, _Window] = {}
        self._leases: dict[str, _Leases] = {}
        self._spent: dict[str, int] = {}

    @staticmethod
    def now_ms() -> int:
        return int(time.monotonic() * 1000)

    def admit(self, checks: Sequence[Check], member: str, lease_ms: int) -> Verdict:
        now = self.now_ms()
        for index, check in enumerate(checks):
            ok, used, retry = self._check(check, now)
            if not ok:
                return Verdict(False, index, retry, used)
        states = [self._reserve(check, member, now, lease_ms) for check in checks]
        return Verdict(True, states=states)

    def _check(self, check: Check, now: int) -> tuple[bool, int, int]:
        if check.kind in ("requests", "tokens"):
            window = self._windows.setdefault(check.name, _Window())
            window.evict(now - WINDOW_MS)
            used = window.total
            if used + check.amount <= check.limit:
                return True, used, 0
            if check.amount > check.limit:
                return False, used, -1
            freed = 0
            for stamp, entry in window.entries:  # the moment enough has left the window
                freed += window.weights.get(entry, 0)
                if used - freed + check.amount <= check.limit:
                    return False, used, stamp + WINDOW_MS - now
            return False, used, WINDOW_MS
        leases = self._leases.setdefault(check.name, _Leases())
        leases.evict(now)
        if check.kind == "concurrency":
            return leases.total + 1 <= check.limit, leases.total, CONCURRENCY_RETRY_MS
        used = self._spent.get(check.name, 0) + leases.total
        return used + check.amount <= check.limit, used, -1

    def _reserve(self, check: Check, member: str, now: int, lease_ms: int) -> tuple[int, int]:
        if check.kind in ("requests", "tokens"):
            window = self._windows[check.name]
            window.entries.append((now, member))
            window.weights[member] = window.weights.get(member, 0) + check.amount
            window.total += check.amount
            return check.limit - window.total, window.entries[0][0] + WINDOW_MS - now
        leases = self._leases[check.name]
        leases.expiry[member] = now + lease_ms
        leases.weights[member] = check.amount
        leases.total += check.amount
        spent = self._spent.get(check.name, 0) if check.kind == "budget" else 0
        return check.limit - leases.total - spent, 0

    def settle(self, settlements: Sequence[Settlement]) -> None:
        for item in settlements:
            check = item.check
            if check.kind == "tokens":
                window = self._windows.get(check.name)
                if window is not None and item.member in window.weights:
                    window.total += item.actual - window.weights[item.member]
                    window.weights[item.member] = item.actual
            elif check.kind in ("concurrency", "budget"):
                leases = self._leases.get(check.name)
                if leases is not None and item.member in leases.expiry:
                    del leases.expiry[item.member]
                    leases.total -= leases.weights.pop(item.member, 0)
                if check.kind == "budget":
                    self._spent[check.name] = self._spent.get(check.name, 0) + item.actual

    def renew(self, leases: Sequence[tuple[Check, str]], lease_ms: int) -> None:
        now = self.now_ms()
        for check, member in leases:
            held = self._leases.get(check.name)
            if held is not None and member in held.expiry:
                held.expiry[member] = now + lease_ms

    def spent(self, check: Check) -> int:
        return self._spent.get(check.name, 0)
