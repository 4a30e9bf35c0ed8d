"""The simulator's model catalogue, in OpenRouter's `/models` shape (prices are USD per token,
as decimal strings). Prices are data: tests read them from here, not from constants."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

CREATED = 1764547200  # 2025-12-01


def _model(
    model_id: str,
    name: str,
    prompt: str,
    completion: str,
    context: int,
    max_output: int,
    provider: str,
    reasoning: str = "none",
    reasoning_format: str = "unknown",
    modality: str = "text->text",
    cache_read: str | None = None,
    description: str = "",
) -> dict[str, Any]:
    pricing = {
        "prompt": prompt,
        "completion": completion,
        "request": "0",
        "image": "0",
        "web_search": "0",
        "internal_reasoning": "0",
    }
    if cache_read is not None:
        pricing["input_cache_read"] = cache_read
    embedding = modality.endswith("embeddings")
    supported = ["max_tokens", "temperature", "top_p", "stop", "seed"]
    if not embedding:
        supported += [
            "tools",
            "tool_choice",
            "response_format",
            "structured_outputs",
            "frequency_penalty",
            "presence_penalty",
            "logit_bias",
            "logprobs",
            "top_logprobs",
        ]
    if reasoning != "none":
        supported += ["reasoning", "include_reasoning"]
    return {
        "id": model_id,
        "canonical_slug": f"{model_id}-20251201",
        "hugging_face_id": "",
        "name": name,
        "created": CREATED,
        "description": description or f"{name}, as served by the OpenRouter simulator.",
        "context_length": context,
        "architecture": {
            "modality": modality,
            "input_modalities": ["text"],
            "output_modalities": ["embeddings" if embedding else "text"],
            "tokenizer": "Other",
            "instruct_type": None,
        },
        "pricing": pricing,
        "top_provider": {"context_length": context, "max_completion_tokens": max_output, "is_moderated": False},
        "per_request_limits": None,
        "supported_parameters": sorted(supported),
        "default_parameters": {},
        "expiration_date": None,
        # Simulator-only facts, kept out of what /models serves (see `public`).
        "_provider": provider,
        "_reasoning": reasoning,  # none | optional | always
        "_reasoning_format": reasoning_format,
        "_upstream_name": model_id.split("/", 1)[1],
    }


MODELS: list[dict[str, Any]] = [
    _model(
        "deepseek/deepseek-v3.2",
        "DeepSeek: DeepSeek V3.2",
        "0.00000028",
        "0.0000004",
        163840,
        65536,
        "DeepInfra",
        reasoning="optional",
        description="DeepSeek-V3.2. Users can control the reasoning behaviour with the `reasoning` `enabled` boolean.",
    ),
    _model(
        "openai/gpt-4o-mini",
        "OpenAI: GPT-4o-mini",
        "0.00000015",
        "0.0000006",
        128000,
        16384,
        "OpenAI",
        cache_read="0.000000075",
    ),
    _model(
        "openai/gpt-5-mini",
        "OpenAI: GPT-5 Mini",
        "0.00000025",
        "0.000002",
        400000,
        128000,
        "OpenAI",
        reasoning="always",
        reasoning_format="openai-responses-v1",
        cache_read="0.000000025",
    ),
    _model(
        "anthropic/claude-sonnet-4.5",
        "Anthropic: Claude Sonnet 4.5",
        "0.000003",
        "0.000015",
        1000000,
        64000,
        "Anthropic",
        reasoning="optional",
        reasoning_format="anthropic-claude-v1",
        cache_read="0.0000003",
    ),
    _model(
        "google/gemini-2.5-flash",
        "Google: Gemini 2.5 Flash",
        "0.0000003",
        "0.0000025",
        1048576,
        65535,
        "Google AI Studio",
        reasoning="optional",
        reasoning_format="google-gemini-v1",
        cache_read="0.00000003",
    ),
    _model(
        "meta-llama/llama-3.3-70b-instruct:free",
        "Meta: Llama 3.3 70B Instruct (free)",
        "0",
        "0",
        65536,
        8192,
        "Together",
    ),
    _model(
        "openai/text-embedding-3-small",
        "OpenAI: Text Embedding 3 Small",
        "0.00000002",
        "0",
        8192,
        0,
        "OpenAI",
        modality="text->embeddings",
    ),
    _model(
        "qwen/qwen3-embedding-8b",
        "Qwen: Qwen3 Embedding 8B",
        "0.00000001",
        "0",
        32768,
        0,
        "Nebius",
        modality="text->embeddings",
    ),
]
BY_ID = {model["id"]: model for model in MODELS}


def public(model: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model.items() if not k.startswith("_")}


def price(model: dict[str, Any], name: str) -> Decimal:
    value = model["pricing"].get(name)
    return Decimal(value) if value is not None else Decimal(model["pricing"]["prompt"])
