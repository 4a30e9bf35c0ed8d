"""The relay shared by the APIs whose streams are typed events (Responses, Messages): bytes go
out as they came in, event names, keep-alive comments and `[DONE]` included; only the events
that may carry usage, the end or an error are parsed, found by a byte search first.

A subclass says which events matter (`markers`), what each means (`_read`), and what its
API's own failure event looks like (`failure`). A stream that ends before its API's last
event ends with that failure event, never silently.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.errors import GatewayError, UpstreamConnectionError
from app.normalize.response import openrouter_error, status_of
from app.normalize.sse import complete_events
from app.usage.record import Usage


class EventRelay:
    markers: tuple[bytes, ...] = ()  # an event holding none of these passes unparsed

    __slots__ = ("_buffer", "data_events", "done", "error", "finished", "model", "provider", "saw_data", "usage")

    def __init__(self) -> None:
        self._buffer = b""
        self.data_events = 0
        self.done = False  # nothing more goes to the client
        self.finished = False  # the API's own last event arrived
        self.error: GatewayError | None = None
        self.saw_data = False
        self.model: str | None = None
        self.provider: str | None = None
        self.usage: Usage | None = None

    def billed(self) -> Usage | None:
        return self.usage

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        block, self._buffer = complete_events(self._buffer, data)
        out = []
        while block and not self.done:  # the runs of plain events pass whole; a marked event is read
            hit = min((i for marker in self.markers if (i := block.find(marker)) >= 0), default=-1)
            if hit < 0:
                run, marked, block = block, b"", b""
            else:
                start = block.rfind(b"\n\n", 0, hit)
                start = start + 2 if start >= 0 else 0  # (none before it: the block's first event)
                end = block.find(b"\n\n", hit) + 2
                run, marked, block = block[:start], block[start:end], block[end:]
            if run:
                out.append(self._run(run))
            if marked and not self.done:
                out.append(self._event(marked[:-2]))
        return b"".join(out)

    def _run(self, run: bytes) -> bytes:
        """Events without a marker: passed as one piece when every one is well formed."""
        if _plain(run):
            events = run.count(b"\ndata:") + run.startswith(b"data:")
            if events:
                self.saw_data = True
                self.data_events += events
            return run
        out = []
        for event in run[:-2].split(b"\n\n"):
            out.append(self._event(event))
            if self.done:
                break
        return b"".join(out)

    def end(self) -> bytes:
        """The upstream body ended: what is left, then a failure event unless the stream finished."""
        out = b""
        if self._buffer.strip() and not self.done:
            out = self._event(self._buffer.strip(b"\n"))
            self._buffer = b""
        if self.done or self.finished:
            self.done = True
            return out
        return out + self.fail(self._cut())

    def fail(self, error: GatewayError) -> bytes:
        """End the stream with the API's own failure event; a stream whose last event came has
        nothing to add (the connection may still break, or the drain end it, before `[DONE]`)."""
        if self.finished:
            self.done = True
        if self.done:
            return b""
        self.error = error
        self.done = True
        return self.failure(error)

    def _event(self, event: bytes) -> bytes:
        lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
        if not lines:
            return event + b"\n\n"  # a comment, or a field we do not use: passed on
        data = b"\n".join(lines)
        if data == b"[DONE]":
            if not self.finished:  # the end, before the API's last event: not a silent one
                return self.fail(self._cut()) + event + b"\n\n"
            self.done = True
            return event + b"\n\n"
        if not (data.startswith(b"{") and data.endswith(b"}")):
            return self.fail(self._malformed())
        self.saw_data = True
        self.data_events += 1
        if not any(marker in data for marker in self.markers):
            return event + b"\n\n"
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            return self.fail(self._malformed())
        if not isinstance(parsed, dict):
            return event + b"\n\n"
        if "type" not in parsed and isinstance(parsed.get("error"), dict):  # OpenRouter's untyped error
            return self.fail(upstream_error(parsed["error"]))
        return self._read(parsed, event + b"\n\n")

    def _cut(self) -> GatewayError:
        return UpstreamConnectionError("OpenRouter ended the stream before the response was complete.")

    def _malformed(self) -> GatewayError:
        return UpstreamConnectionError("OpenRouter sent a malformed stream event.", code="upstream_invalid_response")

    # -- what a subclass says -------------------------------------------------------------------
    def _read(self, event: dict[str, Any], raw: bytes) -> bytes:
        """An event holding a marker, parsed: note what it says; return what the client gets."""
        return raw

    def failure(self, error: GatewayError) -> bytes:
        raise NotImplementedError


def upstream_error(error: dict[str, Any], status: int | None = None) -> GatewayError:
    """An error OpenRouter sent inside a stream, as ours; a string code of its own (Responses':
    `rate_limit_exceeded`, `context_length_exceeded`, …) is kept, as clients act on it."""
    mapped = openrouter_error(status or status_of(error), error)
    code = error.get("code")
    if isinstance(code, str) and not code.isdigit():
        mapped.code = code
    return mapped


def _plain(block: bytes) -> bool:
    """Every data line of the block holds one JSON object (a cheap check: braces at both ends)."""
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if not (data.startswith(b"{") and data.endswith(b"}")):
                return False
    return True
