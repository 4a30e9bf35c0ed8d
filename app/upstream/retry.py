"""When and how long to wait before trying OpenRouter again. Pure, except the random jitter.

Retry on connect errors, resets, timeouts, 408, 429, 500, 502, 503, 504, 524, 529 and the
temporary in-flight 402; never on other 4xx. Full-jitter exponential backoff, at least as long
as OpenRouter's `Retry-After`. A retry budget keeps retries to a share of the requests in
flight, so an outage is not multiplied.
"""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime
from time import time

from app.errors import GatewayError, UpstreamConnectionError, UpstreamTimeoutError

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 524, 529})


def is_retryable(error: GatewayError) -> bool:
    if isinstance(error, (UpstreamConnectionError, UpstreamTimeoutError)):
        return error.code != "upstream_invalid_response"
    status = getattr(error, "upstream_status", None)
    if status == 402:
        return error.code == "upstream_in_flight_budget"
    return status in RETRYABLE_STATUSES


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (attempt counts from 0)."""
    return random.uniform(0, min(cap_s, base_s * (2**attempt)))


def retry_after_s(error: GatewayError) -> float | None:
    """OpenRouter's `Retry-After` (seconds or an HTTP date), if it sent one."""
    return parse_retry_after(error.headers.get("retry-after"))


def parse_retry_after(value: str | None) -> float | None:
    """A `Retry-After` value in seconds from now (0 for a past date), or None when it is not one."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if 0 <= seconds < 1e9 else None  # negative, NaN, inf: not a wait
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError, OverflowError):
        return None


class RetryBudget:
    """Retries in progress may be at most `ratio` of requests in flight (but always `minimum`)."""

    def __init__(self, ratio: float, minimum: int) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.in_flight = 0
        self.retrying = 0

    def try_acquire(self) -> bool:
        # A share, not a floor of it: one request alone may still be retried.
        if self.retrying >= max(self.minimum, self.ratio * self.in_flight):
            return False
        self.retrying += 1
        return True

    def release(self) -> None:
        self.retrying -= 1
