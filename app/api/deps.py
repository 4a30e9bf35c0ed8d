"""Dependencies of the routes: the process's Gateway and the request's body and id."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import Receive

from app.errors import InvalidRequestError, RequestTooLargeError, UnsupportedMediaTypeError
from app.gateway import Gateway


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def request_id(request: Request) -> str:
    rid: str = request.scope["request_id"]
    return rid


async def read_json_body(headers: Mapping[str, str], receive: Receive, limit: int) -> bytes:
    """The raw body, refused early if it is not JSON or larger than `limit` bytes."""
    content_type = headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise UnsupportedMediaTypeError(
                f"Content-Type must be application/json, not {media or 'empty'}.", param="content-type"
            )
    encoding = headers.get("content-encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {encoding} is not supported; send the body uncompressed.", param="content-encoding"
        )
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise RequestTooLargeError(f"The request body is larger than {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise InvalidRequestError("The client went away before sending the whole body.", code="client_closed")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"The request body is larger than {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
