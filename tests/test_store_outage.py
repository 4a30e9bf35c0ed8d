"""The store unreachable mid-test (Redis stopped; the SQLite file's write lock held elsewhere):
admission follows the configured policy per concern (rate limits, budgets) within about the
store's timeout, logs the outage once, keeps spend to settle later, and recovers by itself; keys
made through the admin API keep working (and revoked ones stay revoked) through a Redis outage."""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.simulator import SimulatorThread
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, GatewayProcess, GatewayServer, base_env, gateway_settings, request_id, wait_until
from tests.test_metering import simulator_sums

HELLO = {"model": "deepseek/deepseek-v3.2", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}


@pytest.fixture
def redis_on_disk() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True).start()  # survives its own restart
    yield server
    server.cleanup()


def chat(gateway: GatewayServer, key: str, body: dict[str, Any] = HELLO, rid: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **({"x-request-id": rid} if rid else {})}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=20)


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


TIMEOUT_S = 0.5
MARGIN_S = 1.0  # a loaded machine's scheduling and HTTP; less than one more timeout per queued call


def spent_usd(gateway: GatewayServer, key_id: str) -> float:
    shown = httpx.get(gateway.url + f"/admin/keys/{key_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    value: float = shown.json()["budget"]["spent_usd"]
    return value


def test_a_locked_sqlite_file_follows_the_policy_and_loses_no_settlement(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    """Another process holds the SQLite file's write lock (a stuck worker, a backup tool) for
    longer than store_timeout_s. As with Redis away: budgets (closed) answer 503 within about the
    timeout, however many wait; rate limits (open) admit, also for a key not cached yet (reads
    do not wait behind writes). A request settled meanwhile is settled once the lock is gone,
    and once."""
    path = tmp_path / "gateway.db"
    settings = gateway_settings(
        simulator.base_url,
        admin_key=ADMIN_KEY,
        store=f"sqlite://{path}",
        store_timeout_s=TIMEOUT_S,
        limits={"admit_ahead": False},  # as above: every request here asks the store
    )
    with GatewayServer(settings) as gateway, ThreadPoolExecutor(8) as pool:
        limited, budgeted, cost = setup_keys(gateway)
        with httpx.Client(base_url=gateway.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            fresh = admin.post("/keys", json={"name": "fresh", "team": "ops", "rpm": 1000}).json()["key"]
        slow_id = request_id()
        slow = pool.submit(chat, gateway, budgeted["key"], {**HELLO, "simulator": {"ttfb_ms": 1500}}, slow_id)
        wait_until(lambda: simulator.find(slow_id), 10, "the slow request admitted")

        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            assert slow.result().status_code == 200  # answered; its settlement meets the lock
            wait_until(lambda: gateway.gateway.admission.pending_settlements, 10, "its settlement held back")
            started = time.monotonic()
            refused = list(pool.map(lambda _: chat(gateway, budgeted["key"]), range(4)))
            assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
            for response in refused:
                assert response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable"
            started = time.monotonic()
            assert [chat(gateway, key).status_code for key in (fresh, limited)] == [200, 200]
            assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
        finally:
            locker.rollback()
            locker.close()

        paid = cost + slow.result().json()["usage"]["cost"]
        wait_until(lambda: abs(spent_usd(gateway, budgeted["id"]) - paid) < 1e-9, 10, "the held-back settlement")
        again = wait_until(lambda: (r := chat(gateway, budgeted["key"])).status_code == 200 and r, 10, "recovery")
        paid += again.json()["usage"]["cost"]
        wait_until(lambda: abs(spent_usd(gateway, budgeted["id"]) - paid) < 1e-9, 10, "every settlement, once")
        with httpx.Client(base_url=gateway.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            wait_until(lambda: admin.get("/usage").json()["total"]["requests"] == 6, 10, "every request in the ledger")
        assert abs(spent_usd(gateway, budgeted["id"]) - paid) < 1e-9  # and nothing applied twice


CHAT = "/v1/chat/completions"


HI = [{"role": "user", "content": "hi"}]


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_redis_outage_with_admin_created_keys(simulator: SimulatorThread, tmp_path: Path) -> None:
    redis_server = RedisServer(appendonly=True).start()  # keys and teams survive its restart
    env = base_env(simulator, GATEWAY_STORE=redis_server.url, GATEWAY_STORE_PREFIX="ou" + uuid.uuid4().hex[:8])
    marker = "outage-" + uuid.uuid4().hex
    counter = iter(range(1000))
    try:
        with (
            GatewayProcess(env, str(tmp_path / "gateway.log")) as gateway,
            httpx.Client(base_url=gateway.url, timeout=20) as http,
        ):
            team = "ops-" + uuid.uuid4().hex[:6]
            assert http.post("/admin/teams", json={"name": team}, headers=ADMIN).status_code == 201
            live = http.post("/admin/keys", json={"name": "live", "team": team}, headers=ADMIN).json()
            gone = http.post("/admin/keys", json={"name": "gone", "team": team}, headers=ADMIN).json()

            def chat(key: str, stream: bool = False) -> httpx.Response:
                body = {"model": "openai/gpt-4o-mini", "messages": HI, "stream": stream}
                headers = {"Authorization": f"Bearer {key}", "x-request-id": f"{marker}-{next(counter)}"}
                return http.post(CHAT, json=body, headers=headers)

            assert chat(live["key"]).status_code == 200  # known (cached) before the outage
            assert chat(gone["key"]).status_code == 200
            assert http.post(f"/admin/keys/{gone['id']}/revoke", headers=ADMIN).status_code == 200
            wait_until(lambda: chat(gone["key"]).status_code == 401, 10, "the revocation")

            redis_server.stop()
            for i in range(8):
                answer = chat(live["key"], stream=i % 2 == 1)
                assert answer.status_code == 200, answer.text  # no limits: admitted while the store is down
                refused = chat(gone["key"])
                assert refused.status_code == 401, refused.text  # revoked stays revoked
                assert refused.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/readyz").status_code == 503

            redis_server.start()
            served = simulator_sums(simulator, marker)
            assert served["billed"] == 10  # the live key's 9 and the gone key's 1 (before its revocation)

            def usage_of(key_id: str) -> dict[str, Any] | None:
                answer = http.get("/admin/usage", params={"key": key_id}, headers=ADMIN)
                return answer.json()["total"] if answer.status_code == 200 else None

            def settled() -> bool:
                live_total, gone_total = usage_of(live["id"]), usage_of(gone["id"])
                if live_total is None or gone_total is None:
                    return False
                cost = Decimal(repr(live_total["cost_usd"])) + Decimal(repr(gone_total["cost_usd"]))
                return (
                    live_total["requests"] == 9
                    and gone_total["requests"] == 1
                    and abs(cost - served["cost"]) < Decimal("1e-9")
                    and live_total["completion_tokens"] + gone_total["completion_tokens"] == served["completion"]
                    and live_total["prompt_tokens"] + gone_total["prompt_tokens"] == served["prompt"]
                )

            wait_until(settled, 30, "the ledger to hold every successful request")
            assert http.get("/readyz").status_code == 200
    finally:
        redis_server.cleanup()
