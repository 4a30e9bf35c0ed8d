"""Anthropic's Messages API, as OpenRouter serves it (Claude Code, the Anthropic SDK).

What differs from chat: the key may come as `x-api-key` (Bearer wins when both come; upstream
always gets the gateway's own Bearer), `anthropic-version` and `anthropic-beta` go upstream
(the beta list also as OpenRouter's `x-anthropic-beta`), reasoning is `thinking`, usage counts
input without the cache (`input_tokens` + `cache_read_input_tokens` +
`cache_creation_input_tokens` is the prompt; cache reads are the cached part), a stream is
named events whose counts arrive in `message_start` and, cumulatively, in the last
`message_delta` (without cost: it comes from `/generation`), and errors are Anthropic's
envelope, before a stream and as its `event: error` inside one.

`/v1/messages/count_tokens` is answered here, from the gateway's own estimate: never forwarded
(OpenRouter has no such route), never billed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from app.dialects.base import Dialect, Relay
from app.dialects.events import EventRelay, upstream_error
from app.errors import ANTHROPIC_TYPES, AuthenticationError, GatewayError
from app.limits import estimate
from app.usage.record import Usage

# Reasoning defaults (written as OpenRouter's `reasoning`) as `thinking` budgets.
MIN_THINKING = 1024
EFFORT_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768, "max": 32768}
# Anthropic's error types, as the status OpenRouter would have answered with.
STATUS_OF_TYPE = {kind: status for status, kind in ANTHROPIC_TYPES.items()}


class Messages(Dialect):
    name = "messages"
    upstream_path = "/messages"
    routes = ("/messages",)
    required = (("messages", list),)
    expect = "content"
    output_limits = ("max_tokens",)
    summary = "Create a message (Anthropic Messages)"
    tag = "Anthropic"

    def credential(self, headers: Mapping[str, str]) -> str | None:
        if headers.get("authorization"):
            return headers["authorization"]
        key = headers.get("x-api-key")
        if not key:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'x-api-key: <key>' or 'Authorization: Bearer <key>'."
            )
        return f"Bearer {key}"

    def wants_usage(self, payload: dict[str, Any]) -> bool:
        return True

    def fold_reasoning(self, payload: dict[str, Any]) -> bool:
        return False  # `thinking` is this API's own control, and OpenRouter's here

    def defaults(self, defaults: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        if "reasoning" not in defaults:
            return defaults
        translated = {k: v for k, v in defaults.items() if k != "reasoning"}
        thinking = thinking_of(defaults["reasoning"], payload.get("max_tokens"))
        if thinking is not None:
            translated.setdefault("thinking", thinking)
        return translated

    def upstream_headers(self, headers: Mapping[str, str], payload: dict[str, Any]) -> dict[str, str]:
        passed = {name: headers[name] for name in ("anthropic-version", "anthropic-beta") if headers.get(name)}
        if "anthropic-beta" in passed:
            passed["x-anthropic-beta"] = passed["anthropic-beta"]
        session = headers.get("x-claude-code-session-id")
        if session:
            passed["x-session-id"] = session[:256]
        return passed

    def usage_of(self, body: dict[str, Any]) -> Usage | None:
        return usage_from(body.get("usage"))

    def relay(self, include_usage: bool) -> Relay:
        return MessagesRelay()

    def render_error(self, error: GatewayError) -> tuple[int, bytes]:
        return error.anthropic_status, error.render_anthropic()


def thinking_of(reasoning: Any, max_tokens: Any = None) -> dict[str, Any] | None:
    """OpenRouter's `reasoning` (effort, max_tokens, enabled) as Anthropic's `thinking`, its
    budget below the request's `max_tokens` as Anthropic requires (none if less than 1,024
    tokens would be left to think in, Anthropic's least)."""
    if not isinstance(reasoning, dict):
        return None
    if reasoning.get("enabled") is False or reasoning.get("effort") == "none":
        return {"type": "disabled"}
    budget = reasoning.get("max_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool):
        budget = EFFORT_BUDGETS.get(str(reasoning.get("effort", "medium")), EFFORT_BUDGETS["medium"])
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        budget = min(budget, max_tokens - 1)
    return {"type": "enabled", "budget_tokens": budget} if budget >= MIN_THINKING else None


def usage_from(usage: Any) -> Usage | None:
    """Anthropic's counts as OpenRouter's: the prompt includes cache reads and writes."""
    if not isinstance(usage, dict):
        return None
    fresh, read, written = (
        Usage.from_counts(usage.get(name), 0, 0, 0, None).prompt_tokens
        for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )
    return Usage.from_counts(fresh + read + written, usage.get("output_tokens"), 0, read, usage.get("cost"))


def count_tokens(payload: dict[str, Any]) -> bytes:
    """`/v1/messages/count_tokens`: the gateway's estimate of the prompt, in Anthropic's shape."""
    return orjson.dumps({"input_tokens": estimate.prompt_tokens(payload)})


class MessagesRelay(EventRelay):
    markers = (b'"message_start"', b'"message_delta"', b'"message_stop"', b'"error"')

    __slots__ = ("counts",)

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, Any] = {}  # message_start's usage, overwritten by each message_delta's

    def _read(self, event: dict[str, Any], raw: bytes) -> bytes:
        kind = event.get("type")
        if kind == "message_start":
            message: dict[str, Any] = event["message"] if isinstance(event.get("message"), dict) else {}
            self.model = message["model"] if isinstance(message.get("model"), str) else None
            self.provider = message["provider"] if isinstance(message.get("provider"), str) else None
            self._count(message.get("usage"))
        elif kind == "message_delta":
            self._count(event.get("usage"))
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":  # already this API's failure event: passed on as it is, and the end
            error: dict[str, Any] = event["error"] if isinstance(event.get("error"), dict) else {}
            self.error = upstream_error(error, STATUS_OF_TYPE.get(str(error.get("type")), 502))
            self.done = True
        return raw

    def _count(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.counts.update((k, v) for k, v in usage.items() if v is not None)
            self.usage = usage_from(self.counts)

    def failure(self, error: GatewayError) -> bytes:
        return b"event: error\ndata: " + error.render_anthropic() + b"\n\n"


MESSAGES = Messages()
