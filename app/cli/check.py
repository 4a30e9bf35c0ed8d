"""`gateway check`, and what is wrong with a configuration: the problems `check` reports and
`serve` refuses to start on (secrets, declared teams, the store), and the online key probe."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sized
from pathlib import Path
from typing import Any

from app.config_file import SECRETS
from app.settings import ConfigError, Settings, load_settings, read_secret

MIN_KEY_LENGTH = 32
# The secrets that open something by themselves: the admin API, /metrics (all spend)
_STRONG = ("admin_key", "metrics_key")
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
    """The settings, with what the command line overrides (`--config`, `--host`, `--port`)."""
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
        found.append(
            "admin_key: no client could get in; set GATEWAY_ADMIN_KEY (to create keys), GATEWAY_API_KEY "
            "(a bootstrap key) or declare keys in the config file; or try `gateway serve --demo`"
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
                f"{name}: {env[name]} has {len(value)} characters; use at least {MIN_KEY_LENGTH}, "
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


def store_problem(settings: Settings, create: bool) -> str | None:
    """Whether the store answers: keys, teams and limits live there, so a gateway cannot start
    without it (one line, not a traceback from inside the server's start-up). Without `create`,
    a SQLite file not there yet is not made (`check` run under sudo would leave it root's), only
    where it would be checked."""
    if settings.store == "memory":
        return None
    from urllib.parse import urlsplit

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
    if settings.store == "memory":
        print(
            "warning: store: memory keeps teams, keys, usage and spend in this process only: a restart loses "
            "them and workers do not share them; leave GATEWAY_STORE unset (SQLite) or use Redis",
            file=sys.stderr,
        )
    if found:
        return 1
    missing = missing_config(settings)
    source = f"no file: {missing}, defaults and environment only" if missing else settings.config_file or "no file"
    print(
        f"config OK ({source}): upstream {settings.upstream.base_url}, "
        f"store {store_label(settings)}, "
        f"{_count(settings.teams, 'team')}, {_count(settings.keys, 'key')}, "
        f"{_count(settings.models.aliases, 'alias', 'aliases')}, "
        f"{_count(settings.models.per_model, 'per-model setting')}"
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


def _count(things: Sized, one: str, many: str = "") -> str:
    return f"{len(things)} {one if len(things) == 1 else many or one + 's'}"


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
