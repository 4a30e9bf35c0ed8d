"""Dependencies of the routes: the process's Gateway and the request's body and id."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import RequestTooLargeError, UnsupportedMediaTypeError
from app.gateway import Gateway


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def request_id(request: Request) -> str:
    rid: str = request.scope["request_id"]
    return rid


async def read_json_body(request: Request, limit: int) -> bytes:
    """The raw body, refused early if it is not JSON or larger than `limit` bytes."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise UnsupportedMediaTypeError(
                f"Content-Type must be application/json, not {media or 'empty'}.", param="content-type"
            )
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise RequestTooLargeError(f"The request body is larger than {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"The request body is larger than {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)
