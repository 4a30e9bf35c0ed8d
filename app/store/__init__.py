"""Stores, chosen by `GATEWAY_STORE`: `sqlite` (the default: a file in the data directory, shared
by the workers of one machine), `memory` (one process: `--demo` and tests) or Redis (shared by
replicas)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from app.store.base import Store, StoreError
from app.store.location import sqlite_file
from app.store.memory import MemoryStore

if TYPE_CHECKING:  # settings import `location` from here: at run time, this package needs only their values
    from app.settings import Settings

__all__ = ["Store", "StoreError", "open_store", "sqlite_path"]


def sqlite_path(settings: Settings) -> Path | None:
    """The SQLite store's file, or None for another store."""
    return sqlite_file(settings.store, settings.data_dir)


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
