"""The SQLite store (app/store/sqlite.py) beyond the shared contract: what it holds survives
closing and reopening; two stores on one file, as two workers, share keys, revocations and
limits exactly; the `store` setting's forms; errors come out as `StoreError`; every call
answers within the store's timeout (a write lock held elsewhere, a long read), reads do not
wait behind writes, and what commits after its caller left is undone or applied once."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest

from app.auth.records import KeyFields, KeyRecord, TeamFields
from app.auth.registry import Registry
from app.limits.checks import Check, Reserve, Settlement, budget_period
from app.settings import ConfigError, load_settings
from app.store import open_store, sqlite_path, sqlite_schema
from app.store.base import LedgerBatch, StoreError
from app.store.location import sqlite_file
from app.store.sqlite import SqliteStore
from app.store.sqlite_thread import DbThread

pytestmark = pytest.mark.anyio
LEASE_MS = 60_000
T = TypeVar("T")


def member() -> str:
    return uuid.uuid4().hex


async def test_what_it_holds_survives_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    period, ttl = budget_period("day")
    budget = Check("key", "k1", "budget", 10**9, 500, period, ttl)
    slots = Check("key", "k1", "concurrency", 2)
    first = SqliteStore(path)
    registry = Registry(first)
    await registry.create_team("ml", TeamFields(rpm=10))
    kept, _ = await registry.create_key("bot", "ml", KeyFields())
    revoked, _ = await registry.create_key("old", "ml", KeyFields())
    await registry.revoke_key(revoked.id)
    used_at = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    await first.touch_keys({kept.id: used_at})
    running = member()
    assert (await first.admit([slots, budget], running, LEASE_MS)).ok  # still running when closed
    done = member()
    assert (await first.admit([budget], done, LEASE_MS)).ok
    await first.settle([Settlement(budget, done, 120)], "batch-1")
    usage = [("20260501", f"ml|{kept.id}|m", "requests", 3)]
    await first.ledger_apply(LedgerBatch("ledger-1", usage, {kept.id: "bot"}))
    await first.close()

    again = SqliteStore(path)
    try:
        team = await again.get_team("ml")
        assert team is not None and team.rpm == 10
        key = await again.get_key(kept.id)
        assert key is not None and key.last_used_at == used_at and not key.revoked
        gone = await again.get_key(revoked.id)
        assert gone is not None and gone.revoked
        assert await again.budget_spent(budget) == 120
        await again.settle([Settlement(budget, done, 120)], "batch-1")  # a retry after the restart
        assert await again.budget_spent(budget) == 120
        held = await again.admit([slots, budget], member(), LEASE_MS)  # the running request's hold stays
        assert held.ok and held.states == [(0, 0), (10**9 - 120 - 500 - 500, 0)]
        await again.ledger_apply(LedgerBatch("ledger-1", usage))  # applied before the restart
        stored, names = await again.ledger_read(["20260501"])
        assert stored == {"20260501": {f"ml|{kept.id}|m|requests": 3}} and names == {kept.id: "bot"}
    finally:
        await again.close()


async def test_two_stores_on_one_file_see_each_others_keys_and_revocations(tmp_path: Path) -> None:
    """As two workers: a key made through one is found by the other, and a revocation through
    one is announced to the other within a second."""
    path = tmp_path / "gateway.db"
    one, other = SqliteStore(path), SqliteStore(path)
    heard: list[str] = []
    other.on_change(heard.append)
    try:
        await asyncio.wait_for(_heard(heard, "*"), 2)  # following the feed from here on
        registry = Registry(one)
        await registry.create_team("ml", TeamFields())
        record, _ = await registry.create_key("bot", "ml", KeyFields())
        await asyncio.wait_for(_heard(heard, f"key:{record.id}"), 2)
        found = await other.get_key(record.id)
        assert found is not None and not found.revoked
        heard.clear()
        await registry.revoke_key(record.id)  # publishes "key:<id>"
        started = time.monotonic()
        await asyncio.wait_for(_heard(heard, f"key:{record.id}"), 2)
        assert time.monotonic() - started < 1.0
        revoked = await other.get_key(record.id)
        assert revoked is not None and revoked.revoked
    finally:
        await one.close()
        await other.close()


async def _heard(heard: list[str], change: str, times: int = 1) -> None:
    while heard.count(change) < times:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "check",
    [
        Check("key", "shared", "requests", 12),
        Check("key", "shared", "concurrency", 12),
        Check("key", "shared", "budget", 12 * 1000, 1000, "total", 0),
    ],
    ids=["rpm", "concurrency", "budget"],
)
def test_two_stores_on_one_file_share_a_limit_exactly(tmp_path: Path, check: Check) -> None:
    """Two stores, each on its own thread and event loop as in two worker processes, admitting
    one request per transaction as fast as they can: exactly the limit is admitted."""
    path = tmp_path / "gateway.db"

    def worker(attempts: int) -> list[bool]:
        async def run() -> list[bool]:
            store = SqliteStore(path, timeout_s=5)
            try:
                return [(await store.admit([check], member(), LEASE_MS)).ok for _ in range(attempts)]
            finally:
                await store.close()

        return asyncio.run(run())

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(worker, [24, 24]))
    # An RPM bucket refills one request per 5 s: a run slowed down that long (a loaded machine)
    # may admit one more, the refill, and no other.
    refilled = int((time.monotonic() - started) * check.limit / 60) if check.kind == "requests" else 0
    assert [len(results) for results in outcomes] == [24, 24]
    admitted = sum(ok for results in outcomes for ok in results)
    assert 12 <= admitted <= 12 + refilled  # each on its own would admit 12


async def test_a_settlement_batch_sent_through_two_stores_is_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    one, other = SqliteStore(path), SqliteStore(path)
    budget = Check("key", "k2", "budget", 10**6, 400, "total", 0)
    tokens = Check("key", "k2", "tokens", 100, 60)
    try:
        holder = member()
        assert (await one.admit([tokens, budget], holder, LEASE_MS)).ok
        batch = [Settlement(tokens, holder, 50), Settlement(budget, holder, 300)]
        await one.settle(batch, "batch-x")
        await other.settle(batch, "batch-x")  # the same batch, retried by another worker
        assert await other.budget_spent(budget) == 300
        after = await other.admit([tokens], member(), LEASE_MS)
        assert after.ok and after.states[0][0] in (30, 31)  # 100 - 60 + 50 once - 60 (+ refill)
    finally:
        await one.close()
        await other.close()


async def test_an_admission_whose_caller_gave_up_is_given_back(tmp_path: Path) -> None:
    """Admitted after its caller left (the transaction runs on the store's thread whatever the
    caller does): nobody would settle it, so its slot comes back at once, not after its lease."""
    store = SqliteStore(tmp_path / "gateway.db")
    slots = Check("key", "k3", "concurrency", 2)
    try:
        gone = asyncio.ensure_future(store.admit([slots], "gone", LEASE_MS))
        stays = asyncio.ensure_future(store.admit([slots], "stays", LEASE_MS))
        await asyncio.sleep(0)
        gone.cancel()
        assert (await stays).ok and gone.cancelled()
        deadline = time.monotonic() + 5
        while not (probe := await store.admit([slots], member(), LEASE_MS)).ok and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polling, with a deadline
        assert probe.ok and probe.states == [(0, 0)]  # stays's slot and the probe's: gone's came back
    finally:
        await store.close()


async def test_declared_entries_load_from_two_workers_at_once(tmp_path: Path) -> None:
    """Two workers start together and load the same declared key, each through its own store on
    the one file: both may find it missing, and the second then finds its name taken by the
    first one's copy of the same key, which is no conflict."""
    from app.auth.records import TeamRecord

    path = tmp_path / "gateway.db"
    one, other = SqliteStore(path), SqliteStore(path)
    team = TeamRecord(name="gitops", declared=True)
    key = KeyRecord(id="gggggggggggg", name="ci", team="gitops", hash="1" * 64, declared=True)
    try:
        assert await one.create_team(team)  # from an earlier start: both take the same steps
        await asyncio.gather(Registry(one).load_declared([team], [key]), Registry(other).load_declared([team], [key]))
        for store in (one, other):
            assert [k.id for k in await store.list_keys()] == ["gggggggggggg"]
    finally:
        await one.close()
        await other.close()


async def test_an_unusable_file_is_a_store_error(tmp_path: Path) -> None:
    not_a_db = tmp_path / "gateway.db"
    not_a_db.write_bytes(b"this is not a database, it is a text file of some length " * 20)
    (tmp_path / "a-file").write_text("")
    for path in (not_a_db, tmp_path / "a-file" / "gateway.db"):
        store = SqliteStore(path)
        with pytest.raises(StoreError, match=f"sqlite {path}"):
            await store.ping()
        await store.close()


@pytest.mark.parametrize(
    ("store", "path"),
    [
        (None, "data/gateway.db"),  # unset: the default
        ("sqlite", "data/gateway.db"),
        ("sqlite:///var/lib/gateway/gw.db", "/var/lib/gateway/gw.db"),
        ("sqlite:state/gw.db", "state/gw.db"),
    ],
)
def test_the_store_setting_names_the_file(store: str | None, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_STORE", raising=False)
    monkeypatch.delenv("GATEWAY_DATA_DIR", raising=False)
    settings = load_settings(config_file=None, **({"store": store} if store else {}))
    assert sqlite_path(settings) == Path(path)
    elsewhere = load_settings(config_file=None, store="sqlite", data_dir="/srv/gw")
    assert sqlite_path(elsewhere) == Path("/srv/gw/gateway.db")
    assert sqlite_path(load_settings(config_file=None, store="memory")) is None


@pytest.mark.parametrize("store", ["sqlite://rel.db", "sqlite:", "sqlite:///", "sqlite:dir/", "sqlite::memory:", ""])
def test_a_malformed_sqlite_store_is_refused(store: str) -> None:
    with pytest.raises(ConfigError, match=r"^store: .*sqlite") as refused:
        load_settings(config_file=None, store=store)
    if store.startswith("sqlite:"):  # one reader of the forms: the store's, which the settings use
        with pytest.raises(ValueError) as unreadable:
            sqlite_file(store, "data")
        assert str(unreadable.value) in str(refused.value)


async def test_open_store_makes_the_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_STORE", raising=False)
    data = tmp_path / "nested" / "data"
    store = open_store(load_settings(config_file=None, data_dir=str(data)))
    try:
        assert isinstance(store, SqliteStore)
        await store.ping()
        assert (data / "gateway.db").exists()
    finally:
        await store.close()


# -- deadlines: every call answers within the store's timeout -----------------------------------------
TIMEOUT_S = 0.5
MARGIN_S = 0.5  # a loaded machine's scheduling; not a second timeout


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Another connection holds the file's write lock, as a worker stuck in a transaction would."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.rollback()
        db.close()


async def test_a_write_lock_held_elsewhere_fails_calls_within_one_timeout(tmp_path: Path) -> None:
    """(a) an admission fails within the timeout; (b) eight settlements queued behind it fail
    within one timeout, not eight; (c) a key is read at once meanwhile. Once the lock is gone
    everything works, and the settlements sent again are applied once."""
    path = tmp_path / "gateway.db"
    store = SqliteStore(path, timeout_s=TIMEOUT_S)
    budget = Check("key", "k5", "budget", 10**9, 100, "total", 0)
    try:
        record, _ = await make_key(store)
        holders = [member() for _ in range(8)]
        for holder in holders:
            assert (await store.admit([budget], holder, LEASE_MS)).ok
        batches = {f"batch-{holder}": [Settlement(budget, holder, 10)] for holder in holders}
        with write_locked(path):
            started = time.monotonic()
            with pytest.raises(StoreError, match=rf"sqlite {path}: no answer within {TIMEOUT_S}s"):
                await store.admit([budget], member(), LEASE_MS)
            assert time.monotonic() - started < TIMEOUT_S + MARGIN_S

            started = time.monotonic()

            async def timed(call: Awaitable[T]) -> tuple[float, T | StoreError]:
                try:
                    outcome: T | StoreError = await call
                except StoreError as exc:
                    outcome = exc
                return time.monotonic() - started, outcome

            *settled, (read_s, found) = await asyncio.gather(
                *(timed(store.settle(items, batch)) for batch, items in batches.items()),
                timed(store.get_key(record.id)),
            )
            assert all(isinstance(outcome, StoreError) for _, outcome in settled)
            assert max(seconds for seconds, _ in settled) < TIMEOUT_S + MARGIN_S  # one timeout for all
            assert isinstance(found, KeyRecord) and found.id == record.id
            assert read_s < 0.25  # reads do not wait behind writes
        for batch, items in batches.items():  # as the gateway does: sent again under their ids
            await store.settle(items, batch)
            await store.settle(items, batch)
        assert await store.budget_spent(budget) == 80
        assert (await store.admit([budget], member(), LEASE_MS)).ok
    finally:
        await store.close()


async def make_key(store: SqliteStore) -> tuple[KeyRecord, str]:
    registry = Registry(store)
    await registry.create_team("ml", TeamFields())
    return await registry.create_key("bot", "ml", KeyFields())


async def test_a_long_read_stops_at_its_deadline_and_frees_its_thread(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    store = SqliteStore(path, timeout_s=0.05)
    try:
        await store.prepare()  # opened (and the schema made) with the time that takes at start
        record, _ = await make_key(store)
        with sqlite3.connect(path) as db:  # a big ledger: reading a day of it takes longer than 0.05 s
            db.executemany("INSERT INTO ledger VALUES ('20260501', ?, 1)", ((f"f{i}",) for i in range(300_000)))
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"no answer within 0\.05s"):
            await store.ledger_read(["20260501"])
        assert time.monotonic() - started < 0.05 + MARGIN_S
        found = await store.get_key(record.id)  # the reader is free again: the query was stopped
        assert found is not None and time.monotonic() - started < 0.05 + MARGIN_S
    finally:
        await store.close()


async def test_a_call_done_after_its_deadline_hands_its_result_to_late(tmp_path: Path) -> None:
    """Its caller has heard a StoreError: what the call did is handed to `late` (to be undone).
    A call whose deadline passed while it waited in line is not run at all."""
    thread = DbThread(tmp_path / "gateway.db", "test", sqlite_schema.connect)
    release = threading.Event()
    late: list[str] = []
    ran: list[str] = []
    try:
        slow = thread.call(0.1, lambda db: "done" if release.wait(10) else "", late=late.append)
        queued = thread.call(0.1, lambda db: ran.append("queued"))
        for reply in (slow, queued):
            with pytest.raises(StoreError, match=r"no answer within 0\.1s"):
                await reply
        release.set()
        assert await thread.call(5, lambda db: "after") == "after"  # behind both in line
        assert late == ["done"] and ran == []
    finally:
        await thread.close(2)


async def test_reservations_sent_with_a_settlement_its_caller_left_are_given_back(tmp_path: Path) -> None:
    """The settlement's transaction is under way (waiting for a lock) when its caller leaves:
    it commits all the same, and the reservation ahead it made, which nobody will use or
    settle, is given back at once rather than when its lease ends."""
    path = tmp_path / "gateway.db"
    store = SqliteStore(path, timeout_s=10)
    slots = Check("key", "k6", "concurrency", 1)
    try:
        await store.ping()
        with write_locked(path):
            sending = asyncio.ensure_future(store.settle([], "", [Reserve([slots], "ahead", LEASE_MS, 1)]))
            await asyncio.sleep(0.05)  # not needed here; without it, the old code dropped the call unrun
            sending.cancel()
        deadline = time.monotonic() + 5
        while not (probe := await store.admit([slots], member(), LEASE_MS)).ok and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polling, with a deadline
        assert probe.ok and sending.cancelled()
    finally:
        await store.close()


async def test_a_listener_that_fails_does_not_end_the_change_feed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gateway.db"
    one, other = SqliteStore(path), SqliteStore(path)
    heard: list[str] = []

    def listener(change: str) -> None:
        heard.append(change)
        if len(heard) == 1:
            raise RuntimeError("a listener's bug")

    other.on_change(listener)
    try:
        await asyncio.wait_for(_heard(heard, "*"), 2)  # the first thing it hears; it raised
        await asyncio.wait_for(_heard(heard, "*", times=2), 2)  # followed again: all dropped, as after any gap
        await one.publish("key:abcdefabcdef")
        await asyncio.wait_for(_heard(heard, "key:abcdefabcdef"), 2)
        assert "a change listener failed" in caplog.text
    finally:
        await one.close()
        await other.close()


async def test_a_backlog_of_expired_rows_is_swept_in_short_transactions(tmp_path: Path) -> None:
    """After a long stop, markers and leases past their time may number millions: they go in
    transactions of a bounded size, each well inside a call's deadline, and one process a minute
    sweeps (the others are told it is not their turn)."""
    path = tmp_path / "gateway.db"
    # 0.25 s a call, half the default: one transaction over the whole backlog takes seconds; a
    # bounded one well under this even on a loaded machine (0.1 s failed once beside a benchmark)
    store, other = SqliteStore(path, timeout_s=0.25), SqliteStore(path, timeout_s=0.25)
    try:
        await store.ping()
        await other.ping()
        old = int(time.time() * 1000) - 8 * 86_400_000
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.executemany("INSERT INTO ledger_batches VALUES (?, ?)", ((f"{n:024x}", old) for n in range(600_000)))
            db.executemany("INSERT INTO settled VALUES (?, ?)", ((f"s{n}", old) for n in range(50_000)))
            db.executemany("INSERT INTO leases VALUES ('c', ?, ?, 1)", ((f"m{n}", old) for n in range(50_000)))
            db.execute("INSERT INTO ledger_batches VALUES ('recent', ?)", (int(time.time() * 1000),))
            db.commit()
        assert await store.sweep() == 1  # one limit (the lease set) was there to look at
        assert await other.sweep() == 0  # not its turn: one process a minute
        with contextlib.closing(sqlite3.connect(path)) as db:
            left = [db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("settled", "leases")]
            assert left == [0, 0]
            assert db.execute("SELECT id FROM ledger_batches").fetchall() == [("recent",)]
    finally:
        await store.close()
        await other.close()
