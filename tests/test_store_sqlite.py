"""The SQLite store (app/store/sqlite.py) beyond the shared contract: what it holds survives
closing and reopening; two stores on one file, as two workers, share keys, revocations and
limits exactly; the `store` setting's forms; errors come out as `StoreError`."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.auth.records import KeyFields, TeamFields
from app.auth.registry import Registry
from app.limits.checks import Check, Settlement, budget_period
from app.settings import ConfigError, load_settings
from app.store import open_store, sqlite_path
from app.store.base import LedgerBatch, StoreError
from app.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio
LEASE_MS = 60_000


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


async def _heard(heard: list[str], change: str) -> None:
    while change not in heard:
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

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(worker, [24, 24]))
    assert [len(results) for results in outcomes] == [24, 24]
    assert sum(ok for results in outcomes for ok in results) == 12  # each on its own would admit 12


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
    """Two workers start together and load the same declared key: both find it missing, and the
    second then finds its name taken by the first one's copy of the same key, which is no
    conflict. (Their calls alternate: the store runs them in the order made.)"""
    from app.auth.records import KeyRecord, TeamRecord

    store = SqliteStore(tmp_path / "gateway.db")
    team = TeamRecord(name="gitops", declared=True)
    key = KeyRecord(id="gggggggggggg", name="ci", team="gitops", hash="1" * 64, declared=True)
    try:
        assert await store.create_team(team)  # from an earlier start: both take the same steps
        await asyncio.gather(Registry(store).load_declared([team], [key]), Registry(store).load_declared([team], [key]))
        assert [k.id for k in await store.list_keys()] == ["gggggggggggg"]
    finally:
        await store.close()


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
    with pytest.raises(ConfigError, match=r"^store: .*sqlite"):
        load_settings(config_file=None, store=store)


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
