"""One error tree for the whole gateway, rendered once per dialect: OpenAI's error envelope
(`render`), and Anthropic's on the Messages routes (`render_anthropic`). The drawing below is
the tree of the classes, each with its status and the code it sets (tests/test_errors.py checks it).

    GatewayError                      500 server_error / internal_error
    ├── InvalidRequestError           400 invalid_request_error / invalid_request or a specific code
    │   ├── RequestTooLargeError      413 request_too_large
    │   ├── UnsupportedMediaTypeError 415 unsupported_media_type
    │   ├── NotFoundError             404 not_found (an admin resource)
    │   ├── ConflictError             409 already_exists | read_only | … (x-should-retry: false)
    │   └── RouteNotFoundError        404 unknown_url
    ├── AuthenticationError           401 invalid_api_key
    ├── AdminDisabledError            403 admin_api_disabled
    ├── MetricsDisabledError          403 metrics_disabled (no GATEWAY_METRICS_KEY nor admin key)
    ├── ModelNotAllowedError          403 model_not_allowed
    ├── ModelNotFoundError            404 model_not_found
    ├── StoreUnavailableError         503 store_unavailable
    ├── ServerShuttingDownError       503 server_shutting_down (a stream open at the end of the drain)
    ├── RateLimitError                429 requests|tokens / rate_limit_exceeded
    │   └── BudgetExceededError       429 insufficient_quota (x-should-retry: false)
    └── UpstreamError                 502 server_error / upstream_error | upstream_invalid_response
        │                                 | catalogue_unavailable
        ├── UpstreamConnectionError   502 upstream_unreachable | upstream_reset (retryable)
        ├── UpstreamTimeoutError      504 upstream_timeout
        ├── UpstreamUnavailableError  503 upstream_auth_failed | upstream_insufficient_credits
        │                                 | upstream_in_flight_budget | upstream_key_missing (x-should-retry: false)
        ├── CircuitOpenError          503 upstream_circuit_open (the model keeps failing; retry-after)
        └── UpstreamStatusError       502 unless given: OpenRouter's 4xx status and message (DESIGN §5)

`code` is always a string reason; OpenAI SDKs choose their exception class from the status.
docs/errors.md's table lists every code (tests/test_error_table.py keeps the two together).
Anthropic's twin of each row: the type its status stands for at Anthropic (`ANTHROPIC_TYPES`),
503 (and OpenRouter's 503 or 529 passed on) as Anthropic's 529 `overloaded_error`, other 5xx
but 504 as 500 `api_error`; our `code` kept beside it, a budget refusal typed `billing_error`.
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    upstream_status: int | None = None  # OpenRouter's status, when the error came from it

    def __init__(
        self,
        message: str = "The gateway failed to handle the request.",
        *,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.param = param
        self.headers = dict(headers or {})
        self.metadata = metadata

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.metadata:
            error["metadata"] = self.metadata
        return {"error": error}

    def render(self) -> bytes:
        return orjson.dumps(self.body())

    def sse_event(self) -> bytes:
        """The error as the one SSE event OpenAI SDKs raise on in the middle of a stream."""
        return b"data: " + self.render() + b"\n\n"

    # -- Anthropic's dialect (the Messages routes) ------------------------------------------------
    @property
    def anthropic_status(self) -> int:
        if self.status == 503 or self.upstream_status in (503, 529):  # ours, or OpenRouter's overloaded
            return 529
        if self.status >= 500 and self.status != 504:
            return 500
        return self.status

    def anthropic_body(self) -> dict[str, Any]:
        kind = "billing_error" if self.code == "insufficient_quota" else None
        error: dict[str, Any] = {
            "type": kind or ANTHROPIC_TYPES.get(self.anthropic_status, "invalid_request_error"),
            "message": self.message,
            "code": self.code,
        }
        if self.metadata:
            error["metadata"] = self.metadata
        return {"type": "error", "error": error}

    def render_anthropic(self) -> bytes:
        return orjson.dumps(self.anthropic_body())


ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class RequestTooLargeError(InvalidRequestError):
    status = 413
    code = "request_too_large"


class UnsupportedMediaTypeError(InvalidRequestError):
    status = 415
    code = "unsupported_media_type"


class NotFoundError(InvalidRequestError):
    status = 404
    code = "not_found"


class ConflictError(InvalidRequestError):
    """The request contradicts what exists; repeating it gives the same answer."""

    status = 409
    code = "already_exists"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("x-should-retry", "false")


class RouteNotFoundError(InvalidRequestError):
    status = 404
    code = "unknown_url"


class AuthenticationError(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str, *, refused: Any = None) -> None:
        super().__init__(message)
        self.refused = refused  # the key's Principal when the key exists (revoked, expired, an old secret)


class AdminDisabledError(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "admin_api_disabled"


class MetricsDisabledError(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "metrics_disabled"


class StoreUnavailableError(GatewayError):
    status = 503
    type = "server_error"
    code = "store_unavailable"


class ServerShuttingDownError(GatewayError):
    status = 503
    type = "server_error"
    code = "server_shutting_down"


class ModelNotAllowedError(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class ModelNotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RateLimitError(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class BudgetExceededError(RateLimitError):
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str = "Budget exhausted.", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("x-should-retry", "false")


class UpstreamError(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamConnectionError(UpstreamError):
    """The connection to OpenRouter failed or broke: nothing usable was received."""

    code = "upstream_reset"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamUnavailableError(UpstreamError):
    """OpenRouter refuses the gateway itself (its key or its credits): no client retry helps."""

    status = 503

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("x-should-retry", "false")


class CircuitOpenError(UpstreamError):
    status = 503
    code = "upstream_circuit_open"


class UpstreamStatusError(UpstreamError):
    """An OpenRouter error passed on with its status, message and metadata."""
