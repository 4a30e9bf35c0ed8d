"""What one request used: tokens as OpenRouter counted them, and what it cost.

Token meanings follow OpenRouter: `completion` includes `reasoning`, `prompt` includes
`cached`; the subsets are never added on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float | None = None  # OpenRouter's `usage.cost`, when it sent one

    @classmethod
    def from_openrouter(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        cost = usage.get("cost")
        return cls(
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            reasoning_tokens=_count(
                completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else 0
            ),
            cached_tokens=_count(prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else 0),
            cost_usd=float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None,
        )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
