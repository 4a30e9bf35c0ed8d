"""Cost from the catalogue's prices, for when OpenRouter did not report `usage.cost`."""

from __future__ import annotations

from decimal import Decimal

from app.catalog.models import Prices
from app.usage.record import Usage


def catalogue_cost(usage: Usage, prices: Prices) -> Decimal:
    """USD for `usage` at `prices`; cached prompt tokens at the cache-read price when there is one."""
    cached = min(usage.cached_tokens, usage.prompt_tokens) if prices.cache_read is not None else 0
    cache_price = prices.cache_read if prices.cache_read is not None else prices.prompt
    return (
        (usage.prompt_tokens - cached) * prices.prompt
        + cached * cache_price
        + usage.completion_tokens * prices.completion
        + prices.request
    )
