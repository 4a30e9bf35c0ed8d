"""The hot path's shortcuts (issue 6) keep the behaviour of what they replace: metric families
summed in process export exactly the samples prometheus_client would; the in-flight gauge reads
the live count; the admission script's single read sees buckets, spend and expired holds
together; fast-lane responses of every kind carry x-request-id; a non-streaming response is
metered after it is sent, and still metered when the client is gone by then."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
import uuid
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.limits.checks import Check, Settlement
from app.simulator import SimulatorThread
from app.store.base import Store
from app.store.redis import RedisStore
from app.usage.metrics import LLM_SECONDS, OVERHEAD_SECONDS, LocalCounter, LocalHistogram, Metrics
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, CLIENT_KEY, GatewayServer, gateway_settings, scrape, wait_until
from tests.test_limits import new_key

HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]
MODEL = "openai/gpt-4o-mini"


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but `_created` (a timestamp), by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


# -- 1. in-process families = prometheus_client's -----------------------------------------------------
@pytest.mark.parametrize("buckets", [LLM_SECONDS, OVERHEAD_SECONDS], ids=["llm", "overhead"])
def test_local_histogram_exports_what_prometheus_client_would(buckets: tuple[float, ...]) -> None:
    values = [0.0, 0.00005, *buckets, *(b * 1.0001 for b in buckets), buckets[-1] * 10, 0.3, 0.3, 7.77]
    reference = CollectorRegistry()
    theirs = Histogram("h_seconds", "doc", ("model", "endpoint"), buckets=buckets, registry=reference)
    ours = LocalHistogram("h_seconds", "doc", ("model", "endpoint"), buckets)
    for i, value in enumerate(values):
        labels = ("m" + str(i % 3), "chat")
        theirs.labels(*labels).observe(value)
        ours.observe(labels, value)
    mine = CollectorRegistry()
    mine.register(_Wrap(ours))
    expected, got = samples(generate_latest(reference)), samples(generate_latest(mine))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert len([k for k in got if k[0] == "h_seconds_bucket"]) == 3 * (len(buckets) + 1)  # +Inf included


def test_local_counter_exports_what_prometheus_client_would() -> None:
    reference = CollectorRegistry()
    theirs = Counter("c_usd", "doc", ("team", "key"), registry=reference)
    ours = LocalCounter("c_usd", "doc", ("team", "key"))
    for i, amount in enumerate([1, 0.000123, 2.5, 1e-9, 40]):
        labels = ("t" + str(i % 2), "k")
        theirs.labels(*labels).inc(amount)
        ours.inc(labels, amount)
    mine = CollectorRegistry()
    mine.register(_Wrap(ours))
    assert samples(generate_latest(mine)) == samples(generate_latest(reference))


class _Wrap:
    def __init__(self, family: LocalCounter | LocalHistogram) -> None:
        self.family = family

    def collect(self) -> Any:
        yield self.family.collect()


def test_a_process_exports_the_request_families_once() -> None:
    """One process (no PROMETHEUS_MULTIPROC_DIR): the families are in-process and each is exported
    once, with HELP and TYPE, so promtool and Prometheus accept the page."""
    metrics = Metrics()
    assert not metrics.multiprocess and isinstance(metrics.duration, LocalHistogram)
    text = metrics.exposition().decode()
    for name in ("gateway_requests_total", "gateway_request_duration_seconds", "gateway_in_flight_requests"):
        assert text.count(f"# TYPE {name} ") == 1, name


# -- 2. the in-flight gauge is live --------------------------------------------------------------------
def in_flight(url: str) -> float:
    page = scrape(url, timeout=10).content
    return samples(page)[("gateway_in_flight_requests", ())]


def test_in_flight_gauge_counts_open_requests(gateway: GatewayServer, http: httpx.Client) -> None:
    """A stream that goes silent stays in flight until its client leaves; one that ends does not."""
    stalled = {"model": MODEL, "messages": HELLO, "stream": True, "simulator": {"words": 30, "stall_after": 2}}
    ending = {"model": MODEL, "messages": HELLO, "stream": True, "simulator": {"words": 30, "chunk_delay_ms": 20}}
    assert in_flight(gateway.url) == 0
    with http.stream("POST", "/v1/chat/completions", json=stalled) as first:
        assert first.status_code == 200
        with http.stream("POST", "/v1/chat/completions", json=ending) as second:
            assert second.status_code == 200
            wait_until(lambda: in_flight(gateway.url) == 2, 10, "two requests in flight")
            assert "".join(second.iter_text()).endswith("data: [DONE]\n\n")
        wait_until(lambda: in_flight(gateway.url) == 1, 10, "one request in flight")
    wait_until(lambda: in_flight(gateway.url) == 0, 10, "no request in flight once the client left")


# -- 3. the admission script's one read ------------------------------------------------------------------
@pytest.mark.anyio
async def test_one_admission_sees_buckets_spend_and_expired_holds(store: Store) -> None:
    """Buckets, a budget's spend and its held sum are read together; a hold that expired is
    dropped from the held sum before the budget is decided, and the verdict's states say so."""
    scope = "k" + uuid.uuid4().hex[:8]
    rpm, tpm = Check("key", scope, "requests", 10), Check("key", scope, "tokens", 1000, 100)

    def budget(amount: int) -> Check:
        return Check("key", scope, "budget", 1000, amount, "total", 0)

    crashed, paid, late = (uuid.uuid4().hex for _ in range(3))
    started = time.monotonic()
    assert (await store.admit([rpm, tpm, budget(500)], crashed, 200)).ok  # never settled: expires
    assert (await store.admit([rpm, tpm, budget(300)], paid, 60_000)).ok
    await store.settle([Settlement(tpm, paid, 100 - 40), Settlement(budget(300), paid, 250)])  # 40 tokens, 250 spent
    assert not (await store.admit([rpm, tpm, budget(300)], late, 60_000)).ok  # 250 spent + 500 held
    await asyncio.sleep(0.3)  # the crashed request's lease (200 ms) runs out
    verdict = await store.admit([rpm, tpm, budget(300)], late, 60_000)
    refill = (time.monotonic() - started) * 1000 / 60  # TPM 1000: the bucket refills 1000 a minute
    assert verdict.ok
    (rpm_left, _), (tpm_left, _), (budget_left, _) = verdict.states
    assert rpm_left == 10 - 3  # three admissions; the refused one took nothing (all or nothing)
    assert 1000 - 100 - 40 - 100 <= tpm_left <= 1000 - 100 - 40 - 100 + refill + 1  # 100 held, 40 used, 100 held
    assert budget_left == 1000 - 250 - 300  # the expired 500 is no longer held


# -- 4. fast-lane responses of every kind carry the request id ---------------------------------------
def test_every_fast_lane_answer_carries_the_request_id(gateway: GatewayServer) -> None:
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    many_headers = {f"x-filler-{i}": "y" for i in range(120)}
    cases: dict[str, tuple[dict[str, str], Any, int]] = {
        "200": (auth, {"model": MODEL, "messages": HELLO}, 200),
        "401": ({"Authorization": "Bearer sk-gw-nope"}, {"model": MODEL, "messages": HELLO}, 401),
        "400": (auth, {"model": MODEL}, 400),
        "upstream 503": (auth, {"model": MODEL, "messages": HELLO, "simulator": {"status": 503}}, 502),
        "431": ({**auth, **many_headers}, {"model": MODEL, "messages": HELLO}, 431),
    }
    with httpx.Client(base_url=gateway.url, timeout=20) as http:
        for kind, (headers, body, status) in cases.items():
            rid = f"hot-{kind.replace(' ', '-')}-{uuid.uuid4().hex[:8]}"
            response = http.post("/v1/chat/completions", json=body, headers={**headers, "x-request-id": rid})
            assert response.status_code == status, (kind, response.text)
            assert response.headers.get("x-request-id") == rid, kind
            assert response.headers.get("content-type", "").startswith("application/json"), kind
            assert list(response.headers.keys()).count("x-request-id") == 1, kind


# -- 5. metering after the response --------------------------------------------------------------------
def answered(url: str) -> float:
    """Requests counted as answered (200) or as left by their client (499)."""
    page = samples(scrape(url, timeout=10).content)
    return sum(
        value
        for (name, labels), value in page.items()
        if name == "gateway_requests_total" and dict(labels)["status"] in ("200", "499")
    )


def test_a_response_is_metered_once_sent_even_if_the_client_is_gone(gateway: GatewayServer) -> None:
    """The client sends a request and closes its socket without reading the answer: the
    request is still counted, once."""
    before = answered(gateway.url)
    body = httpx.Request(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "simulator": {"ttfb_ms": 150}},
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in body.headers.items() if k.lower() != "host"
        )
        raw.sendall(head.encode() + b"\r\n" + body.read())
    counted = wait_until(lambda: answered(gateway.url) - before, 10, "the request metered")
    assert counted == 1  # a double record would be made in the same loop turn as the first


# -- 6. the lean Redis client: commands queued per loop turn, set-up first -----------------------------
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


# -- 7. a released concurrency slot is back before the client's next request ------------------------
def test_a_sequential_client_gets_its_concurrency_slot_back_at_once(keyed: GatewayServer) -> None:
    """Metering (and so settlement) runs after the response is sent; the slot must still be free
    when the client's next request comes: one after another at max_concurrency 1, never refused."""
    key = new_key(keyed, max_concurrency=1)["key"]
    with httpx.Client(base_url=keyed.url, headers={"Authorization": f"Bearer {key}"}, timeout=20) as http:
        statuses = [
            http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 5}).status_code
            for _ in range(40)
        ]
    assert statuses == [200] * 40


def test_a_sequential_client_gets_its_concurrency_slot_back_at_once_on_redis(
    simulator: SimulatorThread, redis_server: RedisServer
) -> None:
    """On Redis too, from a fresh Redis (no scripts loaded yet): the gateway loads its scripts
    when it starts, before its first request, so no admission or settlement meets NOSCRIPT."""
    import redis

    from app.store import lua

    shas = [hashlib.sha1(src.encode()).hexdigest() for src in (lua.ADMIT, lua.SETTLE, lua.LEDGER_APPLY)]
    settings = gateway_settings(
        simulator.base_url, admin_key=ADMIN_KEY, store=redis_server.url, store_prefix="t" + uuid.uuid4().hex[:10]
    )
    with redis.Redis(port=redis_server.port) as plain:
        plain.script_flush()
        assert plain.script_exists(*shas) == [False, False, False]
        with GatewayServer(settings) as gateway:
            assert plain.script_exists(*shas) == [True, True, True]  # loaded at start, before any request
            test_a_sequential_client_gets_its_concurrency_slot_back_at_once(gateway)


# -- 8. reservations are the server's own, whatever request id the client sends ---------------------
def test_a_reused_request_id_does_not_share_a_concurrency_slot(keyed: GatewayServer) -> None:
    """The request id is the client's to choose, so it cannot name a request's hold in the
    store: three requests sent with one id at max_concurrency 2 hold three slots, and the third
    is refused; once they end, the slots are free again."""
    key = new_key(keyed, max_concurrency=2)["key"]
    stalled = {"model": MODEL, "messages": HELLO, "stream": True, "simulator": {"words": 30, "stall_after": 1}}
    headers = {"Authorization": f"Bearer {key}", "x-request-id": "same-id-" + uuid.uuid4().hex[:6]}
    with httpx.Client(base_url=keyed.url, headers=headers, timeout=20) as http:
        with http.stream("POST", "/v1/chat/completions", json=stalled) as first:
            assert first.status_code == 200
            with http.stream("POST", "/v1/chat/completions", json=stalled) as second:
                assert second.status_code == 200
                third = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
                assert third.status_code == 429, third.text
                assert third.json()["error"]["code"] == "rate_limit_exceeded"
        after = wait_until(
            lambda: (
                (r := http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})).status_code == 200
                and r
            ),
            10,
            "the slots released",
        )
        assert after.headers["x-request-id"] == headers["x-request-id"]


def test_a_reused_request_id_does_not_share_a_concurrency_slot_on_redis(
    simulator: SimulatorThread, redis_server: RedisServer
) -> None:
    settings = gateway_settings(
        simulator.base_url, admin_key=ADMIN_KEY, store=redis_server.url, store_prefix="t" + uuid.uuid4().hex[:10]
    )
    with GatewayServer(settings) as gateway:
        test_a_reused_request_id_does_not_share_a_concurrency_slot(gateway)


# -- 9. the lean Redis client keeps one connection, and leaves none behind --------------------------
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


# -- 10. the serving stack the issue asks for ------------------------------------------------------
def test_served_on_uvloop_and_httptools_with_no_base_http_middleware(simulator: SimulatorThread) -> None:
    """uvicorn runs on uvloop with httptools; no middleware is a BaseHTTPMiddleware (which
    would wrap every request in a task and a stream); the edge, with the inference fast lane,
    is the first thing every request meets."""
    from starlette.middleware.base import BaseHTTPMiddleware
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from app.api.edge import EdgeMiddleware
    from app.main import create_app
    from app.server import options

    settings = gateway_settings(simulator.base_url, cors_origins=["https://app.example"])
    chosen = options(settings)
    assert chosen["loop"] == "uvloop" and issubclass(chosen["http"], HttpToolsProtocol)
    app = create_app(settings)
    assert not any(issubclass(m.cls, BaseHTTPMiddleware) for m in app.user_middleware if isinstance(m.cls, type))
    layer = app.front  # CORS (when configured), then the edge, then FastAPI
    while not isinstance(layer, EdgeMiddleware):
        assert not isinstance(layer, BaseHTTPMiddleware)
        layer = layer.app
    assert layer.inference and layer.app == app.behind_edge


def test_upstream_is_one_aiohttp_session_and_serving_never_imports_httpx(gateway: GatewayServer) -> None:
    """OpenRouter is reached through one shared aiohttp session; httpx (measured ~7x slower under
    load on its default transport) serves the CLI and the tests only, and the serving path does
    not even import it."""
    import subprocess
    import sys

    import aiohttp

    session = gateway.server.config.app.state.gateway.client._session
    assert isinstance(session, aiohttp.ClientSession) and not session.closed
    probe = (
        "import sys, app.cli, app.cli.serve, app.server, app.logs, app.api.edge, app.upstream.client\n"
        "from app.main import create_app, create_admin_app\n"
        "print('httpx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- 11. a busy listener's writes leave together ------------------------------------------------------
class RecordingTransport(asyncio.Transport):
    """An asyncio transport that records what it is asked to send, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0  # the client keeps up

    def write_eof(self) -> None:
        self.sent.append(b"<eof>")

    def abort(self) -> None:
        self.aborted = self.closed = True


async def _next_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


@pytest.mark.anyio
async def test_a_lone_request_writes_at_once_and_busy_ones_at_the_end_of_the_turn() -> None:
    from app.server import HeldTransport, WriteBatch

    requests: set[Any] = {"one"}
    batch = WriteBatch(requests)
    a, b = RecordingTransport(), RecordingTransport()
    first, second = HeldTransport(a, batch), HeldTransport(b, batch)

    first.write(b"HTTP/1.1 200 OK\r\n\r\n")  # one request open: straight to the socket
    assert a.sent == [b"HTTP/1.1 200 OK\r\n\r\n"] and not batch.held

    requests.add("two")  # busy: held until the loop turn ends, each connection's bytes in order
    first.write(b"head-a ")
    second.write(b"head-b ")
    first.writelines([b"body", b"-a"])
    second.write(b"body-b")
    assert a.sent == [b"HTTP/1.1 200 OK\r\n\r\n"] and b.sent == []
    await _next_turn()
    assert a.sent == [b"HTTP/1.1 200 OK\r\n\r\n", b"head-a body-a"]
    assert b.sent == [b"head-b body-b"]  # one system call per connection
    assert not batch.held

    requests.discard("two")  # alone again, but a connection holding writes keeps them in order
    requests.add("three")
    first.write(b"x")
    requests.discard("three")
    first.write(b"y")
    assert first.get_write_buffer_size() == 2  # the socket's buffer and what is held
    await _next_turn()
    assert a.sent[-1] == b"xy"
    assert first.get_write_buffer_size() == 0


@pytest.mark.anyio
async def test_held_writes_go_out_before_close_and_never_to_a_closed_socket() -> None:
    from app.server import HeldTransport, WriteBatch

    batch = WriteBatch({"one", "two"})
    a, b = RecordingTransport(), RecordingTransport()
    first, second = HeldTransport(a, batch), HeldTransport(b, batch)
    first.write(b"last words")
    first.close()  # uvicorn closes after a response on a connection that is not kept alive
    assert a.sent == [b"last words"] and a.closed
    second.write(b"never sent")
    b.close()  # the client went away before the turn ended
    await _next_turn()
    assert b.sent == [] and first.is_closing()


@pytest.mark.anyio
async def test_one_failing_connection_does_not_strand_the_others(caplog: pytest.LogCaptureFixture) -> None:
    from app.server import HeldTransport, WriteBatch

    class Broken(RecordingTransport):
        def write(self, data: bytes | bytearray | memoryview) -> None:
            raise RuntimeError("unable to perform operation on a closed transport")

    class Unabortable(Broken):
        def abort(self) -> None:
            raise RuntimeError("not even that")

    batch = WriteBatch({"one", "two"})
    ok, broken, worse, last = RecordingTransport(), Broken(), Unabortable(), RecordingTransport()
    for transport, data in ((broken, b"lost"), (worse, b"lost too"), (ok, b"delivered"), (last, b"also")):
        HeldTransport(transport, batch).write(data)
    await _next_turn()
    assert ok.sent == [b"delivered"] and last.sent == [b"also"]
    assert "writing a held response failed" in caplog.text
    assert broken.aborted  # its client is told at once, not left waiting for bytes that are gone

    other = Broken()
    failing = HeldTransport(other, WriteBatch({"one", "two"}))
    failing.write(b"x")
    failing.close()  # uvicorn's shutdown closes connection after connection: this must not raise
    assert other.aborted


@pytest.mark.anyio
async def test_held_writes_keep_flow_control_and_the_transport_contract() -> None:
    """A big response, or a client not keeping up, is written at once (uvicorn's flow control
    must see its buffer); what is held never passes HELD_LIMIT; non-bytes are refused as the
    socket refuses them, and a bytearray is copied before the caller can change it."""
    from app.server import HeldTransport, WriteBatch

    class Slow(RecordingTransport):
        def get_write_buffer_size(self) -> int:
            return sum(map(len, self.sent))

    socket_ = Slow()
    held = HeldTransport(socket_, WriteBatch({"one", "two"}))
    chunk = b"e" * 40_000
    for _ in range(10):  # a stream of 400 kB in one loop turn
        held.write(chunk)
        assert held.get_write_buffer_size() - socket_.get_write_buffer_size() <= HeldTransport.HELD_LIMIT
    assert sum(map(len, socket_.sent)) == 400_000  # nothing waits for the turn's end once it backs up
    await _next_turn()
    assert b"".join(socket_.sent) == chunk * 10

    quick = RecordingTransport()
    lone_big = HeldTransport(quick, WriteBatch({"one", "two"}))
    lone_big.write(b"b" * (HeldTransport.HELD_LIMIT + 1))
    assert len(quick.sent) == 1  # bigger than what may be held: straight to the socket

    target = RecordingTransport()
    busy = HeldTransport(target, WriteBatch({"one", "two"}))
    with pytest.raises(TypeError):
        busy.write("a str body")  # type: ignore[arg-type]

    class Tagged(bytes):
        pass

    busy.write(Tagged(b"sub"))  # a bytes subclass is bytes, as the socket takes it
    busy.flush()
    assert target.sent == [b"sub"]
    target.sent.clear()
    buffer = bytearray(b"before")
    busy.write(buffer)
    buffer[:] = b"after!"
    busy.write_eof()  # what is held goes first
    assert target.sent == [b"before", b"<eof>"]


def test_many_concurrent_requests_each_get_their_whole_answer(gateway: GatewayServer) -> None:
    """Under load the gateway's answers leave in batches; each client still gets exactly its own
    complete response (bodies, ids and lengths match), streams included."""

    async def run() -> None:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            headers = {"Authorization": f"Bearer {CLIENT_KEY}"}

            async def one(i: int) -> None:
                rid = f"req-batch-{i}"
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"number {i}"}]}
                if i % 3 == 1:  # answered by the gateway itself: many of these finish in one loop turn
                    response = await client.post(
                        "/v1/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer sk-gw-not-a-key-{i}", "x-request-id": rid},
                    )
                    assert response.status_code == 401 and response.headers["x-request-id"] == rid
                    assert response.json()["error"]["code"] == "invalid_api_key"
                    return
                if i % 3 == 0:
                    body["stream"] = True
                    async with client.stream(
                        "POST", "/v1/chat/completions", json=body, headers={**headers, "x-request-id": rid}
                    ) as response:
                        text = (await response.aread()).decode()
                    assert response.status_code == 200 and response.headers["x-request-id"] == rid
                    assert text.rstrip().endswith("data: [DONE]")
                    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
                    said = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
                    assert f"You said: number {i}" in said  # this stream's own words, whole
                    return
                response = await client.post(
                    "/v1/chat/completions", json=body, headers={**headers, "x-request-id": rid}
                )
                assert response.status_code == 200 and response.headers["x-request-id"] == rid
                assert int(response.headers["content-length"]) == len(response.content)
                assert f"You said: number {i}" in response.json()["choices"][0]["message"]["content"]

            await asyncio.gather(*(one(i) for i in range(240)))

    httpx.get(gateway.url + "/healthz")  # the listener's batch is made with its first connection
    batch = gateway.server.server_state.write_batch  # type: ignore[attr-defined]
    batch.most = 0
    asyncio.run(run())
    assert batch.most >= 2  # some loop turn's answers did leave together


def test_pipelined_requests_are_answered_in_order_while_the_server_is_busy(gateway: GatewayServer) -> None:
    """Three requests pipelined on one connection while a slow stream keeps the listener busy
    (its writes held to the end of each loop turn): three whole answers, in the order asked."""
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    slow = {"model": MODEL, "messages": HELLO, "stream": True, "simulator": {"words": 30, "chunk_delay_ms": 50}}
    with (
        httpx.Client(base_url=gateway.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=slow, headers=headers) as stream,
    ):
        assert stream.status_code == 200
        body = b'{"model": "x"}'
        ask = b"".join(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sk-gw-wrong-%d\r\n"
            b"x-request-id: pipe-%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (n, n, len(body), body)
            for n in range(3)
        )
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
            raw.sendall(ask)
            received = b""
            deadline = time.monotonic() + 10
            while received.count(b"invalid_api_key") < 3 and time.monotonic() < deadline:
                received += raw.recv(65536)
        assert "".join(stream.iter_text()).endswith("data: [DONE]\n\n")
    ids = [line.split(b": ")[1].strip() for line in received.split(b"\r\n") if line.startswith(b"x-request-id")]
    assert ids == [b"pipe-0", b"pipe-1", b"pipe-2"]
    assert received.count(b"HTTP/1.1 401") == 3


# -- 12. admissions of one loop turn: one script call -------------------------------------------------
def evalsha_calls(port: int) -> int:
    import redis

    with redis.Redis(port=port) as plain:
        stats = plain.info("commandstats").get("cmdstat_evalsha", {})
        return int(stats.get("calls", 0))


@pytest.mark.anyio
async def test_admissions_of_one_turn_are_one_script_call_each_with_its_own_verdict(own_redis: RedisServer) -> None:
    """Sixty requests of two keys reaching admission in the same loop turn (as at c=64) are judged
    by one script call, in turn, each getting its own verdict, exact as one call each would be;
    a lone admission is one call too."""
    store = RedisStore(own_redis.url, prefix="t" + uuid.uuid4().hex[:10], timeout_s=2)
    try:
        await store.prepare()
        rpm = Check("key", "a", "requests", 30)
        slots = Check("key", "b", "concurrency", 3)
        assert (await store.admit([Check("key", "warm", "requests", 5)], "warm", 1000)).ok  # connected
        before = evalsha_calls(own_redis.port)
        asks = [store.admit([rpm], f"a{i}", 60_000) for i in range(50)] + [
            store.admit([slots], f"b{i}", 60_000) for i in range(10)
        ]
        verdicts = await asyncio.gather(*asks)
        assert evalsha_calls(own_redis.port) - before == 1
        assert sorted(v.states[0][0] for v in verdicts[:50] if v.ok) == list(range(30))  # each its own
        assert [v.ok for v in verdicts[:50]] == [True] * 30 + [False] * 20  # judged in the order asked
        assert all(v.failed == 0 and v.used == 30 for v in verdicts[30:50])
        assert [v.ok for v in verdicts[50:]] == [True] * 3 + [False] * 7
        assert (await store.admit([slots], "b-late", 60_000)).ok is False
        assert evalsha_calls(own_redis.port) - before == 2
    finally:
        await store.close()


@pytest.mark.anyio
async def test_batched_admissions_survive_lost_scripts_a_gone_caller_and_a_silent_redis(
    own_redis: RedisServer,
) -> None:
    """A batch that meets NOSCRIPT (Redis restarted or flushed) loads the script and is answered;
    a caller that gave up does not stop the others' answers, and what it was granted is given
    back at once; with Redis silent, every caller of the batch gets the store's error in time,
    and the store works again once Redis does."""
    import signal

    import redis

    from app.store.base import StoreError

    store = RedisStore(own_redis.url, prefix="t" + uuid.uuid4().hex[:10], timeout_s=0.5)
    try:
        await store.prepare()
        rpm = Check("key", "n", "requests", 100)
        assert (await store.admit([rpm], "warm", 60_000)).ok
        with redis.Redis(port=own_redis.port) as plain:
            plain.script_flush()
        verdicts = await asyncio.gather(*(store.admit([rpm], f"m{i}", 60_000) for i in range(5)))
        assert [v.ok for v in verdicts] == [True] * 5 and sorted(v.states[0][0] for v in verdicts) == list(
            range(94, 99)
        )

        slots = Check("key", "n", "concurrency", 2)
        gone = asyncio.ensure_future(store.admit([rpm, slots], "gone", 60_000))
        stays = asyncio.ensure_future(store.admit([rpm, slots], "stays", 60_000))
        await asyncio.sleep(0)
        gone.cancel()
        assert (await stays).ok
        assert gone.cancelled()
        # admitted in Redis after its caller left: released at once, not held for the lease (60 s)
        deadline = time.monotonic() + 5
        while not (probe := await store.admit([slots], "probe", 60_000)).ok and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polling, with a deadline
        assert probe.ok and probe.states[0][0] == 0  # stays's slot and the probe's: gone's came back

        assert own_redis.process is not None
        own_redis.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(store.admit([rpm], f"s{i}", 60_000) for i in range(4)), return_exceptions=True
            )
            assert all(isinstance(o, StoreError) for o in outcomes), outcomes
            assert time.monotonic() - started < 5
        finally:
            own_redis.process.send_signal(signal.SIGCONT)
        assert (await store.admit([rpm], "after", 60_000)).ok
    finally:
        await store.close()


@pytest.mark.anyio
async def test_large_batches_are_split_below_luas_unpack_limit(own_redis: RedisServer) -> None:
    """At most 1,000 names per script call (Lua unpacks ~8,000 values at most): 300 admissions of
    four checks in one turn go as two calls, and 999 settlements with three reservations ahead as
    two (the reservations that do not fit go after); every verdict is the right one, in order."""
    from app.limits.checks import Reserve

    store = RedisStore(own_redis.url, prefix="t" + uuid.uuid4().hex[:10], timeout_s=5)
    try:
        await store.prepare()
        checks = [Check("key", f"big{i}", "requests", 250) for i in range(4)]
        assert (await store.admit([Check("key", "warm", "requests", 5)], "warm", 1000)).ok
        before = evalsha_calls(own_redis.port)
        verdicts = await asyncio.gather(*(store.admit(checks, f"m{i}", 60_000) for i in range(300)))
        assert evalsha_calls(own_redis.port) - before == 2
        assert [v.ok for v in verdicts] == [True] * 250 + [False] * 50  # in the order asked, across both calls
        tokens = Check("key", "many", "tokens", 10**9, 10)
        held = [f"h{i}" for i in range(999)]
        for member in held:
            assert (await store.admit([tokens], member, 60_000)).ok
        before = evalsha_calls(own_redis.port)
        ahead = [Reserve(checks, f"a{i}", 60_000) for i in range(3)]
        answers = await store.settle([Settlement(tokens, m, 10) for m in held], "big", ahead)
        assert evalsha_calls(own_redis.port) - before == 2  # 999 + 4 names, then 8
        assert [v.ok for v in answers] == [False, False, False]  # the four limits are used up (250 of 250)
    finally:
        await store.close()
