"""The Redis store on a Sentinel-managed master (issue #20): the store URL's Sentinel form, and a
failover followed without a restart by every client of the store (the request path's lean client,
redis-py's pool, the change channel), with real redis-server processes (tests/redis_topology.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest

from app.auth.records import KeyRecord, TeamRecord
from app.limits.checks import Check, Reserve, Settlement
from app.simulator import SimulatorThread
from app.store.base import StoreError
from app.store.location import check_store, sentinel_of
from app.store.redis import RedisStore
from tests.admission_support import HELLO, MINI, chat, make_key, make_team
from tests.redis_topology import SentinelSet
from tests.support import ADMIN_KEY, GatewayServer, gateway_settings


def test_the_sentinel_form_names_sentinels_master_database_and_passwords() -> None:
    url = "rediss+sentinel://app:p%40ss@10.0.0.1:26379,[::1]:26380/gw-master/3?sentinel_password=s3&ssl_cert_reqs=none"
    assert check_store(url) == url
    where = sentinel_of(url)
    assert where.sentinels == [("10.0.0.1", 26379), ("::1", 26380)]
    assert where.master == "gw-master" and where.sentinel_auth == {"password": "s3"}
    assert (
        where.data_url == "rediss://app:p%40ss@localhost/3?ssl_cert_reqs=none"
    )  # the sentinels' password is not the master's
    assert sentinel_of("redis+sentinel://h:1/m").data_url == "redis://localhost/0"


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://h:26379", "redis+sentinel://h:26379/", "redis+sentinel://h/m", "redis+sentinel://h:1/m/x"],
)
def test_a_sentinel_url_without_master_or_ports_is_refused_in_words(url: str) -> None:
    with pytest.raises(ValueError, match="redis\\+sentinel://"):
        check_store(url)


def _key(key_id: str, name: str) -> KeyRecord:
    return KeyRecord(id=key_id, name=name, team="ml", hash="0" * 64)


async def _admitted(store: RedisStore, member: str) -> bool:
    checks = [Check("key", "k1", "requests", 1_000_000), Check("key", "k1", "concurrency", 1_000)]
    try:
        verdict = await store.admit(checks, member, 30_000)
        await store.settle(
            [Settlement(checks[1], member, 0)], f"b-{member}", [Reserve(checks, f"{member}-ahead", 30_000)]
        )
    except StoreError:
        return False
    return verdict.ok


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_store_follows_a_sentinel_failover_without_a_restart(
    sentinel_set: Callable[..., SentinelSet],
) -> None:
    """The master SIGKILLed under a store in use: admissions fail (a StoreError, which admission's
    outage policy handles) until the sentinels promote the replica, then succeed on it, with the
    key records and a revocation made before the failover intact and the change channel back."""
    topology = sentinel_set(password="data-pass", sentinel_password="sentinel-pass")
    store = RedisStore(topology.sentinel_url(db=2), prefix="ha", timeout_s=0.5)
    heard: list[str] = []
    store.on_change(heard.append)
    try:
        await store.prepare()
        assert await store.create_team(TeamRecord(name="ml"))
        assert await store.create_key(_key("aaaaaaaaaaaa", "alice")) is None
        assert await store.create_key(_key("bbbbbbbbbbbb", "bob")) is None
        assert await store.delete_key("bbbbbbbbbbbb")  # revoked before the failover
        assert await _admitted(store, "before")
        await asyncio.to_thread(topology.wait_replicated)
        killed_at = topology.kill_master()
        failover_s = await asyncio.to_thread(topology.wait_failover)
        deadline = time.monotonic() + 30
        attempt = 0
        while not await _admitted(store, f"after-{attempt}"):
            attempt += 1
            assert time.monotonic() < deadline, f"no admission 30 s after the failover ({failover_s:.1f} s)"
            await asyncio.sleep(0.1)
        back_s = time.monotonic() - killed_at
        assert back_s < failover_s + 30, (back_s, failover_s)
        assert (await store.get_key("aaaaaaaaaaaa")) is not None, "a key record was lost in the failover"
        assert (await store.get_key("bbbbbbbbbbbb")) is None, "a revoked key came back"
        assert topology.master_address()[1] != killed_port(topology)
        deadline = time.monotonic() + 30
        while "key:after" not in heard:  # the change channel re-subscribed on the new master
            await store.publish("key:after")
            assert time.monotonic() < deadline, heard
            await asyncio.sleep(0.2)
        print(f"sentinel failover {failover_s:.1f} s; admissions back {back_s:.1f} s after the kill")
    finally:
        await store.close()


def killed_port(topology: SentinelSet) -> int:
    assert topology.killed is not None
    return topology.killed.port


@pytest.mark.slow
def test_a_gateway_on_sentinel_serves_again_after_the_failover_without_a_restart(
    simulator: SimulatorThread, sentinel_set: Callable[..., SentinelSet]
) -> None:
    """End to end: a gateway whose store is the Sentinel URL admits a key with a budget; the master
    is SIGKILLed; meanwhile the budgeted key is refused with 503 `store_unavailable` (budgets fail
    closed) or served, never anything else; once the replica is promoted it is served again."""
    topology = sentinel_set()
    settings = gateway_settings(
        simulator.base_url, admin_key=ADMIN_KEY, store=topology.sentinel_url(), store_prefix="g" + uuid.uuid4().hex[:8]
    )
    body = {"model": MINI, "messages": HELLO, "max_tokens": 5}
    with GatewayServer(settings) as gateway:
        key = make_key(gateway, make_team(gateway), rpm=1000, budget_usd=10)
        assert chat(gateway, key["key"], body).status_code == 200
        topology.wait_replicated()
        killed_at = topology.kill_master()
        statuses: set[int] = set()
        served_after = 0  # in a row, once the sentinels name the new master (two may be reservations ahead)
        deadline = time.monotonic() + 40
        while served_after < 5:
            response = chat(gateway, key["key"], body)
            statuses.add(response.status_code)
            assert response.status_code in (200, 503), response.text
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "store_unavailable", response.text
            promoted = topology.master_address()[1] != killed_port(topology)
            served_after = served_after + 1 if promoted and response.status_code == 200 else 0
            assert time.monotonic() < deadline, statuses
            if not served_after:
                time.sleep(0.1)
        back_s = time.monotonic() - killed_at
        print(f"gateway on sentinel: served again {back_s:.1f} s after the kill; statuses {sorted(statuses)}")
