"""Serving the gateway on uvicorn: one process (plus the admin listener, if it has its own
address) or several workers on one socket. The drain on SIGTERM is the app's (main.py); uvicorn
stops accepting connections and waits for requests up to the grace period plus a little."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Generator
from types import FrameType
from typing import Any

import uvicorn

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


def options(settings: Any) -> dict[str, Any]:
    return {
        "loop": "uvloop",
        "http": "httptools",
        "log_level": settings.log_level,
        "access_log": False,
        "proxy_headers": False,  # the client's address is used nowhere; skip uvicorn's middleware for it
        "log_config": None,
        "timeout_graceful_shutdown": settings.shutdown_grace_s + EXTRA_WAIT_S,
    }


def run(settings: Any, app: Any, admin_app: Any = None) -> None:
    """One process: the gateway, and the admin API on its own address if configured."""
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
        await asyncio.gather(*(server.serve() for server in servers))

    import uvloop

    uvloop.run(serve_all())


def run_workers(settings: Any, workers: int) -> None:
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
    Multiprocess(config, sockets=[config.bind_socket()]).run()


def _quiet_signals_after_exit() -> None:
    # uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown; by then we are done, so the
    # handlers it restores must not turn a clean stop into a non-zero exit.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
