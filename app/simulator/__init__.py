"""The OpenRouter simulator: a faithful fake OpenRouter served over real HTTP, for the tests,
`gateway serve --demo` and the benchmark. It never sends anything to the internet."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

from aiohttp import web

from app.simulator.server import API, Simulator

__all__ = ["API", "Simulator", "SimulatorThread", "start_simulator"]


async def start_simulator(simulator: Simulator, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `simulator` in the running loop; returns the runner and the bound port."""
    runner = web.AppRunner(simulator.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    server = cast(asyncio.Server, site._server)
    return runner, int(server.sockets[0].getsockname()[1])


class SimulatorThread:
    """The simulator in a background thread with its own event loop (tests, demo)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self.simulator = Simulator(**options)
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openrouter-simulator", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}{API}"

    def start(self) -> SimulatorThread:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the simulator did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner, self.port = self._loop.run_until_complete(start_simulator(self.simulator, self.host, self.port))
        self._started.set()
        self._loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    # -- for tests: what the simulator received ----------------------------------------------
    def requests(self) -> list[dict[str, Any]]:
        return self.simulator.log.entries()

    def find(self, request_id: str) -> list[dict[str, Any]]:
        """Every request that carried this `x-request-id` (one per upstream attempt)."""
        return [e for e in self.requests() if e["headers"].get("x-request-id") == request_id]
