"""What a request may use at most, before it runs: tokens and worst-case cost.

Prompt tokens are estimated from the text in the body (4 characters a token, rounded up;
images and audio at a fixed allowance), completion tokens from `max_completion_tokens` /
`max_tokens` or else the model's maximum output from the catalogue.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from app.catalog.models import Prices

CHARS_PER_TOKEN = 4
MEDIA_TOKENS = 1_500
DEFAULT_MAX_OUTPUT = 16_384


def prompt_tokens(payload: dict[str, Any]) -> int:
    chars, media = _measure(payload.get("messages", payload.get("prompt", payload.get("input"))))
    for extra in ("tools", "functions", "response_format", "instructions", "system"):  # (Responses, Messages)
        if extra in payload:
            extra_chars, _ = _measure(payload[extra])
            chars += extra_chars
    return -(-chars // CHARS_PER_TOKEN) + media * MEDIA_TOKENS + 4


def _measure(value: Any) -> tuple[int, int]:
    """(characters of text, number of media parts) inside a JSON value."""
    if isinstance(value, str):
        return len(value), 0
    if isinstance(value, list):
        chars = media = 0
        for item in value:
            c, m = _measure(item)
            chars, media = chars + c, media + m
        return chars, media
    if isinstance(value, dict):
        if value.get("type") in ("image_url", "input_audio", "file", "video_url"):
            return 0, 1
        chars = media = 0
        for item in value.values():
            c, m = _measure(item)
            chars, media = chars + c, media + m
        return chars, media
    if isinstance(value, (int, float)):
        return 1, 0
    return 0, 0


def completion_tokens(
    payload: dict[str, Any],
    model_entry: dict[str, Any] | None,
    embeddings: bool,
    limits: tuple[str, ...] = ("max_completion_tokens", "max_tokens"),
) -> int:
    """The most the answer may write: the body's output limit (the fields `limits` names, as the
    API calls them), else the model's."""
    if embeddings:
        return 0
    for name in limits:
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if model_entry:
        top = model_entry.get("top_provider") or {}
        for value in (top.get("max_completion_tokens"), model_entry.get("context_length")):
            if isinstance(value, int) and value > 0:
                return value
    return DEFAULT_MAX_OUTPUT


def worst_case_cost(prompt: int, completion: int, prices: Prices | None) -> Decimal:
    if prices is None:
        return Decimal(0)
    return prompt * prices.prompt + completion * prices.completion + prices.request
