"""Helpers for the admission tests on a running gateway: teams and keys made through the admin
API, chat requests (held open as streams when a test needs a request in flight), budgets and
usage read back, catalogue prices, a gateway on a Redis of the test's, and Redis's own view
(MONITOR, commandstats) of the scripts a gateway runs."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import ROUND_CEILING, Decimal
from typing import Any

import httpx
import redis

from app.catalog.models import Prices
from app.simulator import SimulatorThread
from app.simulator.catalogue import BY_ID, price
from app.store import lua
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, GatewayServer, gateway_settings, request_id, scrape

HELLO = [{"role": "user", "content": "Hello there"}]


MINI = "openai/gpt-4o-mini"


SHA = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in (("admit", lua.ADMIT), ("settle", lua.SETTLE))}


SHA["ledger"] = hashlib.sha1(lua.LEDGER_APPLY.encode()).hexdigest()


def admin(gateway: GatewayServer) -> httpx.Client:
    return httpx.Client(base_url=gateway.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=20)


def make_team(gateway: GatewayServer, **limits: Any) -> str:
    name = "t-" + uuid.uuid4().hex[:8]
    with admin(gateway) as client:
        response = client.post("/teams", json={"name": name, **limits})
        assert response.status_code == 201, response.text
    return name


def make_key(gateway: GatewayServer, team: str, **limits: Any) -> dict[str, Any]:
    with admin(gateway) as client:
        response = client.post("/keys", json={"name": "k-" + uuid.uuid4().hex[:6], "team": team, **limits})
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
    return created


def chat(gateway: GatewayServer, key: str, body: dict[str, Any], rid: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "x-request-id": rid or request_id()}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=20)


@contextlib.contextmanager
def held_stream(gateway: GatewayServer, key: str, body: dict[str, Any]) -> Iterator[httpx.Response]:
    """A streaming request whose headers arrived (it was admitted) and whose body is still coming."""
    with (
        httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=20) as client,
        client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response,
    ):
        yield response


def budget_of(gateway: GatewayServer, path: str) -> dict[str, Any]:
    with admin(gateway) as client:
        shown: dict[str, Any] = client.get(path).json()["budget"]
    return shown


def usage_requests(gateway: GatewayServer, key_id: str) -> int:
    with admin(gateway) as client:
        count: int = client.get("/usage", params={"key": key_id}).json()["total"]["requests"]
    return count


def billed(simulator: SimulatorThread, rid: str) -> float:
    return float(sum(e.get("cost") or 0 for e in simulator.find(rid)))


def catalogue_prices(model: str) -> Prices:
    entry = BY_ID[model]
    return Prices(price(entry, "prompt"), price(entry, "completion"), price(entry, "request"))


def nano_ceil(usd: Decimal) -> int:
    return int((usd * 10**9).to_integral_value(ROUND_CEILING))


def metric(gateway: GatewayServer, name: str) -> float:
    text = scrape(gateway.url, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def commandstats(url: str) -> dict[str, int]:
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}


class Monitor:
    """Redis's own MONITOR: every command the server runs (Lua's inner calls marked `lua`)."""

    _ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._sock.sendall(b"MONITOR\r\n")
        self._buffer = b""
        while b"\r\n" not in self._buffer:
            self._buffer += self._sock.recv(4096)
        ok, self._buffer = self._buffer.split(b"\r\n", 1)
        assert ok == b"+OK"
        self._sock.settimeout(None)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            *complete, self._buffer = self._buffer.split(b"\r\n")
            with self._lock:
                self._lines.extend(line.decode(errors="replace") for line in complete)
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self._buffer += data

    def commands(self, since: int = 0) -> list[tuple[str, list[str]]]:
        """(client, [command, args...]) per command, from the `since`-th on."""
        with self._lock:
            lines = self._lines[since:]
        out = []
        for line in lines:
            client, _, rest = line.partition("] ")
            out.append((client.rsplit(" ", 1)[-1], [m.group(1) for m in self._ARG.finditer(rest)]))
        return out

    def mark(self) -> int:
        with self._lock:
            return len(self._lines)

    def scripts(self, since: int = 0) -> Counter[str]:
        """EVALSHA calls by script name (admit, settle, ledger) since a mark."""
        names = {sha: name for name, sha in SHA.items()}
        return Counter(
            names.get(args[1], args[1]) for _, args in self.commands(since) if args and args[0].upper() == "EVALSHA"
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)


@contextlib.contextmanager
def redis_gateway(simulator: SimulatorThread, server: RedisServer, **overrides: Any) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        simulator.base_url,
        admin_key=ADMIN_KEY,
        store=server.url,
        store_prefix="d" + uuid.uuid4().hex[:8],
        **overrides,
    )
    with GatewayServer(settings) as gateway:
        yield gateway
