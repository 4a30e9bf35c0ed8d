"""Metering: every finished request becomes one UsageRecord, which feeds the ledger, the
metrics, the budget settlement and the log. Streams cut before OpenRouter sent usage, and
usage that came without its cost (streamed Messages, Responses without `cost`), are recorded
from what was seen at the catalogue's prices (marked `estimated`) and reconciled later from
OpenRouter's `GET /generation`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import orjson

from app.call import ProxyCall
from app.catalog.models import Catalog
from app.limits.admission import Admission
from app.limits.reservation import Reservation
from app.usage.cost import catalogue_cost
from app.usage.ledger import Ledger
from app.usage.metrics import Metrics
from app.usage.record import CostSource, Usage, UsageRecord

log = logging.getLogger("gateway.usage")
requests_log = logging.getLogger("gateway.requests")
BODY_LOG_LIMIT = 16_384


def _clip(text: str) -> str:
    return text if len(text) <= BODY_LOG_LIMIT else text[:BODY_LOG_LIMIT] + "…"


def _response_body(call: ProxyCall) -> str | None:
    """The completion as the client got it: the JSON body, or a stream's events as relayed."""
    if call.parsed is not None:
        return _clip(orjson.dumps(call.parsed).decode())
    if call.logged_stream:
        return _clip(call.logged_stream.decode("utf-8", "replace"))
    return None


def _tokens(usage: Usage) -> tuple[int, int, int, int]:
    return usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens, usage.cached_tokens


Lookup = Callable[[str, ProxyCall], Awaitable[tuple[int, Any]]]


class Meter:
    def __init__(
        self,
        catalog: Catalog,
        ledger: Ledger,
        metrics: Metrics,
        admission: Admission,
        lookup: Lookup,
        reconcile_delays_s: tuple[float, ...] = (0.5, 0.5, 1, 2, 4, 8, 15),  # settings.reconcile_delays_s
    ) -> None:
        self.catalog = catalog
        self.ledger = ledger
        self.metrics = metrics
        self.admission = admission
        self._lookup = lookup
        self._delays = reconcile_delays_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.log_requests = True
        self.log_bodies = False

    def record(self, call: ProxyCall) -> UsageRecord:
        record = self.build(call)
        self.metrics.observe_request(record)
        if not record.estimated:
            self.metrics.observe_usage(record)
        if call.forwarded:
            self.ledger.add(record)
        if call.reservation is not None:
            self.admission.settle(call.reservation, record.prompt_tokens + record.completion_tokens, record.cost_usd)
        if record.estimated:
            lookups = [*(call.unread or ()), *(call.uncosted or ())]  # told nothing; told no cost
            if call.usage is None and call.generation_id and call.generation_id not in lookups:
                lookups.append(call.generation_id)  # a cut stream's
            if lookups:
                self._spawn(self._reconcile(call, record, lookups))
        if self.log_requests and requests_log.isEnabledFor(logging.INFO):
            fields = record.log_fields()
            if self.log_bodies:
                fields["request_body"] = call.logged_body
                fields["response_body"] = _response_body(call)
            requests_log.info("request", extra=fields)
        return record

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the record ------------------------------------------------------------------------------
    def build(self, call: ProxyCall) -> UsageRecord:
        now = time.perf_counter()
        finished = call.finished or now
        model = call.model_used or call.model
        upstream_s = None
        overhead = finished - call.started
        if call.upstream_started is not None:
            upstream_end = call.upstream_done or finished
            upstream_s = max(0.0, upstream_end - call.upstream_started)
            overhead = max(0.0, (call.upstream_started - call.started) + (finished - upstream_end))
        record = UsageRecord(
            request_id=call.request_id,
            time=call.wall_time,
            key_id=call.principal.key_id,
            key_name=call.principal.key_name,
            team=call.principal.team_name,
            endpoint=call.endpoint.name,
            model_requested=call.model_requested,
            model=model if call.forwarded else None,
            model_served=call.model_served,
            provider=call.provider,
            stream=call.stream,
            status=call.status,
            error_code=call.error_code,
            generation_id=call.generation_id,
            duration_s=finished - call.started,
            upstream_s=upstream_s,
            overhead_s=overhead,
            ttft_s=(call.first_token - call.started) if call.first_token else None,
            retries=call.retries,
        )
        if call.uncosted:  # at the catalogue's prices until /generation tells their cost
            usage = self.priced(call.usage, list(call.uncosted.values()), model)
            return record.with_usage(usage, usage.cost_usd or Decimal(0), "catalogue", estimated=True)
        if call.usage is not None:
            # exact, unless another try's usage could not be read: then looked up and added
            cost, source = self.cost(call.usage, model)
            return record.with_usage(call.usage, cost, source, estimated=bool(call.unread))
        if call.stream and call.forwarded and call.data_events:
            seen = Usage(prompt_tokens=call.prompt_estimate, completion_tokens=max(0, call.data_events - 1))
            cost, _ = self.cost(seen, model)
            return record.with_usage(seen, cost, "catalogue", estimated=True)
        if call.forwarded and (call.generation_id or call.unread):
            # OpenRouter started a generation but its body told us nothing usable (malformed, or
            # an error without usage): it may still be billed, so ask for its stats later.
            return record.with_usage(Usage(), Decimal(0), "none", estimated=True)
        return record

    def priced(self, usage: Usage | None, more: list[Usage], model: str | None) -> Usage:
        """Usages together, each with its own cost (OpenRouter's, else the catalogue's)."""
        total = Usage(cost_usd=Decimal(0))
        for part in [usage, *more] if usage is not None else more:
            total = total.plus(Usage(*_tokens(part), cost_usd=self.cost(part, model)[0]))
        return total

    def cost(self, usage: Usage, model: str | None) -> tuple[Decimal, CostSource]:
        """OpenRouter's own `usage.cost` first; the catalogue's prices otherwise."""
        if usage.cost_usd is not None:
            return usage.cost_usd, "upstream"
        prices = self.catalog.cached_prices(model) if model else None
        if prices is None:
            return Decimal(0), "none"
        return catalogue_cost(usage, prices), "catalogue"

    # -- reconciliation --------------------------------------------------------------------------
    async def _reconcile(self, call: ProxyCall, estimate: UsageRecord, lookups: list[str]) -> None:
        """Replace the estimate by what OpenRouter's stats say: the usage read from the tries
        (if any) plus each looked-up generation's. A generation that cannot be found keeps its
        part of the estimate (a cut stream's tokens seen); when none can, the estimate stands."""
        found: Usage | None = None
        missing = []
        for generation_id in lookups:
            usage = await self._look_up(generation_id, call)
            if usage is None:
                missing.append(generation_id)
            else:
                found = usage if found is None else found.plus(usage)
        if found is None:
            self.metrics.reconciliations.labels("gave_up").inc()
            self.metrics.observe_usage(estimate)  # the estimate stands, as marked
            log.warning("generation %s could not be reconciled; its estimate stands", ", ".join(lookups))
            return
        exact = self.priced(call.usage, [found], estimate.model)
        uncosted = call.uncosted or {}
        kept = [uncosted[g] for g in missing if g in uncosted]  # their counts, at the catalogue's prices
        exact = self.priced(exact, kept, estimate.model)
        if call.usage is None and not uncosted and call.generation_id in missing:  # a cut stream never found
            seen = Usage(estimate.prompt_tokens, estimate.completion_tokens, cost_usd=estimate.cost_usd)
            exact = exact.plus(seen)
        if missing:
            log.warning("generation %s could not be looked up; its part stays estimated", ", ".join(missing))
        await self._apply(call.reservation, estimate, exact)

    async def _look_up(self, generation_id: str, call: ProxyCall) -> Usage | None:
        """One generation's usage from OpenRouter's stats, asked again while it is not there yet."""
        for delay in self._delays:
            await asyncio.sleep(delay)
            try:
                status, body = await self._lookup(generation_id, call)
            except Exception as exc:  # a lookup failure must never escape a background task
                log.debug("generation lookup failed: %s", exc)
                continue
            data = body.get("data") if isinstance(body, dict) else None
            if status == 200 and isinstance(data, dict):
                return Usage.from_generation(data)
            if status not in (404, 429) and status < 500:
                break
        return None

    async def _apply(self, reservation: Reservation | None, estimate: UsageRecord, usage: Usage) -> None:
        cost, source = self.cost(usage, estimate.model)
        exact = UsageRecord(**{name: getattr(estimate, name) for name in UsageRecord.__slots__})
        exact.with_usage(usage, cost, "generation" if source == "upstream" else source)
        self.ledger.correct(estimate, exact)
        self.metrics.observe_usage(exact)
        self.metrics.reconciliations.labels("reconciled").inc()
        if reservation is not None:
            self.admission.adjust(
                reservation, exact.prompt_tokens + exact.completion_tokens, exact.cost_usd - estimate.cost_usd
            )
        log.info(
            "generation %s reconciled: %s tokens, $%s",
            exact.generation_id,
            exact.prompt_tokens + exact.completion_tokens,
            exact.cost_usd,
            extra=exact.log_fields(),  # the corrected record (cost_source generation), for the log
        )

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
