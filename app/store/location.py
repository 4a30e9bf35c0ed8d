"""The `store` setting read in one place: which store it names and, for SQLite, which file (the
settings check it with this, the store opens what it says)."""

from __future__ import annotations

from pathlib import Path

SQLITE_FILE = "gateway.db"  # in the data directory, for `store: sqlite`
_FORMS = (
    "'sqlite' (the default), sqlite:///absolute/path.db, sqlite:relative/path.db, 'memory', "
    "or a redis://, rediss:// or unix:// URL"
)


def check_store(value: str) -> str:
    """`value` if it names a store; else ValueError, in words for the reader of the config."""
    if value == "memory" or value.startswith(("redis://", "rediss://", "unix://")):
        return value
    if value == "sqlite" or value.startswith("sqlite:"):
        sqlite_file(value, ".")
        return value
    raise ValueError(_FORMS)


def sqlite_file(store: str, data_dir: str) -> Path | None:
    """The SQLite store's file (`sqlite`: gateway.db in `data_dir`; `sqlite:///absolute/path.db`;
    `sqlite:relative/path.db`, to the working directory), or None for another store."""
    if store == "sqlite":
        return Path(data_dir) / SQLITE_FILE
    if not store.startswith("sqlite:"):
        return None
    absolute = store.startswith("sqlite://")
    path = store.removeprefix("sqlite://") if absolute else store.removeprefix("sqlite:")
    if absolute and not path.startswith("/"):
        raise ValueError("sqlite:///absolute/path.db (three slashes) or sqlite:relative/path.db")
    if not path.strip("/") or path.endswith("/") or path == ":memory:":
        raise ValueError("name the database file: sqlite:///absolute/path.db or sqlite:relative/path.db")
    return Path(path)
