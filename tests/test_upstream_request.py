"""What reaches OpenRouter, read from the simulator's request log: attribution, the gateway's
own key, reasoning built from `reasoning_effort`, per-model defaults, aliases, and every field
we do not know passed through unchanged."""

from __future__ import annotations

import json
from typing import Any

import httpx
import orjson
import pytest

from app.simulator import SimulatorThread
from tests.support import CLIENT_KEY, UPSTREAM_KEY, GatewayServer, request_id

HELLO = [{"role": "user", "content": "Hi"}]


def send(
    http: httpx.Client, simulator: SimulatorThread, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, dict[str, Any]]:
    """POST a chat request through the gateway; returns the response and what OpenRouter got."""
    rid = request_id()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(
        "/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json", "x-request-id": rid, **(headers or {})},
    )
    entries = simulator.find(rid)
    assert len(entries) == 1, entries
    return response, entries[0]


def upstream_body(entry: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(entry["body"])
    return body


def test_attribution_headers_and_gateway_key(http: httpx.Client, simulator: SimulatorThread) -> None:
    response, entry = send(http, simulator, {"model": "openai/gpt-4o-mini", "messages": HELLO})
    assert response.status_code == 200
    headers = entry["headers"]
    assert headers["http-referer"] == "https://example.com/our-app"
    assert headers["x-openrouter-title"] == "Gateway Tests"
    assert headers["x-title"] == "Gateway Tests"
    assert headers["x-openrouter-categories"] == "cli-agent,programming-app"
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"  # ours, never the client's
    assert CLIENT_KEY not in json.dumps(headers)
    assert headers["x-request-id"] == response.headers["x-request-id"]


def test_openrouter_key_is_not_accepted_from_clients(gateway: GatewayServer) -> None:
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "openai/gpt-4o-mini", "messages": HELLO},
        headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert UPSTREAM_KEY not in response.text


def test_reasoning_effort_becomes_reasoning_object(http: httpx.Client, simulator: SimulatorThread) -> None:
    _, entry = send(http, simulator, {"model": "openai/gpt-5-mini", "messages": HELLO, "reasoning_effort": "minimal"})
    body = upstream_body(entry)
    assert body["reasoning"] == {"effort": "minimal"}
    assert "reasoning_effort" not in body


def test_reasoning_effort_values_are_not_validated(http: httpx.Client, simulator: SimulatorThread) -> None:
    _, entry = send(
        http, simulator, {"model": "openai/gpt-5-mini", "messages": HELLO, "reasoning_effort": "galaxy-brain"}
    )
    assert upstream_body(entry)["reasoning"] == {"effort": "galaxy-brain"}


def test_reasoning_effort_merges_into_reasoning_object(http: httpx.Client, simulator: SimulatorThread) -> None:
    _, entry = send(
        http,
        simulator,
        {
            "model": "openai/gpt-5-mini",
            "messages": HELLO,
            "reasoning_effort": "high",
            "reasoning": {"exclude": True, "summary": "auto"},
        },
    )
    body = upstream_body(entry)
    assert body["reasoning"] == {"exclude": True, "summary": "auto", "effort": "high"}
    assert "reasoning_effort" not in body


def test_conflicting_reasoning_is_refused(http: httpx.Client) -> None:
    for reasoning in ({"effort": "low"}, {"max_tokens": 2048}):
        response = http.post(
            "/v1/chat/completions",
            json={"model": "openai/gpt-5-mini", "messages": HELLO, "reasoning_effort": "high", "reasoning": reasoning},
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "reasoning_effort"


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ({}, {"enabled": True}),
        ({"reasoning": {"enabled": False}}, {"enabled": False}),
        ({"reasoning_effort": "low"}, {"effort": "low"}),
        ({"reasoning": {"max_tokens": 4096}}, {"max_tokens": 4096}),
        ({"reasoning": {"exclude": True}}, {"enabled": True, "exclude": True}),
    ],
)
def test_per_model_reasoning_defaults(
    http: httpx.Client, simulator: SimulatorThread, sent: dict[str, Any], expected: dict[str, Any]
) -> None:
    _, entry = send(http, simulator, {"model": "deepseek/deepseek-v3.2", "messages": HELLO, **sent})
    assert upstream_body(entry)["reasoning"] == expected


def test_no_reasoning_default_for_other_models(http: httpx.Client, simulator: SimulatorThread) -> None:
    _, entry = send(http, simulator, {"model": "openai/gpt-4o-mini", "messages": HELLO})
    assert "reasoning" not in upstream_body(entry)


@pytest.mark.parametrize(
    ("requested", "resolved"),
    [
        ("gpt-4o-mini", "openai/gpt-4o-mini"),
        ("thinker", "deepseek/deepseek-v3.2"),
        ("default", "openai/gpt-4o-mini"),
        (None, "openai/gpt-4o-mini"),
    ],
)
def test_aliases_resolved(http: httpx.Client, simulator: SimulatorThread, requested: str | None, resolved: str) -> None:
    body: dict[str, Any] = {"messages": HELLO}
    if requested is not None:
        body["model"] = requested
    response, entry = send(http, simulator, body)
    assert response.status_code == 200
    assert upstream_body(entry)["model"] == resolved


def test_aliases_resolved_in_fallback_models(http: httpx.Client, simulator: SimulatorThread) -> None:
    _, entry = send(
        http,
        simulator,
        {"model": "openai/gpt-4o-mini", "messages": HELLO, "models": ["thinker", "anthropic/claude-sonnet-4.5"]},
    )
    assert upstream_body(entry)["models"] == ["deepseek/deepseek-v3.2", "anthropic/claude-sonnet-4.5"]


UNKNOWN_FIELDS = (
    b'"provider": {"order": ["deepinfra/turbo", "anthropic"], "data_collection": "deny", '
    b'"max_price": {"prompt": 1.25, "completion": "2"}, "sort": {"by": "throughput", "partition": "none"}}, '
    b'"plugins": [{"id": "web", "max_results": 3}, {"id": "response-healing"}], '
    b'"models": ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4.5"], '
    b'"transforms": ["middle-out"], "session_id": "s-\\u00e9t\\u00e9", "x_custom": {"deep": [1, 2.5, null, true]}'
)


def test_unknown_fields_pass_byte_for_byte_when_untouched(http: httpx.Client, simulator: SimulatorThread) -> None:
    raw = b'{"model": "openai/gpt-4o-mini",  "messages": [{"role": "user", "content": "Hi"}], ' + UNKNOWN_FIELDS + b"}"
    response, entry = send(http, simulator, raw)
    assert response.status_code == 200
    assert entry["body"].encode() == raw  # nothing to change: the client's own bytes went upstream


def test_unknown_fields_pass_unchanged_when_body_is_rewritten(http: httpx.Client, simulator: SimulatorThread) -> None:
    raw = b'{"model": "thinker", "messages": [{"role": "user", "content": "Hi"}], ' + UNKNOWN_FIELDS + b"}"
    response, entry = send(http, simulator, raw)
    assert response.status_code == 200
    sent, received = orjson.loads(raw), upstream_body(entry)
    assert received["model"] == "deepseek/deepseek-v3.2"
    for name in ("provider", "plugins", "models", "transforms", "session_id", "x_custom"):
        assert received[name] == sent[name]
        assert orjson.dumps(sent[name]) in entry["body"].encode()  # same values, same order, compact
    assert list(received)[: len(sent)] == list(sent)  # the client's field order is kept


def test_steering_headers_pass_and_others_do_not(http: httpx.Client, simulator: SimulatorThread) -> None:
    _, entry = send(
        http,
        simulator,
        {"model": "openai/gpt-4o-mini", "messages": HELLO},
        headers={"x-session-id": "abc", "x-openrouter-cache": "true", "x-title": "Spoofed", "cookie": "session=secret"},
    )
    headers = entry["headers"]
    assert headers["x-session-id"] == "abc" and headers["x-openrouter-cache"] == "true"
    assert headers["x-title"] == "Gateway Tests"
    assert "cookie" not in headers
