"""Stores, chosen by `GATEWAY_STORE`: `sqlite` (the default: a file in the data directory, shared
by the workers of one machine), `memory` (one process: `--demo` and tests) or Redis (shared by
replicas)."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings
from app.store.base import Store, StoreError
from app.store.memory import MemoryStore

__all__ = ["Store", "StoreError", "open_store", "sqlite_path"]

SQLITE_FILE = "gateway.db"


def sqlite_path(settings: Settings) -> Path | None:
    """The SQLite store's file (`sqlite`: gateway.db in `data_dir`), or None for another store."""
    store = settings.store
    if store == "sqlite":
        return Path(settings.data_dir) / SQLITE_FILE
    if store.startswith("sqlite://"):
        return Path(store.removeprefix("sqlite://"))  # sqlite:///absolute/path.db
    if store.startswith("sqlite:"):
        return Path(store.removeprefix("sqlite:"))  # sqlite:relative/path.db (to the working directory)
    return None


def open_store(settings: Settings) -> Store:
    if settings.store == "memory":
        return MemoryStore()
    path = sqlite_path(settings)
    if path is not None:
        from app.store.sqlite import SqliteStore

        return SqliteStore(path, timeout_s=settings.store_timeout_s)
    from app.store.redis import RedisStore

    return RedisStore(
        settings.store,
        prefix=settings.store_prefix,
        timeout_s=settings.store_timeout_s,
        max_connections=settings.store_max_connections,
    )
