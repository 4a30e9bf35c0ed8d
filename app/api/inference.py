"""The inference routes: every API of `app/dialects/` through the one request path (`proxy`),
and Anthropic's `count_tokens`, answered here.

`edge.py` calls `answer` for a POST to any path in `dialects.ROUTES` before FastAPI routing
(the fast lane); the FastAPI routes below run the same `answer` and give the OpenAPI schema its
entries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, MutableMapping
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive

from app.api.deps import GatewayDep, read_json_body, request_id
from app.api.responses import JSON, JSONBytes, SSEResponse, error_response
from app.auth.keys import UNKNOWN
from app.call import ANSWERING
from app.dialects import DIALECTS, MESSAGES, Dialect
from app.dialects.messages import count_tokens
from app.errors import AuthenticationError, GatewayError
from app.gateway import Gateway, response_headers
from app.usage.meter import BODY_LOG_LIMIT

log = logging.getLogger("gateway")
COUNT_TOKENS = "/messages/count_tokens"


async def answer(
    gateway: Gateway,
    endpoint: Dialect | None,
    headers: Mapping[str, str],
    receive: Receive,
    request_id: str,
    scope: MutableMapping[str, Any] | None = None,
) -> Response:
    """A POST to an inference route, answered in its API's dialect whatever happens
    (`endpoint` None: count_tokens)."""
    dialect = endpoint or MESSAGES
    try:
        if endpoint is None:
            return await count_message_tokens(gateway, headers, receive)
        return await proxy(gateway, endpoint, headers, receive, request_id, scope)
    except GatewayError as error:
        return error_response(error, dialect)
    except Exception:
        log.exception("unhandled error on POST %s", (scope or {}).get("path", dialect.name))
        return error_response(GatewayError(), dialect)


async def proxy(
    gateway: Gateway,
    endpoint: Dialect,
    headers: Mapping[str, str],
    receive: Receive,
    request_id: str,
    scope: MutableMapping[str, Any] | None = None,
) -> Response:
    """DESIGN §4: authenticate → parse → resolve → normalise → admit → forward → relay → meter."""
    try:
        principal = await gateway.authenticate(endpoint.credential(headers))
    except GatewayError as error:  # counted and logged too: a flood of bad keys shows
        refused = error.refused if isinstance(error, AuthenticationError) else None
        gateway.finish(gateway.new_call(request_id, endpoint, refused or UNKNOWN), error)  # key "" if unknown
        raise
    call = gateway.new_call(request_id, endpoint, principal)  # from here on, metered however it ends
    if scope is not None:
        scope[ANSWERING] = call  # the server marks it if the client hangs up (no further tries)
    try:
        raw = await read_json_body(headers, receive, gateway.settings.max_body_bytes)
        gateway.body_received(call)
        if gateway.settings.log_bodies:
            call.logged_body = raw[:BODY_LOG_LIMIT].decode("utf-8", "replace")
            call.logged_stream = bytearray()
        payload = gateway.parse(raw, endpoint)
        await gateway.resolve(call, payload)
        body = gateway.to_upstream(call, payload, raw)
        await gateway.admit(call, payload)
        outcome = await gateway.forward(call, body, payload, headers)
        if isinstance(outcome, bytes):
            await gateway.admission.free_slots(call.reservation)  # before the answer: see there
            return JSONBytes(outcome, response_headers(call, None), partial(gateway.finish, call))
        relayed = response_headers(call, outcome.headers)
        relay = endpoint.relay(call.include_usage)
        return SSEResponse(outcome, relay, call, relayed, gateway.finish, gateway.streams)
    except GatewayError as error:
        gateway.finish(call, error)
        raise
    except BaseException as exc:  # cancelled, or a bug: the call is still metered and released
        status, code = (499, "request_cancelled") if isinstance(exc, asyncio.CancelledError) else (500, None)
        gateway.finish(call, GatewayError("The request did not complete.", status=status, code=code))
        raise


async def count_message_tokens(gateway: Gateway, headers: Mapping[str, str], receive: Receive) -> Response:
    """Anthropic's token count, estimated here: for a valid key, never forwarded, never billed."""
    await gateway.authenticate(MESSAGES.credential(headers))
    raw = await read_json_body(headers, receive, gateway.settings.max_body_bytes)
    payload = gateway.parse(raw, MESSAGES)
    return Response(count_tokens(payload), media_type=JSON)


_BODY = {"content": {"application/json": {"schema": {"type": "object"}}}, "required": True}


def _route(endpoint: Dialect | None) -> Any:
    async def route(request: Request, gateway: GatewayDep) -> Response:
        return await answer(gateway, endpoint, request.headers, request.receive, request_id(request))

    return route


def router() -> APIRouter:
    """The inference routes for FastAPI's routing and schema, one per path of each API."""
    routes = APIRouter()
    for dialect in DIALECTS:
        for path in dialect.routes:
            routes.add_api_route(
                path,
                _route(dialect),
                methods=["POST"],
                summary=dialect.summary,
                tags=[dialect.tag],
                openapi_extra={"requestBody": _BODY},
            )
    routes.add_api_route(
        COUNT_TOKENS,
        _route(None),
        methods=["POST"],
        summary="Count a message's input tokens (an estimate; never forwarded)",
        tags=[MESSAGES.tag],
        openapi_extra={"requestBody": _BODY},
    )
    return routes
