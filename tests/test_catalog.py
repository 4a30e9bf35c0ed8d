"""The model catalogue (app/catalog/models.py): fetched once per TTL with OpenRouter's pricing and
context fields kept, served stale while it refreshes; a router id with any suffix is not a listed model."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import openai

from app.catalog.models import Catalog
from app.settings import ModelsSettings
from app.simulator import SimulatorThread
from app.simulator.catalogue import MODELS
from tests.support import (
    CLIENT_KEY,
    UPSTREAM_KEY,
    GatewayServer,
    gateway_settings,
    wait_until,
)


def extra(obj: Any, name: str) -> Any:
    return (obj.model_extra or {}).get(name)


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=CLIENT_KEY, max_retries=0, timeout=20)


def test_models_are_fetched_once_per_ttl_and_keep_pricing() -> None:
    ttl = 3.0
    sim = SimulatorThread(api_keys={UPSTREAM_KEY}).start()  # its own, so every GET /models is ours
    try:

        def fetches() -> list[dict[str, Any]]:
            return [e for e in sim.requests() if e["method"] == "GET" and e["path"] == "/api/v1/models"]

        settings = gateway_settings(sim.base_url, upstream={"catalog_ttl_s": ttl})
        with GatewayServer(settings) as gateway, sdk(gateway.url + "/v1") as client:
            started = time.monotonic()
            first = {m.id: m for m in client.models.list()}
            second = {m.id: m for m in client.models.list()}
            client.models.retrieve("openai/gpt-4o-mini")
            assert time.monotonic() - started < ttl, "the machine is too slow for this TTL"
            assert len(fetches()) == 1  # three answers within the TTL, one upstream GET /models
            assert first.keys() == second.keys()
            for listed in MODELS:  # OpenRouter's pricing and context fields survive as extras
                ours = first[listed["id"]]
                assert extra(ours, "pricing") == listed["pricing"]
                assert extra(ours, "context_length") == listed["context_length"]
                assert extra(ours, "top_provider") == listed["top_provider"]
            deepseek = first["deepseek/deepseek-v3.2"]
            assert extra(deepseek, "context_length") == 163840
            assert extra(deepseek, "pricing")["prompt"] == "0.00000028"
            assert extra(deepseek, "pricing")["completion"] == "0.0000004"

            fetched_at = time.monotonic()
            wait_until(lambda: time.monotonic() - fetched_at > ttl, 10, "the TTL to pass")
            stale = {m.id: m for m in client.models.list()}  # served at once, refreshed behind it
            assert stale.keys() == first.keys()
            wait_until(lambda: len(fetches()) == 2, 10, "a second GET /models after the TTL")
            again = client.models.retrieve("deepseek/deepseek-v3.2")
            assert extra(again, "context_length") == 163840
            assert extra(again, "pricing") == extra(deepseek, "pricing")
            assert len(fetches()) == 2  # fresh again: no third fetch
    finally:
        sim.stop()


def test_a_router_id_with_any_suffix_is_not_a_listed_model() -> None:
    """`openrouter/auto` is in OpenRouter's catalogue; `openrouter/auto:<anything>` passes to it
    unlisted, so it must not count as listed (and get a label of its own) by its base."""

    async def fetch() -> list[dict[str, Any]]:
        return [{"id": "openrouter/auto"}, {"id": "openai/gpt-4o-mini"}]

    catalog = Catalog(fetch, 300, ModelsSettings())
    assert catalog.is_listed("openai/gpt-4o-mini") is None  # not loaded yet: no judgement
    asyncio.run(catalog.entries())
    assert catalog.is_listed("openrouter/auto") and catalog.is_listed("openai/gpt-4o-mini:nitro")
    for unlisted in ("openrouter/auto:" + uuid.uuid4().hex, "~openai/gpt-4o-mini", "openai/gpt-4o-mini:whatever"):
        assert catalog.is_listed(unlisted) is False, unlisted
