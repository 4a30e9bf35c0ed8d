"""A refused admission in the client's terms: the store's verdict on the check that failed becomes
a `RateLimitError` (429 with retry-after and x-ratelimit-* headers, or x-should-retry: false when
waiting cannot help) or a `BudgetExceededError`, with a message that says which limit and why."""

from __future__ import annotations

import math
from decimal import Decimal

from app.errors import BudgetExceededError, RateLimitError
from app.limits.checks import NANO, Check, Verdict, format_duration

_WHAT = {"requests": "requests per minute", "tokens": "tokens per minute", "concurrency": "concurrent requests"}


def refusal(check: Check, verdict: Verdict) -> RateLimitError:
    if check.kind == "budget":
        return BudgetExceededError(
            budget_message(check, verdict.used),
            metadata={"scope": check.scope, "period": check.period, "limit": "budget"},
        )
    never = verdict.retry_after_ms < 0
    headers: dict[str, str] = {}
    if not never:
        headers["retry-after"] = str(max(1, math.ceil(verdict.retry_after_ms / 1000)))
        headers["retry-after-ms"] = str(max(0, verdict.retry_after_ms))
    else:
        headers["x-should-retry"] = "false"
    if check.kind in ("requests", "tokens"):
        headers[f"x-ratelimit-limit-{check.kind}"] = str(check.limit)
        headers[f"x-ratelimit-remaining-{check.kind}"] = str(max(0, check.limit - verdict.used))
        headers[f"x-ratelimit-reset-{check.kind}"] = format_duration(max(0, verdict.retry_after_ms))
    message = f"Rate limit of the {check.scope}: {check.limit} {_WHAT[check.kind]}."
    if check.kind == "tokens" and never:
        message = (
            f"This request may use {check.amount} tokens, more than the {check.scope}'s limit of "
            f"{check.limit} tokens per minute; lower max_tokens (max_output_tokens on Responses)."
        )
    return RateLimitError(
        message,
        type="tokens" if check.kind == "tokens" else "requests",
        headers=headers,
        metadata={"scope": check.scope, "limit": check.kind},
    )


def budget_message(check: Check, used: int) -> str:
    """Why a budget refused a request: used up, or this request's worst-case cost (reserved before
    it runs, from the model's price and max_tokens) larger than what is left of it."""
    budget, spent = f"{check.scope} budget of ${Decimal(check.limit) / NANO}", f"${Decimal(used) / NANO:.6f}"
    if used >= check.limit:
        return f"The {budget} for this period is used up ({spent} spent or held)."
    worst = f"This request may cost up to ${Decimal(check.amount) / NANO:.6f} (the model's price for its output limit)"
    if check.amount > check.limit:
        return f"{worst}, more than the whole {budget} per period; lower max_tokens (max_output_tokens on Responses)."
    left = f"more than is left of the {budget} for this period ({spent} spent or held)"
    return f"{worst}, {left}; lower max_tokens (max_output_tokens on Responses)."
