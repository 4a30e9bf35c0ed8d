"""`gateway serve` (and `--demo`, against the built-in OpenRouter simulator), `gateway simulate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.cli.check import missing_config, problems, settings_from, store_label, store_problem, team_problems
from app.settings import ConfigError, Settings

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


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = _demo_settings(args) if args.demo else settings_from(args)
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
    if missing := missing_config(settings):
        print(
            f"note: no config file ({missing}): running on defaults and the environment only, with no model "
            "aliases, declared teams or declared keys; name the file with --config FILE or GATEWAY_CONFIG",
            file=sys.stderr,
        )
    fresh = _new_store_file(settings)  # before the checks below open (and so create) it
    if found := _start_problems(settings, args.demo):
        for problem in found:
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
    return _run(args, settings, sockets, fresh)


def _start_problems(settings: Settings, demo: bool) -> list[str]:
    """Why the gateway must not start, in the order worth fixing (the store is asked only once
    the rest is right). The demo makes its own secrets and store."""
    found = [] if demo else problems(settings)
    if not found and not demo:
        found = [p for p in [store_problem(settings, create=True)] if p]
    return found or team_problems(settings, store_answers=True)


def _run(args: argparse.Namespace, settings: Settings, sockets: list[socket.socket], fresh: Path | None) -> int:
    from app import server
    from app.logs import configure_logging
    from app.main import create_admin_app, create_app

    configure_logging(settings)
    _announce(settings, sockets, fresh)
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


def _announce(settings: Settings, sockets: list[socket.socket], fresh: Path | None) -> None:
    """One line saying where the gateway listens and which store it uses; a warning when that
    store is a new, empty file (started from another directory, `data_dir` points elsewhere)."""
    log = logging.getLogger("gateway")
    urls = [f"http://{_shown_host(sock)}:{sock.getsockname()[1]}" for sock in sockets]
    store = store_label(settings).replace(" (created at first start)", "")
    admin = f", admin API on {urls[1]}" if len(urls) > 1 else ""
    log.info(f"listening on {urls[0]}{admin}; store {store}", extra={"url": urls[0], "store": store})
    if fresh is not None:
        log.warning(
            f"store: {fresh} did not exist: starting with a new, empty store (no teams, keys or usage). If "
            "this gateway kept data before, it was elsewhere: set GATEWAY_DATA_DIR, or run from the directory "
            "it ran from"
        )


def _new_store_file(settings: Settings) -> Path | None:
    """The SQLite store's file (absolute) if it does not exist yet."""
    from app.store import sqlite_path

    path = sqlite_path(settings)
    return path.absolute() if path is not None and not path.exists() else None


def _shown_host(sock: socket.socket) -> str:
    host = str(sock.getsockname()[0])
    return f"[{host}]" if ":" in host else host


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
    settings = settings_from(args)
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
