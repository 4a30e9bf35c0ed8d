"""What every simulator endpoint does the same way: read the JSON body, resolve the model it
names, answer JSON, play the faults due before the headers (latency, a hang, a reset, an error
status), and drop the connection; plus the keep-alive comment its streams start with."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from app.simulator.catalogue import BY_ID
from app.simulator.errors import error_response

KEEPALIVE = b": OPENROUTER PROCESSING\n\n"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def parse_body(raw: bytes) -> tuple[dict[str, Any], web.Response | None]:
    """The body as a JSON object, or OpenRouter's 400 when it is not one."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}, error_response(400, {"message": "Invalid JSON body"})
    if not isinstance(payload, dict):
        return {}, error_response(400, {"message": "Expected object, received " + type(payload).__name__})
    return payload, None


def model_of(payload: dict[str, Any], kind: str) -> tuple[dict[str, Any], web.Response | None]:
    """The catalogue entry of the body's `model` (a `:variant` suffix falls back to the base id),
    or OpenRouter's 400/404 when it is invalid, unknown, or of the wrong kind for the endpoint."""
    model_id = payload.get("model") or "openai/gpt-4o-mini"
    if not isinstance(model_id, str) or "/" not in model_id:
        return {}, error_response(
            400, {"message": f"{model_id} is not a valid model ID", "error_type": "invalid_request"}
        )
    base = model_id if model_id in BY_ID else model_id.rsplit(":", 1)[0]
    model = BY_ID.get(base)
    if model is None:
        return {}, error_response(404, {"message": f"No endpoints found for {model_id}.", "error_type": "not_found"})
    is_embedding = model["architecture"]["output_modalities"] == ["embeddings"]
    if is_embedding != (kind == "embedding"):
        return {}, error_response(
            400, {"message": f"{model_id} does not support this endpoint", "error_type": "invalid_request"}
        )
    return model, None


async def faults_before_headers(
    request: web.Request,
    knobs: dict[str, Any],
    error: Callable[[int, dict[str, Any]], web.Response] = error_response,
) -> web.StreamResponse | None:
    """The `ttfb_ms`, `hang` and `reset: "before_headers"` knobs, then the `status` knob answered
    as `error(status, knobs)`: OpenRouter's body by default, the agent APIs pass their own."""
    if knobs.get("ttfb_ms"):
        await asyncio.sleep(float(knobs["ttfb_ms"]) / 1000)
    if knobs.get("hang"):
        await asyncio.sleep(3600)
    if knobs.get("reset") == "before_headers":
        reset(request)
        return web.Response(status=500)
    if isinstance(knobs.get("status"), int) and knobs["status"] != 200:
        return error(knobs["status"], knobs)
    return None


def reset(request: web.Request) -> None:
    """Drop the connection without an answer."""
    transport = request.transport
    if transport is not None:
        transport.abort()
