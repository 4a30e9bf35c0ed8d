"""Retries toward OpenRouter, shown with the simulator's fault knobs: what is retried and what
is not, Retry-After, the deadline, the retry budget, fallbacks and the circuit breaker."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.simulator import SimulatorThread
from tests.support import CLIENT_KEY, GatewayServer, gateway_settings, request_id, scrape, wait_until

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def retrying(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        simulator.base_url,
        upstream={
            "deadline_s": 2.0,
            "retries": {
                "max_attempts": 3,
                "backoff_base_s": 0.05,
                "backoff_cap_s": 0.2,
                "budget_ratio": 0.25,
                "budget_min": 0,
            },
            "breaker": {"failure_threshold": 1_000_000},
        },
        models={
            "per_model": {
                "google/gemini-2.5-flash": {"first_byte_timeout_s": 0.3},
                "anthropic/claude-sonnet-4.5": {"fallbacks": ["openai/gpt-4o-mini"]},
            }
        },
    )
    with GatewayServer(settings) as server:
        yield server


@pytest.fixture
def client(retrying: GatewayServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=retrying.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20) as sdk:
        yield sdk


def script(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"simulator": {"id": uuid.uuid4().hex, "sequence": list(steps)}}


def attempts(simulator: SimulatorThread, rid: str) -> list[dict[str, Any]]:
    return sorted(simulator.find(rid), key=lambda e: e["time"])


def test_503_then_200_is_a_200(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    rid = request_id()
    reply = client.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=HELLO,
        extra_body=script({"status": 503}, {}),
        extra_headers={"x-request-id": rid},
    )
    assert reply.choices[0].message.content
    assert [e["status"] for e in attempts(simulator, rid)] == [503, 200]


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 500},
        {"status": 502},
        {"status": 408},
        {"status": 524},
        {"status": 529},
        {"status": 402, "in_flight": True},
        {"reset": "before_headers"},
        {"error_body_200": "envelope"},
        {"malformed": "json", "status": 200},
    ],
    ids=["500", "502", "408", "524", "529", "in-flight-402", "reset", "200-with-error", "malformed-json"],
)
def test_transient_failures_are_retried(
    client: openai.OpenAI, simulator: SimulatorThread, failure: dict[str, Any]
) -> None:
    rid = request_id()
    first = {k: v for k, v in failure.items() if not (k == "status" and v == 200)}
    if failure.get("malformed"):
        with pytest.raises(openai.InternalServerError):  # a malformed body is not transient: no retry
            client.chat.completions.create(
                model="openai/gpt-4o-mini",
                messages=HELLO,
                extra_body=script(first, {}),
                extra_headers={"x-request-id": rid},
            )
        assert len(attempts(simulator, rid)) == 1
        return
    reply = client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=HELLO, extra_body=script(first, {}), extra_headers={"x-request-id": rid}
    )
    assert reply.choices[0].message.content
    assert len(attempts(simulator, rid)) == 2


def test_retry_after_is_honoured(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    rid = request_id()
    client.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=HELLO,
        extra_body=script({"status": 429, "retry_after": 1}, {}),
        extra_headers={"x-request-id": rid},
    )
    first, second = attempts(simulator, rid)
    assert first["status"] == 429 and second["status"] == 200
    assert second["time"] - first["time"] >= 1.0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_errors_are_not_retried(client: openai.OpenAI, simulator: SimulatorThread, status: int) -> None:
    rid = request_id()
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(
            model="openai/gpt-4o-mini",
            messages=HELLO,
            extra_body={"simulator": {"status": status}},
            extra_headers={"x-request-id": rid},
        )
    assert len(attempts(simulator, rid)) == 1


def test_no_retry_after_the_first_streamed_byte(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    rid = request_id()
    stream = client.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=HELLO,
        stream=True,
        extra_body={"simulator": {"reset_after": 2}},
        extra_headers={"x-request-id": rid},
    )
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert not isinstance(caught.value, openai.APIStatusError)  # an in-stream error event
    assert len(attempts(simulator, rid)) == 1


def test_a_hang_ends_with_504_at_the_deadline(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model="deepseek/deepseek-v3.2", messages=HELLO, extra_body={"simulator": {"hang": True}}
        )
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504 and caught.value.body["code"] == "upstream_timeout"  # type: ignore[index]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert 2.0 <= elapsed < 6.0  # the deadline (2 s), not the per-try timeout (120 s)


def test_per_model_first_byte_timeout(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    rid = request_id()
    reply = client.chat.completions.create(
        model="google/gemini-2.5-flash",
        messages=HELLO,
        extra_body=script({"ttfb_ms": 1500}, {}),
        extra_headers={"x-request-id": rid},
    )
    assert reply.choices[0].message.content
    assert len(attempts(simulator, rid)) == 2


def test_spent_retries_tell_the_sdk_not_to_retry(retrying: GatewayServer, simulator: SimulatorThread) -> None:
    rid = request_id()
    with (
        openai.OpenAI(base_url=retrying.url + "/v1", api_key=CLIENT_KEY, max_retries=2) as sdk,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        sdk.chat.completions.create(
            model="openai/gpt-5-mini",
            messages=HELLO,
            extra_body={"simulator": {"status": 503}},
            extra_headers={"x-request-id": rid},
        )
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(attempts(simulator, rid)) == 3  # the gateway's three tries, not multiplied by the SDK's


def test_fallback_model_after_retries(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    rid = request_id()
    reply = client.chat.completions.create(
        model="anthropic/claude-sonnet-4.5",
        messages=HELLO,
        extra_headers={"x-request-id": rid},
        extra_body={"simulator": {"status_for": {"anthropic/claude-sonnet-4.5": 503}}},
    )
    assert reply.model == "openai/gpt-4o-mini"
    import json

    tried = [json.loads(e["body"])["model"] for e in attempts(simulator, rid)]
    assert tried == ["anthropic/claude-sonnet-4.5"] * 3 + ["openai/gpt-4o-mini"]


def test_retries_stay_within_the_retry_budget(retrying: GatewayServer, simulator: SimulatorThread) -> None:
    marker = "budget-" + uuid.uuid4().hex
    body = {
        "model": "meta-llama/llama-3.3-70b-instruct:free",
        "messages": HELLO,
        "simulator": {"status": 503, "ttfb_ms": 150},
    }

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=retrying.url, timeout=30, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        ) as http:
            return list(
                await asyncio.gather(
                    *(
                        http.post("/v1/chat/completions", json=body, headers={"x-request-id": f"{marker}-{i}"})
                        for i in range(20)
                    )
                )
            )

    responses = asyncio.run(burst())
    assert all(r.status_code == 502 and r.headers["x-should-retry"] == "false" for r in responses)
    tries = [e for e in simulator.requests() if e["headers"].get("x-request-id", "").startswith(marker)]
    # Without a budget: 20 x 3 = 60 tries. With 25% of 20 in flight: at most 5 retrying at once.
    assert 20 < len(tries) <= 20 + 5 * 2


@pytest.fixture(scope="module")
def breaking(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        simulator.base_url,
        upstream={"retries": {"max_attempts": 1}, "breaker": {"failure_threshold": 2, "open_base_s": 1.0}},
        models={"per_model": {"google/gemini-2.5-flash": {"fallbacks": ["openai/gpt-4o-mini"]}}},
    )
    with GatewayServer(settings) as server:
        yield server


def test_circuit_breaker_fails_fast_then_recovers(breaking: GatewayServer, simulator: SimulatorThread) -> None:
    model = "openai/gpt-5-mini"
    with openai.OpenAI(base_url=breaking.url + "/v1", api_key=CLIENT_KEY, max_retries=0) as sdk:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                sdk.chat.completions.create(model=model, messages=HELLO, extra_body={"simulator": {"status": 503}})
        rid = request_id()
        with pytest.raises(openai.InternalServerError) as caught:
            sdk.chat.completions.create(model=model, messages=HELLO, extra_headers={"x-request-id": rid})
        assert caught.value.status_code == 503
        assert caught.value.body["code"] == "upstream_circuit_open"  # type: ignore[index]
        assert int(caught.value.response.headers["retry-after"]) >= 1
        assert simulator.find(rid) == []  # failed fast, without calling OpenRouter

        def recovered() -> bool:
            try:
                return bool(sdk.chat.completions.create(model=model, messages=HELLO).choices)
            except openai.InternalServerError:
                return False

        from tests.support import wait_until

        wait_until(recovered, 5, "the half-open trial")
        assert sdk.chat.completions.create(model=model, messages=HELLO).choices  # closed again


def test_open_circuit_goes_to_the_fallback(breaking: GatewayServer, simulator: SimulatorThread) -> None:
    model = "google/gemini-2.5-flash"
    failing = {"simulator": {"status_for": {model: 503}}}
    with openai.OpenAI(base_url=breaking.url + "/v1", api_key=CLIENT_KEY, max_retries=0) as sdk:
        for _ in range(2):
            assert (
                sdk.chat.completions.create(model=model, messages=HELLO, extra_body=failing).model
                == "openai/gpt-4o-mini"
            )
        rid = request_id()
        reply = sdk.chat.completions.create(model=model, messages=HELLO, extra_headers={"x-request-id": rid})
    assert reply.model == "openai/gpt-4o-mini"
    import json

    assert [json.loads(e["body"])["model"] for e in simulator.find(rid)] == ["openai/gpt-4o-mini"]


# -- a client that hangs up ---------------------------------------------------------------------
def metric(url: str, name: str, **labels: str) -> float:
    text = scrape(url).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def hang_up(url: str, body: dict[str, Any], rid: str, after_s: float) -> None:
    """Send a request and leave after `after_s`, as a client timing out does."""
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "x-request-id": rid}
    with httpx.Client(timeout=after_s) as http, pytest.raises(httpx.ReadTimeout):
        http.post(url + "/v1/chat/completions", json=body, headers=headers)


def test_a_client_gone_gets_no_further_tries(retrying: GatewayServer, simulator: SimulatorThread) -> None:
    """Each try would be a generation OpenRouter bills; nobody is left to get its answer."""
    rid, model = request_id(), "deepseek/deepseek-v3.2"
    gone_before = metric(retrying.url, "gateway_requests_total", model=model, status="499")
    failing = script({"status": 503, "ttfb_ms": 1000}, {"status": 503}, {})  # a 503 after 1 s, then more tries
    hang_up(retrying.url, {"model": model, "messages": HELLO, **failing}, rid, after_s=0.1)
    wait_until(
        lambda: metric(retrying.url, "gateway_requests_total", model=model, status="499") == gone_before + 1,
        10,
        "the request metered as 499",
    )
    assert len(attempts(simulator, rid)) == 1


def test_a_slow_upload_is_not_counted_against_the_deadline(retrying: GatewayServer) -> None:
    """The deadline (2 s here) is for OpenRouter's answer; the client's own upload time is its own."""
    body = json.dumps({"model": "openai/gpt-4o-mini", "messages": HELLO}).encode()

    def slowly() -> Iterator[bytes]:
        for n in range(0, len(body), len(body) // 5 + 1):
            time.sleep(0.6)  # the client's pace, not a synchronisation
            yield body[n : n + len(body) // 5 + 1]

    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"}
    response = httpx.post(retrying.url + "/v1/chat/completions", content=slowly(), headers=headers, timeout=20)
    assert response.status_code == 200, response.text


def test_an_answer_nobody_waits_for_is_still_metered(retrying: GatewayServer, simulator: SimulatorThread) -> None:
    """OpenRouter bills a non-streaming request whether or not the client stays (openrouter-api.md,
    Cancellation), so the gateway lets the try finish and meters its exact usage, as a 499."""
    rid, model = request_id(), "openai/gpt-4o-mini"
    gone_before = metric(retrying.url, "gateway_requests_total", model=model, status="499")
    cost_before = metric(retrying.url, "gateway_cost_usd_total", model=model)
    hang_up(retrying.url, {"model": model, "messages": HELLO, **script({"ttfb_ms": 600})}, rid, after_s=0.15)
    wait_until(
        lambda: metric(retrying.url, "gateway_requests_total", model=model, status="499") == gone_before + 1,
        10,
        "the request metered as 499",
    )
    (served,) = attempts(simulator, rid)
    assert served["cost"] > 0
    assert metric(retrying.url, "gateway_cost_usd_total", model=model) - cost_before == pytest.approx(served["cost"])
