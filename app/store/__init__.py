"""Stores: `memory` (embedded) or Redis (shared by replicas), chosen by `GATEWAY_STORE`."""

from __future__ import annotations

from app.settings import Settings
from app.store.base import Store, StoreError
from app.store.memory import MemoryStore

__all__ = ["Store", "StoreError", "open_store"]


def open_store(settings: Settings) -> Store:
    if settings.store == "memory":
        return MemoryStore()
    from app.store.redis import RedisStore

    return RedisStore(
        settings.store,
        prefix=settings.store_prefix,
        timeout_s=settings.store_timeout_s,
        max_connections=settings.store_max_connections,
    )
