"""`POST /v1/messages` through the gateway, with the Anthropic Python SDK against the simulator:
text (created and streamed), a tool-use round trip keeping the thinking signature, both auth
headers, `?beta=true`, the Anthropic headers forwarded, errors in Anthropic's envelope and
statuses, streams that fail or are cut ending with `event: error`, count_tokens answered by the
gateway itself, and cost in the ledger equal to what the simulator billed (streamed Messages
carry no cost: it comes from /generation)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import pytest

from app.simulator import SimulatorThread
from tests.agent_support import admin, agent_gateway, key_usage, new_key, parse_sse, team_metrics, wait_for_ledger
from tests.support import UPSTREAM_KEY, GatewayServer, wait_until

CLAUDE = "anthropic/claude-sonnet-4.5"
MINI_MODEL = "openai/gpt-4o-mini"
MAX_BODY = 256 * 1024
HELLO = [{"role": "user", "content": "Hello there, gateway!"}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def gateway(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    with agent_gateway(simulator, max_body_bytes=MAX_BODY) as server:
        yield server


@pytest.fixture
def key(gateway: GatewayServer) -> dict[str, Any]:
    return new_key(gateway)


@pytest.fixture
def marker() -> str:
    return "msg-" + uuid.uuid4().hex


def sdk(gateway: GatewayServer, key: str, marker: str, **auth: Any) -> anthropic.Anthropic:
    """The SDK on the gateway's root (it appends /v1/messages); every request tagged `marker`."""
    credentials = auth or {"api_key": key}
    return anthropic.Anthropic(
        base_url=gateway.url, max_retries=0, timeout=20, default_headers={"x-request-id": marker}, **credentials
    )


def sent(simulator: SimulatorThread, marker: str) -> list[dict[str, Any]]:
    return [e for e in simulator.requests() if e["headers"].get("x-request-id", "").startswith(marker)]


def test_create_returns_the_text_and_the_ledger_holds_its_exact_cost(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str
) -> None:
    with sdk(gateway, key["key"], marker) as client:
        message = client.messages.create(model=CLAUDE, max_tokens=200, messages=HELLO)  # type: ignore[arg-type]
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].text == f"Hello from {CLAUDE}! You said: Hello there, gateway!"  # type: ignore[union-attr]
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    cost = wait_for_ledger(gateway, simulator, key, marker)
    total = key_usage(gateway, key)
    assert total["requests"] == 1 and total["completion_tokens"] == message.usage.output_tokens
    metered, endpoints = team_metrics(gateway, key["team"])
    assert abs(metered - cost) < Decimal("1e-9") and endpoints == {"messages"}


def test_stream_delivers_named_events_and_is_billed_from_generation(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str
) -> None:
    text = 'Héllo, wörld! 🚀 "quotes" and \\backslashes\\ stay.'
    with (
        sdk(gateway, key["key"], marker) as client,
        client.messages.stream(
            model=CLAUDE,
            max_tokens=200,
            messages=HELLO,
            extra_body={"simulator": {"reply": text, "cached_tokens": 5}},  # type: ignore[arg-type]
        ) as stream,
    ):
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text and final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.output_tokens > 0 and final.usage.cache_read_input_tokens == 5
    wait_for_ledger(gateway, simulator, key, marker)
    total = key_usage(gateway, key)
    assert total["cached_tokens"] == 5
    assert total["prompt_tokens"] == final.usage.input_tokens + 5 + (final.usage.cache_creation_input_tokens or 0)


def test_a_tool_use_round_trip_keeps_the_thinking_signature(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str
) -> None:
    asked: dict[str, Any] = {
        "model": CLAUDE,
        "max_tokens": 4000,
        "tools": [WEATHER],
        "thinking": {"type": "enabled", "budget_tokens": 2000},
    }
    question = {"role": "user", "content": "Use get_weather: what is the weather in Paris?"}
    with sdk(gateway, key["key"], marker) as client:
        with client.messages.stream(messages=[question], **asked) as stream:
            first = stream.get_final_message()
        kinds = [block.type for block in first.content]
        assert kinds == ["thinking", "tool_use"] and first.stop_reason == "tool_use"
        thinking, use = first.content
        assert thinking.signature  # type: ignore[union-attr]
        history = [
            question,
            {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C and sunny"}]},  # type: ignore[union-attr]
        ]
        second = client.messages.create(messages=history, **asked)
    reply = [b for b in second.content if b.type == "text"]
    assert reply and reply[0].text.startswith("The tool answered: 18 C and sunny")
    replayed = json.loads(sent(simulator, marker)[-1]["body"])["messages"][1]["content"][0]
    assert replayed["signature"] == thinking.signature  # type: ignore[union-attr]
    wait_for_ledger(gateway, simulator, key, marker)


def test_a_bad_thinking_signature_is_refused_upstream_in_anthropic_shape(
    gateway: GatewayServer, key: dict[str, Any], marker: str
) -> None:
    forged = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "forged"}]},
        {"role": "user", "content": "again"},
    ]
    with sdk(gateway, key["key"], marker) as client, pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=CLAUDE, max_tokens=100, messages=forged)  # type: ignore[arg-type]
    assert refused.value.body["type"] == "error"  # type: ignore[index]
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "signature" in refused.value.body["error"]["message"]  # type: ignore[index]


@pytest.mark.parametrize("auth", ["x-api-key", "bearer", "both"])
def test_either_auth_header_works_and_upstream_gets_only_our_bearer(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str, auth: str
) -> None:
    headers = {
        "x-api-key": {"x-api-key": key["key"]},
        "bearer": {"authorization": f"Bearer {key['key']}"},
        "both": {"authorization": f"Bearer {key['key']}", "x-api-key": "sk-gw-not-a-key"},  # Bearer wins
    }[auth]
    body = {"model": CLAUDE, "max_tokens": 100, "messages": HELLO}
    extra = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "interleaved-thinking-2025-05-14",
        "x-request-id": marker,
    }
    answer = httpx.post(gateway.url + "/v1/messages?beta=true", json=body, headers={**headers, **extra}, timeout=20)
    assert answer.status_code == 200, answer.text
    (upstream,) = sent(simulator, marker)
    assert upstream["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}" and "x-api-key" not in upstream["headers"]
    assert upstream["headers"]["anthropic-version"] == "2023-06-01"
    assert upstream["headers"]["anthropic-beta"] == upstream["headers"]["x-anthropic-beta"] == extra["anthropic-beta"]
    assert upstream["path"] == "/api/v1/messages"


def test_our_refusals_come_in_anthropic_shape(gateway: GatewayServer, key: dict[str, Any], marker: str) -> None:
    with (
        sdk(gateway, "sk-gw-unknown-0123456789", marker) as client,
        pytest.raises(anthropic.AuthenticationError) as bad,
    ):
        client.messages.create(model=CLAUDE, max_tokens=100, messages=HELLO)  # type: ignore[arg-type]
    assert bad.value.status_code == 401 and bad.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with sdk(gateway, key["key"], marker) as client:
        with pytest.raises(anthropic.BadRequestError) as missing:
            client.messages.create(model=CLAUDE, max_tokens=100, messages=[])  # type: ignore[arg-type]
        assert missing.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        with pytest.raises(anthropic.NotFoundError) as unknown:
            client.messages.create(model="nobody/nothing", max_tokens=100, messages=HELLO)  # type: ignore[arg-type]
        assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(anthropic.RateLimitError) as limited:
            client.messages.create(
                model=CLAUDE,
                max_tokens=100,
                messages=HELLO,
                extra_body={"simulator": {"status": 429, "retry_after": 3}},  # type: ignore[arg-type]
            )
        assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert limited.value.response.headers["retry-after"] == "3"
        with pytest.raises(anthropic.InternalServerError) as overloaded:
            client.messages.create(
                model=CLAUDE,
                max_tokens=100,
                messages=HELLO,
                extra_body={"simulator": {"status": 503}},  # type: ignore[arg-type]
            )
        # OpenRouter overloaded (503) is Anthropic's 529 overloaded_error; its other 5xx, 500 api_error
        assert overloaded.value.status_code == 529
        assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        assert overloaded.value.body["error"]["message"] == "No available providers for this request"  # type: ignore[index]
        with pytest.raises(anthropic.InternalServerError) as failed:
            client.messages.create(
                model=CLAUDE,
                max_tokens=100,
                messages=HELLO,  # type: ignore[arg-type]
                extra_body={"simulator": {"status": 502}},
            )
        assert failed.value.status_code == 500 and failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    too_big = httpx.post(
        gateway.url + "/v1/messages",
        content=b'{"messages": "' + b"x" * (MAX_BODY + 10) + b'"}',
        headers={"x-api-key": key["key"], "content-type": "application/json"},
        timeout=20,
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "request_too_large"


def test_a_stream_that_fails_or_is_cut_ends_with_an_error_event(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str
) -> None:
    body = {"model": CLAUDE, "max_tokens": 200, "messages": HELLO, "stream": True}
    for knobs in ({"stream_error": 1, "error_after": 3}, {"reset_after": 4, "words": 30}):
        answer = httpx.post(
            gateway.url + "/v1/messages",
            json={**body, "simulator": knobs},
            headers={"x-api-key": key["key"], "x-request-id": f"{marker}-{len(knobs)}"},
            timeout=20,
        )
        blocks = [b for b in answer.text.split("\n\n") if b.strip() and not b.startswith(":")]
        assert blocks[-1].startswith("event: error\ndata: "), blocks[-1]
        assert json.loads(blocks[-1].split("data: ", 1)[1])["type"] == "error"
        assert "message_stop" not in answer.text
    with (
        sdk(gateway, key["key"], marker) as client,
        pytest.raises(anthropic.APIStatusError),
        client.messages.stream(
            model=CLAUDE,
            max_tokens=200,
            messages=HELLO,  # type: ignore[arg-type]
            extra_body={"simulator": {"stream_error": 1}},
        ) as stream,
    ):
        stream.get_final_message()
    wait_for_ledger(gateway, simulator, key, marker)


def test_count_tokens_is_answered_here_never_forwarded_nor_billed(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str
) -> None:
    with sdk(gateway, key["key"], marker) as client:
        counted = client.messages.count_tokens(model=CLAUDE, messages=HELLO)  # type: ignore[arg-type]
        longer = client.messages.count_tokens(
            model=CLAUDE, messages=[{"role": "user", "content": "Hello there, gateway! " * 50}]
        )
    assert 0 < counted.input_tokens < longer.input_tokens
    refused = httpx.post(gateway.url + "/v1/messages/count_tokens?beta=true", json={"messages": HELLO}, timeout=20)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert "x-api-key" in refused.json()["error"]["message"]  # how to send a key, in this API's terms
    assert sent(simulator, marker) == []
    assert key_usage(gateway, key)["requests"] == 0


def test_one_budget_is_spent_and_refused_across_chat_responses_and_messages(
    gateway: GatewayServer, simulator: SimulatorThread, marker: str
) -> None:
    key = new_key(gateway, budget_usd=1, budget_period="total")
    auth = {"Authorization": f"Bearer {key['key']}"}
    asks = {
        "/v1/chat/completions": {"model": "openai/gpt-4o-mini", "messages": HELLO},
        "/v1/responses": {"model": "openai/gpt-4o-mini", "input": "hi"},
        "/v1/messages": {"model": CLAUDE, "max_tokens": 50, "messages": HELLO},
    }
    with httpx.Client(base_url=gateway.url, timeout=20) as http:
        for n, (path, body) in enumerate(asks.items()):
            assert http.post(path, json=body, headers={**auth, "x-request-id": f"{marker}-{n}"}).status_code == 200
        cost = wait_for_ledger(gateway, simulator, key, marker)

        def spent() -> float:
            with admin(gateway) as client:
                return float(client.get(f"/keys/{key['id']}").json()["budget"]["spent_usd"])

        wait_until(lambda: abs(spent() - float(cost)) < 1e-12, 10, "the three settled in one budget")
        with admin(gateway) as client:  # the budget is now exactly what the three cost: exhausted
            assert client.patch(f"/keys/{key['id']}", json={"budget_usd": float(cost)}).status_code == 200
        refused = {path: http.post(path, json=body, headers=auth) for path, body in asks.items()}
    assert {r.status_code for r in refused.values()} == {429}
    assert refused["/v1/chat/completions"].json()["error"]["code"] == "insufficient_quota"
    assert refused["/v1/responses"].json()["error"]["code"] == "insufficient_quota"
    assert refused["/v1/messages"].json()["error"]["type"] == "billing_error"
    assert all(r.headers["x-should-retry"] == "false" for r in refused.values())


def test_team_policy_defaults_allowlist_and_aliases_apply_to_messages_and_responses(
    gateway: GatewayServer, simulator: SimulatorThread, marker: str
) -> None:
    """A team's provider policy is imposed, its reasoning default becomes Messages' `thinking`
    (and stays `reasoning` on Responses), its model allowlist refuses in each API's dialect."""
    team = "team-" + uuid.uuid4().hex[:8]
    policy = {"order": ["anthropic"], "data_collection": "deny"}
    with admin(gateway) as client:
        created = client.post(
            "/teams",
            json={
                "name": team,
                "models": ["anthropic/*"],
                "provider": policy,
                "defaults": {"reasoning": {"effort": "low"}},
            },
        )
        assert created.status_code == 201, created.text
        key = client.post("/keys", json={"name": "agent", "team": team}).json()
    auth = {"Authorization": f"Bearer {key['key']}"}
    with httpx.Client(base_url=gateway.url, timeout=20) as http:
        ok = http.post(
            "/v1/messages",
            json={"model": CLAUDE, "max_tokens": 4000, "messages": HELLO},
            headers={**auth, "x-request-id": marker},
        )
        assert ok.status_code == 200, ok.text
        assert [b["type"] for b in ok.json()["content"]] == ["thinking", "text"]  # the team's default: thinking
        refused = http.post(
            "/v1/messages", json={"model": "openai/gpt-4o-mini", "max_tokens": 50, "messages": HELLO}, headers=auth
        )
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        assert refused.json()["error"]["code"] == "model_not_allowed"
        sneaked = {"model": CLAUDE, "max_tokens": 50, "messages": HELLO, "fallbacks": ["openai/gpt-4o-mini"]}
        refused = http.post("/v1/messages", json=sneaked, headers=auth)  # OpenRouter's fallback list, checked too
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        refused = http.post("/v1/responses", json={"model": "openai/gpt-4o-mini", "input": "hi"}, headers=auth)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
        answer = http.post(
            "/v1/responses", json={"model": CLAUDE, "input": "hi"}, headers={**auth, "x-request-id": marker + "-r"}
        )
        assert answer.status_code == 200, answer.text
    messages_body, responses_body = (json.loads(e["body"]) for e in sent(simulator, marker))
    assert messages_body["thinking"] == {"type": "enabled", "budget_tokens": 2048} and "reasoning" not in messages_body
    assert responses_body["reasoning"] == {"effort": "low"} and "thinking" not in responses_body
    assert messages_body["provider"] == responses_body["provider"] == policy


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
def test_an_untouched_body_goes_upstream_byte_for_byte(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str, path: str
) -> None:
    """Nothing to change (no alias, no defaults, no policy): the client's own bytes, with their
    spacing, key order and escapes, and the reasoning and thinking items in them, go upstream."""
    if path == "/v1/responses":
        raw = (
            '{ "input" : [{"role":"user","content":"caf\\u00e9 \u2615"},'
            '{"type":"reasoning","id":"rs_1","summary":[],"encrypted_content":null}],'
            '"model":"openai/gpt-4o-mini","store":false, "metadata": {"z": 1, "a": 2}}'
        )
    else:
        raw = (
            '{"messages":[{"role":"user","content":"caf\\u00e9 \u2615"}], "max_tokens":50,'
            '  "model" : "openai/gpt-4o-mini", "metadata": {"user_id": "u-1"}, "unknown_field": [1, 2.50]}'
        )
    headers = {"Authorization": f"Bearer {key['key']}", "Content-Type": "application/json", "x-request-id": marker}
    answer = httpx.post(gateway.url + path, content=raw.encode(), headers=headers, timeout=20)
    assert answer.status_code == 200, answer.text
    (upstream,) = sent(simulator, marker)
    assert upstream["body"] == raw


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
def test_streams_keep_their_event_names_keep_alives_and_pings(
    gateway: GatewayServer, key: dict[str, Any], path: str
) -> None:
    body: dict[str, Any] = (
        {"model": "openai/gpt-4o-mini", "input": "hi"}
        if path == "/v1/responses"
        else {"model": CLAUDE, "max_tokens": 100, "messages": HELLO}
    )
    body.update(stream=True, simulator={"keepalives": 2})
    auth = {"Authorization": f"Bearer {key['key']}"}
    answer = httpx.post(gateway.url + path, json=body, headers=auth, timeout=20)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    assert answer.text.startswith(": OPENROUTER PROCESSING\n\n" * 2)
    events = parse_sse(answer.text)
    assert all(name == data["type"] for name, data in events if data != "[DONE]")  # every event named as sent
    if path == "/v1/messages":
        assert [name for name, _ in events][:2] == ["message_start", "ping"] and events[-1][0] == "message_stop"
    else:
        assert events[-2][0] == "response.completed" and events[-1] == (None, "[DONE]")


@pytest.fixture(scope="module")
def strict(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    upstream = {"deadline_s": 1.0, "breaker": {"failure_threshold": 2, "open_base_s": 30.0}}
    with agent_gateway(simulator, upstream=upstream) as server:
        yield server


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
def test_request_ids_deadline_and_breaker_answer_in_each_dialect(
    strict: GatewayServer, simulator: SimulatorThread, marker: str, path: str
) -> None:
    """The request id goes upstream and comes back; a request past its deadline is a 504
    (Anthropic's timeout_error); a model that keeps failing is paused by its breaker (Anthropic's
    529 overloaded_error), in each API's own envelope."""
    key = new_key(strict)
    model = "google/gemini-2.5-flash" if path == "/v1/responses" else "meta-llama/llama-3.3-70b-instruct:free"
    base: dict[str, Any] = {"input": "hi"} if path == "/v1/responses" else {"max_tokens": 50, "messages": HELLO}
    auth = {"Authorization": f"Bearer {key['key']}"}
    with httpx.Client(base_url=strict.url, timeout=20) as http:
        ok = http.post(path, json={**base, "model": MINI_MODEL}, headers={**auth, "x-request-id": marker})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == marker
        assert [e["path"] for e in sent(simulator, marker)] == [f"/api{path}"]
        late = http.post(path, json={**base, "model": MINI_MODEL, "simulator": {"ttfb_ms": 3000}}, headers=auth)
        failing = [
            http.post(path, json={**base, "model": model, "simulator": {"status": 502}}, headers=auth) for _ in range(3)
        ]
    assert late.status_code == 504
    failed = 500 if path == "/v1/messages" else 502  # (OpenRouter's 5xx after retries: Anthropic's api_error)
    assert [r.status_code for r in failing[:2]] == [failed, failed]
    paused = failing[2]
    if path == "/v1/messages":
        assert late.json()["error"]["type"] == "timeout_error"
        assert paused.status_code == 529 and paused.json()["error"]["type"] == "overloaded_error"
        assert paused.json()["error"]["code"] == "upstream_circuit_open"
    else:
        assert late.json()["error"]["code"] == "upstream_timeout"
        assert paused.status_code == 503 and paused.json()["error"]["code"] == "upstream_circuit_open"
    assert paused.headers["retry-after"]
