"""The simulator's `POST /api/v1/responses` over loopback: openai-python's `responses.create`
and `responses.stream` parse what it serves; httpx shows the wire (SSE framing, errors, knobs)
and that what it billed (its log) is what `/generation` reports."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from app.simulator import SimulatorThread, generate
from app.simulator.catalogue import BY_ID, price
from app.simulator.errors import _MESSAGES
from tests.agent_support import cut_stream, generation, logged, parse_sse
from tests.support import UPSTREAM_KEY, request_id, wait_until

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
}
CLOCK = {
    "type": "function",
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC"]}}},
}


@pytest.fixture
def sdk(simulator: SimulatorThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=simulator.base_url, api_key=UPSTREAM_KEY, max_retries=0, timeout=20) as client:
        yield client


@pytest.fixture
def http(simulator: SimulatorThread) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    with httpx.Client(base_url=simulator.base_url, headers=headers, timeout=20) as client:
        yield client


def cost_of(model_id: str, prompt: int, completion: int, cached: int = 0) -> float:
    model = BY_ID[model_id]
    return float(
        (prompt - cached) * price(model, "prompt")
        + cached * price(model, "input_cache_read")
        + completion * price(model, "completion")
    )


def test_create_parses_with_reasoning_encrypted_content_and_billing(
    sdk: openai.OpenAI, http: httpx.Client, simulator: SimulatorThread
) -> None:
    rid = request_id()
    raw = sdk.responses.with_raw_response.create(
        model="openai/gpt-5-mini",
        input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Plan my day"}]}],
        instructions="Be brief.",
        reasoning={"effort": "low", "summary": "auto"},
        include=["reasoning.encrypted_content"],
        extra_headers={"x-request-id": rid},
        extra_body={"simulator": {"cached_tokens": 4}},
    )
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.model == "openai/gpt-5-mini"
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    thought = reasoning.summary[0].text
    assert reasoning.encrypted_content == (
        "enc_" + base64.b64encode(thought.encode()).decode() + "." + generate.sign(thought)
    )
    assert message.type == "message" and message.id.startswith("msg_")
    assert response.output_text == "Hello from openai/gpt-5-mini! You said: Plan my day"
    usage = response.usage
    assert usage is not None and usage.input_tokens_details.cached_tokens == 4
    assert usage.output_tokens_details.reasoning_tokens == generate.count_tokens(thought)
    assert usage.output_tokens == generate.count_tokens(response.output_text) + generate.count_tokens(thought)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    extra = usage.model_extra or {}
    assert extra["cost"] == cost_of("openai/gpt-5-mini", usage.input_tokens, usage.output_tokens, 4)
    assert extra["is_byok"] is False and set(extra["cost_details"]) == {
        "upstream_inference_cost",
        "upstream_inference_input_cost",
        "upstream_inference_output_cost",
    }
    entry = logged(simulator, rid)
    gen_id = raw.headers["x-generation-id"]
    assert gen_id.startswith("gen-") and entry["generation_id"] == gen_id
    assert entry["cost"] == extra["cost"] and entry["completed"] and not entry["stream"]
    stats = generation(http, gen_id)
    assert stats["api_type"] == "responses" and stats["streamed"] is False and stats["cancelled"] is False
    assert stats["total_cost"] == entry["cost"]
    assert (stats["native_tokens_prompt"], stats["native_tokens_cached"]) == (usage.input_tokens, 4)
    assert stats["native_tokens_completion"] == usage.output_tokens
    assert stats["native_tokens_reasoning"] == usage.output_tokens_details.reasoning_tokens


def test_stream_helper_accumulates_text_and_final_response(sdk: openai.OpenAI) -> None:
    with sdk.responses.stream(model="openai/gpt-4o-mini", input="Say hello") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello from openai/gpt-4o-mini! You said: Say hello"
    assert len(deltas) > 1 and final.status == "completed"
    assert final.usage is not None and (final.usage.model_extra or {})["cost"] > 0


def test_stream_helper_sees_reasoning_summary_then_function_call(sdk: openai.OpenAI) -> None:
    with sdk.responses.stream(
        model="deepseek/deepseek-v3.2",
        input="Weather in Paris?",
        tools=[CLOCK, WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        reasoning={"effort": "medium"},
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.reasoning_summary_text.delta" in kinds and "response.function_call_arguments.delta" in kinds
    assert kinds[-1] == "response.completed"
    reasoning, call = final.output
    assert reasoning.type == "reasoning" and reasoning.encrypted_content is None  # not asked for in `include`
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris", "days": 1}


def test_tool_output_is_answered_without_a_new_call(sdk: openai.OpenAI) -> None:
    response = sdk.responses.create(
        model="openai/gpt-4o-mini",
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21C"},
        ],
    )
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text == "The tool answered: sunny, 21C"
    none = sdk.responses.create(model="openai/gpt-4o-mini", tools=[WEATHER], tool_choice="none", input="Hi")
    assert none.output_text == "Hello from openai/gpt-4o-mini! You said: Hi"


def test_replayed_encrypted_content_is_verified(sdk: openai.OpenAI, http: httpx.Client) -> None:
    first = sdk.responses.create(
        model="openai/gpt-5-mini", input="Think", reasoning={"effort": "low"}, include=["reasoning.encrypted_content"]
    )
    reasoning = first.output[0].to_dict()
    history = [{"role": "user", "content": "Think"}, reasoning, {"role": "user", "content": "Again"}]
    second = sdk.responses.create(model="openai/gpt-5-mini", input=history)
    assert second.status == "completed"
    tampered = {**reasoning, "encrypted_content": reasoning["encrypted_content"].replace("enc_", "enc_QQ", 1)}
    answer = http.post("/responses", json={"model": "openai/gpt-5-mini", "input": [tampered]})
    assert answer.status_code == 400
    assert answer.json()["error"] == {
        "code": 400,
        "message": "Invalid encrypted_content in reasoning item",
        "metadata": {"error_type": "invalid_request"},
    }


@pytest.mark.parametrize(
    ("extra", "raw"),
    [
        (
            {"store": True},
            {"code": "invalid_value", "values": [False], "path": ["store"], "message": "Invalid input: expected false"},
        ),
        (
            {"store": None},
            {"code": "invalid_value", "values": [False], "path": ["store"], "message": "Invalid input: expected false"},
        ),
        (
            {"previous_response_id": "resp_1"},
            {
                "code": "invalid_value",
                "values": [None],
                "path": ["previous_response_id"],
                "message": "Invalid input: expected null",
            },
        ),
    ],
    ids=["store-true", "store-null", "previous-response-id"],
)
def test_stateful_requests_are_refused(http: httpx.Client, extra: dict[str, Any], raw: dict[str, Any]) -> None:
    answer = http.post("/responses", json={"model": "openai/gpt-4o-mini", "input": "hi", **extra})
    assert answer.status_code == 400
    assert answer.json() == {
        "error": {"code": "invalid_prompt", "message": "Invalid Responses API request"},
        "metadata": {"raw": [raw]},
    }
    assert http.post("/responses", json={"model": "openai/gpt-4o-mini", "input": "hi", "store": False}).is_success


def test_missing_input_and_missing_auth(http: httpx.Client, simulator: SimulatorThread) -> None:
    answer = http.post("/responses", json={"model": "openai/gpt-4o-mini"})
    assert answer.status_code == 400 and answer.json()["metadata"]["raw"][0]["path"] == ["input"]
    assert answer.json()["metadata"]["raw"][0]["code"] == "invalid_type"
    anonymous = httpx.post(simulator.base_url + "/responses", json={"model": "openai/gpt-4o-mini", "input": "hi"})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == 401


@pytest.mark.parametrize(
    ("status", "code", "error_type"),
    [
        (429, "rate_limit_exceeded", "rate_limit_exceeded"),
        (400, "invalid_prompt", "invalid_request"),
        (401, "server_error", "authentication"),
        (503, "server_error", "provider_overloaded"),
    ],
)
def test_status_knob_in_the_responses_shape(http: httpx.Client, status: int, code: str, error_type: str) -> None:
    knobs = {"status": status, "error_shape": "responses", "retry_after": 7}
    answer = http.post("/responses", json={"model": "openai/gpt-4o-mini", "input": "hi", "simulator": knobs})
    assert answer.status_code == status and answer.headers["retry-after"] == "7"
    assert answer.json() == {"error": {"code": code, "message": _MESSAGES[status][0]}, "error_type": error_type}
    knobs = {**knobs, "message": "Slow down", "error_type": "x"}
    answer = http.post("/responses", json={"model": "openai/gpt-4o-mini", "input": "hi", "simulator": knobs})
    assert answer.json() == {"error": {"code": code, "message": "Slow down"}, "error_type": "x"}


def test_status_knob_numeric_by_default_and_sdk_errors(sdk: openai.OpenAI, http: httpx.Client) -> None:
    answer = http.post("/responses", json={"model": "openai/gpt-4o-mini", "input": "hi", "simulator": {"status": 402}})
    assert answer.status_code == 402
    assert answer.json()["error"]["code"] == 402 and answer.json()["error"]["metadata"]["error_type"] == (
        "payment_required"
    )
    with pytest.raises(openai.RateLimitError):
        sdk.responses.create(model="openai/gpt-4o-mini", input="hi", extra_body={"simulator": {"status": 429}})


def test_max_output_tokens_ends_incomplete(sdk: openai.OpenAI, http: httpx.Client) -> None:
    body = {"model": "openai/gpt-4o-mini", "input": "hi", "max_output_tokens": 3, "simulator": {"words": 10}}
    response = http.post("/responses", json=body).json()
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["content"][0]["text"] == "lorem ipsum dolor"
    assert response["usage"]["output_tokens"] == 3
    with sdk.responses.stream(
        model="openai/gpt-4o-mini", input="hi", max_output_tokens=3, extra_body={"simulator": {"words": 10}}
    ) as stream:
        last = [e for e in stream][-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details is not None


def test_stream_wire_framing(http: httpx.Client) -> None:
    body = {"model": "openai/gpt-4o-mini", "input": "hi", "stream": True, "simulator": {"keepalives": 3}}
    answer = http.post("/responses", json=body)
    assert answer.headers["content-type"] == "text/event-stream" and answer.headers["x-generation-id"]
    assert answer.text.startswith(": OPENROUTER PROCESSING\n\n" * 3 + "event: response.created\ndata: {")
    events = parse_sse(answer.text)
    assert events[-1] == (None, "[DONE]")
    named = events[:-1]
    assert all(name == data["type"] for name, data in named)
    assert [data["sequence_number"] for _, data in named] == list(range(len(named)))
    kinds = [data["type"] for _, data in named]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    created = named[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None


def test_stream_without_event_names_done_or_cost(http: httpx.Client, simulator: SimulatorThread) -> None:
    rid = request_id()
    knobs = {"event_names": False, "omit_done": True, "usage_cost": False, "keepalives": 0, "generation_404s": 0}
    body = {"model": "openai/gpt-4o-mini", "input": "hi", "stream": True, "simulator": knobs}
    answer = http.post("/responses", json=body, headers={"x-request-id": rid})
    stats = http.get("/generation", params={"id": answer.headers["x-generation-id"]})  # stored before the EOF
    assert stats.status_code == 200 and stats.json()["data"]["total_cost"] == logged(simulator, rid)["cost"] > 0
    assert answer.text.startswith("data: {")
    events = parse_sse(answer.text)
    assert all(name is None for name, _ in events) and events[-1][1]["type"] == "response.completed"
    usage = events[-1][1]["response"]["usage"]
    assert "cost" not in usage and "cost_details" not in usage and usage["total_tokens"] > 0
    assert logged(simulator, rid)["cost"] == cost_of(
        "openai/gpt-4o-mini", usage["input_tokens"], usage["output_tokens"]
    )
    plain = http.post("/responses", json={"model": "openai/gpt-4o-mini", "input": "hi", "simulator": knobs}).json()
    assert "cost" not in plain["usage"]


@pytest.mark.parametrize("shape", [1, 2, 3])
def test_in_stream_failure_bills_what_was_produced(http: httpx.Client, simulator: SimulatorThread, shape: int) -> None:
    rid = request_id()
    knobs = {"stream_error": shape, "error_after": 6, "reply": "one two three four five six", "keepalives": 0}
    body = {"model": "openai/gpt-4o-mini", "input": "hi", "stream": True, "simulator": knobs}
    answer = http.post("/responses", json=body, headers={"x-request-id": rid})
    events = parse_sse(answer.text)
    assert len(events) == 7 and (None, "[DONE]") not in events  # 6 events, the error, EOF
    text = "".join(d["delta"] for _, d in events if d["type"] == "response.output_text.delta")
    assert text == "one two"
    name, failure = events[-1]
    assert failure["sequence_number"] == 6
    entry = logged(simulator, rid)
    assert entry["failed"] and not entry["completed"] and entry["stream"]
    assert entry["usage"]["completion_tokens"] == 2
    assert entry["cost"] == cost_of("openai/gpt-4o-mini", entry["usage"]["prompt_tokens"], 2)
    if shape == 1:
        assert name == "response.failed"
        response = failure["response"]
        assert response["status"] == "failed" and response["error_type"] == "provider_unavailable"
        assert response["error"] == {"code": "server_error", "message": "Provider returned error"}
        assert response["usage"]["output_tokens"] == 2 and response["usage"]["cost"] == entry["cost"]
    elif shape == 2:
        assert (name, failure) == (
            "error",
            {
                "type": "error",
                "code": "server_error",
                "message": "Provider returned error",
                "param": None,
                "sequence_number": 6,
            },
        )
    else:
        assert failure == {
            "type": "error",
            "error": {"code": 502, "message": "Provider returned error"},
            "sequence_number": 6,
        }
    stats = generation(http, entry["generation_id"])
    assert stats["total_cost"] == entry["cost"] and stats["streamed"] is True


def test_failed_event_reaches_the_sdk(sdk: openai.OpenAI) -> None:
    with sdk.responses.stream(
        model="openai/gpt-4o-mini", input="hi", extra_body={"simulator": {"stream_error": 1, "error_after": 4}}
    ) as stream:
        last = [e for e in stream][-1]
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            stream.get_final_response()
    assert last.type == "response.failed" and last.response.status == "failed"


def test_reset_after_cuts_the_stream_and_bills_so_far(http: httpx.Client, simulator: SimulatorThread) -> None:
    rid = request_id()
    knobs = {"reset_after": 5, "reply": "alpha beta gamma delta", "keepalives": 1}
    body = {"model": "openai/gpt-4o-mini", "input": "hi", "stream": True, "simulator": knobs}
    received, entry = cut_stream(http, simulator, "/responses", body, rid)
    assert b"response.completed" not in received and b'"delta":"alpha"' in received
    assert entry["usage"]["completion_tokens"] == 1


def test_malformed_event_model_served_and_provider(http: httpx.Client) -> None:
    knobs = {"malformed_after": 3, "model_served": "gpt-4o-mini-2024-07-18", "provider": "Azure"}
    body = {"model": "openai/gpt-4o-mini", "input": "hi", "stream": True, "simulator": knobs}
    text = http.post("/responses", json=body).text
    assert 'data: {"type": "response.output_text.delta", "delta": \n\n' in text
    assert '"model":"gpt-4o-mini-2024-07-18"' in text and '"provider":"Azure"' in text


def test_reasoning_follows_the_catalogue_and_the_request(http: httpx.Client) -> None:
    def kinds(model: str, **extra: Any) -> list[str]:
        body = {"model": model, "input": "hi", **extra}
        return [item["type"] for item in http.post("/responses", json=body).json()["output"]]

    assert kinds("deepseek/deepseek-v3.2") == ["message"]
    assert kinds("deepseek/deepseek-v3.2", reasoning={"effort": "low"}) == ["reasoning", "message"]
    assert kinds("deepseek/deepseek-v3.2", reasoning={"effort": "none"}) == ["message"]
    assert kinds("openai/gpt-5-mini") == ["reasoning", "message"]  # always reasons
    assert kinds("openai/gpt-4o-mini", reasoning={"effort": "high"}) == ["message"]  # never does


def test_cached_tokens_are_priced_at_the_cache_read_price(http: httpx.Client) -> None:
    body = {"model": "openai/gpt-4o-mini", "input": "a b c d e f g h", "simulator": {"cached_tokens": 5}}
    usage = http.post("/responses", json=body).json()["usage"]
    model = BY_ID["openai/gpt-4o-mini"]
    expected = (
        (usage["input_tokens"] - 5) * price(model, "prompt")
        + 5 * price(model, "input_cache_read")
        + usage["output_tokens"] * price(model, "completion")
    )
    assert usage["cost"] == float(expected) and Decimal(str(usage["cost"])) > 0
    assert usage["input_tokens_details"] == {"cached_tokens": 5}


def test_client_leaving_a_stalled_stream_is_logged_and_cancelled(
    http: httpx.Client, simulator: SimulatorThread
) -> None:
    rid = request_id()
    body = {"model": "openai/gpt-4o-mini", "input": "hi", "stream": True, "simulator": {"stall_after": 5}}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/responses", json=body, headers={"x-request-id": rid}, timeout=httpx.Timeout(20, read=0.5))
    entry = wait_until(lambda: (e := logged(simulator, rid)).get("disconnected") and e, 5)
    assert not entry["completed"] and entry["usage"]["completion_tokens"] == 1  # "Hello" was sent
    stats = generation(http, entry["generation_id"])
    assert stats["cancelled"] is True and stats["total_cost"] == entry["cost"]


def test_faults_before_headers_and_sequences(http: httpx.Client) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/responses", json={"input": "hi", "simulator": {"reset": "before_headers"}})
    knobs = {"id": request_id(), "sequence": [{"status": 503}, {"reply": "second time"}], "generation_404s": 0}
    body = {"model": "openai/gpt-4o-mini", "input": "hi", "simulator": knobs}
    assert http.post("/responses", json=body).status_code == 503
    answer = http.post("/responses", json=body)
    assert answer.json()["output"][0]["content"][0]["text"] == "second time"
    found = http.get("/generation", params={"id": answer.headers["x-generation-id"]})  # no 404 first
    assert found.status_code == 200
    body = {"model": "openai/gpt-4o-mini", "input": "hi", "simulator": {"status_for": {"openai/gpt-4o-mini": 429}}}
    assert http.post("/responses", json=body).status_code == 429


def test_an_agent_model_calls_a_tool_only_when_told(sdk: openai.OpenAI) -> None:
    """Codex sends all its tools every turn: a tool is called when the user names it or
    tool_choice forces it, never just because tools were sent."""
    plain = sdk.responses.create(model="openai/gpt-4o-mini", tools=[WEATHER], input="Reply with pong")
    assert [item.type for item in plain.output] == ["message"]
    named = sdk.responses.create(model="openai/gpt-4o-mini", tools=[WEATHER], input="get_weather for Paris")
    forced = sdk.responses.create(model="openai/gpt-4o-mini", tools=[WEATHER], tool_choice="required", input="Hi")
    assert [item.type for item in named.output] == [item.type for item in forced.output] == ["function_call"]
