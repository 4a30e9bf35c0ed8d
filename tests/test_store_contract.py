"""One contract, three stores: every test runs on the memory store, a SQLite file and a real redis-server."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis

from app.auth.keys import hash_key, key_id_of
from app.auth.records import KeyFields, KeyRecord, TeamFields, TeamRecord
from app.auth.registry import Registry
from app.errors import ConflictError, InvalidRequestError, NotFoundError
from app.limits.checks import Check, Settlement, budget_period
from app.store.base import Store
from app.store.redis import RedisStore
from tests.redis_server import RedisServer
from tests.redis_server import dump as redis_dump

pytestmark = pytest.mark.anyio


def team(name: str = "ml", **fields: object) -> TeamRecord:
    return TeamRecord(name=name, **fields)


def key(key_id: str, name: str = "bot", team_name: str = "ml") -> KeyRecord:
    return KeyRecord(id=key_id, name=name, team=team_name, hash="0" * 64)


async def test_teams_crud(store: Store) -> None:
    assert await store.create_team(team("ml", models=["openai/*"], rpm=10))
    assert not await store.create_team(team("ml"))  # names are unique
    assert await store.create_team(team("ops"))
    got = await store.get_team("ml")
    assert got is not None and got.models == ["openai/*"] and got.rpm == 10
    assert [t.name for t in await store.list_teams()] == ["ml", "ops"]
    assert await store.update_team(got.model_copy(update={"rpm": 20}))
    assert (await store.get_team("ml")).rpm == 20  # type: ignore[union-attr]
    assert not await store.update_team(team("nobody"))
    assert await store.delete_team("ops")
    assert not await store.delete_team("ops")
    assert await store.get_team("ops") is None


async def test_keys_crud_and_unique_names_per_team(store: Store) -> None:
    assert await store.create_key(key("aaaaaaaaaaaa", "bot", "ml")) is None
    assert await store.create_key(key("bbbbbbbbbbbb", "bot", "ml")) == "aaaaaaaaaaaa"
    assert await store.get_key("bbbbbbbbbbbb") is None  # no duplicate was stored
    assert await store.create_key(key("cccccccccccc", "bot", "ops")) is None  # same name, other team
    assert await store.create_key(key("dddddddddddd", "ci", "ml")) is None
    assert {k.id for k in await store.list_keys()} == {"aaaaaaaaaaaa", "cccccccccccc", "dddddddddddd"}
    assert {k.id for k in await store.list_keys(team="ml")} == {"aaaaaaaaaaaa", "dddddddddddd"}

    renamed = (await store.get_key("dddddddddddd")).model_copy(update={"name": "bot"})  # type: ignore[union-attr]
    assert await store.update_key(renamed, old_name="ci") == "aaaaaaaaaaaa"  # taken
    renamed = renamed.model_copy(update={"name": "deploy"})
    assert await store.update_key(renamed, old_name="ci") is None
    assert await store.create_key(key("eeeeeeeeeeee", "ci", "ml")) is None  # the old name is free again
    assert await store.delete_key("eeeeeeeeeeee")
    assert not await store.delete_key("eeeeeeeeeeee")
    assert await store.create_key(key("ffffffffffff", "ci", "ml")) is None


async def test_last_used_is_recorded(store: Store) -> None:
    await store.create_key(key("aaaaaaaaaaaa"))
    moment = datetime.now(UTC).replace(microsecond=0)
    await store.touch_keys({"aaaaaaaaaaaa": moment, "zzzzzzzzzzzz": moment})
    got = await store.get_key("aaaaaaaaaaaa")
    assert got is not None and got.last_used_at == moment
    assert [k.last_used_at for k in await store.list_keys()] == [moment]


async def test_changes_reach_listeners(store: Store) -> None:
    heard: list[str] = []
    store.on_change(heard.append)
    await store.publish("key:aaaaaaaaaaaa")
    for _ in range(200):
        if "key:aaaaaaaaaaaa" in heard:
            break
        await asyncio.sleep(0.01)
    assert "key:aaaaaaaaaaaa" in heard


async def test_registry_key_lifecycle(store: Store) -> None:
    registry = Registry(store)
    with pytest.raises(InvalidRequestError, match="No team named"):
        await registry.create_key("bot", "ml", KeyFields())
    await registry.create_team("ml", TeamFields())
    with pytest.raises(ConflictError):
        await registry.create_team("ml", TeamFields())
    record, plaintext = await registry.create_key("bot", "ml", KeyFields(models=["openai/*"]))
    assert key_id_of(plaintext) == record.id and record.hash == hash_key(plaintext)
    with pytest.raises(ConflictError) as conflict:
        await registry.create_key("bot", "ml", KeyFields())
    assert conflict.value.metadata == {"id": record.id}
    assert conflict.value.headers["x-should-retry"] == "false"

    rotated, new_plaintext = await registry.rotate_key(record.id, grace_period_s=60)
    assert rotated.id == record.id and rotated.hash == hash_key(new_plaintext) != record.hash
    assert [p.hash for p in rotated.previous] == [record.hash]
    revoked = await registry.revoke_key(record.id)
    assert revoked.revoked and revoked.revoked_at is not None
    heard: list[str] = []
    store.on_change(heard.append)
    assert (await registry.revoke_key(record.id)).revoked_at == revoked.revoked_at  # idempotent
    # ... and announced again, so a retry heals a worker that missed the first announcement
    for _ in range(200):
        if f"key:{record.id}" in heard:
            break
        await asyncio.sleep(0.01)
    assert f"key:{record.id}" in heard
    with pytest.raises(ConflictError):
        await registry.rotate_key(record.id, 0)
    await registry.delete_team("ml")  # only revoked keys left
    with pytest.raises(NotFoundError):
        await registry.team("ml")


async def test_registry_refuses_to_delete_team_with_active_keys(store: Store) -> None:
    registry = Registry(store)
    await registry.create_team("ml", TeamFields())
    await registry.create_key("bot", "ml", KeyFields())
    with pytest.raises(ConflictError, match="active keys"):
        await registry.delete_team("ml")


async def test_declared_entries_are_loaded_and_read_only(store: Store) -> None:
    registry = Registry(store)
    declared_team = TeamRecord(name="gitops", declared=True)
    declared_key = KeyRecord(id="gggggggggggg", name="ci", team="gitops", hash="1" * 64, declared=True)
    await registry.load_declared([declared_team], [declared_key])
    await registry.load_declared([declared_team], [declared_key])  # idempotent at every start
    assert (await store.get_key("gggggggggggg")) is not None
    with pytest.raises(ConflictError, match="config file"):
        await registry.revoke_key("gggggggggggg")
    with pytest.raises(ConflictError, match="config file"):
        await registry.update_team("gitops", {"rpm": 1})
    await registry.load_declared([], [])  # withdrawn from the file: gone
    assert await store.get_key("gggggggggggg") is None and await store.get_team("gitops") is None


async def test_a_declared_key_replaced_under_its_name_loads(store: Store) -> None:
    """A key regenerated (`gateway keys generate`) and put in the file in place of the old one has
    the old one's name and a new id: the old one goes first, so the new one takes its name."""
    registry = Registry(store)
    declared_team = TeamRecord(name="gitops", declared=True)
    old = KeyRecord(id="oooooooooooo", name="ci", team="gitops", hash="1" * 64, declared=True)
    new = KeyRecord(id="nnnnnnnnnnnn", name="ci", team="gitops", hash="2" * 64, declared=True)
    await registry.load_declared([declared_team], [old])
    await registry.load_declared([declared_team], [new])
    assert await store.get_key("oooooooooooo") is None
    loaded = await store.get_key("nnnnnnnnnnnn")
    assert loaded is not None and loaded.name == "ci" and loaded.hash == "2" * 64


async def test_expiry_must_be_in_the_future(store: Store) -> None:
    registry = Registry(store)
    await registry.create_team("ml", TeamFields())
    with pytest.raises(InvalidRequestError, match="expires_at"):
        await registry.create_key("old", "ml", KeyFields(expires_at=datetime.now(UTC) - timedelta(seconds=1)))


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_redis_survives_a_new_connection_and_holds_no_secret(store: Store, redis_server: RedisServer) -> None:
    assert isinstance(store, RedisStore)
    registry = Registry(store)
    await registry.create_team("ml", TeamFields(upstream_key_env="TEAM_ML_OPENROUTER_KEY"))
    record, plaintext = await registry.create_key("bot", "ml", KeyFields())
    await store.touch_keys({record.id: datetime.now(UTC)})

    again = RedisStore(redis_server.url, prefix=store.channel.split(":")[0])
    try:
        assert (await again.get_key(record.id)) is not None
        assert [t.name for t in await again.list_teams()] == ["ml"]
    finally:
        await again.close()

    dump = redis_dump(redis_server.url)
    secret = plaintext.rsplit("-", 1)[1]
    assert record.id.encode() in dump
    assert plaintext.encode() not in dump and secret.encode() not in dump


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_redis_changes_reach_other_replicas(store: Store, redis_server: RedisServer) -> None:
    assert isinstance(store, RedisStore)
    replica = RedisStore(redis_server.url, prefix=store.channel.split(":")[0])
    heard: list[str] = []
    replica.on_change(heard.append)
    try:
        for _ in range(300):  # subscribed: a fresh listener first drops everything ("*")
            if "*" in heard:
                break
            await asyncio.sleep(0.01)
        await store.publish("key:aaaaaaaaaaaa")
        started = asyncio.get_running_loop().time()
        while "key:aaaaaaaaaaaa" not in heard:
            assert asyncio.get_running_loop().time() - started < 1.0, heard
            await asyncio.sleep(0.005)
    finally:
        await replica.close()


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_redis_sweep_leaves_no_state_behind(store: Store, redis_server: RedisServer) -> None:
    """Limit state that says nothing any more goes: settled leases at once, full buckets and
    leases of crashed requests at the sweep, which one replica runs per minute."""
    assert isinstance(store, RedisStore)
    prefix = store.channel.split(":")[0]
    limits, tag = f"{{{prefix}}}:limits", f"{{{prefix}}}:"
    period, ttl = budget_period("day")
    checks = [
        Check("key", "s1", "requests", 5),
        Check("key", "s1", "tokens", 500, 100),
        Check("key", "s1", "concurrency", 5),
        Check("key", "s1", "budget", 10**6, 1000, period, ttl),
    ]
    settled, crashed = "req-settled", "req-crashed"
    assert (await store.admit(checks, settled, 60_000)).ok
    assert (await store.admit(checks, crashed, 200)).ok
    await store.settle([Settlement(c, settled, 40 if c.kind == "tokens" else 7) for c in checks[1:]])
    client = redis.Redis.from_url(redis_server.url)
    try:
        fields = {f.decode() for f in client.hkeys(limits)}
        assert fields == {c.name for c in checks}  # the crashed request still holds its lease
        leases = [f"{tag}leases:{c.name}" for c in checks[2:]]
        assert [client.zcard(z) for z in leases] == [1, 1]
        # Make the buckets idle for two windows (as if two minutes had passed).
        for c in checks[:2]:
            level = client.hget(limits, c.name).decode().split(":")[0]
            client.hset(limits, c.name, f"{level}:{int(time.time() * 1000) - 2 * 60_000 - 1}")
        await asyncio.sleep(0.3)  # the crashed request's lease runs out
        assert await store.sweep() == 4
        assert client.hlen(limits) == 0 and [client.exists(z) for z in leases] == [0, 0]
        assert int(client.get(f"{tag}lim:{checks[3].name}:spent")) == 7  # the spend stays
        assert 0 < client.ttl(f"{tag}lim:{checks[3].name}:spent") <= ttl
        assert await store.sweep() == 0  # another replica's turn comes in a minute
    finally:
        client.close()
