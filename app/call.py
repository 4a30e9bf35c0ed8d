"""One request on its way through the gateway."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.auth.keys import Principal
from app.usage.record import Usage

if TYPE_CHECKING:
    from app.dialects import Dialect
    from app.limits.reservation import Reservation


# The scope entry holding a request's ProxyCall while it is answered: the server marks the call
# when the client hangs up before its answer is complete (server.py).
ANSWERING = "gateway.call"


@dataclass(slots=True)
class ProxyCall:
    """What the gateway knows about one request; metering reads it when the request ends."""

    request_id: str
    endpoint: Dialect  # the API it speaks
    principal: Principal
    started: float = field(default_factory=time.perf_counter)
    wall_time: float = field(default_factory=time.time)
    model_requested: str | None = None
    model: str | None = None  # the OpenRouter id asked for (aliases resolved)
    model_used: str | None = None  # the one that answered (a fallback, perhaps)
    model_served: str | None = None  # as OpenRouter named it in the response
    provider: str | None = None
    stream: bool = False
    include_usage: bool = False
    status: int = 200
    error_code: str | None = None
    generation_id: str | None = None
    usage: Usage | None = None  # summed over every try OpenRouter billed and priced
    uncosted: dict[str, Usage] | None = None  # tries counted without their cost, by generation id
    unread: list[str] | None = None  # generation ids of tries whose usage could not be read
    parsed: Any = None  # the non-streaming response body, parsed once
    payload: Any = None  # streams: the request body, to estimate a cut stream's prompt
    logged_body: str | None = None  # the request body, only when log_bodies is on
    logged_stream: bytearray | None = None  # streams: the events relayed, likewise
    data_events: int = 0  # streams: data events relayed
    reservation: Reservation | None = None
    attempts: int = 0
    retries: int = 0
    upstream_started: float | None = None
    first_byte: float | None = None
    upstream_done: float | None = None
    first_token: float | None = None
    finished: float | None = None
    forwarded: bool = False  # sent to OpenRouter (at least one try)
    in_flight: bool = False
    client_disconnected: bool = False
    deadline: float = float("inf")  # perf_counter time by which the request must be answered

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    @property
    def prompt_estimate(self) -> int:
        from app.limits.estimate import prompt_tokens

        return prompt_tokens(self.payload) if isinstance(self.payload, dict) else 0

    def add_usage(self, usage: Usage | None) -> None:
        """Usage of one more billed try (a 200 with an error inside is billed, then retried)."""
        if usage is None:
            return
        if usage.cost_usd is None and self.generation_id:  # its cost is in OpenRouter's /generation
            self.uncosted = {**(self.uncosted or {}), self.generation_id: usage}
            return
        self.usage = usage if self.usage is None else self.usage.plus(usage)

    def usage_unread(self) -> None:
        """OpenRouter answered this try with a 200 whose usage could not be read (a body that is
        not JSON, or an error without usage): it may be billed, so its generation is looked up
        later and added to what the other tries used."""
        if self.generation_id:
            self.unread = [*(self.unread or ()), self.generation_id]
