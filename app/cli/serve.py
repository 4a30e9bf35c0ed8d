"""`gateway serve` (and `--demo`), `gateway simulate`, `gateway check`."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Sized
from typing import Any

from app.settings import ConfigError, Settings, load_settings, read_secret

DEMO_UPSTREAM_KEY = "sk-or-simulated-demo-key"
MIN_ADMIN_KEY = 32


def add_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--demo", action="store_true", help="run against the built-in OpenRouter simulator")
    serve.add_argument("--host", help="listen address (default GATEWAY_HOST or 0.0.0.0; demo: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default GATEWAY_PORT or 8080)")
    serve.add_argument("--config", help="YAML config file (default GATEWAY_CONFIG or config/gateway.yaml)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (metrics aggregated across them)")
    serve.set_defaults(handler=_serve)

    simulate = commands.add_parser("simulate", help="run the OpenRouter simulator on its own port")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8090)
    simulate.add_argument("--api-key", action="append", help="accept only this key (repeatable)")
    simulate.add_argument("--no-log", action="store_true", help="keep no request log (benchmarks)")
    simulate.add_argument("--keepalives", type=int, default=2, help="keep-alive comments before each stream")
    simulate.set_defaults(handler=_simulate)

    check = commands.add_parser("check", help="validate the configuration and the environment")
    check.add_argument("--config", help="YAML config file (default GATEWAY_CONFIG or config/gateway.yaml)")
    check.add_argument("--online", action="store_true", help="also try the OpenRouter key (GET /key)")
    check.set_defaults(handler=_check)


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    if args.config:
        overrides["config_file"] = args.config
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    return load_settings(**overrides)


def _problems(settings: Settings) -> list[str]:
    problems = []
    if settings.upstream.api_key is None:
        problems.append("upstream.api_key: OPENROUTER_API_KEY is not set")
    if settings.api_key is None and settings.admin_key is None and not settings.keys:
        problems.append(
            "admin_key: no client could get in; set GATEWAY_ADMIN_KEY (to create keys), GATEWAY_API_KEY "
            "(a bootstrap key) or declare keys in the config file; or try `gateway serve --demo`"
        )
    problems += _secret_problems(settings)
    for team in settings.teams:
        if team.upstream_key_env and read_secret(team.upstream_key_env) is None:
            problems.append(f"teams.{team.name}.upstream_key_env: {team.upstream_key_env} is not set")
    for alias, target in settings.models.aliases.items():
        if target in settings.models.aliases:
            problems.append(f"models.aliases.{alias}: points at another alias ({target}); name an OpenRouter id")
    return problems


def _secret_problems(settings: Settings) -> list[str]:
    """The admin key must be hard to guess, and each secret used for one thing only: a client key
    equal to the admin key opens the admin API, one equal to the OpenRouter key hands it out."""
    admin, client, upstream = (
        secret.get_secret_value() if secret else None
        for secret in (settings.admin_key, settings.api_key, settings.upstream.api_key)
    )
    problems = []
    if admin is not None and len(admin) < MIN_ADMIN_KEY:
        problems.append(
            f"admin_key: GATEWAY_ADMIN_KEY has {len(admin)} characters; use at least {MIN_ADMIN_KEY}, "
            "e.g. $(openssl rand -hex 32)"
        )
    elif admin is not None and len(set(admin)) < 8:
        problems.append("admin_key: GATEWAY_ADMIN_KEY repeats a few characters; use e.g. $(openssl rand -hex 32)")
    if client is not None and client == admin:
        problems.append("api_key: GATEWAY_API_KEY equals GATEWAY_ADMIN_KEY; a client key must not open the admin API")
    if client is not None and client == upstream:
        problems.append(
            "api_key: GATEWAY_API_KEY equals OPENROUTER_API_KEY; clients must never hold the OpenRouter key"
        )
    if admin is not None and admin == upstream:
        problems.append("admin_key: GATEWAY_ADMIN_KEY equals OPENROUTER_API_KEY; give each its own secret")
    return problems


def _team_problems(settings: Settings, store_answers: bool) -> list[str]:
    """Declared keys whose team is declared nowhere: not in the file, not in the store (when it
    answers; a memory store starts empty)."""
    from app.auth.registry import Registry, undeclared_teams
    from app.store import open_store

    teams = [team.record() for team in settings.teams]
    keys = [key.record() for key in settings.keys]
    if settings.store == "memory" or not store_answers:
        hint = (
            "under teams: in the file, and a memory store starts empty: declare it there"
            if settings.store == "memory"
            else "under teams: in the file (the store does not answer, so its teams were not counted)"
        )
        return undeclared_teams(keys, {t.name for t in teams}, hint)

    async def read() -> list[str]:
        store = open_store(settings)
        try:
            return await Registry(store).undeclared_teams(teams, keys)
        finally:
            await store.close()

    return asyncio.run(read())


def _store_problem(settings: Settings) -> str | None:
    """Whether the store answers: keys, teams and limits live there, so a gateway cannot start
    without it (one line, not a traceback from inside the server's start-up)."""
    if settings.store == "memory":
        return None
    from urllib.parse import urlsplit

    from app.store import open_store, sqlite_path

    async def ping() -> None:
        store = open_store(settings)
        try:
            await asyncio.wait_for(store.ping(), settings.store_timeout_s + 1)
        finally:
            await store.close()

    try:
        asyncio.run(ping())
    except Exception as exc:  # any failure to reach it is the problem reported
        path = sqlite_path(settings)
        if path is not None:  # the error names the file
            return f"store: cannot use {exc}" if str(exc) else f"store: cannot use sqlite {path} (timed out)"
        try:
            parts = urlsplit(settings.store)
            shown = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
        except ValueError:  # not even a URL: its scheme only (the rest may hold a password)
            shown = settings.store.split("://", 1)[0] + "://…"
        return f"store: {shown} does not answer ({type(exc).__name__}: {exc or 'timed out'})"
    return None


def _check(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"problem: {problem}", file=sys.stderr)
        return 1
    store = _store_problem(settings)
    problems = [*_problems(settings), *([store] if store else []), *_team_problems(settings, store is None)]
    if args.online and settings.upstream.api_key is not None:
        refused, report = _try_upstream_key(settings, settings.upstream.api_key.get_secret_value())
        problems += [refused] if refused else []
        if report:
            print(report)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if settings.store == "memory":
        print(
            "warning: store: memory keeps teams, keys, usage and spend in this process only: a restart loses "
            "them and workers do not share them; leave GATEWAY_STORE unset (SQLite) or use Redis",
            file=sys.stderr,
        )
    if problems:
        return 1
    missing = _missing_config(settings)
    source = f"no file: {missing}, defaults and environment only" if missing else settings.config_file or "no file"
    print(
        f"config OK ({source}): upstream {settings.upstream.base_url}, "
        f"store {_store_label(settings)}, "
        f"{_count(settings.teams, 'team')}, {_count(settings.keys, 'key')}, "
        f"{_count(settings.models.aliases, 'alias', 'aliases')}, "
        f"{_count(settings.models.per_model, 'per-model setting')}"
    )
    return 0


def _store_label(settings: Settings) -> str:
    """Which store, without a URL's password: `sqlite data/gateway.db`, `redis`, `memory`."""
    from app.store import sqlite_path

    path = sqlite_path(settings)
    return f"sqlite {path}" if path is not None else settings.store.split("://", 1)[0]


def _count(things: Sized, one: str, many: str = "") -> str:
    return f"{len(things)} {one if len(things) == 1 else many or one + 's'}"


def _missing_config(settings: Settings) -> str | None:
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


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = _demo_settings(args) if args.demo else _settings(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"problem: {problem}", file=sys.stderr)
        return 2
    if args.demo and args.workers > 1:
        print("problem: --demo runs one process; drop --workers", file=sys.stderr)
        return 2
    if args.workers > 1 and settings.store == "memory":
        print(
            "problem: store: the memory store lives inside one process, so each of the --workers would have its "
            "own keys, limits and budgets; use the sqlite store (the default) or Redis, or drop --workers",
            file=sys.stderr,
        )
        return 2
    if args.workers > 1 and settings.admin_port is not None:
        print("problem: admin_port: a separate admin listener needs one process; drop --workers", file=sys.stderr)
        return 2
    if missing := _missing_config(settings):
        print(
            f"note: no config file ({missing}): running on defaults and the environment only, with no model "
            "aliases, declared teams or declared keys; name the file with --config FILE or GATEWAY_CONFIG",
            file=sys.stderr,
        )
    if problems := _start_problems(settings, args.demo):
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        print("refusing to start; see `gateway check`", file=sys.stderr)
        return 2
    from app import server

    try:  # before anything is announced: a demo key for a port another process holds is a lie
        sockets = server.listen(settings)
    except server.ListenError as exc:
        print(f"problem: {exc}", file=sys.stderr)
        return 2
    settings = settings.model_copy(update={"port": sockets[0].getsockname()[1]})  # port 0: the one given
    return _run(args, settings, sockets)


def _start_problems(settings: Settings, demo: bool) -> list[str]:
    """Why the gateway must not start, in the order worth fixing (the store is asked only once
    the rest is right). The demo makes its own secrets and store."""
    problems = [] if demo else _problems(settings)
    if not problems and not demo:
        problems = [p for p in [_store_problem(settings)] if p]
    return problems or _team_problems(settings, store_answers=True)


def _run(args: argparse.Namespace, settings: Settings, sockets: list[socket.socket]) -> int:
    from app import server
    from app.logs import configure_logging
    from app.main import create_admin_app, create_app

    configure_logging(settings)
    simulator = None
    if args.demo:
        from app.simulator import SimulatorThread

        simulator = SimulatorThread(api_keys={DEMO_UPSTREAM_KEY}).start()
        settings = settings.model_copy(
            update={"upstream": settings.upstream.model_copy(update={"base_url": simulator.base_url})}
        )
        _print_demo(settings, simulator.base_url)
    if args.workers > 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _fresh_metrics_dir()
    if args.workers > 1:
        if args.config:
            os.environ["GATEWAY_CONFIG"] = args.config  # each worker loads the settings itself
        server.run_workers(settings, args.workers, sockets[0])
        return 0
    try:
        app = create_app(settings)
        admin_app = create_admin_app(settings, app) if settings.admin_port is not None else None
        started = server.run(settings, app, admin_app, sockets)
    finally:
        if simulator is not None:
            simulator.stop()
    return 0 if started else 2  # not started: its start was refused, and said why


def _fresh_metrics_dir() -> None:
    """prometheus_client's multiprocess mode: one directory for every worker, emptied at start."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(
        tempfile.gettempdir(), f"gateway-metrics-{os.getpid()}"
    )
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def _demo_settings(args: argparse.Namespace) -> Settings:
    from pydantic import SecretStr

    if not args.host:
        args.host = "127.0.0.1"
    settings = _settings(args)
    return settings.model_copy(
        update={
            "api_key": settings.api_key or SecretStr("sk-gw-demo-" + secrets.token_hex(16)),
            "admin_key": settings.admin_key or SecretStr("sk-gw-admin-demo-" + secrets.token_hex(16)),
            "store": "memory",
            "upstream": settings.upstream.model_copy(update={"api_key": SecretStr(DEMO_UPSTREAM_KEY)}),
        }
    )


def _print_demo(settings: Settings, simulator_url: str) -> None:
    assert settings.api_key is not None
    key = settings.api_key.get_secret_value()
    admin = settings.admin_key.get_secret_value() if settings.admin_key else ""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{host}:{settings.port}/v1"
    print(
        f"""
OpenRouter Gateway demo: OpenRouter is simulated at {simulator_url} (no network, no config).

Try it with curl:

  curl {base}/chat/completions \\
    -H "Authorization: Bearer {key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "deepseek/deepseek-v3.2", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

Or with the OpenAI SDK (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="{key}")
  reply = client.chat.completions.create(
      model="deepseek/deepseek-v3.2", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)

Manage teams and keys (the demo keeps them in memory):

  export GATEWAY_ADMIN_KEY={admin} GATEWAY_URL=http://{host}:{settings.port}
  gateway teams create demo --models 'openai/*' 'deepseek/*'
  gateway keys create --name me --team demo
""",
        flush=True,
    )


def _simulate(args: argparse.Namespace) -> int:
    from app.simulator import Simulator, start_simulator

    simulator = Simulator(
        api_keys=set(args.api_key) if args.api_key else None, record=not args.no_log, keepalives=args.keepalives
    )

    async def run() -> None:
        runner, port = await start_simulator(simulator, args.host, args.port)
        print(f"OpenRouter simulator on http://{args.host}:{port}/api/v1", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        import uvloop

        uvloop.run(run())
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port taken, an address not ours
        print(f"problem: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
