"""Serving the gateway on uvicorn: one process (plus the admin listener, if it has its own
address) or several workers on one socket. The drain on SIGTERM is the app's (main.py); uvicorn
stops accepting connections and waits for requests up to the grace period plus a little.

uvicorn's httptools protocol is used as is, except that a busy server's writes to its clients
leave together at the end of each event-loop turn (`WriteBatch`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Generator, Iterable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.call import ANSWERING

log = logging.getLogger("gateway")
EXTRA_WAIT_S = 5.0  # beyond the grace period, for streams to send their last event


class MainServer(uvicorn.Server):
    """The listener that owns the signals; it stops its companions (the admin listener) too."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.companions: list[uvicorn.Server] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        for companion in self.companions:
            companion.should_exit = True


class QuietServer(uvicorn.Server):
    """A second listener in the same process: the first one owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class WorkerConfig(uvicorn.Config):
    """A worker's config. uvicorn calls `configure_logging` in each new worker before it serves:
    quieting the signals there makes a drained worker exit 0, not re-raise SIGTERM on itself."""

    def configure_logging(self) -> None:
        super().configure_logging()
        _quiet_signals_after_exit()


class WriteBatch:
    """One listener's writes to its clients, held while it is busy and sent together when the
    event-loop turn ends.

    A write to a client that sleeps in its poll costs the writer a wake-up of another process,
    across cores: measured on 2-core VMs, the first write of a response took ~5x the CPU of the
    second (~25 us at 64 concurrent requests, the most expensive line of a request). Written
    one by one as requests finish, the responses of one loop turn wake the client again and again;
    written together, the first wakes it and the rest find it awake. Bench A/B at 64 concurrent
    requests: +7% requests/s, -21 us of CPU per request; streams +8%. With one request open (or
    none) nothing is held: a lone request's answer, and a lone stream's events, leave at once."""

    def __init__(self, requests: set[Any]) -> None:
        self.requests = requests  # uvicorn's running requests (their tasks) on this listener
        self.held: list[HeldTransport] = []  # connections with writes held this turn
        self.most = 0  # the most connections one flush has written to (for the tests)

    def flush(self) -> None:
        held, self.held = self.held, []
        if len(held) > self.most:  # (a connection that flushed itself on the limit may be listed twice)
            self.most = max(self.most, len({id(transport) for transport in held}))
        for transport in held:
            transport.flush_or_abort()


class HeldTransport:
    """A client connection's transport whose writes go through the listener's `WriteBatch`; in
    order, since a connection holding writes holds every later one until the flush. At most
    `HELD_LIMIT` bytes are held: a bigger response (or a client that is not keeping up, whose
    socket buffer is not empty) is written at once, so uvicorn's flow control sees it as before."""

    __slots__ = ("_batch", "_held", "_held_bytes", "_transport")
    HELD_LIMIT = 65536

    def __init__(self, transport: asyncio.Transport, batch: WriteBatch) -> None:
        self._transport = transport
        self._batch = batch
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes):
            if not isinstance(data, (bytearray, memoryview)):
                raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
            data = bytes(data)  # held past the caller's return: a copy, as the socket would have taken
        if self._held:
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > self.HELD_LIMIT:
                self.flush()
            return
        batch = self._batch
        if len(batch.requests) <= 1 or len(data) > self.HELD_LIMIT or self._transport.get_write_buffer_size():
            self._transport.write(data)  # alone (nobody to share the wake-up with), big, or backed up
            return
        if not batch.held:
            asyncio.get_running_loop().call_soon(batch.flush)
        batch.held.append(self)
        self._held.append(data)
        self._held_bytes = len(data)

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(chunks))

    def flush(self) -> None:
        held = self._held
        if held:
            self._held = []
            self._held_bytes = 0
            if not self._transport.is_closing():
                self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def flush_or_abort(self) -> bool:
        """Write what is held; if that fails, abort the connection (its bytes are gone, its
        client must not wait for them). Never raises: one broken connection must not strand the
        others' responses, nor stop a shutdown closing the rest."""
        try:
            self.flush()
            return True
        except Exception:
            log.exception("writing a held response failed; closing its connection")
            with contextlib.suppress(Exception):
                self.abort()
            return False

    def close(self) -> None:
        if self.flush_or_abort():
            self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._held_bytes = 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._held_bytes

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:  # the rest of asyncio.Transport, as it is
        return getattr(self._transport, name)


class BatchingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, its writes going through the listener's `WriteBatch`; a
    client hanging up before its answer is complete marks its request's call (`ANSWERING`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        batch: WriteBatch | None = getattr(self.server_state, "write_batch", None)
        if batch is None:
            batch = self.server_state.write_batch = WriteBatch(self.tasks)  # type: ignore[attr-defined]
        super().connection_made(HeldTransport(transport, batch))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        # Noticed here, a departure costs a request nothing; a task per request awaiting
        # `http.disconnect` would cost every request a few percent of its CPU. (With HTTP
        # pipelining `cycle` is the newest request read, so one still running behind it is not
        # marked; no OpenAI SDK pipelines.)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            call: Any = cycle.scope.get(ANSWERING)  # a ProxyCall
            if call is not None:
                call.client_disconnected = True
        super().connection_lost(exc)


def options(settings: Any) -> dict[str, Any]:
    return {
        "loop": "uvloop",
        "http": BatchingHttpToolsProtocol,
        "log_level": settings.log_level,
        "access_log": False,
        "proxy_headers": False,  # the client's address is used nowhere; skip uvicorn's middleware for it
        "log_config": None,
        "timeout_graceful_shutdown": settings.shutdown_grace_s + EXTRA_WAIT_S,
    }


class ListenError(Exception):
    """An address the gateway cannot listen on (taken, or not this machine's)."""


def listen(settings: Any) -> list[socket.socket]:
    """The gateway's sockets (the admin listener's second, if it has its own port), bound before
    anything starts, so a taken port is one line and nothing else happens."""
    addresses = [(settings.host, settings.port)]
    if settings.admin_port is not None:
        addresses.append((settings.admin_host or settings.host, settings.admin_port))
    sockets: list[socket.socket] = []
    for host, port in addresses:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sockets.append(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            for bound in sockets:
                bound.close()
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sock.set_inheritable(True)  # workers serve on it
    return sockets


def run(settings: Any, app: Any, admin_app: Any = None, sockets: list[socket.socket] | None = None) -> bool:
    """One process: the gateway, and the admin API on its own address if configured; on
    `sockets` (from `listen`) when given. False if it never started (its start was refused)."""
    main = MainServer(uvicorn.Config(app, host=settings.host, port=settings.port, **options(settings)))
    servers: list[uvicorn.Server] = [main]
    if admin_app is not None:
        admin_config = uvicorn.Config(
            admin_app,
            host=settings.admin_host or settings.host,
            port=settings.admin_port,
            lifespan="off",
            **options(settings),
        )
        admin = QuietServer(admin_config)
        main.companions.append(admin)
        servers.append(admin)
    _quiet_signals_after_exit()

    async def serve_all() -> None:
        await asyncio.gather(*(server.serve([sockets[n]] if sockets else None) for n, server in enumerate(servers)))

    import uvloop

    try:
        uvloop.run(serve_all())
    except SystemExit:
        if main.started:
            raise
        return False  # uvicorn's exit from a start the app refused (it logged the app's reasons)
    return True


def run_workers(settings: Any, workers: int, sock: socket.socket | None = None) -> None:
    """Several worker processes on one socket; each builds its app from the environment."""
    from uvicorn.supervisors import Multiprocess

    config = WorkerConfig(
        "app.main:create_worker_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        **options(settings),
    )
    _quiet_signals_after_exit()
    Multiprocess(config, sockets=[sock or config.bind_socket()]).run()


def _quiet_signals_after_exit() -> None:
    # uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown; by then we are done, so the
    # handlers it restores must not turn a clean stop into a non-zero exit.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
