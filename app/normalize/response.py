"""OpenRouter responses -> what OpenAI SDKs expect. Pure functions, no I/O.

OpenRouter errors carry a numeric `code`, no `type`, and details under `metadata`; some arrive
on HTTP 200. Every one of them becomes a GatewayError with the status of DESIGN §5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from app.errors import (
    GatewayError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from app.upstream.retry import parse_retry_after

_TYPE_BY_STATUS = {408: "timeout", 429: "requests"}
_CODE_BY_STATUS = {
    400: "invalid_request",
    403: "permission_denied",
    404: "not_found",
    408: "request_timeout",
    409: "conflict",
    413: "request_too_large",
    422: "unprocessable_entity",
    429: "rate_limit_exceeded",
}
_DEFAULT_MESSAGE = {
    400: "OpenRouter rejected the request.",
    403: "OpenRouter refused the request.",
    404: "OpenRouter found nothing for this request.",
    429: "Rate limited upstream.",
}
ERROR_FINISH_REASONS = frozenset({"error", "network_error"})


def openrouter_error(status: int, error: Any, headers: Mapping[str, str] | None = None) -> GatewayError:
    """Map an OpenRouter error object (the value of `"error"`) and its status to our tree."""
    mapped = _map(status, error, headers)
    mapped.upstream_status = status
    return mapped


def _map(status: int, error: Any, headers: Mapping[str, str] | None) -> GatewayError:
    error = error if isinstance(error, dict) else {"message": error if isinstance(error, str) else None}
    message = error.get("message") if isinstance(error.get("message"), str) else None
    metadata = _metadata(error)
    passed: dict[str, str] = {}
    wait = parse_retry_after(headers.get("retry-after")) if headers else None
    if wait is not None:  # passed on as whole seconds; one the client's SDK cannot read is dropped
        passed["retry-after"] = str(math.ceil(wait))
    if "retry-after" not in passed and isinstance(metadata, dict):
        seconds = metadata.get("retry_after_seconds")
        if isinstance(seconds, (int, float)) and seconds >= 0:
            passed["retry-after"] = str(int(seconds))

    if status == 401:
        return UpstreamUnavailableError(
            f"OpenRouter refused the gateway's API key ({message or 'unauthorized'}). Tell the gateway operator.",
            code="upstream_auth_failed",
        )
    if status == 402:
        if _is_in_flight_budget(message, metadata):
            return UpstreamUnavailableError(
                message or "OpenRouter's in-flight budget is exhausted.",
                code="upstream_in_flight_budget",
                headers=passed,
                metadata=metadata,
            )
        return UpstreamUnavailableError(
            f"The gateway's OpenRouter account cannot pay for this request ({message or 'insufficient credits'}).",
            code="upstream_insufficient_credits",
            metadata=metadata,
        )
    if 400 <= status < 500:
        error_type = metadata.get("error_type") if isinstance(metadata, dict) else None
        availability = metadata.get("availability") if isinstance(metadata, dict) else None
        code = (availability or {}).get("code") if isinstance(availability, dict) else None
        return UpstreamStatusError(
            message or _DEFAULT_MESSAGE.get(status, f"OpenRouter answered {status}."),
            status=status,
            type=_TYPE_BY_STATUS.get(status, "invalid_request_error"),
            code=code or error_type or _CODE_BY_STATUS.get(status, "invalid_request"),
            headers=passed,
            metadata=metadata,
        )
    if status in (504, 524):
        return UpstreamTimeoutError(message or "OpenRouter timed out.", headers=passed, metadata=metadata)
    return UpstreamError(message or f"OpenRouter failed ({status}).", headers=passed, metadata=metadata)


def _metadata(error: dict[str, Any]) -> dict[str, Any] | None:
    metadata = error.get("metadata")
    metadata = dict(metadata) if isinstance(metadata, dict) else {}
    if isinstance(error.get("availability"), dict):
        metadata["availability"] = error["availability"]
    return metadata or None


def _is_in_flight_budget(message: str | None, metadata: dict[str, Any] | None) -> bool:
    if isinstance(metadata, dict) and (
        metadata.get("limit_source") == "openrouter_in_flight_budget"
        or metadata.get("reason") == "in_flight_budget_exhausted"
    ):
        return True
    return message is not None and "in-flight" in message


def status_of(error: Any, fallback: int = 502) -> int:
    """The HTTP status an error object stands for: its numeric `code` when that is one."""
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    return code if isinstance(code, int) and 400 <= code <= 599 else fallback


def error_from_status(status: int, raw: bytes, headers: Mapping[str, str]) -> GatewayError:
    """An OpenRouter non-2xx response as one of ours, whatever its body looks like."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if error is None:
        text = raw[:200].decode("utf-8", "replace").strip()
        error = {"message": text} if text and not text.startswith("<") else {}
    return openrouter_error(status, error, headers)


def choice_error(choice: Any) -> GatewayError | None:
    """A choice that ended in error: `finish_reason: error`, or an error only the provider named."""
    if not isinstance(choice, dict):
        return None
    error = choice.get("error")
    if error:
        return openrouter_error(status_of(error), error)
    native = choice.get("native_finish_reason")
    if choice.get("finish_reason") == "error" or native in ERROR_FINISH_REASONS:
        failed = UpstreamError(
            f"The provider stopped with an error ({native or 'error'}).",
            metadata={"native_finish_reason": native} if native else None,
        )
        failed.upstream_status = 502
        return failed
    return None


def body_error(body: Any, expect: str) -> GatewayError | None:
    """The error hidden in an HTTP-200 body, if any. `expect` names the field a success has."""
    if not isinstance(body, dict):
        return UpstreamError("OpenRouter returned a body that is not a JSON object.", code="upstream_invalid_response")
    if body.get("error"):
        return openrouter_error(status_of(body["error"]), body["error"])
    if not isinstance(body.get(expect), list):
        return UpstreamError(f"OpenRouter returned a response without '{expect}'.", code="upstream_invalid_response")
    if expect == "choices":
        for choice in body["choices"]:
            error = choice_error(choice)
            if error is not None:
                return error
    return None
