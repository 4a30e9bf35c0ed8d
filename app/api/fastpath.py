"""The inference routes' fast lane: POSTs to the OpenAI endpoints go straight to `proxy`,
skipping FastAPI's routing, dependency solving and exception middleware (a measurable share of
each request). Everything else, including these routes' OpenAPI documentation, stays FastAPI's.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.chat import proxy
from app.api.responses import error_response
from app.call import CHAT, COMPLETIONS, EMBEDDINGS, Endpoint
from app.errors import GatewayError
from app.gateway import Gateway
from app.request_ids import request_id_of

log = logging.getLogger("gateway")

ROUTES: dict[str, Endpoint] = {
    f"{prefix}{path}": endpoint
    for prefix in ("/v1", "/api/v1")
    for path, endpoint in (("/chat/completions", CHAT), ("/completions", COMPLETIONS), ("/embeddings", EMBEDDINGS))
}


class FastPathMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        gateway: Gateway = scope["app"].state.gateway
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        rid = request_id_of(scope["headers"])
        id_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            response = await proxy(gateway, endpoint, headers, receive, rid)
        except GatewayError as error:
            response = error_response(error)
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            response = error_response(GatewayError())
        await response(scope, receive, send_with_id)
