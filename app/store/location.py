"""The `store` setting read in one place: which store it names and, for SQLite, which file (the
settings check it with this, the store opens what it says)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode

SQLITE_FILE = "gateway.db"  # in the data directory, for `store: sqlite`
_FORMS = (
    "'sqlite' (the default), sqlite:///absolute/path.db, sqlite:relative/path.db, 'memory', "
    "or a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL"
)
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_SENTINEL_FORM = "redis+sentinel://[user:password@]host:port[,host:port...]/<master>[/<db>][?sentinel_password=...]"


def check_store(value: str) -> str:
    """`value` if it names a store; else ValueError, in words for the reader of the config."""
    if value == "memory" or value.startswith(("redis://", "rediss://", "unix://")):
        return value
    if value.startswith(SENTINEL_SCHEMES):
        sentinel_of(value)
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


@dataclass(frozen=True)
class SentinelURL:
    """A `redis+sentinel://` store URL read: the sentinels to ask, the master's name, and the
    master's own URL with no address (its user, password, database and `ssl_*` options: every
    connection to the master, wherever the sentinels say it is, is made with them)."""

    sentinels: list[tuple[str, int]]
    master: str
    data_url: str
    sentinel_auth: dict[str, str] = field(default_factory=dict)  # the sentinels' own credentials


def sentinel_of(url: str) -> SentinelURL:
    """`url` read as a Sentinel store URL, or ValueError saying what is wrong with it."""
    scheme, rest = url.split("://", 1)
    rest, _, query = rest.partition("?")
    userinfo, at, where = rest.rpartition("@")
    hosts, _, path = where.partition("/")
    names = [part for part in path.split("/") if part]
    if not names or len(names) > 2 or (len(names) == 2 and not names[1].isdigit()):
        raise ValueError(f"name the master (and the database, if not 0): {_SENTINEL_FORM}")
    sentinels = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"each sentinel as host:port ({address!r}): {_SENTINEL_FORM}")
        sentinels.append((host.strip("[]"), int(port)))
    options = dict(parse_qsl(query))
    auth = {name: options.pop(f"sentinel_{name}") for name in ("username", "password") if f"sentinel_{name}" in options}
    data = "rediss" if scheme.startswith("rediss") else "redis"
    data_url = f"{data}://{userinfo + '@' if at else ''}localhost/{names[1] if len(names) == 2 else 0}"
    if options:
        data_url += "?" + urlencode(options)
    return SentinelURL(sentinels, unquote(names[0]), data_url, auth)
