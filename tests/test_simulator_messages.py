"""The simulator's `POST /api/v1/messages` over loopback: the Anthropic SDK's `messages.create`
and `messages.stream` parse what it serves; httpx shows the wire (named events, errors, knobs)
and that what it billed (its log) is what `/generation` reports."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from app.simulator import SimulatorThread, generate
from app.simulator.catalogue import BY_ID, price
from tests.agent_support import cut_stream, generation, logged, parse_sse
from tests.support import UPSTREAM_KEY, request_id

CLAUDE = "anthropic/claude-sonnet-4.5"
HELLO = [{"role": "user", "content": "Hello there"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
}


@pytest.fixture
def sdk(simulator: SimulatorThread) -> Iterator[anthropic.Anthropic]:
    # The SDK appends /v1/messages to its base URL, as Claude Code does to ANTHROPIC_BASE_URL.
    root = simulator.base_url.removesuffix("/v1")
    with anthropic.Anthropic(base_url=root, api_key=UPSTREAM_KEY, max_retries=0, timeout=20) as client:
        yield client


@pytest.fixture
def http(simulator: SimulatorThread) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    with httpx.Client(base_url=simulator.base_url, headers=headers, timeout=20) as client:
        yield client


def cost_of(model_id: str, fresh: int, completion: int, read: int = 0, write: int = 0) -> float:
    model = BY_ID[model_id]
    return float(
        fresh * price(model, "prompt")
        + read * price(model, "input_cache_read")
        + write * price(model, "input_cache_write")
        + completion * price(model, "completion")
    )


def post(http: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    return http.post("/messages", json={"model": CLAUDE, "max_tokens": 200, "messages": HELLO, **body}, headers=headers)


def test_create_with_thinking_cache_and_billing(
    sdk: anthropic.Anthropic, http: httpx.Client, simulator: SimulatorThread
) -> None:
    rid = request_id()
    raw = sdk.messages.with_raw_response.create(
        model=CLAUDE,
        max_tokens=200,
        system="Be brief.",
        messages=HELLO,
        thinking={"type": "enabled", "budget_tokens": 100},
        extra_headers={"x-request-id": rid, "anthropic-beta": "interleaved-thinking-2025-05-14", "x-session-id": "s1"},
        extra_body={"simulator": {"cached_tokens": 3, "cache_write_tokens": 2}},
    )
    message = raw.parse()
    assert message.id.startswith("msg_") and message.model == CLAUDE and message.stop_reason == "end_turn"
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.signature == generate.sign(thinking.thinking)
    assert text.type == "text" and text.text == "Hello from anthropic/claude-sonnet-4.5! You said: Hello there"
    usage = message.usage
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (3, 2)
    assert usage.output_tokens == generate.count_tokens(text.text) + generate.count_tokens(thinking.thinking)
    extra = usage.model_extra or {}
    assert extra["cost"] == cost_of(CLAUDE, usage.input_tokens, usage.output_tokens, 3, 2)
    assert extra["is_byok"] is False and (message.model_extra or {})["provider"] == "Anthropic"
    entry = logged(simulator, rid)
    assert entry["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert entry["headers"]["anthropic-version"]  # whatever the SDK sends, logged for the gateway tests
    assert entry["headers"]["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert entry["headers"]["x-session-id"] == "s1"
    gen_id = raw.headers["x-generation-id"]
    assert entry["generation_id"] == gen_id and entry["cost"] == extra["cost"] and entry["completed"]
    stats = generation(http, gen_id)
    assert stats["api_type"] == "messages" and stats["streamed"] is False and stats["total_cost"] == entry["cost"]
    assert stats["native_tokens_prompt"] == usage.input_tokens + 3 + 2  # every input token
    assert stats["native_tokens_cached"] == 3 and stats["native_tokens_completion"] == usage.output_tokens
    assert stats["native_tokens_reasoning"] == generate.count_tokens(thinking.thinking)


def test_stream_helper_text_thinking_and_final_message(sdk: anthropic.Anthropic) -> None:
    with sdk.messages.stream(
        model=CLAUDE,
        max_tokens=200,
        messages=HELLO,
        thinking={"type": "adaptive"},
        extra_body={"simulator": {"cached_tokens": 2}},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    thinking, block = final.content
    assert thinking.type == "thinking" and thinking.signature == generate.sign(thinking.thinking)
    assert (
        block.type == "text" and block.text == text == "Hello from anthropic/claude-sonnet-4.5! You said: Hello there"
    )
    assert final.stop_reason == "end_turn" and final.usage.cache_read_input_tokens == 2
    assert final.usage.output_tokens == generate.count_tokens(text) + generate.count_tokens(thinking.thinking)


def test_stream_helper_accumulates_tool_input(sdk: anthropic.Anthropic) -> None:
    with sdk.messages.stream(
        model=CLAUDE,
        max_tokens=200,
        messages=HELLO,
        tools=[{"name": "get_time", "input_schema": {"type": "object", "properties": {}}}, WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        final = stream.get_final_message()
    (call,) = final.content
    assert call.type == "tool_use" and call.id.startswith("toolu_") and call.name == "get_weather"
    assert call.input == {"city": "Paris", "days": 1} and final.stop_reason == "tool_use"
    answered = sdk.messages.create(
        model=CLAUDE,
        max_tokens=200,
        tools=[WEATHER],
        messages=[
            *HELLO,
            {"role": "assistant", "content": [call.to_dict()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21C"}]},
        ],
    )
    assert [b.type for b in answered.content] == ["text"] and answered.stop_reason == "end_turn"
    assert answered.content[0].text == "The tool answered: sunny, 21C"
    declined = sdk.messages.create(
        model=CLAUDE,
        max_tokens=200,
        messages=HELLO,
        tools=[WEATHER],
        tool_choice={"type": "none"},
    )
    assert declined.content[0].type == "text"


def test_replayed_thinking_signature_is_verified(sdk: anthropic.Anthropic) -> None:
    first = sdk.messages.create(
        model=CLAUDE,
        max_tokens=200,
        messages=HELLO,
        thinking={"type": "enabled", "budget_tokens": 50},
    )
    thinking = first.content[0].to_dict()
    history = [*HELLO, {"role": "assistant", "content": [thinking, first.content[1].to_dict()]}, *HELLO]
    assert sdk.messages.create(model=CLAUDE, max_tokens=200, messages=history).stop_reason == "end_turn"
    history[1] = {"role": "assistant", "content": [{**thinking, "signature": "forged"}]}
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.create(model=CLAUDE, max_tokens=200, messages=history)
    assert refused.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages.1.content.0: Invalid `signature` in `thinking` block",
            "error_type": "invalid_request",
        },
        "request_id": None,
    }


def test_thinking_follows_the_catalogue_and_the_request(http: httpx.Client) -> None:
    def kinds(model: str, **extra: Any) -> list[str]:
        return [block["type"] for block in post(http, {"model": model, **extra}).json()["content"]]

    assert kinds(CLAUDE) == ["text"]
    assert kinds(CLAUDE, thinking={"type": "disabled"}) == ["text"]
    assert kinds(CLAUDE, thinking={"type": "enabled", "budget_tokens": 64}) == ["thinking", "text"]
    assert kinds("openai/gpt-5-mini", thinking={"type": "disabled"}) == ["thinking", "text"]  # always reasons


def test_max_tokens_stops_the_text(http: httpx.Client) -> None:
    body = post(http, {"max_tokens": 3, "simulator": {"words": 10}}).json()
    assert body["stop_reason"] == "max_tokens" and body["content"] == [{"type": "text", "text": "lorem ipsum dolor"}]
    assert body["usage"]["output_tokens"] == 3


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "overloaded_error"),
        (529, "overloaded_error"),
        (504, "timeout_error"),
        (524, "timeout_error"),
    ],
)
def test_status_knob_in_anthropics_envelope(http: httpx.Client, status: int, kind: str) -> None:
    answer = post(http, {"simulator": {"status": status, "message": "No", "error_type": "x", "retry_after": 3}})
    assert answer.status_code == status and answer.headers["retry-after"] == "3"
    assert answer.json() == {
        "type": "error",
        "error": {"type": kind, "message": "No", "error_type": "x"},
        "request_id": None,
    }


def test_request_errors_and_routes(http: httpx.Client, simulator: SimulatorThread, sdk: anthropic.Anthropic) -> None:
    missing = http.post("/messages", json={"model": CLAUDE, "max_tokens": 10})
    assert missing.status_code == 400
    assert missing.json()["error"] == {
        "type": "invalid_request_error",
        "message": "messages: Field required",
        "error_type": "invalid_request",
    }
    unknown = post(http, {"model": "anthropic/claude-nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    anonymous = httpx.post(simulator.base_url + "/messages", json={"model": CLAUDE, "messages": HELLO})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    keyed_only = httpx.post(simulator.base_url + "/messages", json=HELLO, headers={"x-api-key": UPSTREAM_KEY})
    assert keyed_only.status_code == 401  # OR's spec declares Bearer only
    rid = request_id()
    both = {"x-api-key": "sk-ant-client", "x-request-id": rid}
    assert http.post("/messages?beta=true", json={"model": CLAUDE, "messages": HELLO}, headers=both).status_code == 200
    entry = logged(simulator, rid)
    assert entry["query"] == {"beta": "true"} and entry["headers"]["x-api-key"] == "sk-ant-client"
    assert http.post("/messages/count_tokens", json={"model": CLAUDE, "messages": HELLO}).status_code == 404
    with pytest.raises(anthropic.RateLimitError):
        sdk.messages.create(model=CLAUDE, max_tokens=9, messages=HELLO, extra_body={"simulator": {"status": 429}})


def test_stream_wire_events(http: httpx.Client, simulator: SimulatorThread) -> None:
    rid = request_id()
    body = {"stream": True, "tools": [WEATHER], "thinking": {"type": "enabled", "budget_tokens": 64}}
    body["messages"] = [{"role": "user", "content": "Use get_weather for Paris"}]  # (a tool named: called)
    body["simulator"] = {"keepalives": 2, "cached_tokens": 2, "cache_write_tokens": 1}
    answer = post(http, body, **{"x-request-id": rid})
    assert answer.headers["content-type"] == "text/event-stream" and answer.headers["x-generation-id"]
    assert answer.text.startswith(": OPENROUTER PROCESSING\n\n" * 2 + "event: message_start\ndata: {")
    events = parse_sse(answer.text)
    assert all(name == data["type"] for name, data in events)  # every event named, no [DONE]
    kinds = [name for name, _ in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"] and kinds.count("ping") == 1
    assert kinds[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    final = events[-2][1]
    fresh = final["usage"]["input_tokens"]
    assert start["usage"] == {
        "input_tokens": fresh,
        "output_tokens": 1,
        "cache_creation_input_tokens": 1,
        "cache_read_input_tokens": 2,
    }
    assert final["delta"] == {"stop_reason": "tool_use", "stop_sequence": None} and "cost" not in final["usage"]
    blocks = [d["content_block"] for _, d in events if d["type"] == "content_block_start"]
    assert blocks[0] == {"type": "thinking", "thinking": ""} and blocks[1]["type"] == "tool_use"
    deltas = [d["delta"]["type"] for _, d in events if d["type"] == "content_block_delta"]
    assert deltas.index("signature_delta") == deltas.count("thinking_delta") and "input_json_delta" in deltas
    entry = logged(simulator, rid)
    assert entry["cost"] == cost_of(CLAUDE, fresh, final["usage"]["output_tokens"], 2, 1)
    stats = generation(http, entry["generation_id"])
    assert stats["streamed"] is True and stats["total_cost"] == entry["cost"]


def test_stream_knobs_zero_start_cost_and_done(http: httpx.Client, simulator: SimulatorThread) -> None:
    rid = request_id()
    knobs = {"start_usage": "zero", "stream_cost": True, "done": True, "keepalives": 0, "generation_404s": 0}
    answer = post(http, {"stream": True, "simulator": knobs}, **{"x-request-id": rid})
    events = parse_sse(answer.text)
    stats = http.get("/generation", params={"id": answer.headers["x-generation-id"]})  # stored before the EOF
    assert stats.status_code == 200 and stats.json()["data"]["total_cost"] == logged(simulator, rid)["cost"]
    assert set(events[0][1]["message"]["usage"].values()) == {0}
    assert events[-1] == (None, "[DONE]") and events[-2][0] == "message_stop"
    assert events[-3][1]["usage"]["cost"] == logged(simulator, rid)["cost"]
    plain = post(http, {"simulator": {"usage_cost": False}}).json()
    assert "cost" not in plain["usage"] and plain["usage"]["output_tokens"] > 0


def test_in_stream_error_bills_what_was_produced(
    http: httpx.Client, simulator: SimulatorThread, sdk: anthropic.Anthropic
) -> None:
    rid = request_id()
    knobs = {"stream_error": 2, "error_after": 5, "reply": "one two three four", "keepalives": 0}
    events = parse_sse(post(http, {"stream": True, "simulator": knobs}, **{"x-request-id": rid}).text)
    assert [name for name, _ in events] == ["message_start", "ping", "content_block_start"] + [
        "content_block_delta"
    ] * 2 + ["error"]
    assert events[-1][1] == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded", "error_type": "provider_overloaded"},
    }
    entry = logged(simulator, rid)
    assert entry["failed"] and not entry["completed"] and entry["usage"]["completion_tokens"] == 2
    assert generation(http, entry["generation_id"])["total_cost"] == entry["cost"] > 0
    with (
        pytest.raises(anthropic.APIStatusError, match="Overloaded"),
        sdk.messages.stream(
            model=CLAUDE,
            max_tokens=50,
            messages=HELLO,
            extra_body={"simulator": knobs},
        ) as stream,
    ):
        stream.get_final_message()


def test_reset_and_malformed_after(http: httpx.Client, simulator: SimulatorThread) -> None:
    rid = request_id()
    body = {"model": CLAUDE, "max_tokens": 50, "messages": HELLO, "stream": True}
    body["simulator"] = {"reset_after": 4, "reply": "alpha beta gamma", "keepalives": 0}
    received, entry = cut_stream(http, simulator, "/messages", body, rid)
    assert b"message_stop" not in received and b'"text":"alpha"' in received
    assert entry["usage"]["completion_tokens"] == 1
    text = post(http, {"stream": True, "simulator": {"malformed_after": 3}}).text
    assert 'event: content_block_delta\ndata: {"type": "content_block_delta", "index": \n\n' in text


def test_an_agent_model_calls_a_tool_only_when_told(http: httpx.Client) -> None:
    """Agents send all their tools every turn: a tool is called when the user names it or
    tool_choice forces it, never just because tools were sent."""
    plain = post(http, {"tools": [WEATHER]}).json()
    assert [b["type"] for b in plain["content"]] == ["text"] and plain["stop_reason"] == "end_turn"
    named = post(http, {"tools": [WEATHER], "messages": [{"role": "user", "content": "get_weather, please"}]}).json()
    forced = post(http, {"tools": [WEATHER], "tool_choice": {"type": "any"}}).json()
    assert named["stop_reason"] == forced["stop_reason"] == "tool_use"
