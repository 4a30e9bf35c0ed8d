"""The simulator's catalogue (app/simulator/catalogue.py): the `usage.cost` it serves for chat,
streamed chat and embeddings is the tokens times the prices its own `/models` lists."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from app.simulator import SimulatorThread
from app.simulator.catalogue import MODELS
from tests.support import (
    request_id,
)

HELLO = [{"role": "user", "content": "Hello there, catalogue!"}]


def extra(obj: Any, name: str) -> Any:
    return (obj.model_extra or {}).get(name)


def catalogue(simulator: SimulatorThread) -> dict[str, dict[str, Any]]:
    """The simulator's own `/models`, read over HTTP as the gateway reads OpenRouter's."""
    body = httpx.get(simulator.base_url + "/models", timeout=10).json()
    return {m["id"]: m for m in body["data"]}


def is_embedding(model: dict[str, Any]) -> bool:
    return bool(model["architecture"]["output_modalities"] == ["embeddings"])


def expected_cost(model: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> float:
    pricing = model["pricing"]
    return float(
        prompt_tokens * Decimal(pricing["prompt"])
        + completion_tokens * Decimal(pricing["completion"])
        + Decimal(pricing.get("request", "0"))
    )


def chat_model_ids() -> list[str]:
    return [m["id"] for m in MODELS if m["architecture"]["output_modalities"] != ["embeddings"]]


@pytest.mark.parametrize("model_id", chat_model_ids())
def test_chat_cost_is_tokens_times_the_listed_prices(
    model_id: str, client: openai.OpenAI, simulator: SimulatorThread
) -> None:
    model = catalogue(simulator)[model_id]
    rid = request_id()
    reply = client.chat.completions.create(
        model=model_id, messages=HELLO, extra_body={"simulator": {"words": 12}}, extra_headers={"x-request-id": rid}
    )
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens >= 12
    cost = extra(usage, "cost")
    assert cost == pytest.approx(expected_cost(model, usage.prompt_tokens, usage.completion_tokens), abs=1e-12)
    if model_id.endswith(":free"):
        assert cost == 0
    else:
        assert cost > 0
    (logged,) = simulator.find(rid)
    assert logged["cost"] == cost  # what the simulator served is what the client was told


def test_streamed_usage_cost_follows_the_listed_prices(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    model = catalogue(simulator)["deepseek/deepseek-v3.2"]
    stream = client.chat.completions.create(
        model="deepseek/deepseek-v3.2",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"simulator": {"words": 20}},
    )
    usage = [c.usage for c in stream if c.usage is not None][-1]
    cost = extra(usage, "cost")
    assert cost > 0
    assert cost == pytest.approx(expected_cost(model, usage.prompt_tokens, usage.completion_tokens), abs=1e-12)


def test_embedding_cost_follows_the_listed_prices(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    models = [m for m in catalogue(simulator).values() if is_embedding(m)]
    assert len(models) >= 2
    costs = {}
    for model in models:
        result = client.embeddings.create(model=model["id"], input=["one text to embed", "and another, longer one"])
        usage = result.usage
        assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens
        cost = extra(usage, "cost")
        assert cost > 0
        assert cost == pytest.approx(expected_cost(model, usage.prompt_tokens, 0), abs=1e-12)
        costs[model["id"]] = cost
    assert len(set(costs.values())) == len(costs)  # priced per model, not one flat rate
