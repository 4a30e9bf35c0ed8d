"""create_app(settings): the FastAPI application. The lifespan owns the upstream session,
the catalogue and the Gateway; nothing lives at module level.

Run with `gateway serve`, or `uvicorn app.main:create_app --factory`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import multiprocess
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.api import admin, health, inference, models
from app.api.docs import add_docs
from app.api.edge import EdgeMiddleware
from app.api.responses import error_response, gateway_error_handler
from app.auth.keys import KeyAuthenticator
from app.auth.teams import TeamPolicyFactory
from app.catalog.models import Catalog
from app.dialects import dialect_of
from app.errors import GatewayError, InvalidRequestError, RouteNotFoundError, StoreUnavailableError, UpstreamError
from app.gateway import Gateway
from app.limits.admission import Admission
from app.settings import ConfigError, Settings, load_settings, read_secret
from app.store import Store, StoreError, open_store
from app.upstream.client import OpenRouterClient, open_session
from app.usage.metrics import Metrics

log = logging.getLogger("gateway")
RATE_LIMIT_HEADERS = [
    f"x-ratelimit-{part}-{kind}" for part in ("limit", "remaining", "reset") for kind in ("requests", "tokens")
]


def create_app(settings: Settings | None = None) -> GatewayApp:
    """The gateway. With `admin_port` set, /admin is left out (see `create_admin_app`)."""
    settings = settings or load_settings()
    separate_admin = settings.admin_port is not None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        session = open_session(settings.upstream)
        client = OpenRouterClient(session, settings.upstream)
        store = open_store(settings)
        try:
            try:
                gateway = await _start_gateway(settings, client, store)
            except ConfigError as exc:
                app.state.refusal = exc  # reported in one line per problem (GatewayApp), not as a traceback
                raise
            app.state.gateway = gateway
            # What exists now lives as long as the process: keep it out of every future GC pass,
            # and collect the young generation less often (requests make many short-lived objects).
            gc.collect()
            gc.freeze()
            gc.set_threshold(10_000, 50, 100)
            _drain_on_signals(gateway, settings.shutdown_delay_s, settings.shutdown_grace_s)
            duties = [
                asyncio.ensure_future(_flush_last_used(gateway, settings.last_used_flush_s)),
                asyncio.ensure_future(gateway.admission.run()),
                asyncio.ensure_future(gateway.ledger.run()),
                asyncio.ensure_future(_refresh_budget_gauges(gateway, settings.budget_gauges_refresh_s)),
            ]
            try:
                yield
            finally:
                for duty in duties:
                    duty.cancel()
                await gateway.drain()
                await _flush_once(gateway)
                if gateway.metrics.multiprocess:
                    multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
        finally:
            await store.close()
            await session.close()

    app = _fastapi(settings, lifespan)
    for prefix in ("/v1", "/api/v1"):
        app.include_router(inference.router(), prefix=prefix, include_in_schema=prefix == "/v1")
        app.include_router(models.router, prefix=prefix, include_in_schema=prefix == "/v1")
    if not separate_admin:
        app.include_router(admin.router)
    app.include_router(health.router)
    _finish(app, settings, admin_routes=not separate_admin, inference=True)
    return app


def create_worker_app() -> GatewayApp:
    """For `gateway serve --workers N`: each worker reads its settings and sets up its logging."""
    from app.logs import configure_logging

    settings = load_settings()
    configure_logging(settings)
    return create_app(settings)


def create_admin_app(settings: Settings, gateway_app: FastAPI) -> GatewayApp:
    """The admin API on its own address (`admin_host`/`admin_port`), sharing the gateway's state."""
    app = _fastapi(settings, None)
    app.state = gateway_app.state
    app.include_router(admin.router)
    app.include_router(health.router)
    _finish(app, settings, admin_routes=True, inference=False)
    return app


class GatewayApp(FastAPI):
    """FastAPI with the edge (and CORS, when configured) in front of its whole middleware stack,
    so the inference POSTs take the fast lane before any of FastAPI's own layers run (its error
    middleware, telemetry and body limit: ~5% of a request's CPU, measured)."""

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.front is not None, "call _finish(app, ...) first"
        await self.front(scope, receive, self._refusing(send) if scope["type"] == "lifespan" else send)

    def _refusing(self, send: Send) -> Send:
        """A start refused for the configuration (a declared key without a team) is told as its
        problems, one line each: Starlette would send the server a traceback to log."""

        async def sending(message: Message) -> None:
            refusal: ConfigError | None = getattr(self.state, "refusal", None)
            if message["type"] == "lifespan.startup.failed" and refusal is not None:
                message = {**message, "message": "\n".join(f"problem: {p}" for p in refusal.problems)}
            await send(message)

        return sending

    async def behind_edge(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


def _fastapi(settings: Settings, lifespan: Any) -> GatewayApp:
    app = GatewayApp(
        title="OpenRouter Gateway",
        version=__version__,
        description="An OpenAI-compatible gateway in front of OpenRouter.",
        lifespan=lifespan,
        redirect_slashes=False,  # an unknown path is a 404, not a redirect a client may not follow
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: ours are served locally
        redoc_url=None,
    )
    add_docs(app)
    return app


def _finish(app: GatewayApp, settings: Settings, admin_routes: bool, inference: bool) -> None:
    app.add_exception_handler(GatewayError, gateway_error_handler)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    front: ASGIApp = EdgeMiddleware(
        app.behind_edge,
        app.state,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        admin=admin_routes,
        inference=inference,
        metrics_keys=[key.get_secret_value() for key in (settings.metrics_key, settings.admin_key) if key],
    )
    if settings.cors_origins:  # outermost, so fast-lane responses get the headers too
        front = CORSMiddleware(
            front,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id", *RATE_LIMIT_HEADERS],
        )
    app.front = front


async def _start_gateway(settings: Settings, client: OpenRouterClient, store: Store) -> Gateway:
    async def fetch_models() -> list[dict[str, Any]]:
        status, body = await client.get_json("/models", timeout=settings.upstream.connect_timeout_s + 10)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise UpstreamError(f"GET /models answered {status}")
        models: list[dict[str, Any]] = body["data"]
        return models

    catalog = Catalog(fetch_models, settings.upstream.catalog_ttl_s, settings.models)
    teams = TeamPolicyFactory(settings.attribution, client.auth_header(), read_secret)
    bootstrap = settings.api_key.get_secret_value() if settings.api_key else None
    authenticator = KeyAuthenticator(store, teams, bootstrap, cache_ttl_s=settings.auth_cache_ttl_s)
    metrics = Metrics(catalog.is_listed, multiprocess=settings.metrics_multiprocess_dir is not None)
    admission = Admission(
        store, settings.limits, on_store_error=metrics.store_errors.inc, on_ahead=metrics.admitted_ahead
    )
    gateway = Gateway(settings, client, catalog, store, authenticator, admission, metrics)
    await store.prepare()
    await gateway.registry.load_declared([t.record() for t in settings.teams], [k.record() for k in settings.keys])
    return gateway


async def _flush_last_used(gateway: Gateway, every_s: float) -> None:
    """Last-used times reach the store in batches, never as a write per request."""
    while True:
        await asyncio.sleep(every_s)
        await _flush_once(gateway)


def _drain_on_signals(gateway: Gateway, delay_s: float, grace_s: float) -> None:
    """SIGTERM/SIGINT: start the gateway's drain (/readyz answers 503), keep serving for
    `delay_s` so load balancers polling readiness move away, then let uvicorn's own handler stop
    the server: it stops accepting connections and waits for requests and streams, which the
    drain ends `grace_s` later. A second signal stops the server at once."""
    if threading.current_thread() is not threading.main_thread():
        return  # an embedded server (tests): no signals here
    loop = asyncio.get_running_loop()
    signalled = False
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def chained(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            nonlocal signalled
            first, signalled = not signalled, True
            if first and delay_s > 0:
                loop.call_soon_threadsafe(gateway.begin_drain, delay_s + grace_s)
                if callable(previous):
                    loop.call_soon_threadsafe(loop.call_later, delay_s, previous, signum, frame)
                return
            loop.call_soon_threadsafe(gateway.begin_drain, grace_s)
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, chained)


async def _refresh_budget_gauges(gateway: Gateway, every_s: float) -> None:
    """Budget gauges per team, from the store (each replica reports the same shared figure)."""
    while True:
        try:
            for team in await gateway.store.list_teams():
                state = await gateway.admission.budget_state("team", team.name, team)
                if state is not None:
                    gateway.metrics.budget_spent.labels(team.name).set(state["spent_usd"])
                    gateway.metrics.budget_limit.labels(team.name).set(state["limit_usd"])
        except StoreError:
            pass  # the admission path already reports the outage
        await asyncio.sleep(every_s)


async def _flush_once(gateway: Gateway) -> None:
    taken = gateway.authenticator.take_last_used()
    try:
        await gateway.store.touch_keys({key_id: datetime.fromtimestamp(when, UTC) for key_id, when in taken.items()})
    except StoreError:
        for key_id, when in taken.items():  # keep them for the next try
            gateway.authenticator.last_used.setdefault(key_id, when)


async def _store_error(request: Request, exc: Exception) -> Response:
    log.warning("store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return _render(request, StoreUnavailableError("The store is unavailable; try again shortly."))


def _render(request: Request, error: GatewayError) -> Response:
    """An error in the dialect of the path asked (Anthropic's under /v1/messages)."""
    return error_response(error, dialect_of(request.url.path))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
        return _render(request, InvalidRequestError("The body is not valid JSON.", code="invalid_json"))
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return _render(
        request, InvalidRequestError(f"{where or 'request'}: {first.get('msg', 'invalid')}", param=where or None)
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _render(request, RouteNotFoundError(f"Unknown request URL: {request.method} {request.url.path}."))
    if exc.status_code == 400 and str(exc.detail) == "There was an error parsing the body":
        # FastAPI's words for a body json.loads refused (bad UTF-8, too deep, a 5,000-digit number)
        return _render(request, InvalidRequestError("The body is not valid JSON.", code="invalid_json"))
    error = InvalidRequestError(str(exc.detail), status=exc.status_code, code=f"http_{exc.status_code}")
    error.headers.update(exc.headers or {})
    return _render(request, error)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _render(request, GatewayError())
