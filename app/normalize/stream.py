"""OpenRouter SSE -> OpenAI SSE, as a byte relay. Pure, no I/O.

Bytes go out as they came in. Only events that may hold usage or an error are parsed:
- `: OPENROUTER PROCESSING` keep-alives stay SSE comments (clients ignore them);
- the usage chunk (all three observed shapes) is read for metering, and reaches the client
  only if it asked with `stream_options.include_usage`, in OpenAI's `choices: []` shape;
- each in-stream error shape becomes one `data: {"error": ...}` event, and the stream ends;
- a stream that ends before finishing becomes an error event too, never a silent cut.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.errors import GatewayError, UpstreamConnectionError
from app.normalize.response import choice_error, openrouter_error, status_of
from app.normalize.sse import complete_events
from app.usage.record import Usage

DONE = b"data: [DONE]\n\n"
_FINISH = b'"finish_reason":"'


class StreamRelay:
    """Feed it upstream bytes; it returns the bytes for the client."""

    __slots__ = (
        "_buffer",
        "data_events",
        "done",
        "error",
        "finished",
        "include_usage",
        "model",
        "provider",
        "saw_data",
        "usage",
    )

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage
        self._buffer = b""
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.provider: str | None = None
        self.data_events = 0  # a cut stream's completion is estimated from these
        self.error: GatewayError | None = None
        self.finished = False  # a finish_reason arrived
        self.done = False  # [DONE] arrived, or the stream ended by an error
        self.saw_data = False

    def billed(self) -> Usage | None:
        return Usage.from_openrouter(self.usage)

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        block, self._buffer = complete_events(self._buffer, data)
        if not block:
            return b""
        events = block.count(b"data:")
        if events:
            self.saw_data = True
            self.data_events += events
        plain = b"error" not in block and b'"usage"' not in block and b"[DONE]" not in block
        if plain:
            if _well_formed(block):
                if _FINISH in block:
                    self.finished = True
                return block
            return self._events(block)
        # Pass the plain events before the first one that may hold usage or an error as they are.
        cut = block.rfind(b"\n\n", 0, _first_marker(block)) + 2
        head = block[:cut] if cut > 1 else b""
        if head and _well_formed(head):
            if _FINISH in head:
                self.finished = True
            return head + self._events(block[cut:])
        return self._events(block)

    def end(self) -> bytes:
        """The upstream body ended: flush, and make sure the client sees a proper ending."""
        out = b""
        if self._buffer.strip() and not self.done:
            out = self._events(self._buffer.rstrip(b"\n") + b"\n\n")
            self._buffer = b""
        if self.done:
            return out
        if self.finished or self.usage is not None:
            self.done = True
            return out + DONE
        return out + self.fail(UpstreamConnectionError("OpenRouter ended the stream before the response was complete."))

    def fail(self, error: GatewayError) -> bytes:
        """End the stream with one OpenAI-style error event."""
        if self.done:
            return b""
        self.error = error
        self.done = True
        return error.sse_event()

    def _events(self, block: bytes) -> bytes:
        out: list[bytes] = []
        for event in block.split(b"\n\n"):
            if not event:
                continue
            out.append(self._event(event))
            if self.done:
                break
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        data = _data_of(event)
        if data is None:
            return event + b"\n\n"  # a comment or a field we do not use: pass it on
        if data == b"[DONE]":
            self.done = True
            return DONE
        if not _looks_like_json(data):
            return self.fail(
                UpstreamConnectionError("OpenRouter sent a malformed stream event.", code="upstream_invalid_response")
            )
        if b"error" not in data and b'"usage"' not in data:
            if _FINISH in data:
                self.finished = True
            return event + b"\n\n"
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return self.fail(
                UpstreamConnectionError("OpenRouter sent a malformed stream event.", code="upstream_invalid_response")
            )
        if not isinstance(chunk, dict):
            return event + b"\n\n"
        error = _chunk_error(chunk)
        if error is not None:
            return self.fail(error)
        choices = chunk.get("choices")
        if any(isinstance(c, dict) and c.get("finish_reason") for c in choices or ()):
            self.finished = True
        if not chunk.get("usage"):
            return event + b"\n\n"
        return self._usage_chunk(chunk, event)

    def _usage_chunk(self, chunk: dict[str, Any], event: bytes) -> bytes:
        self.usage = chunk["usage"]
        self.model = chunk.get("model") if isinstance(chunk.get("model"), str) else None
        self.provider = chunk.get("provider") if isinstance(chunk.get("provider"), str) else None
        choices = chunk.get("choices") or []
        meaningful = [c for c in choices if _meaningful(c)]
        if self.include_usage and not choices:
            return event + b"\n\n"
        out = b""
        if meaningful:
            without_usage = {k: v for k, v in chunk.items() if k != "usage"}
            without_usage["choices"] = meaningful
            out = b"data: " + orjson.dumps(without_usage) + b"\n\n"
        if self.include_usage:
            out += b"data: " + orjson.dumps({**chunk, "choices": []}) + b"\n\n"
        return out


def _first_marker(block: bytes) -> int:
    """Where the first sign of usage, an error or the end is, or -1."""
    found = [i for i in (block.find(b"error"), block.find(b'"usage"'), block.find(b"[DONE]")) if i >= 0]
    return min(found) if found else -1


def _well_formed(block: bytes) -> bool:
    """A cheap check that every data event in the block holds one whole JSON object.

    Parsing every chunk would cost the hot path; a truncated or garbled event almost never
    starts with `{` and ends with `}`, so this catches what upstream breakage looks like."""
    events = block.count(b"\n\n")
    if block.startswith(b"data: {") and block.count(b"}\n\n") == events and block.count(b"\n\ndata: {") == events - 1:
        return True  # compact one-line events (one per read, usually), each a braced object: checked in C
    if events == 1:
        return not block.startswith(b"data:") or _looks_like_json(block[5:-2].strip())
    for event in block.split(b"\n\n"):
        if event.startswith(b"data:") and not _looks_like_json(event[5:].strip()):
            return False
    return True


def _looks_like_json(data: bytes) -> bool:
    return data.startswith(b"{") and data.endswith(b"}")


def _data_of(event: bytes) -> bytes | None:
    """The data of one SSE event (several `data:` lines joined), or None if it has none."""
    if event.startswith(b"data:") and b"\n" not in event:
        return event[5:].strip()
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _chunk_error(chunk: dict[str, Any]) -> GatewayError | None:
    if chunk.get("error"):
        return openrouter_error(status_of(chunk["error"]), chunk["error"])
    for choice in chunk.get("choices") or ():
        error = choice_error(choice)
        if error is not None:
            return error
    return None


def _meaningful(choice: Any) -> bool:
    """A choice that carries something besides an empty delta (content, tools, a finish)."""
    if not isinstance(choice, dict):
        return False
    if choice.get("finish_reason") or choice.get("logprobs"):
        return True
    delta = choice.get("delta") or {}
    return any(value not in (None, "", []) for name, value in delta.items() if name != "role")
