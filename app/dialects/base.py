"""What an API a client speaks is, to the shared request path: one `Dialect` per API, each in
its own module saying only what differs from the others (DESIGN §4).

The shared stages (`gateway.py`) ask the request's dialect how to read a body (its model,
whether it streams, its output limit, its usage), how to fold reasoning flags into it, which
headers from the client go upstream, how to relay a stream (a `Relay`), and how to render an
error, before the stream or inside it. The defaults here are OpenAI's Chat Completions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from app.errors import GatewayError, InvalidRequestError
from app.normalize import request as normalize
from app.normalize.stream import StreamRelay
from app.usage.record import Usage

Required = tuple[tuple[str, type | tuple[type, ...]], ...]


class Answer(Protocol):
    """What OpenRouter's answer said, as metering reads it once the request ends: a JSON body's
    (`forwarder.BodyAnswer`) or a stream's (its `Relay`)."""

    model: str | None  # as OpenRouter named it
    provider: str | None
    data_events: int  # streams: events that carried output (a cut stream's completion is estimated from these)

    def billed(self) -> Usage | None: ...


class Relay(Answer, Protocol):
    """Upstream SSE bytes in, client SSE bytes out; pure, no I/O. What it read for metering is
    on it when the stream ends."""

    done: bool  # nothing more goes to the client (its end came, an error, or a failure of ours)
    error: GatewayError | None  # how it failed, if it did
    saw_data: bool  # a data event went out (the first token's time)

    def feed(self, data: bytes) -> bytes: ...
    def end(self) -> bytes: ...
    def fail(self, error: GatewayError) -> bytes: ...


class Dialect:
    """One API the gateway serves: Chat Completions' behaviour unless a subclass says otherwise."""

    name = "chat.completions"  # the `endpoint` of metrics, the ledger and logs
    upstream_path = "/chat/completions"  # below OpenRouter's base URL
    routes: tuple[str, ...] = ("/chat/completions",)  # below /v1 and /api/v1
    required: Required = (("messages", list),)
    expect = "choices"  # the list a successful JSON body carries
    streams = True
    writes_tokens = True  # (embeddings do not: they reserve no output)
    output_limits: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
    summary = "Create a chat completion"
    tag = "OpenAI"
    media_type = "application/json"

    # -- reading the request -------------------------------------------------------------------
    def credential(self, headers: Mapping[str, str]) -> str | None:
        """The client's `Authorization` header (Messages also takes `x-api-key`)."""
        return headers.get("authorization")

    def check(self, payload: dict[str, Any]) -> None:
        """What this API cannot work without, and the fields the gateway reads, well typed."""
        normalize.require_fields(payload, self.required)
        normalize.check_types(payload)
        for name in self.output_limits:  # they set what limits and budgets reserve
            value = payload.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidRequestError(f"'{name}' must be a positive integer.", param=name, code="invalid_type")
        if not self.streams and payload.get("stream"):
            raise InvalidRequestError("This endpoint does not stream.", code="invalid_value", param="stream")

    def wants_usage(self, payload: dict[str, Any]) -> bool:
        """Whether a stream's usage event goes to the client: only when asked, in chat."""
        return normalize.wants_usage(payload)

    # -- normalising ---------------------------------------------------------------------------
    def fold_reasoning(self, payload: dict[str, Any]) -> bool:
        """The API's own reasoning controls as OpenRouter reads them; True if the body changed."""
        return normalize.fold_reasoning_effort(payload)

    def defaults(self, defaults: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        """Configured body defaults (written in OpenRouter's chat terms) in this API's terms, for
        this body."""
        return defaults

    def upstream_headers(self, headers: Mapping[str, str], payload: dict[str, Any]) -> dict[str, str]:
        """Headers this API's clients send that OpenRouter should get (beyond the shared ones)."""
        return {}

    # -- reading the answer ----------------------------------------------------------------------
    def usage_of(self, body: dict[str, Any]) -> Usage | None:
        return Usage.from_openrouter(body.get("usage"))

    def relay(self, include_usage: bool) -> Relay:
        return StreamRelay(include_usage)

    # -- errors ------------------------------------------------------------------------------------
    def render_error(self, error: GatewayError) -> tuple[int, bytes]:
        """An error before any answer: status and body."""
        return error.status, error.render()
