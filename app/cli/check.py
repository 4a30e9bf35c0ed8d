"""`gateway check`, and what is wrong with a configuration: the problems `check` reports and
`serve` refuses to start on (secrets, declared teams, the store), and the online key probe."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sized
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from app.config_file import SECRETS
from app.settings import ConfigError, Settings, load_settings, read_secret

MIN_KEY_LENGTH = 32
# The secrets that open something by themselves: the admin API, /metrics (all spend), and the
# bootstrap client key (no team, no limits: all of OpenRouter's models on the gateway's account)
_STRONG = ("admin_key", "metrics_key", "api_key")
OPENROUTER_API = "https://openrouter.ai/api/v1"
# Why two secrets must differ, told at the one of the two to change
_SHARED = {
    ("api_key", "admin_key"): "a client key must not open the admin API",
    ("api_key", "upstream.api_key"): "clients must never hold the OpenRouter key",
    ("admin_key", "upstream.api_key"): "give each its own secret",
    ("metrics_key", "admin_key"): "Prometheus's credentials file must not open the admin API",
    ("metrics_key", "api_key"): "every client holding the bootstrap key could read all spend on /metrics",
    ("metrics_key", "upstream.api_key"): "Prometheus's credentials file must not hold the OpenRouter key",
}


def add_command(commands: Any) -> None:
    check = commands.add_parser("check", help="validate the configuration and the environment")
    check.add_argument("--config", help="YAML config file (default GATEWAY_CONFIG or config/gateway.yaml)")
    check.add_argument("--online", action="store_true", help="also try the OpenRouter key (GET /key)")
    check.set_defaults(handler=_check)


def settings_from(args: argparse.Namespace, **overrides: Any) -> Settings:
    """The settings, with what the command line overrides (`--config`, `--host`, `--port`). A
    warning on stderr first for each `GATEWAY_*` variable that names no setting (a typo)."""
    from app.variables import strays

    for stray in strays(os.environ):
        print(f"warning: {stray}", file=sys.stderr)
    if args.config:
        overrides["config_file"] = args.config
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    return load_settings(**overrides)


def problems(settings: Settings) -> list[str]:
    """What is wrong with the settings themselves (the store aside)."""
    found = []
    if settings.upstream.api_key is None:
        found.append("upstream.api_key: OPENROUTER_API_KEY is not set")
    if settings.api_key is None and settings.admin_key is None and not settings.keys:
        held = store_holdings(settings)  # keys made through the admin API before are a way in
        if not (isinstance(held, Holdings) and held.way_in):
            found.append(
                "admin_key: no client could get in; set GATEWAY_ADMIN_KEY (to create keys), GATEWAY_API_KEY "
                "(a bootstrap key) or declare keys in the config file; or try `gateway serve --demo`"
                + (f"; {held}" if isinstance(held, str) else "")
            )
    found += _secret_problems(settings)
    for team in settings.teams:
        if team.upstream_key_env and read_secret(team.upstream_key_env) is None:
            found.append(f"teams.{team.name}.upstream_key_env: {team.upstream_key_env} is not set")
    for alias, target in settings.models.aliases.items():
        if target in settings.models.aliases:
            found.append(f"models.aliases.{alias}: points at another alias ({target}); name an OpenRouter id")
    return found


def _secret_problems(settings: Settings) -> list[str]:
    """A secret that opens something on its own must be hard to guess, and each secret used for
    one thing only (see `_SHARED`)."""
    values = {secret.name: secret.value(settings) for secret in SECRETS}
    env = {secret.name: secret.env for secret in SECRETS}
    found = []
    for name in _STRONG:
        value = values[name]
        if value is not None and len(value) < MIN_KEY_LENGTH:
            found.append(
                f"{name}: {env[name]} has {_count(value, 'character')}; use at least {MIN_KEY_LENGTH}, "
                "e.g. $(openssl rand -hex 32)"
            )
        elif value is not None and len(set(value)) < 8:
            found.append(f"{name}: {env[name]} repeats a few characters; use e.g. $(openssl rand -hex 32)")
    for (name, other), why in _SHARED.items():
        if values[name] is not None and values[name] == values[other]:
            found.append(f"{name}: {env[name]} equals {env[other]}; {why}")
    return found


def team_problems(settings: Settings, store_answers: bool) -> list[str]:
    """Declared keys whose team is declared nowhere: not in the file, not in the store (when it
    answers; a memory store starts empty)."""
    from app.auth.registry import Registry, undeclared_teams
    from app.store import open_store

    teams = [team.record() for team in settings.teams]
    keys = [key.record() for key in settings.keys]
    if settings.store == "memory" or _unborn(settings) or not store_answers:
        if settings.store == "memory":
            hint = "under teams: in the file, and a memory store starts empty: declare it there"
        elif store_answers:  # not opened: that would create it
            hint = "under teams: in the file, nor in the store (created empty at first start): declare it there"
        else:
            hint = "under teams: in the file (the store does not answer, so its teams were not counted)"
        return undeclared_teams(keys, {t.name for t in teams}, hint)

    async def read() -> list[str]:
        store = open_store(settings)
        try:
            return await Registry(store).undeclared_teams(teams, keys)
        finally:
            await store.close()

    return asyncio.run(read())


class Holdings(NamedTuple):
    """What the store holds: teams, keys, the keys neither revoked nor expired, and whether one
    of those is a way in (one not declared: a declared key goes with the file it came from)."""

    teams: int
    keys: int
    active: int
    way_in: bool


def store_holdings(settings: Settings) -> Holdings | str | None:
    """What the store holds; None when it can hold nothing yet (memory, a SQLite file not
    created: it is not made here), or why it could not be read."""
    if settings.store == "memory" or _unborn(settings):
        return None
    from app.auth.records import now
    from app.store import open_store

    async def read() -> Holdings:
        store = open_store(settings)
        try:
            teams = await store.list_teams()
            keys = await store.list_keys()
        finally:
            await store.close()
        moment = now()
        active = [k for k in keys if not k.revoked and (k.expires_at is None or k.expires_at > moment)]
        return Holdings(len(teams), len(keys), len(active), any(not k.declared for k in active))

    try:
        return asyncio.run(asyncio.wait_for(read(), 2 * settings.store_timeout_s + 1))
    except Exception as exc:  # any failure to read it: told as such (the store problem says more)
        return f"the store could not be read ({type(exc).__name__}), so its keys were not counted"


def store_problem(settings: Settings, create: bool) -> str | None:
    """Whether the store answers: keys, teams and limits live there, so a gateway cannot start
    without it (one line, not a traceback from inside the server's start-up). Without `create`,
    a SQLite file not there yet is not made (`check` run under sudo would leave it root's), only
    where it would be checked."""
    if settings.store == "memory":
        return None
    from app.store import open_store, sqlite_path

    path = sqlite_path(settings)
    if path is not None and not create and not path.exists():
        return _place_problem(path)

    async def ping() -> None:
        store = open_store(settings)
        try:
            await asyncio.wait_for(store.ping(), settings.store_timeout_s + 1)
        finally:
            await store.close()

    try:
        asyncio.run(ping())
    except Exception as exc:  # any failure to reach it is the problem reported
        if path is not None:  # the error names the file
            return f"store: cannot use {exc}" if str(exc) else f"store: cannot use sqlite {path} (timed out)"
        try:
            parts = urlsplit(settings.store)
            shown = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
        except ValueError:  # not even a URL: its scheme only (the rest may hold a password)
            shown = settings.store.split("://", 1)[0] + "://…"
        return f"store: {shown} does not answer ({type(exc).__name__}: {exc or 'timed out'})"
    return None


def _unborn(settings: Settings) -> bool:
    """Whether the store is a SQLite file not created yet."""
    from app.store import sqlite_path

    path = sqlite_path(settings)
    return path is not None and not path.exists()


def _place_problem(path: Path) -> str | None:
    """Whether the SQLite file `path` can be created: the nearest of its directories that exists
    must be a directory we may write in (those under it are made at the first start)."""
    try:
        nearest = path.absolute().parent
        while not nearest.exists():
            nearest = nearest.parent
        if not nearest.is_dir():
            return f"store: cannot use sqlite {path}: {nearest} is not a directory"
        if not os.access(nearest, os.W_OK | os.X_OK):
            return f"store: cannot use sqlite {path}: {nearest} is not writable"
    except OSError as exc:  # a directory above it we may not look into
        return f"store: cannot use sqlite {path}: {exc.strerror or exc}"
    return None


def warnings(settings: Settings) -> list[str]:
    """What may well be a mistake, though the gateway would run: `check` says it, without failing."""
    found = []
    if settings.store == "memory":
        found.append(
            "store: memory keeps teams, keys, usage and spend in this process only: a restart loses "
            "them and workers do not share them; leave GATEWAY_STORE unset (SQLite) or use Redis"
        )
    url = urlsplit(settings.upstream.base_url)
    host = (url.hostname or "").lower()
    if (host == "openrouter.ai" or host.endswith(".openrouter.ai")) and url.path.rstrip("/") != "/api/v1":
        found.append(
            f"upstream.base_url: {settings.upstream.base_url} is on openrouter.ai, whose API is under /api/v1: "
            f"OpenRouter's is {OPENROUTER_API}"
        )
    return found


def _check(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"problem: {problem}", file=sys.stderr)
        return 1
    store = store_problem(settings, create=False)
    found = [*problems(settings), *([store] if store else []), *team_problems(settings, store is None)]
    if args.online and settings.upstream.api_key is not None:
        refused, report = _try_upstream_key(settings, settings.upstream.api_key.get_secret_value())
        found += [refused] if refused else []
        if report:
            print(report)
    for problem in found:
        print(f"problem: {problem}", file=sys.stderr)
    for warning in warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    if found:
        return 1
    missing = missing_config(settings)
    source = f"no file: {missing}, defaults and environment only" if missing else settings.config_file or "no file"
    held = store_holdings(settings)
    print(
        f"config OK ({source}): upstream {settings.upstream.base_url}, "
        f"store {store_label(settings)}, "
        f"{_count(settings.teams, 'declared team')}, {_count(settings.keys, 'declared key')}, "
        f"{_count(settings.models.aliases, 'alias', 'aliases')}, "
        f"{_count(settings.models.per_model, 'per-model setting')}"
        + (
            f"; store holds {_count(held.teams, 'team')}, {_count(held.keys, 'key')} ({held.active} active)"
            if isinstance(held, Holdings)
            else ""
        )
    )
    return 0


def store_label(settings: Settings) -> str:
    """Which store, without a URL's password: `sqlite /abs/data/gateway.db`, `redis`, `memory`.
    The file's absolute path: `data_dir` is relative to the working directory, and a gateway
    started elsewhere opens another (new, empty) store."""
    from app.store import sqlite_path

    path = sqlite_path(settings)
    if path is None:
        return settings.store.split("://", 1)[0]
    return f"sqlite {path.absolute()}" + (" (created at first start)" if not path.exists() else "")


def _count(things: Sized | int, one: str, many: str = "") -> str:
    count = things if isinstance(things, int) else len(things)
    return f"{count} {one if count == 1 else many or one + 's'}"


def missing_config(settings: Settings) -> str | None:
    """`<path> not found` when the default config file is absent (an absent file named on
    purpose is an error before this)."""
    if settings.config_file and not os.path.exists(settings.config_file):
        return f"{settings.config_file} not found in {os.getcwd()}"
    return None


def _try_upstream_key(settings: Settings, key: str) -> tuple[str | None, str | None]:
    """`GET /key` with the OpenRouter key: (a problem, or a report line). The key is never shown."""
    from app.errors import UpstreamError
    from app.upstream.client import OpenRouterClient, open_session

    async def ask() -> tuple[int, Any]:
        session = open_session(settings.upstream)
        try:
            return await OpenRouterClient(session, settings.upstream).get_json(
                "/key", timeout=settings.upstream.connect_timeout_s + 10
            )
        finally:
            await session.close()

    where = f"{settings.upstream.base_url}/key"
    try:
        status, body = asyncio.run(ask())
    except UpstreamError as exc:
        return f"upstream.base_url: {where}: {exc.message}", None
    if status == 404:  # the path is wrong, not the key: OpenRouter answers an unknown key with 401
        return f"upstream.base_url: {where} answered 404: is the base URL right? OpenRouter's is {OPENROUTER_API}", None
    data = body.get("data") if isinstance(body, dict) else None
    if status != 200 or not isinstance(data, dict):
        error = body.get("error") if isinstance(body, dict) else None
        said = str(error.get("message"))[:200] if isinstance(error, dict) else None
        said = said and said.replace(key, "…")  # in case it is echoed
        return f"upstream.api_key: {where} refused the OpenRouter key ({status}{f': {said}' if said else ''})", None
    limit = data.get("limit")
    left = data.get("limit_remaining")
    return None, (
        f"OpenRouter key OK: label {data.get('label')!r}, "
        + (f"limit {limit} USD ({left} left)" if limit is not None else "no credit limit")
    )
