"""The limit windows (app/limits/windows.py) on both states that run them, at times the test
chooses: the memory store's dicts (`MemoryLimits` on a clock of the test's) and the SQLite
store's tables (`Tables` inside one transaction, at a given `now`). A wall clock stepped back
refills nothing twice; holds and releases apply in the order made."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from app.limits import windows
from app.limits.checks import Check, Settlement, Verdict
from app.limits.windows import LimitState, MemoryLimits
from app.store import sqlite_schema
from app.store.sqlite_limits import Tables
from app.store.sqlite_tables import transaction

T = TypeVar("T")
LEASE_MS = 60_000


class Clocked:
    """A LimitState the test drives at times of its choosing: each `at(now, work)` is one call
    of the store (for SQLite, one transaction)."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind = kind
        self.now = 0
        self.memory = MemoryLimits(clock=lambda: self.now)
        self.db: sqlite3.Connection | None = sqlite_schema.connect(path, 1.0) if kind == "sqlite" else None

    def at(self, now: int, work: Callable[[LimitState, int], T]) -> T:
        self.now = now
        if self.db is None:
            return work(self.memory, now)
        with transaction(self.db):
            state = Tables(self.db, now)
            result = work(state, now)
            state.flush()
        return result

    def admit(self, now: int, check: Check, member: str = "m") -> Verdict:
        if self.db is None:
            self.now = now
            return self.memory.admit([check], member, LEASE_MS)  # the memory store's own path, on its clock
        return self.at(now, lambda state, t: windows.admit(state, [check], member, LEASE_MS, 1, t))


@pytest.fixture(params=["memory", "sqlite"])
def clocked(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Clocked]:
    state = Clocked(request.param, tmp_path / "gateway.db")
    yield state
    if state.db is not None:
        state.db.close()


def test_a_clock_stepped_back_refills_nothing_twice(clocked: Clocked) -> None:
    """60 a minute, one token a second. At t=100 s one token is left. The clock steps back to
    t=40 s: that token is taken (the level read then is the level at 100 s). Back at 100 s
    nothing has refilled: the minute from 40 s to 100 s was counted already. A bucket stamped
    40 s would refill 60 tokens for it, and admit a 61st request in one minute."""
    rpm = Check("key", "k", "requests", 60)
    assert all(clocked.admit(100_000, rpm).ok for _ in range(59))
    stepped_back = clocked.admit(40_000, rpm)
    assert stepped_back.ok and stepped_back.states[0][0] == 0
    assert not clocked.admit(100_000, rpm).ok
    assert clocked.admit(101_000, rpm).ok  # one second later, one token


def test_a_settlement_while_the_clock_is_back_keeps_the_later_stamp(clocked: Clocked) -> None:
    tpm = Check("key", "k", "tokens", 6000, 6000)
    assert clocked.admit(100_000, tpm).ok  # empty at 100 s
    clocked.at(40_000, lambda state, t: windows.settle(state, [Settlement(tpm, "m", 1000)], t))  # 1000 given back
    low = Check("key", "k", "tokens", 6000, 1000)
    assert clocked.admit(100_000, low).ok  # the 1000 given back
    assert not clocked.admit(100_000, low).ok  # and nothing refilled for 40..100 s


def test_a_hold_then_a_release_in_one_call_leave_nothing_held(clocked: Clocked) -> None:
    def hold_then_release(state: LimitState, now: int) -> None:
        state.hold("slots", "m1", 1, now + LEASE_MS)
        state.hold("slots", "m2", 1, now + LEASE_MS)
        state.release("slots", "m1")

    clocked.at(1_000, hold_then_release)
    assert clocked.at(2_000, lambda state, now: state.held("slots", now)) == 1  # m2's only

    def release_then_hold(state: LimitState, now: int) -> None:
        state.release("slots", "m2")
        state.hold("slots", "m2", 3, now + LEASE_MS)

    clocked.at(3_000, release_then_hold)
    assert clocked.at(4_000, lambda state, now: state.held("slots", now)) == 3
