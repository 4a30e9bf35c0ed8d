"""The official `openai` package, pointed at the gateway (pointed at the simulator), gets the
objects it expects: chat (streamed and not), usage, tools, reasoning, completions,
embeddings, models."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from app.simulator import SimulatorThread
from app.simulator.catalogue import BY_ID
from tests.support import request_id

HELLO = [{"role": "user", "content": "Hello there, gateway!"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def extra(obj: Any, name: str) -> Any:
    """A field OpenRouter adds that the SDK keeps as an extra (e.g. `reasoning`, `cost`)."""
    return (obj.model_extra or {}).get(name)


def test_non_streaming_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("gen-")
    assert reply.model == "openai/gpt-4o-mini"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "Hello from openai/gpt-4o-mini! You said: Hello there, gateway!"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert extra(reply.usage, "cost") > 0


def test_streaming_chat_reassembles_content_exactly(client: openai.OpenAI) -> None:
    text = 'Héllo, wörld! 🚀 Several   spaces,\nnew lines\tand tabs; "quotes" and \\backslashes\\ stay.'
    stream = client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=HELLO, stream=True, extra_body={"simulator": {"reply": text}}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("gen-") for c in chunks)


@pytest.mark.parametrize("variant", ["empty_choices", "choice", "finish"])
def test_usage_chunk_only_when_asked(client: openai.OpenAI, variant: str) -> None:
    knobs = {"simulator": {"usage_variant": variant}, "reasoning": {"effort": "low"}}
    asked = list(
        client.chat.completions.create(
            model="deepseek/deepseek-v3.2",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=knobs,
        )
    )
    with_usage = [c for c in asked if c.usage is not None]
    assert len(with_usage) == 1 and asked[-1] is with_usage[0]
    assert asked[-1].choices == []  # OpenAI's shape, whatever shape OpenRouter used
    usage = with_usage[0].usage
    assert usage is not None and usage.completion_tokens > 0
    assert usage.completion_tokens_details is not None and usage.completion_tokens_details.reasoning_tokens > 0
    assert extra(usage, "cost") > 0
    assert [c.choices[0].finish_reason for c in asked if c.choices and c.choices[0].finish_reason] == ["stop"]

    silent = list(
        client.chat.completions.create(model="deepseek/deepseek-v3.2", messages=HELLO, stream=True, extra_body=knobs)
    )
    assert all(c.usage is None for c in silent)
    assert all(c.choices for c in silent), "no empty-choices chunk reaches a client that did not ask"
    assert [c.choices[0].finish_reason for c in silent if c.choices[0].finish_reason] == ["stop"]
    assert "".join(c.choices[0].delta.content or "" for c in silent) == "".join(
        c.choices[0].delta.content or "" for c in asked if c.choices
    )


def test_tool_call_non_streaming(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO, tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 1}


def test_tool_call_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="anthropic/claude-sonnet-4.5",
        messages=HELLO,
        tools=[WEATHER_TOOL],
        stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    name, arguments, ids, finish = "", "", [], None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                ids += [delta.id] if delta.id else []
                name += delta.function.name or "" if delta.function else ""
                arguments += delta.function.arguments or "" if delta.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert len(ids) == 1 and ids[0].startswith("toolu_")
    assert name == "get_weather"
    assert json.loads(arguments) == {"city": "Paris", "days": 1}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_arguments_stay_as_sent(client: openai.OpenAI, stream: bool) -> None:
    """A tool without parameters may finish with arguments "" (Bedrock); we do not rewrite it."""
    body = {"simulator": {"tool_arguments": ""}}
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="openai/gpt-4o-mini", messages=HELLO, tools=[WEATHER_TOOL], stream=True, extra_body=body
            )
        )
        arguments = "".join(
            d.function.arguments or ""
            for c in chunks
            for ch in c.choices
            for d in ch.delta.tool_calls or ()
            if d.function
        )
    else:
        reply = client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=HELLO, tools=[WEATHER_TOOL], extra_body=body
        )
        assert reply.choices[0].message.tool_calls is not None
        arguments = reply.choices[0].message.tool_calls[0].function.arguments
    assert arguments == ""


def test_reasoning_round_trips_unchanged(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    first = client.chat.completions.create(model="deepseek/deepseek-v3.2", messages=HELLO, reasoning_effort="high")
    message = first.choices[0].message
    reasoning, details = extra(message, "reasoning"), extra(message, "reasoning_details")
    assert isinstance(reasoning, str) and reasoning
    assert details == [{"type": "reasoning.text", "text": reasoning, "format": "unknown", "index": 0}]
    assert first.usage is not None and first.usage.completion_tokens_details is not None
    assert first.usage.completion_tokens_details.reasoning_tokens > 0

    rid = request_id()
    assistant = {"role": "assistant", "content": message.content, "reasoning_details": details}
    client.chat.completions.create(
        model="deepseek/deepseek-v3.2",
        messages=[*HELLO, assistant, {"role": "user", "content": "And now?"}],
        extra_headers={"x-request-id": rid},
    )
    (sent,) = simulator.find(rid)
    assert json.loads(sent["body"])["messages"][1]["reasoning_details"] == details


def test_streamed_signed_reasoning_round_trips(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    """Anthropic thinking blocks arrive in pieces with a final signature; replayed exactly, the
    (simulated) provider accepts them, and it would refuse an edited one."""
    stream = client.chat.completions.create(
        model="anthropic/claude-sonnet-4.5", messages=HELLO, stream=True, extra_body={"reasoning": {"max_tokens": 2048}}
    )
    details: list[dict[str, Any]] = []
    content, reasoning = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            details += extra(choice.delta, "reasoning_details") or []
            reasoning += extra(choice.delta, "reasoning") or ""
            content += choice.delta.content or ""
    assert reasoning and any(d.get("signature") for d in details)
    rid = request_id()
    assistant = {"role": "assistant", "content": content, "reasoning_details": details}
    reply = client.chat.completions.create(
        model="anthropic/claude-sonnet-4.5",
        messages=[*HELLO, assistant, {"role": "user", "content": "More?"}],
        extra_headers={"x-request-id": rid},
    )
    assert reply.choices[0].message.content
    (sent,) = simulator.find(rid)
    assert json.loads(sent["body"])["messages"][1]["reasoning_details"] == details

    tampered = [dict(d) for d in details]
    tampered[0]["text"] = "edited " + tampered[0]["text"]
    with pytest.raises(openai.BadRequestError, match="signature"):
        client.chat.completions.create(
            model="anthropic/claude-sonnet-4.5",
            messages=[*HELLO, {**assistant, "reasoning_details": tampered}, {"role": "user", "content": "More?"}],
        )


def test_legacy_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="openai/gpt-4o-mini", prompt="Say hello")
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "Hello from openai/gpt-4o-mini! You said: Say hello"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0

    chunks = list(client.completions.create(model="openai/gpt-4o-mini", prompt="Say hello", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="openai/text-embedding-3-small", input=["first text", "second text"])
    assert result.object == "list"
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 256 for d in result.data)
    assert abs(sum(v * v for v in result.data[0].embedding) - 1.0) < 1e-3  # unit vectors, decoded from base64
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens == 4

    floats = client.embeddings.create(
        model="openai/text-embedding-3-small", input="first text", encoding_format="float", dimensions=8
    )
    assert len(floats.data[0].embedding) == 8


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(BY_ID) <= set(models)
    deepseek = models["deepseek/deepseek-v3.2"]
    assert deepseek.object == "model" and deepseek.owned_by == "deepseek"
    assert extra(deepseek, "context_length") == 163840
    assert extra(deepseek, "pricing")["prompt"] == "0.00000028"
    assert extra(deepseek, "pricing")["completion"] == "0.0000004"
    assert extra(models["gpt-4o-mini"], "alias_of") == "openai/gpt-4o-mini"

    one = client.models.retrieve("deepseek/deepseek-v3.2")
    assert one.id == "deepseek/deepseek-v3.2" and extra(one, "context_length") == 163840
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nobody/no-such-model")


def test_openrouter_style_prefix(gateway: Any) -> None:
    with openai.OpenAI(
        base_url=gateway.url + "/api/v1", api_key=gateway.settings.api_key.get_secret_value(), max_retries=0
    ) as sdk:
        reply = sdk.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
        assert reply.choices[0].message.content
        assert any(m.id == "openai/gpt-4o-mini" for m in sdk.models.list())
