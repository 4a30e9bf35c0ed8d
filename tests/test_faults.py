"""Fault injection against a real gateway process, the simulator and a real Redis: resets before
and after the first byte, a slow first byte, a stream stalled midway, malformed JSON and SSE,
bursts of 5xx, and Redis killed and restarted under load. For each, the client gets a proper
OpenAI-style outcome and the process stays up; afterwards the ledger equals what the simulator
says it served (nothing lost, nothing counted twice). Then a scan for secrets: no gateway key,
admin key or OpenRouter key in the logs, the metrics or the store."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.simulator import SimulatorThread
from tests.redis_server import RedisServer
from tests.redis_server import dump as redis_dump
from tests.support import ADMIN_KEY, CLIENT_KEY, METRICS_KEY, UPSTREAM_KEY, GatewayProcess, scrape, wait_until
from tests.test_metering import simulator_sums

HI = [{"role": "user", "content": "Tell me something"}]
MARKER = "fault-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def stack(simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    redis_server = RedisServer(appendonly=True).start()
    logs = tmp_path_factory.mktemp("faults")
    env = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_METRICS_KEY": METRICS_KEY,
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_STORE": redis_server.url,
        "GATEWAY_STORE_PREFIX": "f" + uuid.uuid4().hex[:8],
        "GATEWAY_LOG_LEVEL": "debug",
        "GATEWAY_UPSTREAM__READ_TIMEOUT_S": "1",
        "GATEWAY_UPSTREAM__FIRST_BYTE_TIMEOUT_S": "1",
        "GATEWAY_UPSTREAM__DEADLINE_S": "4",
        "GATEWAY_UPSTREAM__RETRIES__MAX_ATTEMPTS": "2",
        "GATEWAY_UPSTREAM__RETRIES__BACKOFF_BASE_S": "0.05",
        "GATEWAY_UPSTREAM__BREAKER__FAILURE_THRESHOLD": "1000000",
    }
    with GatewayProcess(env, str(logs / "gateway.log")) as gateway:
        yield {"gateway": gateway, "redis": redis_server, "log": logs / "gateway.log"}
    redis_server.cleanup()


counter = iter(range(100_000))


def post(gateway: GatewayProcess, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "x-request-id": f"{MARKER}-{next(counter)}"}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def last_event(response: httpx.Response) -> dict[str, Any]:
    events = [e for e in response.text.split("\n\n") if e.startswith("data: ") and e != "data: [DONE]"]
    parsed: dict[str, Any] = json.loads(events[-1][6:])
    return parsed


def alive(gateway: GatewayProcess) -> None:
    assert gateway.process.poll() is None
    assert httpx.get(gateway.url + "/healthz").status_code == 200


@pytest.mark.parametrize(
    ("knobs", "stream", "status", "code"),
    [
        ({"reset": "before_headers"}, False, 502, "upstream_reset"),
        ({"reset": "before_headers"}, True, 502, "upstream_reset"),
        ({"ttfb_ms": 3000}, False, 504, "upstream_timeout"),
        ({"malformed": "json"}, False, 502, "upstream_invalid_response"),
        ({"status": 503}, False, 502, "upstream_error"),
        ({"status": 529}, True, 502, "upstream_error"),
    ],
    ids=[
        "reset-before-first-byte",
        "reset-before-first-byte-stream",
        "slow-first-byte",
        "malformed-json",
        "5xx",
        "5xx-stream",
    ],
)
def test_faults_before_the_first_byte(
    stack: dict[str, Any], knobs: dict[str, Any], stream: bool, status: int, code: str
) -> None:
    response = post(
        stack["gateway"], {"model": "openai/gpt-4o-mini", "messages": HI, "stream": stream, "simulator": knobs}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "server_error"
    if code != "upstream_invalid_response":  # transient: the gateway retried, the SDK must not again
        assert response.headers["x-should-retry"] == "false"
    alive(stack["gateway"])


@pytest.mark.parametrize(
    "knobs",
    [{"reset_after": 3}, {"stall_after": 3}, {"malformed_after": 3}, {"stream_error": 2, "error_after": 3}],
    ids=["reset-after-first-byte", "stalled-midway", "malformed-sse", "in-stream-error"],
)
def test_faults_after_the_first_byte(stack: dict[str, Any], knobs: dict[str, Any]) -> None:
    response = post(
        stack["gateway"],
        {"model": "deepseek/deepseek-v3.2", "messages": HI, "stream": True, "simulator": {"words": 40, **knobs}},
    )
    assert response.status_code == 200
    error = last_event(response)["error"]
    assert {"message", "type", "param", "code"} <= set(error) and error["message"]
    assert "data: [DONE]" not in response.text
    alive(stack["gateway"])


def test_5xx_burst(stack: dict[str, Any]) -> None:
    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        stack["gateway"].url + "/v1/chat/completions",
                        headers={"Authorization": f"Bearer {CLIENT_KEY}", "x-request-id": f"{MARKER}-b{i}"},
                        json={
                            "model": "google/gemini-2.5-flash",
                            "messages": HI,
                            "simulator": {"status": 500 if i % 3 else 200},
                        },
                    )
                    for i in range(30)
                )
            )
            return [r.status_code for r in responses]

    statuses = asyncio.run(burst())
    assert sorted(set(statuses)) == [200, 502] and statuses.count(200) == 10
    alive(stack["gateway"])


def test_redis_killed_and_restarted_under_load(stack: dict[str, Any]) -> None:
    gateway, redis_server = stack["gateway"], stack["redis"]
    outcomes: list[int] = []
    halfway = threading.Event()

    def load() -> None:
        for i in range(60):
            body = {"model": "openai/gpt-4o-mini", "messages": HI, "stream": i % 2 == 0}
            outcomes.append(post(gateway, body).status_code)
            if i == 15:
                halfway.set()
            time.sleep(0.02)

    worker = threading.Thread(target=load)
    worker.start()
    assert halfway.wait(30)
    redis_server.down_while(lambda: len(outcomes))
    worker.join(120)
    assert outcomes == [200] * 60  # the bootstrap key needs no store; usage waits in the buffer
    alive(gateway)


def test_ledger_equals_what_was_served(stack: dict[str, Any], simulator: SimulatorThread) -> None:
    gateway = stack["gateway"]
    for i in range(10):  # its own traffic, beside whatever the other fault tests sent
        assert post(gateway, {"model": "openai/gpt-4o-mini", "messages": HI, "stream": i % 2 == 0}).status_code == 200
    served = simulator_sums(simulator, MARKER)
    assert served["billed"] >= 10

    def matches() -> dict[str, Any] | None:
        response = httpx.get(gateway.url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        if response.status_code != 200:
            return None
        total: dict[str, Any] = response.json()["total"]
        equal = abs(Decimal(repr(total["cost_usd"])) - served["cost"]) < Decimal("1e-9")
        return total if equal and total["completion_tokens"] == served["completion"] else None

    total = wait_until(matches, 30, "the ledger to match the simulator (reconciliation included)")
    assert total["prompt_tokens"] == served["prompt"]
    assert total["reasoning_tokens"] == served["reasoning"]


def test_no_secret_anywhere(stack: dict[str, Any]) -> None:
    gateway = stack["gateway"]
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    httpx.post(gateway.url + "/admin/teams", json={"name": "scan"}, headers=admin).raise_for_status()
    created = httpx.post(gateway.url + "/admin/keys", json={"name": "scan", "team": "scan"}, headers=admin).json()
    rotated = httpx.post(
        gateway.url + f"/admin/keys/{created['id']}/rotate", json={"grace_period_s": 60}, headers=admin
    ).json()
    for key in (created["key"], rotated["key"]):
        assert post_with(gateway, key).status_code == 200
        assert post_with(gateway, key + "tampered").status_code == 401
    assert post_with(gateway, UPSTREAM_KEY).status_code == 401
    metrics = scrape(gateway.url).text
    log_text = Path(stack["log"]).read_text(errors="replace")
    store = redis_dump(stack["redis"].url).decode(errors="replace")
    assert "scan" in metrics and created["id"] in store and "request" in log_text  # the places were searched
    secrets = [
        CLIENT_KEY,
        ADMIN_KEY,
        UPSTREAM_KEY,
        created["key"],
        rotated["key"],
        created["key"].rsplit("-", 1)[1],
        rotated["key"].rsplit("-", 1)[1],
    ]
    for where, text in (("metrics", metrics), ("logs", log_text), ("store", store)):
        for secret in secrets:
            assert secret not in text, f"a secret in the {where}"


def post_with(gateway: GatewayProcess, key: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "openai/gpt-4o-mini", "messages": HI},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
