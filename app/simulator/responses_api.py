"""`POST /api/v1/responses`: OpenRouter's stateless OpenAI Responses API (openrouter-agent-apis.md
§1), answered from the same generated text, reasoning and tool calls as chat: a JSON `response`,
or SSE events ending in `response.completed` / `.incomplete` (or an in-stream failure)."""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import time
from typing import Any

import orjson
from aiohttp import web

from app.simulator import generate
from app.simulator.errors import _MESSAGES, error_response
from app.simulator.event_stream import Event, Host, answer
from app.simulator.generation import Generation, split
from app.simulator.http import faults_before_headers, json_response, model_of, parse_body
from app.simulator.knobs import knobs_of

ENCRYPTED = "reasoning.encrypted_content"


async def serve(sim: Host, request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    record = sim.log.received(request, raw)
    if (refused := sim.refuse(request)) is not None:
        return record.answered(refused)
    payload, problem = parse_body(raw)
    if problem is not None or (problem := _invalid(payload)) is not None:
        return record.answered(problem)
    knobs = knobs_of(payload, sim.attempts)
    record.knobs = knobs
    if (early := await faults_before_headers(request, knobs, error)) is not None:
        return record.answered(early)
    model, problem = model_of(payload, "responses")
    if problem is None and not _replays_verified(payload):
        spec = {"message": "Invalid encrypted_content in reasoning item", "error_type": "invalid_request"}
        problem = error_response(400, spec)
    if problem is not None:
        return record.answered(problem)
    gen = ResponsesGeneration(payload, knobs, model, sim.keepalives)

    def body() -> dict[str, Any]:
        return gen.body(gen.status, gen.items(), gen.usage_body(gen.usage()))

    return await answer(sim, request, record, gen, gen.broken(), knobs.get("omit_done") is not True, body)


def error(status: int, knobs: dict[str, Any]) -> web.Response:
    """The `status` knob's error: OR's numeric body, or (`error_shape: "responses"`) the
    Responses skin's string code with the precise class in `error_type`."""
    response = error_response(status, knobs)
    if knobs.get("error_shape") == "responses":
        message, error_type = _MESSAGES.get(status, (f"Error {status}", "unmapped"))
        code = {400: "invalid_prompt", 429: "rate_limit_exceeded"}.get(status, "server_error")
        response.body = orjson.dumps(
            {
                "error": {"code": code, "message": knobs.get("message") or message},
                "error_type": knobs.get("error_type") or error_type,
            }
        )
    return response


def encrypt(text: str) -> str:
    """A reasoning item's `encrypted_content`: the text, signed so a replay can be verified."""
    return "enc_" + base64.b64encode(text.encode()).decode() + "." + generate.sign(text)


def _invalid(payload: dict[str, Any]) -> web.Response | None:
    """OR's schema check: the API is stateless, and `input` is required."""
    if "store" in payload and payload["store"] is not False:
        raw = {
            "code": "invalid_value",
            "values": [False],
            "path": ["store"],
            "message": "Invalid input: expected false",
        }
    elif payload.get("previous_response_id") is not None:
        raw = {
            "code": "invalid_value",
            "values": [None],
            "path": ["previous_response_id"],
            "message": "Invalid input: expected null",
        }
    elif not isinstance(payload.get("input"), (str, list)):
        raw = {"code": "invalid_type", "path": ["input"], "message": "Invalid input: expected string or array"}
    else:
        return None
    body = {"error": {"code": "invalid_prompt", "message": "Invalid Responses API request"}, "metadata": {"raw": [raw]}}
    return json_response(body, status=400)


def _replays_verified(payload: dict[str, Any]) -> bool:
    items = payload["input"] if isinstance(payload["input"], list) else []
    for item in items:
        sealed = item.get("encrypted_content") if isinstance(item, dict) and item.get("type") == "reasoning" else None
        if sealed is None:
            continue
        if not isinstance(sealed, str) or not sealed.startswith("enc_"):
            return False
        encoded, _, signature = sealed[4:].partition(".")
        try:
            text = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not hmac.compare_digest(signature, generate.sign(text)):
            return False
    return True


def chat_view(payload: dict[str, Any]) -> dict[str, Any]:
    """The request as chat `messages`/`tools`, what `generate.produce` reads."""
    messages: list[dict[str, Any]] = []
    if isinstance(payload.get("instructions"), str):
        messages.append({"role": "system", "content": payload["instructions"]})
    source = payload.get("input")
    for item in [{"role": "user", "content": source}] if isinstance(source, str) else source or []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            role = "system" if item.get("role") == "developer" else item.get("role")
            messages.append({"role": role, "content": item.get("content")})
        elif kind == "function_call":
            call = {"name": str(item.get("name", "")), "arguments": str(item.get("arguments", ""))}
            messages.append(
                {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]}
            )
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
    tools = [
        {"type": "function", "function": {k: t.get(k) for k in ("name", "description", "parameters")}}
        for t in payload.get("tools") or ()
        if isinstance(t, dict) and t.get("type") == "function"
    ]
    choice = payload.get("tool_choice", "auto")
    if isinstance(choice, dict):
        choice = {"function": {"name": choice.get("name")}} if choice.get("type") == "function" else "auto"
    tools = generate.named_tools(tools, choice, messages)
    view = {"messages": messages, "tools": tools, "tool_choice": choice, "max_tokens": payload.get("max_output_tokens")}
    if "reasoning" in payload:
        view["reasoning"] = payload["reasoning"]
    return view


class ResponsesGeneration(Generation):
    """One response: its output items, its body, and its events."""

    def __init__(self, payload: dict[str, Any], knobs: dict[str, Any], model: dict[str, Any], keepalives: int) -> None:
        out = generate.produce(chat_view(payload), knobs, model)
        super().__init__(payload, knobs, model, out, "responses", keepalives)
        self.response_id = "resp_" + generate.random_id(24)
        self.item_ids = {k: f"{k}_{secrets.token_hex(16)}" for k in ("rs", "msg", "fc")}
        self.call_id = "call_" + secrets.token_hex(12)
        self.named = knobs.get("event_names") is not False
        include = payload.get("include")
        self.encrypted = isinstance(include, list) and ENCRYPTED in include

    @property
    def status(self) -> str:
        return "incomplete" if self.out.finish_reason == "length" else "completed"

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "api_type": "responses"}

    def final_usage(self) -> dict[str, Any]:
        out = self.out
        return generate.usage(
            self.model, out.prompt_tokens, out.completion_tokens(), out.reasoning_tokens, out.cached_tokens
        )

    def usage_body(self, usage: dict[str, Any]) -> dict[str, Any]:
        """Chat usage in Responses terms (input counts the cached tokens, output the reasoning)."""
        body: dict[str, Any] = {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": usage["total_tokens"],
        }
        if self.knobs.get("usage_cost") is not False:
            costs = usage["cost_details"]
            body["cost"] = usage["cost"]
            body["cost_details"] = {
                "upstream_inference_cost": costs["upstream_inference_cost"],
                "upstream_inference_input_cost": costs["upstream_inference_prompt_cost"],
                "upstream_inference_output_cost": costs["upstream_inference_completions_cost"],
            }
        body["is_byok"] = False
        return body

    def body(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        p = self.payload
        text = p.get("text") if isinstance(p.get("text"), dict) else {"format": {"type": "text"}}
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "model": self.model_name,
            "status": status,
            "output": output,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": usage,
            "provider": self.provider,
            "instructions": p.get("instructions"),
            "tools": p.get("tools") or [],
            "tool_choice": p.get("tool_choice", "auto"),
            "parallel_tool_calls": p.get("parallel_tool_calls", True),
            "reasoning": p.get("reasoning"),
            "max_output_tokens": p.get("max_output_tokens"),
            "temperature": p.get("temperature"),
            "top_p": p.get("top_p"),
            "metadata": p.get("metadata") or {},
            "store": False,
            "text": text,
        }

    # -- output items, finished (done) or as first announced --------------------------------
    def items(self) -> list[dict[str, Any]]:
        reasoning = [self._reasoning_item(True)] if self.out.reasoning else []
        return [*reasoning, self._call_item(True) if self.out.tool else self._message_item(True)]

    def _reasoning_item(self, done: bool) -> dict[str, Any]:
        text = self.out.reasoning or ""
        return {
            "type": "reasoning",
            "id": self.item_ids["rs"],
            "summary": [{"type": "summary_text", "text": text}] if done else [],
            "encrypted_content": encrypt(text) if done and self.encrypted else None,
            "status": "completed" if done else "in_progress",
        }

    def _message_item(self, done: bool) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.item_ids["msg"],
            "role": "assistant",
            "status": ("incomplete" if self.status == "incomplete" else "completed") if done else "in_progress",
            "content": [_text_part(self.out.content)] if done else [],
        }

    def _call_item(self, done: bool) -> dict[str, Any]:
        assert self.out.tool is not None
        function = self.out.tool["function"]
        return {
            "type": "function_call",
            "id": self.item_ids["fc"],
            "call_id": self.call_id,
            "name": function["name"],
            "arguments": function["arguments"] if done else "",
            "status": "completed" if done else "in_progress",
        }

    # -- streaming ---------------------------------------------------------------------------
    def events(self) -> list[Event]:
        started = self.body("in_progress", [], None)
        steps: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": started}),
            ("response.in_progress", {"response": started}),
        ]
        index = 0
        if self.out.reasoning:
            steps += self._reasoning_steps(index)
            index += 1
        steps += self._call_steps(index) if self.out.tool else self._message_steps(index)
        final = self.body(self.status, self.items(), self.usage_body(self.final_usage()))
        steps.append((f"response.{self.status}", {"response": final}))
        return [self._event(kind, n, fields) for n, (kind, fields) in enumerate(steps)]

    def _event(self, kind: str, sequence: int, fields: dict[str, Any]) -> Event:
        return (kind if self.named else None, {"type": kind, "sequence_number": sequence, **fields})

    def _reasoning_steps(self, index: int) -> list[tuple[str, dict[str, Any]]]:
        text = self.out.reasoning or ""
        at = {"item_id": self.item_ids["rs"], "output_index": index, "summary_index": 0}
        return [
            ("response.output_item.added", {"output_index": index, "item": self._reasoning_item(False)}),
            ("response.reasoning_summary_part.added", {**at, "part": {"type": "summary_text", "text": ""}}),
            *[("response.reasoning_summary_text.delta", {**at, "delta": p}) for p in generate.pieces(text)],
            ("response.reasoning_summary_text.done", {**at, "text": text}),
            ("response.reasoning_summary_part.done", {**at, "part": {"type": "summary_text", "text": text}}),
            ("response.output_item.done", {"output_index": index, "item": self._reasoning_item(True)}),
        ]

    def _message_steps(self, index: int) -> list[tuple[str, dict[str, Any]]]:
        text = self.out.content
        at = {"item_id": self.item_ids["msg"], "output_index": index, "content_index": 0}
        return [
            ("response.output_item.added", {"output_index": index, "item": self._message_item(False)}),
            ("response.content_part.added", {**at, "part": _text_part("")}),
            *[("response.output_text.delta", {**at, "delta": p, "logprobs": []}) for p in generate.pieces(text)],
            ("response.output_text.done", {**at, "text": text, "logprobs": []}),
            ("response.content_part.done", {**at, "part": _text_part(text)}),
            ("response.output_item.done", {"output_index": index, "item": self._message_item(True)}),
        ]

    def _call_steps(self, index: int) -> list[tuple[str, dict[str, Any]]]:
        item = self._call_item(True)
        at = {"item_id": item["id"], "output_index": index}
        return [
            ("response.output_item.added", {"output_index": index, "item": self._call_item(False)}),
            *[("response.function_call_arguments.delta", {**at, "delta": p}) for p in split(item["arguments"], 3)],
            ("response.function_call_arguments.done", {**at, "name": item["name"], "arguments": item["arguments"]}),
            ("response.output_item.done", {"output_index": index, "item": item}),
        ]

    def produced(self, data: dict[str, Any]) -> None:
        kind = data["type"]
        if kind == "response.output_text.delta":
            self.emitted += data["delta"]
        elif kind == "response.reasoning_summary_text.delta":
            self.reasoning_sent = True
        elif kind == "response.function_call_arguments.delta":
            self.tool_sent = True

    def failure(self, sequence: int) -> list[Event]:
        """Shape 1: `response.failed` (usage so far); 2: the spec's flat `error`; 3: a nested one."""
        message = "Provider returned error"
        shape = int(self.knobs["stream_error"])
        if shape == 1:
            failed = {
                **self.body("failed", [], self.usage_body(self.usage())),
                "error": {"code": "server_error", "message": message},
                "error_type": "provider_unavailable",
            }
            return [self._event("response.failed", sequence, {"response": failed})]
        if shape == 2:
            return [self._event("error", sequence, {"code": "server_error", "message": message, "param": None})]
        return [self._event("error", sequence, {"error": {"code": 502, "message": message}})]

    def broken(self) -> bytes:
        head = b"event: response.output_text.delta\n" if self.named else b""
        return head + b'data: {"type": "response.output_text.delta", "delta": \n\n'


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
