"""`POST /api/v1/messages`: OpenRouter's Anthropic Messages skin (openrouter-agent-apis.md §2),
answered from the same generated text, thinking and tool calls as chat: a JSON `message`, or
named SSE events from `message_start` to `message_stop`; errors in Anthropic's envelope."""

from __future__ import annotations

import hmac
import json
from typing import Any

import orjson
from aiohttp import web

from app.simulator import generate
from app.simulator.errors import _MESSAGES, error_response
from app.simulator.event_stream import Event, Host, answer
from app.simulator.generation import Generation, split
from app.simulator.http import faults_before_headers, model_of, parse_body
from app.simulator.knobs import knobs_of

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
    504: "timeout_error",
    524: "timeout_error",
}
_STOP = {"tool_calls": "tool_use", "length": "max_tokens", "stop": "end_turn"}


async def serve(sim: Host, request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    record = sim.log.received(request, raw)
    if (refused := sim.refuse(request)) is not None:
        return record.answered(_anthropic(refused))
    payload, problem = parse_body(raw)
    if problem is not None:
        return record.answered(_anthropic(problem))
    if not isinstance(payload.get("messages"), list):
        return record.answered(error(400, {"message": "messages: Field required", "error_type": "invalid_request"}))
    knobs = knobs_of(payload, sim.attempts)
    record.knobs = knobs
    if (early := await faults_before_headers(request, knobs, error)) is not None:
        return record.answered(early)
    model, problem = model_of(payload, "messages")
    if problem is not None:
        return record.answered(_anthropic(problem))
    if (where := _bad_signature(payload["messages"])) is not None:
        message = f"{where}: Invalid `signature` in `thinking` block"
        return record.answered(error(400, {"message": message, "error_type": "invalid_request"}))
    gen = MessagesGeneration(payload, knobs, model, sim.keepalives)

    def body() -> dict[str, Any]:
        return {**gen.message(gen.content(), gen.stop_reason), "usage": gen.usage_body(gen.usage(), cost=True)}

    return await answer(sim, request, record, gen, _BROKEN, knobs.get("done") is True, body)


def error(status: int, spec: dict[str, Any]) -> web.Response:
    """Anthropic's error envelope, with OR's error class beside the type (and `Retry-After`)."""
    response = error_response(status, spec)
    message, error_type = _MESSAGES.get(status, (f"Error {status}", "unmapped"))
    kind = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    detail = {
        "type": kind,
        "message": spec.get("message") or message,
        "error_type": spec.get("error_type") or error_type,
    }
    response.body = orjson.dumps({"type": "error", "error": detail, "request_id": None})
    return response


def _anthropic(numeric: web.Response) -> web.Response:
    """One of the shared helpers' numeric-code errors, in Anthropic's envelope."""
    assert isinstance(numeric.body, bytes)
    found = orjson.loads(numeric.body)["error"]
    return error(numeric.status, {"message": found["message"], "error_type": found["metadata"]["error_type"]})


def _bad_signature(messages: list[Any]) -> str | None:
    """Where a replayed thinking block's signature does not match its text, if anywhere."""
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        content = message.get("content")
        for m, block in enumerate(content if isinstance(content, list) else []):
            if not isinstance(block, dict) or block.get("type") != "thinking":
                continue
            signature, text = block.get("signature"), block.get("thinking")
            if not isinstance(signature, str) or not hmac.compare_digest(signature, generate.sign(str(text))):
                return f"messages.{n}.content.{m}"
    return None


def chat_view(payload: dict[str, Any]) -> dict[str, Any]:
    """The request as chat `messages`/`tools`, what `generate.produce` reads."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": payload["system"]}] if payload.get("system") else []
    for message in payload["messages"]:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
        result = next((b for b in blocks if b.get("type") == "tool_result"), None)
        if message.get("role") == "user" and result is not None:
            messages.append(
                {"role": "tool", "tool_call_id": result.get("tool_use_id"), "content": result.get("content")}
            )
            continue
        entry: dict[str, Any] = {"role": message.get("role"), "content": content}
        calls = [
            {"type": "function", "function": {"name": str(b.get("name", "")), "arguments": json.dumps(b.get("input"))}}
            for b in blocks
            if b.get("type") == "tool_use"
        ]
        if calls:
            entry["tool_calls"] = calls
        messages.append(entry)
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.get("name"),
                "description": t.get("description"),
                "parameters": t.get("input_schema"),
            },
        }
        for t in payload.get("tools") or ()
        if isinstance(t, dict) and t.get("type") in (None, "custom")
    ]
    choice: Any = payload.get("tool_choice") if isinstance(payload.get("tool_choice"), dict) else {}
    choice = {"any": "required", "none": "none"}.get(
        choice.get("type"), {"function": {"name": choice.get("name")}} if choice.get("type") == "tool" else "auto"
    )
    tools = generate.named_tools(tools, choice, messages)
    thinking = payload.get("thinking")
    thinks = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    return {
        "messages": messages,
        "tools": tools,
        "tool_choice": choice,
        "reasoning": {"enabled": thinks},
        "max_tokens": payload.get("max_tokens"),
    }


class MessagesGeneration(Generation):
    """One message: its content blocks, its body, and its events."""

    def __init__(self, payload: dict[str, Any], knobs: dict[str, Any], model: dict[str, Any], keepalives: int) -> None:
        out = generate.produce(chat_view(payload), knobs, model)
        super().__init__(payload, knobs, model, out, "messages", keepalives)
        self.message_id = "msg_" + generate.random_id(24)
        self.tool_id = "toolu_" + generate.random_id(24)
        writes = knobs.get("cache_write_tokens")
        self.cache_write = min(writes, out.prompt_tokens - out.cached_tokens) if isinstance(writes, int) else 0
        self.cache_write = max(self.cache_write, 0)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "api_type": "messages"}

    def usage(self) -> dict[str, Any]:
        """What was produced so far, with the cache writes chat's generation has no knob for."""
        sent = super().usage()
        reasoning = sent["completion_tokens_details"]["reasoning_tokens"]
        return self._priced(sent["completion_tokens"], reasoning)

    def final_usage(self) -> dict[str, Any]:
        return self._priced(self.out.completion_tokens(), self.out.reasoning_tokens)

    def _priced(self, completion: int, reasoning: int) -> dict[str, Any]:
        out = self.out
        return generate.usage(self.model, out.prompt_tokens, completion, reasoning, out.cached_tokens, self.cache_write)

    def usage_body(self, usage: dict[str, Any], cost: bool) -> dict[str, Any]:
        """Chat usage in Anthropic terms: `input_tokens` leaves out the cache reads and writes."""
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        body: dict[str, Any] = {
            "input_tokens": usage["prompt_tokens"] - cached - self.cache_write,
            "output_tokens": usage["completion_tokens"],
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": cached,
        }
        if cost and self.knobs.get("usage_cost") is not False:
            body.update(cost=usage["cost"], is_byok=False, cost_details=usage["cost_details"])
        return body

    @property
    def stop_reason(self) -> str:
        return _STOP.get(self.out.finish_reason, "end_turn")

    def message(self, content: list[dict[str, Any]], stop_reason: str | None) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model_name,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "provider": self.provider,
        }

    def content(self) -> list[dict[str, Any]]:
        out = self.out
        blocks = []
        if out.reasoning:
            blocks.append({"type": "thinking", "thinking": out.reasoning, "signature": generate.sign(out.reasoning)})
        if out.tool:
            blocks.append(
                {"type": "tool_use", "id": self.tool_id, "name": out.tool["function"]["name"], "input": self._input()}
            )
        else:
            blocks.append({"type": "text", "text": out.content})
        return blocks

    def _input(self) -> Any:
        assert self.out.tool is not None
        try:
            return json.loads(self.out.tool["function"]["arguments"])
        except ValueError:  # a `tool_arguments` knob that is not JSON
            return {}

    # -- streaming ---------------------------------------------------------------------------
    def events(self) -> list[Event]:
        start = self.usage_body(self.final_usage(), cost=False)
        start["output_tokens"] = 1
        if self.knobs.get("start_usage") == "zero":
            start = dict.fromkeys(start, 0)
        steps: list[dict[str, Any]] = [
            {"type": "message_start", "message": {**self.message([], None), "usage": start}},
            {"type": "ping"},
        ]
        out = self.out
        blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        if out.reasoning:
            deltas = [{"type": "thinking_delta", "thinking": p} for p in generate.pieces(out.reasoning)]
            deltas.append({"type": "signature_delta", "signature": generate.sign(out.reasoning)})
            blocks.append(({"type": "thinking", "thinking": ""}, deltas))
        if out.tool:
            name, arguments = out.tool["function"]["name"], out.tool["function"]["arguments"]
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in split(arguments, 3)]
            blocks.append(({"type": "tool_use", "id": self.tool_id, "name": name, "input": {}}, deltas))
        else:
            blocks.append(
                (
                    {"type": "text", "text": ""},
                    [{"type": "text_delta", "text": p} for p in generate.pieces(out.content)],
                )
            )
        for index, (block, deltas) in enumerate(blocks):
            steps.append({"type": "content_block_start", "index": index, "content_block": block})
            steps += [{"type": "content_block_delta", "index": index, "delta": d} for d in deltas]
            steps.append({"type": "content_block_stop", "index": index})
        usage = self.usage_body(self.final_usage(), cost=False)
        if self.knobs.get("stream_cost") is True:
            usage["cost"] = self.final_usage()["cost"]
        delta = {"stop_reason": self.stop_reason, "stop_sequence": None}
        steps.append({"type": "message_delta", "delta": delta, "usage": usage})
        steps.append({"type": "message_stop"})
        return [(step["type"], step) for step in steps]

    def produced(self, data: dict[str, Any]) -> None:
        delta: dict[str, Any] = data["delta"] if data["type"] == "content_block_delta" else {}
        kind = delta.get("type")
        if kind == "text_delta":
            self.emitted += delta["text"]
        elif kind == "thinking_delta":
            self.reasoning_sent = True
        elif kind == "input_json_delta":
            self.tool_sent = True

    def failure(self, sequence: int) -> list[Event]:
        overloaded = {"type": "overloaded_error", "message": "Overloaded", "error_type": "provider_overloaded"}
        return [("error", {"type": "error", "error": overloaded})]


_BROKEN = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": \n\n'
