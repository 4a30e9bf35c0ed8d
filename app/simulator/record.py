"""The simulator's log: every request it received (headers and body) and what it served
(tokens and cost), readable by tests in-process or at `GET /_sim/requests`."""

from __future__ import annotations

import threading
import time
from typing import Any

from aiohttp import web

from app.simulator.generation import Generation


class Record:
    """One received request; filled in as it is answered."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry
        self.knobs: dict[str, Any] = {}
        self.stream = False

    def answered(self, response: web.StreamResponse) -> web.StreamResponse:
        self.entry["status"] = response.status
        self.entry["ended"] = time.time()
        return response

    def served(self, gen: Generation) -> None:
        usage = gen.usage()
        self.entry.update(
            status=200,
            stream=self.stream,
            generation_id=gen.id,
            model_served=gen.model_name,
            usage=usage if gen.billable else None,
            cost=usage["cost"] if gen.billable else 0.0,
            completed=gen.finished and not gen.failed,
            failed=gen.failed,
            ended=time.time(),
        )

    def served_usage(self, gen_id: str, model: str, usage: dict[str, Any]) -> None:
        self.entry.update(
            status=200,
            generation_id=gen_id,
            model_served=model,
            usage=usage,
            cost=usage["cost"],
            completed=True,
            failed=False,
        )

    def disconnected(self, gen: Generation) -> None:
        self.served(gen)
        self.entry.update(disconnected=True, disconnected_at=time.time(), completed=False)


class SimulatorLog:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._entries: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def received(self, request: web.Request, raw: bytes) -> Record:
        entry: dict[str, Any] = {
            "time": time.time(),
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": raw.decode("utf-8", "replace"),
            "status": None,
            "disconnected": False,
        }
        if self.enabled:
            with self._lock:
                self._entries.append(entry)
        return Record(entry)

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._entries]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
