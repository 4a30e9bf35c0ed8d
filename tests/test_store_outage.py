"""Redis stopped mid-test: admission follows the configured policy per concern (rate limits,
budgets), logs the outage once, keeps spend to settle later, and recovers by itself."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.simulator import SimulatorThread
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, GatewayServer, gateway_settings, wait_until

HELLO = {"model": "deepseek/deepseek-v3.2", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}


@pytest.fixture
def redis_on_disk() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True).start()  # survives its own restart
    yield server
    server.cleanup()


def chat(gateway: GatewayServer, key: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions", json=HELLO, headers={"Authorization": f"Bearer {key}"}, timeout=20
    )


def setup_keys(gateway: GatewayServer) -> tuple[str, dict[str, Any], float]:
    with httpx.Client(base_url=gateway.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        assert admin.post("/teams", json={"name": "ops"}).status_code == 201
        limited = admin.post("/keys", json={"name": "limited", "team": "ops", "rpm": 1000}).json()
        budgeted = admin.post("/keys", json={"name": "budgeted", "team": "ops", "budget_usd": 1}).json()
    assert chat(gateway, limited["key"]).status_code == 200  # known (cached) before the outage
    first = chat(gateway, budgeted["key"])
    assert first.status_code == 200
    return limited["key"], budgeted, first.json()["usage"]["cost"]


@pytest.mark.parametrize(
    ("policy", "limited_status", "budgeted_status"),
    [
        ({}, 200, 503),  # the defaults: rate limits open, budgets closed
        ({"rate_limits": "closed", "budgets": "open"}, 503, 200),
    ],
    ids=["default-policy", "inverted-policy"],
)
def test_policy_during_an_outage_and_recovery(
    simulator: SimulatorThread,
    redis_on_disk: RedisServer,
    caplog: pytest.LogCaptureFixture,
    policy: dict[str, str],
    limited_status: int,
    budgeted_status: int,
) -> None:
    settings = gateway_settings(
        simulator.base_url,
        admin_key=ADMIN_KEY,
        store=redis_on_disk.url,
        store_prefix="o" + uuid.uuid4().hex[:8],
        # ahead off: a reservation made ahead before the outage would admit each key's first request
        # of it (test_admission_ahead.py shows that); this pins the policy for requests needing the store
        limits={"on_store_error": policy, "admit_ahead": False},
    )
    with GatewayServer(settings) as gateway:
        limited, budgeted, cost = setup_keys(gateway)
        paid = 1
        caplog.set_level(logging.WARNING)
        redis_on_disk.stop()

        for _ in range(5):
            response = chat(gateway, limited)
            assert response.status_code == limited_status, response.text
            if limited_status == 200:
                assert "x-ratelimit-limit-requests" not in response.headers  # nothing was counted
            response = chat(gateway, budgeted["key"])
            assert response.status_code == budgeted_status, response.text
            if budgeted_status == 503:
                assert response.json()["error"]["code"] == "store_unavailable"
            paid += response.status_code == 200
        assert httpx.get(gateway.url + "/readyz").status_code == 503
        outages = [r for r in caplog.records if "limits store unreachable" in r.getMessage()]
        assert len(outages) == 1  # once per incident, not per request

        redis_on_disk.start()
        wait_until(lambda: chat(gateway, limited).headers.get("x-ratelimit-limit-requests") == "1000", 10, "recovery")
        assert chat(gateway, budgeted["key"]).status_code == 200
        paid += 1
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        assert httpx.get(gateway.url + "/readyz").status_code == 200

        def spent() -> float:
            shown = httpx.get(
                gateway.url + f"/admin/keys/{budgeted['id']}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            ).json()
            value: float = shown["budget"]["spent_usd"]
            return value

        # Whatever was admitted during the outage was still settled once the store returned.
        wait_until(lambda: abs(spent() - paid * cost) < 1e-9, 10, f"spend of {paid} requests")
