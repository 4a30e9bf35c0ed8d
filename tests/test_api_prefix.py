"""The `/api/v1` prefix (OpenRouter's own) serves completions, embeddings and model retrieval
exactly as `/v1` does."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.support import (
    CLIENT_KEY,
    GatewayServer,
)


def extra(obj: Any, name: str) -> Any:
    return (obj.model_extra or {}).get(name)


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=CLIENT_KEY, max_retries=0, timeout=20)


def test_api_v1_prefix_serves_completions_embeddings_and_models_like_v1(gateway: GatewayServer) -> None:
    with sdk(gateway.url + "/v1") as v1, sdk(gateway.url + "/api/v1") as api:
        results = []
        for client in (v1, api):
            text = client.completions.create(model="openai/gpt-4o-mini", prompt="Say hello")
            streamed = "".join(
                c.choices[0].text
                for c in client.completions.create(model="openai/gpt-4o-mini", prompt="Say hello", stream=True)
                if c.choices
            )
            vectors = client.embeddings.create(model="openai/text-embedding-3-small", input=["alpha", "beta"])
            model = client.models.retrieve("deepseek/deepseek-v3.2")
            alias = client.models.retrieve("gpt-4o-mini")
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve("nobody/no-such-model")
            assert text.object == "text_completion" and text.choices[0].text
            assert streamed == text.choices[0].text
            assert vectors.object == "list" and len(vectors.data) == 2 and extra(vectors.usage, "cost") > 0
            assert model.id == "deepseek/deepseek-v3.2" and extra(model, "context_length") == 163840
            assert extra(alias, "alias_of") == "openai/gpt-4o-mini"
            results.append(
                (
                    text.choices[0].text,
                    text.usage.model_dump() if text.usage else None,
                    [d.embedding for d in vectors.data],
                    model.model_dump(),
                    alias.model_dump(),
                )
            )
        assert results[0] == results[1]
