"""Graceful shutdown: SIGTERM during 20 open streams. Not ready at once, new connections refused,
short streams complete, long ones end with one `server_shutting_down` error event instead of a
cut, buffered usage reaches the ledger, and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.simulator import SimulatorThread
from app.store.redis import RedisStore
from tests.redis_server import RedisServer
from tests.support import (
    ADMIN_KEY,
    CLIENT_KEY,
    UPSTREAM_KEY,
    GatewayProcess,
    GatewayServer,
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
    gateway = GatewayProcess(env, str(tmp_path / "gateway.log")).start()
    try:
        short = {
            "model": "openai/gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "simulator": {"words": 10, "chunk_delay_ms": 100},
        }  # about 1 s
        long = {**short, "simulator": {"words": 300, "chunk_delay_ms": 100}}  # about 30 s

        async def scenario() -> tuple[list[tuple[str, str]], float, bool]:
            opened, counter = asyncio.Event(), [0]
            tasks = [
                asyncio.ensure_future(stream(gateway.url, short if i % 2 else long, opened, counter, 20))
                for i in range(20)
            ]
            await asyncio.wait_for(opened.wait(), 30)
            gateway.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.5)
            try:  # new connections are refused once the drain starts
                async with httpx.AsyncClient() as client:
                    await client.get(gateway.url + "/healthz", timeout=2)
                refused = False
            except httpx.ConnectError:
                refused = True
            results = await asyncio.gather(*tasks)
            return results, time.monotonic() - signalled, refused

        results, elapsed, refused = asyncio.run(scenario())
        assert gateway.process.wait(30) == 0
        gateway.process = None
        outcomes = [outcome for outcome, _ in results]
        assert refused
        assert outcomes.count("done") == 10, outcomes  # the short ones finished
        assert outcomes.count("shutdown") == 10, outcomes  # the long ones got the error event, not a cut
        assert 3.0 <= elapsed < 15, elapsed  # ended at the grace period

        def ledger() -> dict[str, int]:
            async def read() -> tuple[dict[str, dict[str, int]], dict[str, str]]:
                store = RedisStore(redis_server.url, prefix=prefix)
                try:
                    return await store.ledger_read([datetime.now(UTC).strftime("%Y%m%d")])
                finally:
                    await store.close()

            stored, _ = asyncio.run(read())
            sums: dict[str, int] = {}
            for fields in stored.values():
                for name, value in fields.items():
                    measure = name.rsplit("|", 1)[1]
                    sums[measure] = sums.get(measure, 0) + value
            return sums

        sums = ledger()  # written before the process exited
        assert sums["requests"] == 20
        assert sums["completion_tokens"] > 0 and sums["cost"] > 0
    finally:
        gateway.stop()
        redis_server.cleanup()


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
