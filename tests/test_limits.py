"""Limits through the gateway (memory store): RPM, TPM, concurrency and budgets per key, team
and globally; OpenAI's rate-limit headers on refusals and on successes; the SDK's view."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from app.limits import estimate
from app.simulator import SimulatorThread
from tests.support import ADMIN_KEY, TEAM_UPSTREAM_KEY, GatewayServer, gateway_settings, request_id, scrape

HELLO = [{"role": "user", "content": "Hello there"}]


def admin_client(gateway: GatewayServer) -> httpx.Client:
    return httpx.Client(base_url=gateway.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"})


def new_key(gateway: GatewayServer, team: dict[str, Any] | None = None, **limits: Any) -> dict[str, Any]:
    with admin_client(gateway) as admin:
        name = "t-" + uuid.uuid4().hex[:8]
        assert admin.post("/teams", json={"name": name, **(team or {})}).status_code == 201
        response = admin.post("/keys", json={"name": "k", "team": name, **limits})
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created


def key_in(gateway: GatewayServer, team: str, **limits: Any) -> dict[str, Any]:
    with admin_client(gateway) as admin:
        response = admin.post("/keys", json={"name": "k-" + uuid.uuid4().hex[:6], "team": team, **limits})
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created


def sdk(gateway: GatewayServer, key: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30, **options)


async def fire(gateway: GatewayServer, key: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(
        base_url=gateway.url, timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        return list(await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies)))


def test_rpm_refuses_with_openai_headers(keyed: GatewayServer) -> None:
    key = new_key(keyed, rpm=3)
    with sdk(keyed, key["key"]) as client:
        remaining = []
        for _ in range(3):
            raw = client.chat.completions.with_raw_response.create(model="openai/gpt-4o-mini", messages=HELLO)
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
            remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        assert remaining == ["2", "1", "0"]
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
    error = caught.value
    assert error.body["type"] == "requests" and error.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert 0 < int(headers["retry-after-ms"]) <= 60_000
    assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-should-retry" not in headers  # waiting helps: the SDK may retry after retry-after


def test_streams_carry_rate_limit_headers(keyed: GatewayServer) -> None:
    key = new_key(keyed, rpm=10, tpm=100_000)
    with (
        sdk(keyed, key["key"]) as client,
        client.chat.completions.with_streaming_response.create(
            model="openai/gpt-4o-mini", messages=HELLO, stream=True
        ) as response,
    ):
        assert response.headers["x-ratelimit-remaining-requests"] == "9"
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < 100_000
        assert list(response.iter_lines())


def test_tpm_reserves_the_estimate_then_settles(keyed: GatewayServer, simulator: SimulatorThread) -> None:
    body = {"model": "openai/gpt-4o-mini", "messages": HELLO, "max_tokens": 100, "simulator": {"ttfb_ms": 400}}
    each = estimate.prompt_tokens(body) + 100
    limit = each * 2 + each // 2
    key = new_key(keyed, tpm=limit)
    started = time.monotonic()
    responses = asyncio.run(fire(keyed, key["key"], [body] * 5))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429, 429, 429]  # two estimates fit, a third does not
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "tokens"
    assert refused.headers["x-ratelimit-limit-tokens"] == str(limit)

    served = sum(json.loads(r.content)["usage"]["total_tokens"] for r in responses if r.status_code == 200)
    with sdk(keyed, key["key"]) as client:  # settled: the real tokens count now, not the estimates
        raw = client.chat.completions.with_raw_response.create(
            model="openai/gpt-4o-mini", messages=HELLO, max_tokens=100
        )
    # The bucket refills at the limit per minute: what trickled back meanwhile is the only slack.
    refilled = math.ceil(limit * (time.monotonic() - started) / 60)
    exact = (
        limit
        - served
        - (estimate.prompt_tokens({"messages": HELLO, "model": "openai/gpt-4o-mini", "max_tokens": 100}) + 100)
    )
    assert exact <= int(raw.headers["x-ratelimit-remaining-tokens"]) <= exact + refilled


def test_request_larger_than_tpm_is_refused_for_good(keyed: GatewayServer) -> None:
    key = new_key(keyed, tpm=500)
    with sdk(keyed, key["key"]) as client, pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO, max_tokens=1000)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "max_tokens" in caught.value.message


def test_tpm_without_max_tokens_reserves_the_model_maximum(keyed: GatewayServer) -> None:
    key = new_key(keyed, tpm=20_000)  # gpt-4o-mini may write 16,384 tokens: one fits, its estimate counted
    with sdk(keyed, key["key"]) as client:
        raw = client.chat.completions.with_raw_response.create(model="openai/gpt-4o-mini", messages=HELLO)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == (
        20_000 - 16_384 - estimate.prompt_tokens({"model": "openai/gpt-4o-mini", "messages": HELLO})
    )  # a fresh bucket is full: nothing to refill yet


def overlap(entries: list[dict[str, Any]]) -> int:
    events = sorted([(e["time"], 1) for e in entries] + [(e["ended"], -1) for e in entries])
    peak = current = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def test_concurrency_cap(keyed: GatewayServer, simulator: SimulatorThread) -> None:
    key = new_key(keyed, max_concurrency=2)
    marker = uuid.uuid4().hex
    body = {"model": "openai/gpt-4o-mini", "messages": HELLO, "user": marker, "simulator": {"ttfb_ms": 300}}
    responses = asyncio.run(fire(keyed, key["key"], [body] * 8))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == 8 and len(ok) >= 2 and refused
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "requests" for r in refused)
    served = [e for e in simulator.requests() if marker in e["body"]]
    assert overlap(served) <= 2
    again = asyncio.run(fire(keyed, key["key"], [body] * 2))  # slots are given back
    assert [r.status_code for r in again] == [200, 200]


def test_a_budget_refusal_says_when_the_request_itself_is_too_dear(keyed: GatewayServer) -> None:
    """A request is held at its worst-case cost (the model's price for max_tokens, or the model's
    output limit without it): one dearer than the budget is told so and how to fix it, not that
    the budget is used up; and the refusal is counted under limit="budget"."""
    key = new_key(keyed, budget_usd=0.001, budget_period="day")

    def refused_by_budget() -> float:
        text = scrape(keyed.url).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_rate_limited_total{") and 'limit="budget"' in line and 'scope="key"' in line
        )

    before = refused_by_budget()
    with sdk(keyed, key["key"]) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="deepseek/deepseek-v3.2", messages=HELLO)  # no max_tokens
        message = caught.value.body["message"]  # type: ignore[index]
        assert "more than the whole key budget of $0.001 per period" in message and "lower max_tokens" in message
        assert "used up" not in message
        assert client.chat.completions.create(model="deepseek/deepseek-v3.2", messages=HELLO, max_tokens=20).choices
    assert refused_by_budget() == before + 1


def test_budget_is_enforced_and_sdk_does_not_retry_it(keyed: GatewayServer, simulator: SimulatorThread) -> None:
    key = new_key(keyed, budget_usd=0.0001, budget_period="day")
    marker = "budget-" + uuid.uuid4().hex
    sent: list[httpx.Request] = []
    http_client = httpx.Client(event_hooks={"request": [sent.append]})
    with sdk(keyed, key["key"], http_client=http_client) as client:
        client.max_retries = 2
        served = 0
        with pytest.raises(openai.RateLimitError) as caught:
            for i in range(100):
                client.chat.completions.create(
                    model="deepseek/deepseek-v3.2",
                    messages=HELLO,
                    max_tokens=50,
                    extra_headers={"x-request-id": f"{marker}-{i}"},
                )
                served += 1
        attempts_before = len(sent)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="deepseek/deepseek-v3.2", messages=HELLO, max_tokens=50)
        assert len(sent) == attempts_before + 1  # x-should-retry: false, so the SDK did not retry
    error = caught.value
    assert error.body["type"] == "insufficient_quota" and error.body["code"] == "insufficient_quota"  # type: ignore[index]
    assert error.response.headers["x-should-retry"] == "false"
    assert served >= 3

    costs = [e["cost"] for e in simulator.requests() if e["headers"].get("x-request-id", "").startswith(marker)]
    assert len(costs) == served  # refused requests never reached OpenRouter
    with admin_client(keyed) as admin:
        budget = wait_until_settled(admin, key["id"], sum(costs))
    assert budget["limit_usd"] == 0.0001 and budget["period"].startswith("d")
    assert abs(budget["spent_usd"] - sum(costs)) < 1e-9  # settled to OpenRouter's own costs
    assert budget["spent_usd"] <= 0.0001


def wait_until_settled(admin: httpx.Client, key_id: str, expected: float) -> dict[str, Any]:
    from tests.support import wait_until

    def settled() -> dict[str, Any] | None:
        budget: dict[str, Any] = admin.get(f"/keys/{key_id}").json()["budget"]
        return budget if abs(budget["spent_usd"] - expected) < 1e-9 else None

    return wait_until(settled, 5, "settlement")


def test_team_limits_are_shared_by_its_keys(keyed: GatewayServer) -> None:
    first = new_key(keyed, team={"rpm": 2})
    second = key_in(keyed, first["team"])
    with sdk(keyed, first["key"]) as a, sdk(keyed, second["key"]) as b:
        a.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
        b.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
        with pytest.raises(openai.RateLimitError) as caught:
            a.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
    assert caught.value.body["metadata"]["scope"] == "team"  # type: ignore[index]


@pytest.fixture(scope="module")
def limited(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    import os

    os.environ["TEAM_ML_OPENROUTER_KEY"] = TEAM_UPSTREAM_KEY
    settings = gateway_settings(simulator.base_url, admin_key=ADMIN_KEY, limits={"global": {"rpm": 3}})
    with GatewayServer(settings) as server:
        yield server


def test_global_limit_spans_keys_but_spares_teams_on_their_own_key(
    limited: GatewayServer, simulator: SimulatorThread
) -> None:
    own = new_key(limited, team={"upstream_key_env": "TEAM_ML_OPENROUTER_KEY"})
    with sdk(limited, own["key"]) as client:
        for _ in range(5):  # more than the global 3 a minute: not on the shared OpenRouter key
            rid = request_id()
            client.chat.completions.create(
                model="openai/gpt-4o-mini", messages=HELLO, extra_headers={"x-request-id": rid}
            )
            assert simulator.find(rid)[0]["headers"]["authorization"] == f"Bearer {TEAM_UPSTREAM_KEY}"
    statuses = []
    for _ in range(4):
        with sdk(limited, new_key(limited)["key"]) as client:
            try:
                client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
                statuses.append(200)
            except openai.RateLimitError as error:
                statuses.append(429)
                assert error.body["metadata"]["scope"] == "global"  # type: ignore[index]
    assert statuses == [200, 200, 200, 429]


@pytest.fixture(scope="module")
def defaulted(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        simulator.base_url,
        admin_key=ADMIN_KEY,
        limits={"key_defaults": {"rpm": 2}, "team_defaults": {"tpm": 1_000_000}},
    )
    with GatewayServer(settings) as server:
        yield server


def test_configured_defaults_apply_to_keys_that_set_none(defaulted: GatewayServer) -> None:
    plain, own = new_key(defaulted), new_key(defaulted, rpm=5)
    with sdk(defaulted, plain["key"]) as client:
        first = client.chat.completions.with_raw_response.create(
            model="openai/gpt-4o-mini", messages=HELLO, max_tokens=10
        )
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-limit-tokens"] == "1000000"  # the team default
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
        assert caught.value.body["metadata"]["scope"] == "key"  # type: ignore[index]
    with sdk(defaulted, own["key"]) as client:
        raw = client.chat.completions.with_raw_response.create(model="openai/gpt-4o-mini", messages=HELLO)
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
