"""Graceful shutdown: SIGTERM during 20 open streams and two requests still waiting on OpenRouter.
New connections refused, short streams complete, long ones end with one `server_shutting_down`
error event instead of a cut, the waiting ones get a 503 `server_shutting_down`, every request
reaches the ledger, and the process exits 0. With `shutdown_delay_s`, the gateway keeps serving
(with /readyz at 503) before it closes its listener. With `--workers 2`, SIGTERM
drains every worker and each exits 0."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.simulator import SimulatorThread
from tests.redis_server import RedisServer, ledger_sums
from tests.support import (
    ADMIN_KEY,
    CLIENT_KEY,
    UPSTREAM_KEY,
    GatewayProcess,
    GatewayServer,
    base_env,
    gateway_settings,
    wait_until,
)


async def stream(
    url: str, body: dict[str, Any], opened: asyncio.Event, counter: list[int], total: int
) -> tuple[str, str]:
    """(how it ended, the text received): "done", "shutdown", or "cut"."""
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as client:
        text = ""
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_text():
                    if not text:
                        counter[0] += 1
                        if counter[0] == total:
                            opened.set()
                    text += chunk
        except httpx.HTTPError:
            return "cut", text
    if text.endswith("data: [DONE]\n\n"):
        return "done", text
    last = [e for e in text.split("\n\n") if e.startswith("data: ")][-1]
    error = json.loads(last[6:]).get("error", {})
    return ("shutdown" if error.get("code") == "server_shutting_down" else "cut"), text


def test_sigterm_during_twenty_open_streams(simulator: SimulatorThread, tmp_path: Path) -> None:
    redis_server = RedisServer().start()
    prefix = "s" + uuid.uuid4().hex[:8]
    env = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_STORE": redis_server.url,
        "GATEWAY_STORE_PREFIX": prefix,
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_SHUTDOWN_GRACE_S": "3",
    }
    log_path = tmp_path / "gateway.log"
    gateway = GatewayProcess(env, str(log_path)).start()
    try:
        short = {
            "model": "openai/gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "simulator": {"words": 10, "chunk_delay_ms": 100},
        }  # about 1 s
        long = {**short, "simulator": {"words": 300, "chunk_delay_ms": 100}}  # about 30 s
        # OpenRouter answers these only after the grace period: they are still waiting at its end
        slow = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        slow["simulator"] = {"ttfb_ms": 20_000}
        slow_stream = {**slow, "stream": True}

        async def waiting(body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
            async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as client:
                response = await client.post(gateway.url + "/v1/chat/completions", json=body)
                return response.status_code, response.json(), time.monotonic()

        async def refused() -> bool:
            try:  # new connections are refused once the drain starts
                async with httpx.AsyncClient() as client:
                    await client.get(gateway.url + "/healthz", timeout=2)
                return False
            except httpx.ConnectError:
                return True
            except (httpx.ReadError, httpx.RemoteProtocolError):
                # the connection was made just before the listener closed, and the drain closed
                # it before reading its request (or the kernel reset it from the backlog): not served
                return True

        async def scenario() -> tuple[list[tuple[str, str]], list[tuple[int, dict[str, Any], float]], float, float]:
            opened, counter = asyncio.Event(), [0]
            tasks = [
                asyncio.ensure_future(stream(gateway.url, short if i % 2 else long, opened, counter, 20))
                for i in range(20)
            ]
            slow_tasks = [asyncio.ensure_future(waiting(body)) for body in (slow, slow_stream)]
            await asyncio.wait_for(opened.wait(), 30)
            gateway.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            deadline = signalled + 10
            while not await refused():
                assert time.monotonic() < deadline, "the gateway kept accepting connections"
                await asyncio.sleep(0.02)
            results = await asyncio.gather(*tasks)
            answers = await asyncio.gather(*slow_tasks)
            return results, answers, time.monotonic() - signalled, signalled

        results, answers, elapsed, signalled = asyncio.run(scenario())
        assert gateway.process.wait(30) == 0
        gateway.process = None
        outcomes = [outcome for outcome, _ in results]
        assert outcomes.count("done") == 10, outcomes  # the short ones finished
        assert outcomes.count("shutdown") == 10, outcomes  # the long ones got the error event, not a cut
        assert 3.0 <= elapsed < 15, elapsed  # ended at the grace period
        for status, body, answered in answers:  # answered at the grace period, not cut at its end + 5 s
            assert status == 503, body
            assert body["error"]["code"] == "server_shutting_down", body
            assert 3.0 <= answered - signalled < 6, answered - signalled
        log = log_path.read_text()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]

        sums = ledger_sums(redis_server.url, prefix)  # written before the process exited
        assert sums["requests"] == 22
        assert sums["completion_tokens"] > 0 and sums["cost"] > 0
    finally:
        gateway.stop()
        redis_server.cleanup()


def test_shutdown_delay_keeps_serving_while_not_ready(simulator: SimulatorThread, tmp_path: Path) -> None:
    env = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_SHUTDOWN_DELAY_S": "3",
        "GATEWAY_SHUTDOWN_GRACE_S": "1",
    }
    gateway = GatewayProcess(env, str(tmp_path / "gateway.log")).start()
    client = httpx.Client(  # a new connection per request: none is caught by the listener closing
        base_url=gateway.url,
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=10,
        limits=httpx.Limits(max_keepalive_connections=0),
    )
    try:
        body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = wait_until(lambda: (r := client.get("/readyz")).status_code == 503 and r, 5, "readyz 503")
        assert ready.json() == {"status": "draining"}
        served = client.post("/v1/chat/completions", json=body)  # still serving while not ready
        assert served.status_code == 200, served.text
        assert time.monotonic() - signalled < 3.0  # all of that happened inside the delay

        def closed() -> bool:
            try:
                httpx.get(gateway.url + "/healthz", timeout=1)
                return False
            except httpx.ConnectError:
                return True
            except httpx.TransportError:  # accepted as the listener closed, then dropped: closing
                return False

        wait_until(closed, 10, "listener closed after the delay")
        assert time.monotonic() - signalled >= 3.0
        assert gateway.process.wait(30) == 0
        gateway.process = None
    finally:
        client.close()
        gateway.stop()


@pytest.fixture
def draining_gateway(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    with GatewayServer(gateway_settings(simulator.base_url)) as server:
        yield server


def test_readyz_turns_503_at_once_when_draining(draining_gateway: GatewayServer) -> None:
    assert httpx.get(draining_gateway.url + "/readyz").status_code == 200
    assert draining_gateway.loop is not None
    draining_gateway.loop.call_soon_threadsafe(draining_gateway.gateway.begin_drain, 60.0)
    ready = wait_until(
        lambda: (r := httpx.get(draining_gateway.url + "/readyz")).status_code == 503 and r, 5, "not ready"
    )
    assert ready.json() == {"status": "draining"}
    assert httpx.get(draining_gateway.url + "/healthz").status_code == 200  # alive, just not ready


def test_sigterm_ends_open_agent_streams_each_in_its_own_dialect(simulator: SimulatorThread, tmp_path: Path) -> None:
    """Responses and Messages streams open at SIGTERM: the short ones finish with their API's own
    last event; the long ones end at the grace period with their API's failure event
    (`response.failed`, `event: error`) saying `server_shutting_down`; every one is logged."""
    env = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_SHUTDOWN_GRACE_S": "2",
    }
    log_path = tmp_path / "gateway.log"
    gateway = GatewayProcess(env, str(log_path)).start()
    bodies = {
        "/v1/responses": {"model": "openai/gpt-4o-mini", "input": "hi", "stream": True},
        "/v1/messages": {
            "model": "anthropic/claude-sonnet-4.5",
            "max_tokens": 2000,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        },
    }
    short, long = {"words": 6, "chunk_delay_ms": 100}, {"words": 300, "chunk_delay_ms": 100}

    async def open_stream(path: str, knobs: dict[str, Any], opened: list[int]) -> str:
        async with (
            httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as client,
            client.stream("POST", gateway.url + path, json={**bodies[path], "simulator": knobs}) as response,
        ):
            assert response.status_code == 200
            text = ""
            async for chunk in response.aiter_text():
                if not text:
                    opened.append(1)
                text += chunk
        return text

    async def scenario() -> list[str]:
        opened: list[int] = []
        tasks = [asyncio.ensure_future(open_stream(p, k, opened)) for p in bodies for k in (short, long)]
        deadline = time.monotonic() + 30
        while len(opened) < len(tasks):
            assert time.monotonic() < deadline, "the streams did not open"
            await asyncio.sleep(0.02)
        gateway.process.send_signal(signal.SIGTERM)
        return list(await asyncio.gather(*tasks))

    try:
        responses_short, responses_long, messages_short, messages_long = asyncio.run(scenario())
        assert gateway.process.wait(30) == 0
        gateway.process = None
    finally:
        gateway.stop()

    def last(text: str) -> tuple[str, dict[str, Any]]:
        block = [b for b in text.split("\n\n") if b.startswith("event:")][-1]
        name, data = block.split("\n", 1)
        return name[6:].strip(), json.loads(data[5:])

    assert last(responses_short)[0] == "response.completed"
    assert last(messages_short)[0] == "message_stop"
    name, event = last(responses_long)
    assert name == "response.failed" and event["response"]["error"]["code"] == "server_shutting_down"
    assert "error" not in event  # never a top-level error key on a Responses event
    name, event = last(messages_long)
    assert name == "error" and event["error"]["type"] == "overloaded_error"
    assert event["error"]["code"] == "server_shutting_down"
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    logged = [line["endpoint"] for line in lines if line.get("message") == "request"]
    assert sorted(logged) == ["messages", "messages", "responses", "responses"], logged


CHAT = "/v1/chat/completions"


HI = [{"role": "user", "content": "hi"}]


CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}


def zombie_status(pid: int) -> int | None:
    """The wait status of an exited, not yet reaped process (field 52 of /proc/<pid>/stat), or
    None while it runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        raise AssertionError(f"worker {pid} was reaped before its exit status was read") from None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[49]) if fields[0] == "Z" else None


async def open_stream(url: str, rid: str, opened: list[int]) -> str:
    body = {
        "model": "openai/gpt-4o-mini",
        "messages": HI,
        "stream": True,
        "simulator": {"words": 30, "chunk_delay_ms": 100},  # about 3 s
    }
    text = ""
    headers = {**CLIENT, "x-request-id": rid}
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", url + CHAT, json=body, headers=headers) as answer,
    ):
        assert answer.status_code == 200
        async for chunk in answer.aiter_text():
            if not text:
                opened.append(1)
            text += chunk
    return text


def test_sigterm_drains_every_worker(simulator: SimulatorThread, tmp_path: Path) -> None:
    redis_server = RedisServer().start()
    prefix = "wk" + uuid.uuid4().hex[:8]
    log = tmp_path / "gateway.log"
    env = base_env(
        simulator,
        GATEWAY_STORE=redis_server.url,
        GATEWAY_STORE_PREFIX=prefix,
        GATEWAY_SHUTDOWN_GRACE_S="15",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    gateway = GatewayProcess(env, str(log), args=("--workers", "2"))
    try:
        gateway.start()
        supervisor = gateway.process

        def started() -> list[int]:
            pids = [int(m) for m in re.findall(r"Started server process \[(\d+)\]", log.read_text())]
            ready = log.read_text().count("Application startup complete")
            return pids if len(pids) == 2 and ready == 2 else []

        workers = wait_until(started, 30, "two workers")
        marker = "workers-" + uuid.uuid4().hex

        async def scenario() -> list[str]:
            opened: list[int] = []
            streams = [asyncio.ensure_future(open_stream(gateway.url, f"{marker}-{i}", opened)) for i in range(6)]
            deadline = asyncio.get_running_loop().time() + 30
            while len(opened) < 6:
                assert asyncio.get_running_loop().time() < deadline, "the streams did not open"
                await asyncio.sleep(0.01)
            supervisor.send_signal(signal.SIGTERM)
            # The supervisor passes SIGTERM on to each worker, then waits for them. Hold it there
            # (SIGSTOP) so the workers' exit statuses can be read before it reaps them.
            terminated = f"Terminated child process [{workers[-1]}]"
            while terminated not in log.read_text():
                assert asyncio.get_running_loop().time() < deadline, "the supervisor did not stop its workers"
                await asyncio.sleep(0.005)
            supervisor.send_signal(signal.SIGSTOP)
            try:
                texts = await asyncio.gather(*streams)
                while None in (statuses := [zombie_status(pid) for pid in workers]):
                    assert asyncio.get_running_loop().time() < deadline + 30, "the workers did not exit"
                    await asyncio.sleep(0.01)
            finally:
                supervisor.send_signal(signal.SIGCONT)
            assert statuses == [0, 0], f"worker wait statuses {statuses} (signal number if killed)"
            return texts

        texts = asyncio.run(scenario())
        assert supervisor.wait(30) == 0
        gateway.process = None
        assert all(t.endswith("data: [DONE]\n\n") for t in texts)  # the streams finished, none cut
        text = log.read_text()
        assert text.count("Application shutdown complete") == 2 and "Traceback" not in text, text[-3000:]
        sums = ledger_sums(redis_server.url, prefix)
        assert sums["requests"] == 6, sums  # every request reached the ledger before the exit
        assert sums["completion_tokens"] == 6 * 30
    finally:
        gateway.stop()
        redis_server.cleanup()
