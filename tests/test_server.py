"""The serving stack (app/server.py): uvicorn on uvloop and httptools with no BaseHTTPMiddleware and
the edge first; a busy listener's writes held to the end of the loop turn (WriteBatch,
HeldTransport) keep order, flow control and the transport contract; under load and with
pipelining every client gets its own whole answer, in order."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx
import pytest

from app.simulator import SimulatorThread
from tests.support import CLIENT_KEY, GatewayServer, gateway_settings

HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]


MODEL = "openai/gpt-4o-mini"


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
