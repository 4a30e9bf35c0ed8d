"""The model catalogue: OpenRouter's `/models`, cached with a TTL, plus our aliases and
per-model settings. Answers "which OpenRouter id is this?" and "does it exist?".
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any

import orjson

from app.errors import ModelNotFoundError, UpstreamError
from app.settings import ModelSettings, ModelsSettings

log = logging.getLogger(__name__)

Fetch = Callable[[], Awaitable[list[dict[str, Any]]]]
_VARIANT_SUFFIXES = (":nitro", ":floor", ":online", ":exacto", ":extended", ":thinking")
_ROUTER_PREFIXES = ("openrouter/", "~")
_NO_SETTINGS = ModelSettings()


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per token (per request for `request`), as OpenRouter publishes them."""

    prompt: Decimal
    completion: Decimal
    request: Decimal = Decimal(0)
    cache_read: Decimal | None = None


class Catalog:
    def __init__(self, fetch: Fetch, ttl_s: float, models: ModelsSettings) -> None:
        self._fetch = fetch
        self._ttl = ttl_s
        self._models = models
        self._entries: dict[str, dict[str, Any]] = {}
        self._fetched_at = float("-inf")
        self._refresh: asyncio.Task[None] | None = None
        self._list_entries: dict[str, dict[str, Any]] | None = None
        self._list_bodies: dict[Hashable, bytes] = {}
        self._max_prices: tuple[dict[str, dict[str, Any]], Prices] | None = None
        self._prices: dict[str, tuple[dict[str, dict[str, Any]], Prices | None]] = {}
        self.settings_for = lru_cache(maxsize=4096)(self._settings_for)

    # -- names -----------------------------------------------------------------------------
    def resolve(self, name: str | None) -> str | None:
        """Alias or `default` -> OpenRouter id; a request without a model gets the default."""
        if name is None or name == "default":
            name = self._models.default or name
            if name is None:
                return None
        return self._models.aliases.get(name, name)

    def _settings_for(self, model_id: str) -> ModelSettings:
        exact = self._models.per_model.get(model_id)
        if exact is not None:
            return exact
        for pattern, settings in self._models.per_model.items():
            if fnmatch.fnmatchcase(model_id, pattern):
                return settings
        return _NO_SETTINGS

    # -- the catalogue -----------------------------------------------------------------------
    async def entries(self) -> dict[str, dict[str, Any]]:
        """Current entries; refreshes in the background once stale, waits only when empty."""
        if time.monotonic() - self._fetched_at < self._ttl:
            return self._entries
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._load())
        if not self._entries:
            await asyncio.shield(self._refresh)
        return self._entries

    async def _load(self) -> None:
        try:
            models = await self._fetch()
        except Exception as exc:  # the catalogue must never take the request path down
            log.warning("model catalogue refresh failed: %s", exc)
            return
        self._entries = {m["id"]: m for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)}
        self._fetched_at = time.monotonic()

    async def check_known(self, model_id: str) -> None:
        """404 for a model OpenRouter does not list. Without a catalogue, let OpenRouter judge."""
        entries = await self.entries()
        if not entries or model_id.startswith(_ROUTER_PREFIXES) or _listed(model_id, entries):
            return
        raise ModelNotFoundError(f"The model '{model_id}' does not exist on OpenRouter.", param="model")

    async def entry(self, model_id: str) -> dict[str, Any] | None:
        return (await self.entries()).get(model_id)

    def is_listed(self, model_id: str) -> bool | None:
        """Whether the catalogue as it is now lists the model (or its base, for a variant); None
        before it is loaded."""
        return _listed(model_id, self._entries) if self._entries else None

    def cached_entry(self, model_id: str) -> dict[str, Any] | None:
        """The catalogue entry as it is now (a variant such as `:nitro` reads its base model)."""
        return self._entries.get(model_id) or self._entries.get(model_id.rsplit(":", 1)[0])

    def cached_prices(self, model_id: str) -> Prices | None:
        """Prices from the catalogue as it is now, without waiting for a refresh."""
        cached = self._prices.get(model_id)
        if cached is None or cached[0] is not self._entries:
            entry = self.cached_entry(model_id)
            cached = self._prices[model_id] = (self._entries, prices_of(entry) if entry else None)
        return cached[1]

    def max_prices(self) -> Prices:
        """The dearest prompt and completion prices listed: the worst case for an unpriced model."""
        entries = self._entries
        if self._max_prices is None or self._max_prices[0] is not entries:
            listed = [prices_of(e) for e in entries.values()]
            worst = Prices(
                prompt=max((p.prompt for p in listed), default=Decimal(0)),
                completion=max((p.completion for p in listed), default=Decimal(0)),
                request=max((p.request for p in listed), default=Decimal(0)),
            )
            self._max_prices = (entries, worst)
        return self._max_prices[1]

    async def prices(self, model_id: str) -> Prices | None:
        entry = await self.entry(model_id.split(":")[0] if model_id.endswith(_VARIANT_SUFFIXES) else model_id)
        return prices_of(entry) if entry else None

    # -- the OpenAI view -------------------------------------------------------------------
    async def openai_list(self, allows: Callable[[str], bool], allowlists: Hashable) -> bytes:
        """`GET /v1/models` body: OpenAI's list shape, OpenRouter's fields kept as extras, only
        the models `allows` admits (bodies cached per distinct allowlist)."""
        entries = await self.require_entries()
        if self._list_entries is not entries:
            self._list_bodies.clear()
            self._list_entries = entries
        body = self._list_bodies.get(allowlists)
        if body is None:
            data = [to_openai_model(entry) for model_id, entry in entries.items() if allows(model_id)]
            for alias, target in self._models.aliases.items():
                if target in entries and allows(target):
                    data.append({**to_openai_model(entries[target]), "id": alias, "alias_of": target})
            body = orjson.dumps({"object": "list", "data": data})
            if len(self._list_bodies) < 1024:
                self._list_bodies[allowlists] = body
        return body

    async def openai_model(self, name: str, allows: Callable[[str], bool]) -> dict[str, Any]:
        entries = await self.require_entries()
        model_id = self.resolve(name) or name
        entry = entries.get(model_id)
        if entry is None or not allows(model_id):
            raise ModelNotFoundError(f"The model '{name}' does not exist.", param="model")
        model = to_openai_model(entry)
        return model if model_id == name else {**model, "id": name, "alias_of": model_id}

    async def require_entries(self) -> dict[str, dict[str, Any]]:
        entries = await self.entries()
        if not entries:
            raise UpstreamError(
                "The model catalogue could not be loaded from OpenRouter.", code="catalogue_unavailable"
            )
        return entries


def _listed(model_id: str, entries: dict[str, dict[str, Any]]) -> bool:
    """The catalogue lists the model, or the base of a known variant (`:nitro`, …)."""
    return model_id in entries or (model_id.endswith(_VARIANT_SUFFIXES) and model_id.rsplit(":", 1)[0] in entries)


def to_openai_model(entry: dict[str, Any]) -> dict[str, Any]:
    model_id = entry["id"]
    extras = {k: v for k, v in entry.items() if k not in ("id", "created")}
    return {
        "id": model_id,
        "object": "model",
        "created": int(entry.get("created") or 0),
        "owned_by": model_id.split("/", 1)[0] if "/" in model_id else "openrouter",
        **extras,
    }


def prices_of(entry: dict[str, Any]) -> Prices:
    pricing = entry.get("pricing") or {}

    def price(name: str) -> Decimal | None:
        value = pricing.get(name)
        try:
            return Decimal(str(value)) if value is not None else None
        except ArithmeticError:
            return None

    return Prices(
        prompt=price("prompt") or Decimal(0),
        completion=price("completion") or Decimal(0),
        request=price("request") or Decimal(0),
        cache_read=price("input_cache_read"),
    )
