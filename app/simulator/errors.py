"""OpenRouter's error bodies as observed (openrouter-api.md §5): numeric `code`, no `type`,
details under `metadata`, a `user_id` beside the error."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

_MESSAGES = {
    400: ("Provider returned error", "invalid_request"),
    401: ("User not found.", "authentication"),
    402: (
        "This request requires more credits, or fewer max_tokens. You requested up to 65536 tokens, "
        "but can only afford 1000. To increase, visit https://openrouter.ai/settings/credits",
        "payment_required",
    ),
    403: ("Input was flagged by moderation", "content_policy_violation"),
    404: ("No endpoints found matching your data policy.", "not_found"),
    408: ("Request timed out", "timeout"),
    413: ("Payload too large", "payload_too_large"),
    422: ("Unprocessable request", "unprocessable"),
    429: ("Provider returned error", "rate_limit_exceeded"),
    500: ("Internal Server Error", "server"),
    502: ("Provider returned error", "provider_unavailable"),
    503: ("No available providers for this request", "provider_overloaded"),
    504: ("Gateway timeout", "timeout"),
    524: ("Provider timed out", "timeout"),
    529: ("Provider overloaded", "provider_overloaded"),
}


def error_body(status: int, spec: dict[str, Any]) -> dict[str, Any]:
    message, error_type = _MESSAGES.get(status, (f"Error {status}", "unmapped"))
    metadata: dict[str, Any] = {"error_type": spec.get("error_type", error_type)}
    if status == 429:
        metadata.update(
            raw='{"error":{"message":"Rate limit reached, retry later"}}', provider_name="Venice", is_byok=False
        )
    if status == 403:
        metadata.update(
            reasons=["harassment"], flagged_input="...", provider_name="OpenAI", model_slug="openai/gpt-4o-mini"
        )
    if status == 402 and spec.get("in_flight"):
        message = "Insufficient credits given your current in-flight requests"
        metadata.update(reason="in_flight_budget_exhausted", limit_source="openrouter_in_flight_budget")
    if status >= 500 and status != 500:
        metadata.setdefault("provider_name", "DeepInfra")
    if isinstance(spec.get("metadata"), dict):
        metadata.update(spec["metadata"])
    error: dict[str, Any] = {"code": status, "message": spec.get("message") or message, "metadata": metadata}
    if isinstance(spec.get("availability"), dict):
        error["availability"] = spec["availability"]
    return {"error": error, "user_id": "user_sim"}


def error_response(status: int, spec: dict[str, Any]) -> web.Response:
    headers = {}
    if spec.get("retry_after") is not None:
        headers["Retry-After"] = str(spec["retry_after"])
    elif status == 402 and spec.get("in_flight"):
        headers["Retry-After"] = "1"
    return web.Response(
        body=orjson.dumps(error_body(status, spec)), status=status, content_type="application/json", headers=headers
    )
