"""The faults the agent APIs (Responses, Messages) share with chat, and their SSE sending:
keep-alive comments first, pacing, a reset, a stall, a broken event or an in-stream error after
N events; it records what was produced, so billed, by the time the stream ended."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web

from app.simulator.generation import Generation
from app.simulator.http import KEEPALIVE, json_response, reset
from app.simulator.record import Record, SimulatorLog

Event = tuple[str | None, dict[str, Any]]  # (SSE event name, or None for a bare `data:`; JSON)


class Host(Protocol):
    """What an agent API's handler uses of the `Simulator` (server.py) that serves it: its key
    check, log, attempt counts and keep-alives, and where the /generation stats are kept."""

    log: SimulatorLog
    attempts: dict[str, int]
    keepalives: int
    generations: dict[str, dict[str, Any]]
    generation_misses: dict[str, int]

    def refuse(self, request: web.Request) -> web.Response | None: ...


@dataclass
class EventStream:
    """One answer's stream: `produced` marks on its generation what a sent event produced;
    `failure(n)` builds the in-stream error sent as the n-th event (after `gen.failed` is set);
    `settled` stores the generation's stats once it has ended (before EOF, like the log)."""

    produced: Callable[[dict[str, Any]], None]
    failure: Callable[[int], list[Event]]
    settled: Callable[[], None]
    broken: bytes
    done: bool

    async def send(
        self, request: web.Request, gen: Generation, record: Record, events: list[Event]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Generation-Id": gen.id}
        )
        record.stream = True
        await response.prepare(request)
        try:
            for _ in range(int(gen.knobs.get("keepalives", gen.keepalives))):
                await response.write(KEEPALIVE)
            for index, event in enumerate(events):
                if (ended := await self._fault(request, response, gen, index)) is not None:
                    record.served(gen)  # before EOF: a client that sees the end finds it logged
                    self.settled()
                    if ended == "error":
                        await response.write_eof()
                    return response
                await response.write(frame(event))
                self.produced(event[1])
                if delay := float(gen.knobs.get("chunk_delay_ms", 0)) / 1000:
                    await asyncio.sleep(delay)
            gen.finished = True
            if self.done:
                await response.write(b"data: [DONE]\n\n")
            record.served(gen)
            self.settled()
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            gen.cancelled = True
            record.disconnected(gen)
            raise
        return response

    async def _fault(
        self, request: web.Request, response: web.StreamResponse, gen: Generation, index: int
    ) -> str | None:
        """Plays the knob due before event `index`; "error" or "reset" when the stream ends there."""
        knobs = gen.knobs
        if knobs.get("stream_error") and index == int(knobs.get("error_after", 1)):
            gen.failed = True
            for event in self.failure(index):
                await response.write(frame(event))
            return "error"
        if index == knobs.get("reset_after"):
            gen.failed = True
            reset(request)
            return "reset"
        if index == knobs.get("stall_after"):
            await asyncio.sleep(3600)
        if index == knobs.get("malformed_after"):
            await response.write(self.broken)
        return None


def frame(event: Event) -> bytes:
    name, data = event
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


async def answer(
    sim: Host,
    request: web.Request,
    record: Record,
    gen: Any,
    broken: bytes,
    done: bool,
    body: Callable[[], dict[str, Any]],
) -> web.StreamResponse:
    """A generation (Responses' or Messages'), streamed as its events or whole as `body()`; its
    /generation stats kept however it ends."""
    sim.generation_misses[gen.id] = int(gen.knobs.get("generation_404s", 1))
    try:
        if gen.payload.get("stream") is True:
            settled = lambda: sim.generations.update({gen.id: gen.stats()})  # noqa: E731
            stream = EventStream(gen.produced, gen.failure, settled, broken, done=done)
            return await stream.send(request, gen, record, gen.events())
        gen.emitted, gen.finished = gen.out.content, True
        record.served(gen)
        return record.answered(json_response(body(), headers={"X-Generation-Id": gen.id}))
    finally:
        sim.generations[gen.id] = gen.stats()
