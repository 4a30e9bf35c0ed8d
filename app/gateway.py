"""The gateway's request path, stage by stage (DESIGN §4), free of any web framework.

`api/` calls these stages in order; `main.py` builds one `Gateway` per process in the lifespan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from app.auth.keys import KeyAuthenticator, Principal, hash_key
from app.auth.registry import Registry
from app.catalog.models import Catalog
from app.errors import GatewayError, InvalidRequestError, ModelNotAllowedError, UpstreamError, UpstreamUnavailableError
from app.normalize import request as normalize
from app.normalize.response import body_error, error_from_status
from app.settings import Settings
from app.store.base import Store
from app.upstream.client import OpenRouterClient, UpstreamResponse, attribution_headers
from app.usage.record import Usage

log = logging.getLogger("gateway.request")

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


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    path: str  # below the upstream base URL
    required: tuple[tuple[str, type | tuple[type, ...]], ...]
    expect: str  # the list a successful response carries
    streams: bool = True


CHAT = Endpoint("chat.completions", "/chat/completions", (("messages", list),), "choices")
COMPLETIONS = Endpoint("completions", "/completions", (("prompt", (str, list)),), "choices")
EMBEDDINGS = Endpoint("embeddings", "/embeddings", (("input", (str, list)),), "data", streams=False)


@dataclass(slots=True)
class ProxyCall:
    """One request on its way through the gateway; metering reads it at the end."""

    request_id: str
    endpoint: Endpoint
    principal: Principal
    started: float = field(default_factory=time.perf_counter)
    model_requested: str | None = None
    model: str | None = None
    model_served: str | None = None
    stream: bool = False
    include_usage: bool = False
    status: int = 200
    error_code: str | None = None
    generation_id: str | None = None
    usage: Usage | None = None
    upstream_started: float | None = None
    first_byte: float | None = None
    first_token: float | None = None
    finished: float | None = None
    client_disconnected: bool = False


class Meter(Protocol):
    def record(self, call: ProxyCall) -> None: ...


class LogMeter:
    """Until the ledger lands: one debug line per finished request."""

    def record(self, call: ProxyCall) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s %s model=%s status=%s usage=%s",
                call.request_id,
                call.endpoint.name,
                call.model,
                call.status,
                call.usage,
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
        meter: Meter,
    ) -> None:
        self.settings = settings
        self.client = client
        self.catalog = catalog
        self.store = store
        self.registry = Registry(store)
        self.authenticator = authenticator
        self.meter = meter
        self.draining = False
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        self.admin_key_hash = hash_key(admin_key).encode() if admin_key else None
        self._headers = {
            **attribution_headers(settings.attribution),
            "Authorization": client.auth_header(),
            "Content-Type": "application/json",
        }

    # 1. authenticate
    async def authenticate(self, authorization: str | None) -> Principal:
        return await self.authenticator.authenticate(authorization)

    # 2. parse
    @staticmethod
    def parse(raw: bytes, endpoint: Endpoint) -> dict[str, Any]:
        payload = normalize.parse_object(raw)
        normalize.require_fields(payload, endpoint.required)
        normalize.check_types(payload)
        if not endpoint.streams and payload.get("stream"):
            raise InvalidRequestError("This endpoint does not stream.", code="invalid_value", param="stream")
        return payload

    # 3. resolve
    async def resolve(self, call: ProxyCall, payload: dict[str, Any]) -> None:
        requested = payload.get("model")
        model = self.catalog.resolve(requested)
        call.model_requested, call.model = requested, model
        call.stream = payload.get("stream") is True
        call.include_usage = call.stream and normalize.wants_usage(payload)
        principal = call.principal
        if model is not None:
            if not principal.allows(model):
                raise ModelNotAllowedError(f"This key may not use the model '{model}'.", param="model")
            await self.catalog.check_known(model)
        fallbacks = payload.get("models")
        if isinstance(fallbacks, list):
            for name in fallbacks:
                target = self.catalog.resolve(name) if isinstance(name, str) else None
                if target is not None and not principal.allows(target):
                    raise ModelNotAllowedError(f"This key may not use the model '{target}'.", param="models")

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
        if call.endpoint is not EMBEDDINGS:
            changed |= normalize.fold_reasoning_effort(payload)
        team = call.principal.team
        if team is not None and team.defaults:
            changed |= normalize.merge_defaults(payload, team.defaults)
        if call.model is not None:
            changed |= normalize.merge_defaults(payload, self.catalog.settings_for(call.model).defaults)
        if team is not None and team.provider:
            changed |= normalize.impose_policy(payload, {"provider": team.provider})
        return normalize.encode(payload) if changed else raw

    # 6. forward
    async def forward(self, call: ProxyCall, body: bytes, client_headers: Mapping[str, str]) -> UpstreamResponse:
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
        if call.stream:
            headers["Accept"] = "text/event-stream"
        timeout = min(self.settings.upstream.first_byte_timeout_s, self.remaining(call))
        call.upstream_started = time.perf_counter()
        response = await self.client.post(call.endpoint.path, body, headers, timeout)
        call.first_byte = time.perf_counter()
        call.generation_id = response.headers.get("x-generation-id")
        if response.status >= 300:
            raw = await response.read()
            raise error_from_status(response.status, raw, response.headers)
        return response

    def remaining(self, call: ProxyCall) -> float:
        return max(0.001, call.started + self.settings.upstream.deadline_s - time.perf_counter())

    # 7. relay (non-streaming)
    async def read_json(self, call: ProxyCall, response: UpstreamResponse) -> bytes:
        """The upstream body, checked for an error hidden in an HTTP 200."""
        raw = await response.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(
                "OpenRouter returned a body that is not JSON.", code="upstream_invalid_response"
            ) from None
        error = body_error(body, call.endpoint.expect)
        if error is not None:
            raise error
        call.usage = Usage.from_openrouter(body.get("usage"))
        call.model_served = body.get("model") if isinstance(body.get("model"), str) else None
        return raw

    # 8. meter
    def finish(self, call: ProxyCall, error: GatewayError | None = None) -> None:
        call.finished = time.perf_counter()
        if error is not None:
            call.status, call.error_code = error.status, error.code
        self.meter.record(call)


def response_headers(upstream_headers: Mapping[str, str]) -> dict[str, str]:
    return {name: upstream_headers[name] for name in PASSED_RESPONSE_HEADERS if name in upstream_headers}
