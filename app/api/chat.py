"""OpenAI inference routes: chat completions, legacy completions, embeddings."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, MutableMapping
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive

from app.api.deps import GatewayDep, read_json_body, request_id
from app.api.responses import JSONBytes, SSEResponse
from app.auth.keys import UNKNOWN
from app.call import ANSWERING, CHAT, COMPLETIONS, EMBEDDINGS, Endpoint
from app.errors import AuthenticationError, GatewayError
from app.gateway import Gateway, response_headers
from app.normalize.stream import StreamRelay
from app.usage.meter import BODY_LOG_LIMIT

router = APIRouter(tags=["OpenAI"])


async def proxy(
    gateway: Gateway,
    endpoint: Endpoint,
    headers: Mapping[str, str],
    receive: Receive,
    request_id: str,
    scope: MutableMapping[str, Any] | None = None,
) -> Response:
    """DESIGN §4: authenticate → parse → resolve → normalise → admit → forward → relay → meter."""
    try:
        principal = await gateway.authenticate(headers.get("authorization"))
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
        return SSEResponse(outcome, StreamRelay(call.include_usage), call, relayed, gateway.finish, gateway.streams)
    except GatewayError as error:
        gateway.finish(call, error)
        raise
    except BaseException as exc:  # cancelled, or a bug: the call is still metered and released
        status, code = (499, "request_cancelled") if isinstance(exc, asyncio.CancelledError) else (500, None)
        gateway.finish(call, GatewayError("The request did not complete.", status=status, code=code))
        raise


_BODY = {"content": {"application/json": {"schema": {"type": "object"}}}, "required": True}


@router.post("/chat/completions", openapi_extra={"requestBody": _BODY}, summary="Create a chat completion")
async def chat_completions(request: Request, gateway: GatewayDep) -> Any:
    return await proxy(gateway, CHAT, request.headers, request.receive, request_id(request))


@router.post("/completions", openapi_extra={"requestBody": _BODY}, summary="Create a completion (legacy)")
async def completions(request: Request, gateway: GatewayDep) -> Any:
    return await proxy(gateway, COMPLETIONS, request.headers, request.receive, request_id(request))


@router.post("/embeddings", openapi_extra={"requestBody": _BODY}, summary="Create embeddings")
async def embeddings(request: Request, gateway: GatewayDep) -> Any:
    return await proxy(gateway, EMBEDDINGS, request.headers, request.receive, request_id(request))
