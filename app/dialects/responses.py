"""OpenAI's Responses API, as OpenRouter serves it: stateless.

What differs from chat: `input` instead of `messages`, `max_output_tokens`, `reasoning` already
in OpenRouter's terms, usage named `input_tokens` / `output_tokens` (cached and reasoning
inside their `*_details`), and a stream of typed events ending with `response.completed`,
`response.incomplete` or `response.failed`. A stream that fails or is cut ends with a
`response.failed` event (Codex retries a silent end; openai-python raises on a top-level
`error` key, so none is ever added to an event). `store: true` and `previous_response_id` need
state OpenRouter does not keep: refused here with a 400 that says what to send instead.
Codex's session header (`session-id`, once `session_id`) or `prompt_cache_key` becomes
`x-session-id`, which keeps OpenRouter's provider routing (and so its cache) sticky.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from app.dialects.base import Dialect, Relay
from app.dialects.events import EventRelay, upstream_error
from app.errors import GatewayError, InvalidRequestError
from app.usage.record import Usage

STATELESS = (
    "OpenRouter's Responses API is stateless: it keeps no responses, so '{field}' cannot work. "
    "Send the whole conversation in 'input' on every turn (earlier output items, reasoning items "
    "with their encrypted_content, function calls and their outputs), with 'store': false or no 'store'."
)
SESSION_HEADERS = ("session-id", "session_id")


class Responses(Dialect):
    name = "responses"
    upstream_path = "/responses"
    routes = ("/responses",)
    required = (("input", (str, list)),)
    expect = "output"
    output_limits = ("max_output_tokens",)
    summary = "Create a model response (stateless)"

    def check(self, payload: dict[str, Any]) -> None:
        if "store" in payload and payload["store"] is not False:
            raise InvalidRequestError(STATELESS.format(field="store"), param="store", code="unsupported_parameter")
        if payload.get("previous_response_id") is not None:
            message = STATELESS.format(field="previous_response_id")
            raise InvalidRequestError(message, param="previous_response_id", code="unsupported_parameter")
        super().check(payload)

    def wants_usage(self, payload: dict[str, Any]) -> bool:
        return True  # the terminal event always carries it

    def fold_reasoning(self, payload: dict[str, Any]) -> bool:
        return False  # `reasoning` is this API's own control, and OpenRouter's

    def upstream_headers(self, headers: Mapping[str, str], payload: dict[str, Any]) -> dict[str, str]:
        session = next((headers[name] for name in SESSION_HEADERS if headers.get(name)), None)
        session = session or payload.get("prompt_cache_key")
        return {"x-session-id": session[:256]} if isinstance(session, str) and session else {}

    def usage_of(self, body: dict[str, Any]) -> Usage | None:
        return usage_from(body.get("usage"))

    def relay(self, include_usage: bool) -> Relay:
        return ResponsesRelay()


def usage_from(usage: Any) -> Usage | None:
    """Responses usage: input includes cached, output includes reasoning (as OpenRouter counts)."""
    if not isinstance(usage, dict):
        return None
    inputs = usage.get("input_tokens_details")
    outputs = usage.get("output_tokens_details")
    return Usage.from_counts(
        usage.get("input_tokens"),
        usage.get("output_tokens"),
        outputs.get("reasoning_tokens") if isinstance(outputs, dict) else 0,
        inputs.get("cached_tokens") if isinstance(inputs, dict) else 0,
        usage.get("cost"),
    )


class ResponsesRelay(EventRelay):
    markers = (
        b'"response.created"',
        b'"response.completed"',
        b'"response.incomplete"',
        b'"response.failed"',
        b'"error',  # the `error` and `response.error` events (and any text that names one: parsed, then passed)
    )

    __slots__ = ("created_at", "response_id")

    def __init__(self) -> None:
        super().__init__()
        self.response_id: str | None = None
        self.created_at: int | None = None

    def _read(self, event: dict[str, Any], raw: bytes) -> bytes:
        kind = event.get("type")
        response = event.get("response")
        response = response if isinstance(response, dict) else {}
        if kind == "response.created":
            self.response_id = response.get("id") if isinstance(response.get("id"), str) else None
            self.created_at = response.get("created_at") if isinstance(response.get("created_at"), int) else None
            self.model = response["model"] if isinstance(response.get("model"), str) else None
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self.usage = usage_from(response.get("usage"))
            self.model = response["model"] if isinstance(response.get("model"), str) else self.model
            self.provider = response["provider"] if isinstance(response.get("provider"), str) else self.provider
            self.finished = True
            if kind == "response.failed":  # the API's own failure event: passed on as it is
                error = response.get("error")
                self.error = upstream_error(error if isinstance(error, dict) else {})
                self.done = True
        elif kind in ("error", "response.error"):  # flat, or with the error nested: made response.failed
            error = event["error"] if isinstance(event.get("error"), dict) else event
            return self.fail(upstream_error(error))
        return raw

    def failure(self, error: GatewayError) -> bytes:
        response = {
            "id": self.response_id or "resp_failed",
            "object": "response",
            "created_at": self.created_at or int(time.time()),
            "model": self.model,
            "status": "failed",
            "output": [],
            "error": {"code": error.code or error.type, "message": error.message},
            "incomplete_details": None,
            "usage": None,
        }
        event = {"type": "response.failed", "sequence_number": self.data_events, "response": response}
        return b"event: response.failed\ndata: " + orjson.dumps(event) + b"\n\n"


RESPONSES = Responses()
