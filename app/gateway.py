"""The gateway's request path, stage by stage (DESIGN §4), free of any web framework:
authenticate → parse → resolve → normalise → admit → forward → relay → meter.

`api/` calls these stages in order; `main.py` builds one `Gateway` per process in the lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from app.auth.keys import KeyAuthenticator, Principal, hash_key
from app.auth.registry import Registry
from app.call import ProxyCall
from app.catalog.models import Catalog
from app.dialects import Answer, Dialect
from app.errors import (
    GatewayError,
    ModelNotAllowedError,
    ServerShuttingDownError,
    UpstreamUnavailableError,
)
from app.forwarder import Forwarder, Outcome
from app.limits.admission import Admission
from app.limits.plan import Demand, demand_of
from app.normalize import request as normalize
from app.settings import Settings
from app.store.base import Store
from app.upstream.client import OpenRouterClient, attribution_headers
from app.usage.ledger import Ledger
from app.usage.meter import Meter
from app.usage.metrics import Metrics

log = logging.getLogger("gateway.request")
SHUTTING_DOWN = "The server is shutting down; retry the request."

# Client headers that steer OpenRouter and are safe to pass on.
PASSED_REQUEST_HEADERS = (
    "x-session-id",
    "x-openrouter-cache",
    "x-openrouter-cache-ttl",
    "x-openrouter-cache-clear",
    "x-openrouter-metadata",
    "x-openrouter-experimental-metadata",
    "x-anthropic-beta",
)
# OpenRouter response headers worth handing to the client.
PASSED_RESPONSE_HEADERS = (
    "x-generation-id",
    "x-openrouter-cache-status",
    "x-openrouter-cache-age",
    "x-openrouter-cache-ttl",
    "x-openrouter-cache-source-id",
)


class Gateway:
    """Everything a request needs, built once per process."""

    def __init__(
        self,
        settings: Settings,
        client: OpenRouterClient,
        catalog: Catalog,
        store: Store,
        authenticator: KeyAuthenticator,
        admission: Admission,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.registry = Registry(store)
        self.authenticator = authenticator
        self.admission = admission
        self.metrics = metrics
        self.client = client
        self.forwarder = Forwarder(
            client, settings.upstream, lambda model: catalog.settings_for(model).first_byte_timeout_s
        )
        self.forwarder.on_retry = lambda reason: metrics.retries.labels(reason).inc()
        metrics.follow_in_flight(lambda: self.forwarder.budget.in_flight)
        self.ledger = Ledger(store, on_drop=metrics.ledger_dropped.inc)
        self.meter = Meter(
            catalog, self.ledger, metrics, admission, self._generation, tuple(settings.reconcile_delays_s)
        )
        self.meter.log_requests, self.meter.log_bodies = settings.log_requests, settings.log_bodies
        self.draining = False  # SIGTERM came: not ready
        self.stopped = False  # the drain's grace period is over: open work ends now
        self.streams: set[Any] = set()  # open SSE responses, ended by the drain at its deadline
        self.waiting: set[asyncio.Task[Any]] = set()  # requests waiting on OpenRouter, likewise
        self._stop_open_work: asyncio.TimerHandle | None = None
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        self.admin_key_hash = hash_key(admin_key).encode() if admin_key else None
        self._shared_auth = client.auth_header()
        self._headers = {
            **attribution_headers(settings.attribution),
            "Authorization": self._shared_auth,
            "Content-Type": "application/json",
        }

    def new_call(self, request_id: str, endpoint: Dialect, principal: Principal) -> ProxyCall:
        call = ProxyCall(request_id, endpoint, principal)
        call.deadline = call.started + self.settings.upstream.deadline_s
        return call

    def body_received(self, call: ProxyCall) -> None:
        """The request's clock (its deadline, the gateway's overhead) starts once the client has
        sent its body: a slow upload is the client's time, not the gateway's nor OpenRouter's."""
        call.started = time.perf_counter()
        call.deadline = call.started + self.settings.upstream.deadline_s

    async def _generation(self, generation_id: str, call: ProxyCall) -> tuple[int, Any]:
        """OpenRouter's stats of one generation, asked with the key that paid for it."""
        team = call.principal.team
        auth = team.headers["Authorization"] if team else self._shared_auth
        return await self.client.get_json("/generation", timeout=10, params={"id": generation_id}, auth=auth)

    # 1. authenticate
    async def authenticate(self, authorization: str | None) -> Principal:
        return await self.authenticator.authenticate(authorization)

    # 2. parse
    def parse(self, raw: bytes, endpoint: Dialect) -> dict[str, Any]:
        payload = normalize.parse_object(raw, self.settings.max_json_depth)
        endpoint.check(payload)
        return payload

    # 3. resolve
    async def resolve(self, call: ProxyCall, payload: dict[str, Any]) -> None:
        requested = payload.get("model")
        model = self.catalog.resolve(requested)
        call.model_requested, call.model = requested, model
        call.stream = payload.get("stream") is True
        call.include_usage = call.stream and call.endpoint.wants_usage(payload)
        principal = call.principal
        fallbacks = payload.get("models")
        if model is not None:
            if not principal.allows(model):
                raise ModelNotAllowedError(f"This key may not use the model '{model}'.", param="model")
            await self.catalog.check_known(model)
        elif any(principal.allowlists) and not (
            isinstance(fallbacks, list) and fallbacks and all(isinstance(m, str) for m in fallbacks)
        ):
            # OpenRouter would pick the account's default model, which no allowlist can vouch for.
            raise ModelNotAllowedError("This key may use only some models: name one in `model`.", param="model")
        for field in ("models", "fallbacks"):  # OpenRouter's fallback lists (Messages has both)
            listed = payload.get(field)
            for name in listed if isinstance(listed, list) else ():
                target = self.catalog.resolve(name) if isinstance(name, str) else None
                if target is not None and not principal.allows(target):
                    raise ModelNotAllowedError(f"This key may not use the model '{target}'.", param=field)

    # 4. normalise
    def to_upstream(self, call: ProxyCall, payload: dict[str, Any], raw: bytes) -> bytes:
        changed = False
        if call.model is not None and call.model != call.model_requested:
            payload["model"] = call.model
            changed = True
        fallbacks = payload.get("models")
        if isinstance(fallbacks, list) and any(self.catalog.resolve(m) != m for m in fallbacks if isinstance(m, str)):
            payload["models"] = [self.catalog.resolve(m) if isinstance(m, str) else m for m in fallbacks]
            changed = True
        dialect = call.endpoint
        changed |= dialect.fold_reasoning(payload)
        team = call.principal.team
        if team is not None and team.defaults:
            changed |= normalize.merge_defaults(payload, dialect.defaults(team.defaults, payload))
        if call.model is not None:
            model_defaults = self.catalog.settings_for(call.model).defaults
            changed |= normalize.merge_defaults(payload, dialect.defaults(model_defaults, payload))
        if team is not None and team.provider:
            changed |= normalize.impose_policy(payload, {"provider": team.provider})
        return normalize.encode(payload) if changed else raw

    # 5. admit
    async def admit(self, call: ProxyCall, payload: dict[str, Any]) -> None:
        team = call.principal.team
        shared_key = team is None or team.headers.get("Authorization") == self._shared_auth
        plan = self.admission.plan(call.principal, shared_key)
        demand = self._demand(call, payload) if plan.needs_demand else Demand()
        call.reservation = await self.admission.admit(call.request_id, plan.checks(demand), plan)

    def _demand(self, call: ProxyCall, payload: dict[str, Any]) -> Demand:
        models = [m for m in self._models(call) if m is not None]
        entry = self.catalog.cached_entry(models[0]) if models else None
        prices = [self.catalog.cached_prices(m) for m in models]
        known = [p for p in prices if p is not None]
        worst = max(known, key=lambda p: p.prompt + p.completion) if len(known) == len(prices) and known else None
        dialect = call.endpoint
        return demand_of(
            payload, entry, worst or self.catalog.max_prices(), not dialect.writes_tokens, dialect.output_limits
        )

    def _models(self, call: ProxyCall) -> list[str | None]:
        """The asked model, then its configured fallbacks that this key may use."""
        if call.model is None:
            return [None]
        fallbacks = self.catalog.settings_for(call.model).fallbacks
        if not fallbacks:
            return [call.model]
        return [call.model, *(m for m in fallbacks if m != call.model and call.principal.allows(m))]

    # 6. forward (7. relay: api/)
    async def forward(
        self, call: ProxyCall, body: bytes, payload: dict[str, Any], client_headers: Mapping[str, str]
    ) -> Outcome:
        team = call.principal.team
        if team is not None and team.missing_key_env:
            raise UpstreamUnavailableError(
                f"Team '{team.name}' has no OpenRouter key on this gateway. Tell the gateway operator.",
                code="upstream_key_missing",
            )
        headers = {**(team.headers if team else self._headers), "X-Request-Id": call.request_id}
        for name in PASSED_REQUEST_HEADERS:
            value = client_headers.get(name)
            if value is not None:
                headers[name] = value
        for name, value in call.endpoint.upstream_headers(client_headers, payload).items():
            headers.setdefault(name, value)  # (the client's own x-session-id or x-anthropic-beta wins)
        if call.stream:
            headers["Accept"] = "text/event-stream"

        def body_for(model: str | None) -> bytes:
            if model == call.model:
                return body
            return normalize.encode({**payload, "model": model})

        if self.stopped:
            raise ServerShuttingDownError(SHUTTING_DOWN)
        if call.client_disconnected:  # gone while it was admitted: a try would be billed for nobody
            raise GatewayError("The client went away before the request was sent.", status=499, code="client_closed")
        call.forwarded = call.in_flight = True
        self.forwarder.budget.in_flight += 1
        if self.metrics.count_in_flight:
            self.metrics.in_flight.inc()
        if call.stream:
            call.payload = payload
        task = asyncio.current_task()
        assert task is not None
        self.waiting.add(task)
        try:
            return await self.forwarder.send(call, self._models(call), body_for, headers)
        except asyncio.CancelledError:
            if not self.stopped:
                raise
            task.uncancel()  # ended by the drain: answer, rather than vanish
            raise ServerShuttingDownError(SHUTTING_DOWN) from None
        finally:
            self.waiting.discard(task)

    # 8. meter
    def finish(self, call: ProxyCall, error: GatewayError | None = None, answer: Answer | None = None) -> None:
        """The request ended (answered, refused or failed): what OpenRouter's answer said, if it
        answered, goes on the call, and the call is metered."""
        call.finished = time.perf_counter()
        if answer is not None:
            call.add_usage(answer.billed())
            call.model_served, call.provider, call.data_events = answer.model, answer.provider, answer.data_events
        if error is not None:
            call.status, call.error_code = error.status, error.code
            if error.status == 429 and isinstance(error.metadata, dict):
                self.metrics.rate_limited.labels(error.metadata.get("limit", ""), error.metadata.get("scope", "")).inc()
        if call.client_disconnected:
            call.status = 499  # what the client saw: nothing; its usage, if any, is metered all the same
        if call.in_flight:
            call.in_flight = False
            self.forwarder.budget.in_flight -= 1
            if self.metrics.count_in_flight:
                self.metrics.in_flight.dec()
        self.meter.record(call)

    def begin_drain(self, grace_s: float) -> None:
        """SIGTERM: report not ready at once; what is still open after `grace_s` gets ended."""
        if self.draining:
            return
        self.draining = True
        log.warning("draining: not ready; open requests end in %.0fs", grace_s)
        self._stop_open_work = asyncio.get_running_loop().call_later(grace_s, self.stop_open_work)

    def stop_open_work(self) -> None:
        """The grace period is over: requests still waiting on OpenRouter get a 503
        `server_shutting_down`, streams get it as their last event, and so do streams that
        would start from now on. Each is metered as it ends."""
        self.stopped = True
        if self.waiting or self.streams:
            log.warning(
                "grace period over: ending %d waiting requests and %d streams", len(self.waiting), len(self.streams)
            )
        for task in list(self.waiting):
            task.cancel()
        for stream in list(self.streams):
            stream.stop()

    async def drain(self) -> None:
        """At shutdown: settle, reconcile (what can be), and write everything still queued."""
        await self.admission.release_spares()  # first: reconciling cut streams may take half a minute
        await self.meter.drain()
        await self.admission.flush()
        await self.ledger.flush()


def response_headers(call: ProxyCall, upstream_headers: Mapping[str, str] | None) -> dict[str, str]:
    headers = (
        {n: upstream_headers[n] for n in PASSED_RESPONSE_HEADERS if n in upstream_headers} if upstream_headers else {}
    )
    if call.generation_id and "x-generation-id" not in headers:
        headers["x-generation-id"] = call.generation_id
    if call.reservation is not None:
        headers.update(call.reservation.headers())
    return headers
