"""The outermost ASGI layer: header limits, request ids, /metrics' credential, and the inference
routes' fast lane.

Every response carries `x-request-id` (the client's, when sane). Requests with too many or too
large headers get 431; /metrics without the scrape or admin key gets 401 (403 with neither set).
POSTs to the inference routes (`dialects.ROUTES`) go straight to `inference.answer`, skipping
all of FastAPI (its middleware stack, router and dependency solving: a measurable share of each
request); everything else, including these routes' OpenAPI documentation, stays FastAPI's.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable

from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.inference import COUNT_TOKENS, answer
from app.api.responses import error_response
from app.auth.keys import bearer_token, hash_key
from app.dialects import PREFIXES, ROUTES, Dialect, dialect_of
from app.errors import AuthenticationError, GatewayError, InvalidRequestError, MetricsDisabledError
from app.gateway import Gateway
from app.request_ids import request_id_of

log = logging.getLogger("gateway")

# POST paths answered before FastAPI: every API's routes, and count_tokens (None).
FAST_LANE: dict[str, Dialect | None] = {**ROUTES, **{prefix + COUNT_TOKENS: None for prefix in PREFIXES}}


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        state: State,
        max_header_bytes: int = 32768,
        max_headers: int = 100,
        admin: bool = True,
        inference: bool = True,
        metrics_keys: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.state = state  # the app's: the lifespan puts the Gateway there
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.admin = admin  # /admin is served here
        self.inference = inference  # the OpenAI routes are served here (not on the admin address)
        # what opens /metrics (the scrape key, the admin key), kept as digests: compared in constant time
        self.metrics_digests = tuple(hash_key(key).encode() for key in metrics_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers = scope["headers"]
        rid = request_id_of(raw_headers)
        scope["request_id"] = rid
        id_header = (b"x-request-id", rid.encode())
        refusal = self._refusal(scope)
        fast = self.inference and scope["method"] == "POST" and scope["path"] in FAST_LANE
        if refusal is None and not fast:

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), id_header]
                await send(message)

            await self.app(scope, receive, send_with_id)
            return
        if refusal is not None:
            response = error_response(refusal, FAST_LANE.get(scope["path"]) or dialect_of(scope["path"]))
        else:
            gateway: Gateway = self.state.gateway
            # the first of repeated headers, as Starlette's own routes read them (and uvicorn lowercases names)
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(raw_headers)}
            response = await answer(gateway, FAST_LANE[scope["path"]], headers, receive, rid, scope)
        response.raw_headers.append(id_header)  # our own responses: no wrapper around every send
        await response(scope, receive, send)

    def _refusal(self, scope: Scope) -> GatewayError | None:
        headers = scope["headers"]
        if len(headers) > self.max_headers or sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            return InvalidRequestError(
                "The request's headers are too many or too large.", status=431, code="request_header_fields_too_large"
            )
        if not self.admin and (scope["path"].startswith("/admin") or scope["path"] == "/metrics"):
            # metrics name keys and teams and show their spend: with the admin API, not beside the OpenAI routes
            return InvalidRequestError("This is served on the admin address.", status=404, code="unknown_url")
        if scope["path"] == "/metrics":
            return self._scrape_refusal(headers)
        return None

    def _scrape_refusal(self, headers: list[tuple[bytes, bytes]]) -> GatewayError | None:
        """/metrics names keys and teams and shows their spend: only for the scrape or admin key."""
        if not self.metrics_digests:
            return MetricsDisabledError(
                "/metrics is off: set GATEWAY_METRICS_KEY (Prometheus's scrape credential) to turn it on."
            )
        authorization = next((value for name, value in headers if name == b"authorization"), b"")
        try:
            token = bearer_token(authorization.decode("latin-1"))
        except AuthenticationError:
            return AuthenticationError(
                "/metrics needs 'Authorization: Bearer <GATEWAY_METRICS_KEY>' (or the admin key)."
            )
        digest = hash_key(token).encode()
        matched = False
        for expected in self.metrics_digests:  # every one compared: the time does not say which matched
            matched |= hmac.compare_digest(digest, expected)
        return None if matched else AuthenticationError("Incorrect metrics key provided.")
