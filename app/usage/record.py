"""What one request used: tokens as OpenRouter counted them, what it cost, and where the cost
came from.

Token meanings follow OpenRouter: `completion` includes `reasoning`, `prompt` includes
`cached`; the subsets are never added on top. Costs are Decimals from OpenRouter's own JSON
numbers (never re-rounded through floats).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

CostSource = Literal["upstream", "catalogue", "generation", "none"]


@dataclass(slots=True)  # not frozen: its __init__ runs on every response (frozen costs ~1 us more)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: Decimal | None = None  # OpenRouter's `usage.cost`, when it sent one

    @classmethod
    def from_openrouter(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        return cls(
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            reasoning_tokens=_count(
                completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else 0
            ),
            cached_tokens=_count(prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else 0),
            cost_usd=_money(usage.get("cost")),
        )

    @classmethod
    def from_counts(cls, prompt: Any, completion: Any, reasoning: Any, cached: Any, cost: Any) -> Usage:
        """From counts as an API body holds them: anything not a count is 0, a cost not a number None."""
        return cls(_count(prompt), _count(completion), _count(reasoning), _count(cached), _money(cost))

    @classmethod
    def from_generation(cls, stats: dict[str, Any]) -> Usage:
        """OpenRouter's `GET /generation` data: native counts first, as billed."""

        def first(*names: str) -> int:
            return next((_count(stats[n]) for n in names if isinstance(stats.get(n), int)), 0)

        return cls(
            prompt_tokens=first("native_tokens_prompt", "tokens_prompt"),
            completion_tokens=first("native_tokens_completion", "tokens_completion"),
            reasoning_tokens=first("native_tokens_reasoning"),
            cached_tokens=first("native_tokens_cached"),
            cost_usd=_money(stats.get("total_cost", stats.get("usage"))),
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def plus(self, other: Usage) -> Usage:
        """Two billed generations' usage together (a cost only when both have one)."""
        cost = None if self.cost_usd is None or other.cost_usd is None else self.cost_usd + other.cost_usd
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.cached_tokens + other.cached_tokens,
            cost,
        )


@dataclass(slots=True)
class UsageRecord:
    """One request, as the ledger, the metrics and the log line see it."""

    request_id: str
    time: float  # unix seconds, when the request arrived
    key_id: str
    key_name: str
    team: str | None
    endpoint: str
    model_requested: str | None
    model: str | None  # the OpenRouter id that answered (or was asked for)
    model_served: str | None  # as OpenRouter named it
    provider: str | None
    stream: bool
    status: int
    error_code: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    cost_source: CostSource = "none"
    estimated: bool = False  # tokens seen so far, until OpenRouter's own figures arrive
    generation_id: str | None = None
    duration_s: float = 0.0
    upstream_s: float | None = None
    overhead_s: float = 0.0
    ttft_s: float | None = None
    retries: int = 0

    def with_usage(self, usage: Usage, cost: Decimal, source: CostSource, estimated: bool = False) -> UsageRecord:
        self.prompt_tokens = usage.prompt_tokens
        self.completion_tokens = usage.completion_tokens
        self.reasoning_tokens = usage.reasoning_tokens
        self.cached_tokens = usage.cached_tokens
        self.cost_usd = cost
        self.cost_source = source
        self.estimated = estimated
        return self

    def log_fields(self) -> dict[str, Any]:
        """The record as one request log line's fields (never a secret)."""
        return {
            "request_id": self.request_id,
            "key_id": self.key_id,
            "key": self.key_name,
            "team": self.team,
            "endpoint": self.endpoint,
            "model_requested": self.model_requested,
            "model": self.model,
            "model_served": self.model_served,
            "provider": self.provider,
            "stream": self.stream,
            "status": self.status,
            "error_code": self.error_code,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
            "cost_usd": str(self.cost_usd),
            "cost_source": self.cost_source,
            "estimated": self.estimated,
            "generation_id": self.generation_id,
            "retries": self.retries,
            "duration_ms": round(self.duration_s * 1000, 3),
            "upstream_ms": round(self.upstream_s * 1000, 3) if self.upstream_s is not None else None,
            "overhead_ms": round(self.overhead_s * 1000, 3),
            "ttft_ms": round(self.ttft_s * 1000, 3) if self.ttft_s is not None else None,
        }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _money(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return Decimal(repr(value)) if value >= 0 else None
