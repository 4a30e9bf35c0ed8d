"""`POST /v1/responses` through the gateway, with openai-python's `responses.create` and
`responses.stream` against the simulator: text, a function-call round trip with a reasoning
item passed back unchanged, the stateless guard, errors in OpenAI's envelope, streams that
fail or are cut ending with `response.failed`, and cost in the ledger equal to what the
simulator billed."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from app.simulator import SimulatorThread
from tests.agent_support import agent_gateway, key_usage, new_key, team_metrics, wait_for_ledger
from tests.support import UPSTREAM_KEY, GatewayServer

MINI = "openai/gpt-4o-mini"
REASONER = "openai/gpt-5-mini"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def gateway(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    with agent_gateway(simulator) as server:
        yield server


@pytest.fixture
def key(gateway: GatewayServer) -> dict[str, Any]:
    return new_key(gateway)


@pytest.fixture
def marker() -> str:
    return "resp-" + uuid.uuid4().hex


def sdk(gateway: GatewayServer, key: dict[str, Any], marker: str) -> openai.OpenAI:
    counter = iter(range(1000))
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key["key"], max_retries=0, timeout=20)

    def tag(request: httpx.Request) -> None:
        request.headers["x-request-id"] = f"{marker}-{next(counter)}"

    client._client.event_hooks["request"].append(tag)
    return client


def test_create_returns_the_text_and_the_ledger_holds_its_exact_cost(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str
) -> None:
    with sdk(gateway, key, marker) as client:
        response = client.responses.create(model=MINI, input="Hello there, gateway!")
    assert response.status == "completed" and response.object == "response"
    assert response.output_text == f"Hello from {MINI}! You said: Hello there, gateway!"
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    cost = wait_for_ledger(gateway, simulator, key, marker)
    assert Decimal(repr((response.usage.model_extra or {})["cost"])) == cost
    total = key_usage(gateway, key)
    assert total["requests"] == 1 and total["prompt_tokens"] == response.usage.input_tokens
    cost = wait_for_ledger(gateway, simulator, key, marker)
    metered, endpoints = team_metrics(gateway, key["team"])
    assert abs(metered - cost) < Decimal("1e-9") and endpoints == {"responses"}


def test_stream_delivers_every_event_and_the_final_response(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str
) -> None:
    text = 'Héllo, wörld! 🚀 "quotes" and \\backslashes\\ stay.'
    with (
        sdk(gateway, key, marker) as client,
        client.responses.stream(model=MINI, input="hi", extra_body={"simulator": {"reply": text}}) as stream,
    ):
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") > 1
    assert final.output_text == text and final.usage is not None
    wait_for_ledger(gateway, simulator, key, marker)


def test_a_function_call_round_trip_passes_the_reasoning_item_back_unchanged(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str
) -> None:
    asked = {"model": REASONER, "tools": [WEATHER], "reasoning": {"effort": "low"}}
    with sdk(gateway, key, marker) as client:
        first = client.responses.create(
            input="Use get_weather: what is the weather in Paris?", include=["reasoning.encrypted_content"], **asked
        )
        kinds = [item.type for item in first.output]
        assert kinds == ["reasoning", "function_call"]
        reasoning, call = first.output
        assert reasoning.encrypted_content  # type: ignore[union-attr]
        history: list[Any] = [
            {"role": "user", "content": "Use get_weather: what is the weather in Paris?"},
            *(item.model_dump(exclude_none=True) for item in first.output),
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"},  # type: ignore[union-attr]
        ]
        second = client.responses.create(input=history, **asked)
    assert second.output_text.startswith("The tool answered: 18 C and sunny")
    sent = [e for e in simulator.requests() if e["headers"].get("x-request-id", "").startswith(marker)]
    replayed = json.loads(sent[-1]["body"])["input"][1]
    assert replayed["encrypted_content"] == reasoning.encrypted_content  # type: ignore[union-attr]
    assert (second.usage.output_tokens_details.reasoning_tokens or 0) > 0  # type: ignore[union-attr]
    wait_for_ledger(gateway, simulator, key, marker)


def test_a_tampered_reasoning_item_is_refused_upstream(
    gateway: GatewayServer, key: dict[str, Any], marker: str
) -> None:
    """The simulator checks encrypted_content, so the round trip above proves a byte-exact relay."""
    item = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "enc_dGFtcGVyZWQ=.bm90LXNpZ25lZA=="}
    with sdk(gateway, key, marker) as client, pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=REASONER, input=[{"role": "user", "content": "hi"}, item])
    assert "encrypted_content" in str(refused.value)


@pytest.mark.parametrize(
    ("extra", "param"), [({"store": True}, "store"), ({"previous_response_id": "resp_123"}, "previous_response_id")]
)
def test_stateful_requests_get_a_clear_400_and_never_go_upstream(
    gateway: GatewayServer,
    simulator: SimulatorThread,
    key: dict[str, Any],
    marker: str,
    extra: dict[str, Any],
    param: str,
) -> None:
    with sdk(gateway, key, marker) as client, pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MINI, input="hi", **extra)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == param and "stateless" in error["message"]
    assert "input" in error["message"]  # it says what to send instead
    assert not [e for e in simulator.requests() if e["headers"].get("x-request-id", "").startswith(marker)]


def test_upstream_sees_our_key_attribution_and_the_session(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str
) -> None:
    with httpx.Client(base_url=gateway.url, timeout=20) as http:
        answer = http.post(
            "/api/v1/responses",
            json={"model": "gpt-4o-mini", "input": "hi", "stream": True, "prompt_cache_key": "conv-1"},
            headers={"Authorization": f"Bearer {key['key']}", "session-id": "codex-session", "x-request-id": marker},
        )
    assert answer.status_code == 200 and "response.completed" in answer.text
    (sent,) = [e for e in simulator.requests() if e["headers"].get("x-request-id") == marker]
    headers = sent["headers"]
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}" and key["key"] not in json.dumps(headers)
    assert headers["x-session-id"] == "codex-session"  # the header wins over prompt_cache_key
    assert headers["http-referer"] == "https://example.com/our-app" and headers["x-openrouter-title"]
    assert sent["path"] == "/api/v1/responses" and json.loads(sent["body"])["model"] == MINI  # the alias resolved


def test_upstream_errors_come_in_openai_shape(gateway: GatewayServer, key: dict[str, Any], marker: str) -> None:
    with sdk(gateway, key, marker) as client, pytest.raises(openai.RateLimitError) as limited:
        client.responses.create(
            model=MINI,
            input="hi",
            extra_body={"simulator": {"status": 429, "retry_after": 7, "error_shape": "responses"}},
        )
    assert limited.value.response.headers["retry-after"] == "7"
    assert set(limited.value.body) >= {"message", "type", "code"}  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [1, 2, 3])
def test_a_stream_that_fails_ends_with_response_failed(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str, shape: int
) -> None:
    with sdk(gateway, key, marker) as client:
        stream = client.responses.create(
            model=MINI, input="hi", stream=True, extra_body={"simulator": {"stream_error": shape, "error_after": 4}}
        )
        kinds = [event.type for event in stream]
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds
    wait_for_ledger(gateway, simulator, key, marker)


def test_a_cut_stream_ends_with_response_failed_and_is_billed_from_generation(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str
) -> None:
    with sdk(gateway, key, marker) as client:
        stream = client.responses.create(
            model=MINI, input="hi", stream=True, extra_body={"simulator": {"reset_after": 5, "words": 30}}
        )
        events = list(stream)
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None  # type: ignore[union-attr]
    wait_for_ledger(gateway, simulator, key, marker)


@pytest.mark.parametrize("stream", [False, True])
def test_usage_without_cost_is_priced_from_generation(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str, stream: bool
) -> None:
    with sdk(gateway, key, marker) as client:
        if stream:
            with client.responses.stream(
                model=MINI, input="hi", extra_body={"simulator": {"usage_cost": False}}
            ) as events:
                events.get_final_response()
        else:
            client.responses.create(model=MINI, input="hi", extra_body={"simulator": {"usage_cost": False}})
    wait_for_ledger(gateway, simulator, key, marker)


def test_the_agents_sdk_runs_a_tool_loop_on_a_team_key(
    gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str
) -> None:
    """docs/agents.md's Agents SDK setup, with a function tool: the SDK calls the tool the model
    asked for and sends its output back with the reasoning item; both turns metered on the key."""
    from agents import (
        Agent,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_default_openai_client,
        set_tracing_disabled,
    )

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        return f"18 C and sunny in {city}"

    client = openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key=key["key"], default_headers={"x-request-id": marker}
    )
    set_default_openai_client(client, use_for_tracing=False)
    set_tracing_disabled(True)
    agent = Agent(
        name="Assistant",
        instructions="Answer in one line.",
        model=OpenAIResponsesModel(model=REASONER, openai_client=client),
        tools=[get_weather],
    )
    result = Runner.run_sync(agent, "Use get_weather for Paris")
    assert result.final_output.startswith("The tool answered: 18 C and sunny in Paris")
    turns = [json.loads(e["body"]) for e in simulator.requests() if e["headers"].get("x-request-id") == marker]
    assert len(turns) == 2
    replayed = [item.get("type") for item in turns[1]["input"]]
    assert "reasoning" in replayed and "function_call" in replayed and "function_call_output" in replayed
    cost = wait_for_ledger(gateway, simulator, key, marker)
    assert key_usage(gateway, key)["requests"] == 2 and cost > 0
