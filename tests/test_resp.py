"""The lean Redis client (app/store/resp.py): commands queued before the connection exists land
after AUTH and SELECT, one connection is kept and shared, a connection that stops answering is
replaced, and a refused login leaves no connection open. Its URL means what it means to redis-py
(which reads it): database, user, client name, unix socket, timeouts, and `rediss://` with every
`ssl_*` option, checked against redis-servers on TLS that the tests' own CA certified."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from app.auth.records import TeamRecord
from app.limits.checks import Check, Settlement, budget_period
from app.simulator import SimulatorThread
from app.store.base import LedgerBatch, StoreError
from app.store.redis import RedisStore
from app.store.resp import RespClient, encode
from tests.admission_support import HELLO, MINI, chat, make_key, make_team
from tests.certificates import Certificates, make_certificates
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, GatewayServer, gateway_settings


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(certificates: Certificates) -> Iterator[RedisServer]:
    """A redis-server on TLS only (its certificate names `localhost`), clients not asked for one."""
    server = RedisServer(tls=certificates).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def mtls_redis(certificates: Certificates) -> Iterator[RedisServer]:
    """A redis-server on TLS only that refuses a client without a certificate from the CA."""
    server = RedisServer(tls=certificates, tls_auth_clients=True).start()
    yield server
    server.cleanup()


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

    before = connected_clients(redis_server.port)
    # The URL's `socket_timeout` outranks the store's timeout, as it does for redis-py's pool.
    client = RespClient(redis_server.url + "?socket_timeout=0.3", timeout_s=30)
    try:
        first = await client.call(encode("CLIENT", "ID"))
        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)  # alive, connected, silent
        started = time.monotonic()
        try:
            with pytest.raises(StoreError):
                await client.call(encode("PING"))
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        assert time.monotonic() - started < 10
        assert await client.call(encode("CLIENT", "ID")) != first
        deadline = time.monotonic() + 10
        while connected_clients(redis_server.port) > before + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # polling Redis's count, with a deadline
        assert connected_clients(redis_server.port) == before + 1  # the silent one was closed, not kept
    finally:
        client.close()


@pytest.mark.anyio
async def test_a_refused_login_leaves_no_connection_open(redis_server: RedisServer) -> None:
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


def tls_url(server: RedisServer, certificates: Certificates, **options: str | Path) -> str:
    """The server's `rediss://` URL (host `localhost`, the name in its certificate) with the CA
    named, and `options` after it."""
    query = "&".join(
        f"{name}={quote(str(value))}" for name, value in {"ssl_ca_certs": certificates.ca, **options}.items()
    )
    return f"{server.url}?{query}"


async def eventually(condition: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not (condition() if callable(condition) else condition):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)  # polling, with a deadline


@pytest.mark.anyio
async def test_rediss_with_the_urls_ca_carries_the_request_path_the_records_and_the_changes(
    tls_redis: RedisServer, certificates: Certificates
) -> None:
    """`rediss://…?ssl_ca_certs=<CA>` (the server has no plain port): admissions and settlements
    on the lean client, records, budget spend and the ledger's reads on redis-py's pool, changes
    on redis-py's pub/sub connection; every one of them verified the server against that CA."""
    url = tls_url(tls_redis, certificates)
    prefix = "tls" + uuid.uuid4().hex[:8]
    store, other = RedisStore(url, prefix=prefix, timeout_s=2), RedisStore(url, prefix=prefix, timeout_s=2)
    heard: list[str] = []
    try:
        assert await store.create_team(TeamRecord(name="tls-team"))
        team = await store.get_team("tls-team")
        assert team is not None and team.name == "tls-team"

        period, ttl = budget_period("day")
        slot, budget = Check("key", "k", "concurrency", 1), Check("key", "k", "budget", 10**9, 1000, period, ttl)
        assert (await store.admit([slot, budget], "m1", 60_000)).ok
        refused = await store.admit([slot, budget], "m2", 60_000)
        assert not refused.ok and refused.failed == 0  # m1 holds the one slot: the state is in Redis
        await store.settle([Settlement(slot, "m1", 0), Settlement(budget, "m1", 700)])
        assert (await store.admit([slot], "m3", 60_000)).ok  # the settlement freed it
        assert await store.budget_spent(budget) == 700

        day = period.removeprefix("d")
        await store.ledger_apply(LedgerBatch(uuid.uuid4().hex, [(day, "t|k|m", "requests", 1)], {"k": "name"}))
        assert await store.ledger_read([day]) == ({day: {"t|k|m|requests": 1}}, {"k": "name"})

        other.on_change(heard.append)
        await eventually(lambda: "*" in heard, "subscribed over TLS")  # said once the subscription holds
        await store.publish("team:tls-team")
        await eventually(lambda: "team:tls-team" in heard, "a change heard over TLS")
    finally:
        await store.close()
        await other.close()


@pytest.mark.anyio
async def test_rediss_without_the_ca_is_refused_at_once_with_a_store_error(tls_redis: RedisServer) -> None:
    """No `ssl_ca_certs`: the system's CAs, as in redis-py, which do not know the test CA. Both
    clients of the store refuse the server at once, as a StoreError (which the gateway meets with
    its outage policy), without waiting out a timeout."""
    store = RedisStore(tls_redis.url, prefix="tls" + uuid.uuid4().hex[:8], timeout_s=5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED"):
            await store.admit([Check("key", "k", "requests", 10)], "m1", 60_000)
        with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED"):
            await store.ping()  # redis-py's pool, from the same URL
        assert time.monotonic() - started < 4
    finally:
        await store.close()


def test_a_gateway_on_a_rediss_store_admits_on_it(
    simulator: SimulatorThread, tls_redis: RedisServer, certificates: Certificates
) -> None:
    """End to end: a gateway whose store is `rediss://…?ssl_ca_certs=<CA>` keeps a team and a key
    there (redis-py) and admits the key's requests under its rate limit there (the lean client):
    the limit's headers come back, counting down."""
    url = tls_url(tls_redis, certificates)
    settings = gateway_settings(
        simulator.base_url, admin_key=ADMIN_KEY, store=url, store_prefix="g" + uuid.uuid4().hex[:8]
    )
    with GatewayServer(settings) as gateway:
        key = make_key(gateway, make_team(gateway), rpm=1000)
        remaining = []
        for _ in range(3):
            response = chat(gateway, key["key"], {"model": MINI, "messages": HELLO, "max_tokens": 5})
            assert response.status_code == 200, response.text
            assert response.headers["x-ratelimit-limit-requests"] == "1000"
            remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert remaining == sorted(remaining, reverse=True) and remaining[-1] < 1000


@pytest.mark.anyio
async def test_ssl_cert_reqs_none_connects_without_the_ca(tls_redis: RedisServer) -> None:
    store = RedisStore(tls_redis.url + "?ssl_cert_reqs=none", prefix="tls" + uuid.uuid4().hex[:8], timeout_s=2)
    try:
        assert (await store.admit([Check("key", "k", "requests", 10)], "m1", 60_000)).ok
        await store.ping()
    finally:
        await store.close()


@pytest.mark.anyio
async def test_the_certificate_must_name_the_host_unless_ssl_check_hostname_is_off(
    tls_redis: RedisServer, certificates: Certificates
) -> None:
    """The server's certificate names `localhost`, not 127.0.0.1: by address it is refused by
    both clients, as in redis-py; `ssl_check_hostname=false` accepts it (the CA still checked)."""
    by_address = tls_url(tls_redis, certificates).replace("//localhost:", "//127.0.0.1:")
    for url, accepted in ((by_address, False), (by_address + "&ssl_check_hostname=false", True)):
        store = RedisStore(url, prefix="tls" + uuid.uuid4().hex[:8], timeout_s=2)
        try:
            admission = store.admit([Check("key", "k", "requests", 10)], "m1", 60_000)
            if accepted:
                assert (await admission).ok
                await store.ping()
            else:
                with pytest.raises(StoreError, match="mismatch"):
                    await admission
                with pytest.raises(StoreError, match="mismatch"):
                    await store.ping()
        finally:
            await store.close()


@pytest.mark.anyio
async def test_a_server_asking_for_a_client_certificate_gets_the_urls(
    mtls_redis: RedisServer, certificates: Certificates
) -> None:
    """`--tls-auth-clients yes`: with `ssl_certfile` and `ssl_keyfile` both clients get in; without,
    both are turned away with a StoreError."""
    with_certificate = tls_url(mtls_redis, certificates, ssl_certfile=certificates.client_cert)
    with_certificate += f"&ssl_keyfile={quote(str(certificates.client_key))}"
    store = RedisStore(with_certificate, prefix="tls" + uuid.uuid4().hex[:8], timeout_s=2)
    try:
        assert (await store.admit([Check("key", "k", "requests", 10)], "m1", 60_000)).ok
        await store.ping()
    finally:
        await store.close()
    store = RedisStore(tls_url(mtls_redis, certificates), prefix="tls" + uuid.uuid4().hex[:8], timeout_s=2)
    try:
        with pytest.raises(StoreError):
            await store.admit([Check("key", "k", "requests", 10)], "m1", 60_000)
        with pytest.raises(StoreError):
            await store.ping()
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_url_names_the_same_database_user_and_name_for_both_clients(
    tls_redis: RedisServer, certificates: Certificates
) -> None:
    """Each URL, on TLS and on the server's unix socket: the connection the lean client opens and
    the one redis-py opens say the same database, ACL user and client name (CLIENT INFO)."""
    import redis.asyncio as aioredis

    user, secret = "u" + uuid.uuid4().hex[:8], "p@ss:w/rd " + uuid.uuid4().hex  # percent-encoded below
    admin = aioredis.Redis.from_url(tls_url(tls_redis, certificates))
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{secret}", "~*", "+@all")
    login = f"{user}:{quote(secret, safe='')}@"
    urls = {
        tls_url(tls_redis, certificates).replace("/0?", "/3?"): ("3", "default", ""),
        tls_url(tls_redis, certificates, db=4).replace("/0?", "/1?"): ("4", "default", ""),  # the query wins
        tls_url(tls_redis, certificates, client_name="gw-tls").replace("//", "//" + login): ("0", user, "gw-tls"),
        f"unix://{login}{tls_redis.socket}?db=5&client_name=gw-unix": ("5", user, "gw-unix"),
    }
    try:
        for url, (db, who, name) in urls.items():
            ours = RespClient(url, timeout_s=2)
            theirs = aioredis.Redis.from_url(url)
            try:
                raw = await ours.call(encode("CLIENT", "INFO"))
                info = dict(field.split("=", 1) for field in raw.decode().split())
                reference = {k: str(v) for k, v in (await theirs.client_info()).items()}
            finally:
                ours.close()
                await theirs.aclose()
            assert (info["db"], info["user"], info["name"]) == (db, who, name), url
            assert (reference["db"], reference["user"], reference["name"]) == (db, who, name), url
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("redis://127.0.0.1:6379?ssl_cert_reqs=none", TypeError),  # a TLS option on a plain URL
        ("rediss://127.0.0.1:6379?ssl_cert_reqs=sometimes", "RedisError"),
        ("redis://127.0.0.1:6379?db=three", ValueError),
        ("http://127.0.0.1:6379", ValueError),
    ],
)
def test_a_url_redis_py_refuses_is_refused_when_the_client_is_made(url: str, error: type | str) -> None:
    """redis-py's pool refuses these when it first connects; the lean client reads the URL with
    redis-py's code, so it refuses them as soon as it is made (the gateway's start)."""
    import redis
    from redis.asyncio import BlockingConnectionPool

    expected = redis.RedisError if error == "RedisError" else error
    assert isinstance(expected, type)
    with pytest.raises(expected):
        BlockingConnectionPool.from_url(url).make_connection()
    with pytest.raises(expected):
        RespClient(url, timeout_s=1)
