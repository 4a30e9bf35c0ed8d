"""`gateway serve` (and `--demo`), `gateway simulate`, `gateway check`."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import sys
import tempfile
from typing import Any

from app.settings import ConfigError, Settings, load_settings, read_secret

DEMO_UPSTREAM_KEY = "sk-or-simulated-demo-key"


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
    for team in settings.teams:
        if team.upstream_key_env and read_secret(team.upstream_key_env) is None:
            problems.append(f"teams.{team.name}.upstream_key_env: {team.upstream_key_env} is not set")
    for alias, target in settings.models.aliases.items():
        if target in settings.models.aliases:
            problems.append(f"models.aliases.{alias}: points at another alias ({target}); name an OpenRouter id")
    return problems


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
    problems = _problems(settings)
    store = _store_problem(settings)
    for problem in [*problems, *([store] if store else [])]:
        print(f"problem: {problem}", file=sys.stderr)
    if problems or store:
        return 1
    source = settings.config_file or "no file"
    if settings.config_file and not os.path.exists(settings.config_file):
        source = f"no file: {settings.config_file} not found, defaults and environment only"
    print(
        f"config OK ({source}): upstream {settings.upstream.base_url}, "
        f"store {settings.store.split('://', 1)[0]}, "
        f"{len(settings.models.aliases)} aliases, {len(settings.models.per_model)} per-model settings"
    )
    return 0


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
    if not args.demo:
        problems = _problems(settings)
        problems += [p for p in [_store_problem(settings)] if p and not problems]
        if problems:
            for problem in problems:
                print(f"problem: {problem}", file=sys.stderr)
            print("refusing to start; see `gateway check`", file=sys.stderr)
            return 2
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
        if settings.admin_port is not None:
            print("problem: admin_port: a separate admin listener needs one process; drop --workers", file=sys.stderr)
            return 2
        if args.config:
            os.environ["GATEWAY_CONFIG"] = args.config  # each worker loads the settings itself
        server.run_workers(settings, args.workers)
        return 0
    try:
        app = create_app(settings)
        server.run(settings, app, create_admin_app(settings, app) if settings.admin_port is not None else None)
    finally:
        if simulator is not None:
            simulator.stop()
    return 0


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
