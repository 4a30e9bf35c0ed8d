"""The lean Redis client (app/store/resp.py): commands queued before the connection exists land
after AUTH and SELECT, one connection is kept and shared, `?db=N` is honoured as redis-py honours
it, a connection that stops answering is replaced, and a refused login leaves no connection open."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from app.limits.checks import Check
from app.store.redis import RedisStore
from tests.redis_server import RedisServer


@pytest.mark.anyio
async def test_commands_racing_the_connection_set_up_land_after_auth_and_select(redis_server: RedisServer) -> None:
    """A fresh store, a user with a password and database 3: fifty admissions sent at once (all
    queued before the connection exists) are each answered with their own verdict, after AUTH
    and SELECT, so every limit key lands in database 3."""
    import redis.asyncio as aioredis

    user, secret = "u" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    prefix = "t" + uuid.uuid4().hex[:10]
    admin = aioredis.Redis(port=redis_server.port)
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{secret}", "~*", "+@all")
    store = RedisStore(f"redis://{user}:{secret}@127.0.0.1:{redis_server.port}/3", prefix=prefix)
    try:
        limit = Check("key", "race", "requests", 30)
        verdicts = await asyncio.gather(*(store.admit([limit], uuid.uuid4().hex, 60_000) for _ in range(50)))
        assert sum(v.ok for v in verdicts) == 30  # each reply went to its own caller
        assert sorted(v.states[0][0] for v in verdicts if v.ok) == list(range(30))
        db3 = aioredis.Redis(port=redis_server.port, db=3)
        in_3 = await db3.keys(f"*{prefix}*")
        await db3.aclose()
        assert in_3 and not await admin.keys(f"*{prefix}*")
    finally:
        await store.close()
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()


def connected_clients(port: int) -> int:
    import redis

    with redis.Redis(port=port) as plain:
        count: int = plain.info("clients")["connected_clients"]
        return count - 1  # this one


@pytest.mark.anyio
async def test_the_lean_client_keeps_one_connection(redis_server: RedisServer) -> None:
    """Concurrent and later calls share one connection (so Redis runs them in the order sent)."""
    from app.store.resp import RespClient, encode

    before = connected_clients(redis_server.port)
    client = RespClient(redis_server.url, timeout_s=2)
    try:
        assert await asyncio.gather(*(client.call(encode("PING")) for _ in range(8))) == [b"PONG"] * 8
        assert [await client.call(encode("PING")) for _ in range(4)] == [b"PONG"] * 4
        assert connected_clients(redis_server.port) == before + 1
    finally:
        client.close()


@pytest.mark.anyio
async def test_the_lean_client_and_redis_py_use_the_same_database(redis_server: RedisServer) -> None:
    """`?db=N` is honoured by both clients of the store: the ledger written on the lean client is
    read back (redis-py) from the same database, and admission state lands there too."""
    import redis

    from app.store.base import LedgerBatch

    prefix = "db" + uuid.uuid4().hex[:8]
    store = RedisStore(f"redis://127.0.0.1:{redis_server.port}?db=3", prefix=prefix, timeout_s=2)
    try:
        await store.ledger_apply(LedgerBatch(uuid.uuid4().hex, [("20261129", "t|k|m", "requests", 2)], {"k": "n"}))
        stored, names = await store.ledger_read(["20261129"])
        assert stored == {"20261129": {"t|k|m|requests": 2}} and names == {"k": "n"}
        check = Check("key", "k", "requests", 10)
        assert (await store.admit([check], "m1", 1000)).ok
    finally:
        await store.close()
    with redis.Redis(port=redis_server.port, db=3) as db3, redis.Redis(port=redis_server.port, db=0) as db0:
        assert db3.keys(f"{{{prefix}}}:*") and not db0.keys(f"{{{prefix}}}:*")


@pytest.mark.anyio
async def test_a_connection_that_stops_answering_is_replaced(redis_server: RedisServer) -> None:
    """A command that times out closes its connection (the ones after it would be as late); the
    next command connects afresh instead of waiting behind a dead socket."""
    import signal

    from app.store.base import StoreError
    from app.store.resp import RespClient, encode

    before = connected_clients(redis_server.port)
    client = RespClient(redis_server.url, timeout_s=0.3)
    try:
        first = await client.call(encode("CLIENT", "ID"))
        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)  # alive, connected, silent
        try:
            with pytest.raises(StoreError):
                await client.call(encode("PING"))
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        assert await client.call(encode("CLIENT", "ID")) != first
        deadline = time.monotonic() + 10
        while connected_clients(redis_server.port) > before + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # polling Redis's count, with a deadline
        assert connected_clients(redis_server.port) == before + 1  # the silent one was closed, not kept
    finally:
        client.close()


@pytest.mark.anyio
async def test_a_refused_login_leaves_no_connection_open(redis_server: RedisServer) -> None:
    from app.store.base import StoreError
    from app.store.resp import RespClient, encode

    before = connected_clients(redis_server.port)
    client = RespClient(f"redis://nobody:wrong@127.0.0.1:{redis_server.port}/0", timeout_s=2)
    for _ in range(6):
        with pytest.raises(StoreError):
            await client.call(encode("PING"))
    deadline = time.monotonic() + 10
    while connected_clients(redis_server.port) > before and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # polling Redis's count, with a deadline
    assert connected_clients(redis_server.port) == before
    client.close()
