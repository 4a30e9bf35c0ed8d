"""ASGI responses of the request path: JSON bytes as received, SSE relayed as received,
and GatewayError as an error response in the dialect of the route asked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.call import ProxyCall
from app.dialects import CHAT, Answer, Dialect, Relay, dialect_of
from app.errors import GatewayError, ServerShuttingDownError, UpstreamError
from app.upstream.client import UpstreamResponse
from app.usage.meter import BODY_LOG_LIMIT

JSON = "application/json"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class JSONBytes(Response):
    """JSON bytes as received, with the least work an ASGI response can do. `after` runs once the
    body is handed to the server (or sending failed): metering, off the client's wait."""

    def __init__(self, body: bytes, headers: dict[str, str], after: Callable[[], None] | None = None) -> None:
        self.body = body
        self.after = after
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *((k.encode(), v.encode()) for k, v in headers.items()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.body})
        finally:
            if self.after is not None:
                self.after()


def error_response(error: GatewayError, dialect: Dialect = CHAT) -> Response:
    status, body = dialect.render_error(error)
    return Response(body, status_code=status, headers=error.headers, media_type=JSON)


async def gateway_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc, dialect_of(request.url.path))


class SSEResponse(Response):
    """Relays an upstream SSE body to the client chunk by chunk.

    A client that goes away cancels the relay at once (uvicorn would otherwise swallow our
    writes silently), which closes the upstream connection, so OpenRouter stops generating.
    A server shutting down ends streams still open at the end of its grace period with one
    failure event of its API (`server_shutting_down`) instead of a cut. A stream counts as open
    from the moment it is made (the upstream answered), so none slips past the drain.
    """

    def __init__(
        self,
        upstream: UpstreamResponse,
        relay: Relay,
        call: ProxyCall,
        headers: dict[str, str],
        on_end: Callable[[ProxyCall, GatewayError | None, Answer], None],
        streams: set[SSEResponse] | None = None,
    ) -> None:
        self.upstream = upstream
        self.streams = streams if streams is not None else set()
        self.streams.add(self)
        self._task: asyncio.Task[Any] | None = None
        self._stopping = False
        self._started = False
        self.relay = relay
        self.call = call
        self.raw_headers = _SSE_HEADERS + [(k.encode(), v.encode()) for k, v in headers.items()]
        self.on_end = on_end
        self._complete = False
        self._upstream_done: float | None = None  # when the upstream body ended (before the tail went out)
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        def client_left(watcher: asyncio.Future[Any]) -> None:
            nonlocal gone
            if not watcher.cancelled() and not self._complete:
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(_disconnected(receive))
        watcher.add_done_callback(client_left)
        self._task = task
        try:
            if self._stopping:  # the drain ended it before it began
                await self._end_for_shutdown(send)
            else:
                await self._start(send)
                await self._relay(send)
        except asyncio.CancelledError:
            if gone:
                task.uncancel()
                self.call.client_disconnected = True  # (metered as 499 by the gateway's finish)
            elif self._stopping and not self._complete:
                task.uncancel()
                await self._end_for_shutdown(send)
            else:
                raise
        finally:
            self.streams.discard(self)
            watcher.remove_done_callback(client_left)
            watcher.cancel()
            if self._complete and self.relay.done and self.relay.error is None and not gone:
                await self.upstream.settle()  # after the client had its last byte
            else:
                self.upstream.close()
            self.call.upstream_done = self._upstream_done or time.perf_counter()
            self.on_end(self.call, self.relay.error, self.relay)

    def stop(self) -> None:
        """The server is going away: end this stream now, with an error event."""
        if not self._complete and not self._stopping:
            self._stopping = True
            if self._task is not None:
                self._task.cancel()

    async def _start(self, send: Send) -> None:
        self._started = True
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

    async def _end_for_shutdown(self, send: Send) -> None:
        self._complete = True
        if not self._started:
            await self._start(send)
        tail = self.relay.fail(ServerShuttingDownError("The server is shutting down; retry the request."))
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _relay(self, send: Send) -> None:
        relay, call = self.relay, self.call
        read = self.upstream.reader()
        try:
            while True:
                try:
                    chunk = await read()
                except BaseException as exc:
                    raise self.upstream.broken(exc) from exc
                if not chunk:
                    break
                out = relay.feed(chunk)
                if out:
                    if call.first_token is None and relay.saw_data:
                        call.first_token = time.perf_counter()
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    if call.logged_stream is not None and len(call.logged_stream) < BODY_LOG_LIMIT:
                        call.logged_stream += out
                if relay.done:
                    break
            tail = relay.end()
        except UpstreamError as exc:
            tail = relay.fail(exc)
        self._upstream_done = time.perf_counter()
        self._complete = True
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
