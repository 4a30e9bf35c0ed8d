"""Helpers for the metering tests: a team and key, chat requests, what the simulator served,
the gateway's metrics and usage report, its JSON request log, and a real `gateway serve` writing
that log."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.simulator import SimulatorThread
from tests.support import (
    ADMIN_KEY,
    GatewayProcess,
    scrape,
    wait_until,
)

HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]


NANO_USD = Decimal("1e-9")


def admin(url: str) -> httpx.Client:
    return httpx.Client(base_url=url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=20)


def team_and_key(url: str, **key_fields: Any) -> tuple[str, dict[str, Any]]:
    """A fresh team and a key in it (the key's fields include its plaintext `key`)."""
    team = "t" + uuid.uuid4().hex[:10]
    with admin(url) as client:
        assert client.post("/teams", json={"name": team}).status_code == 201
        created = client.post("/keys", json={"name": f"{team}-key", "team": team, **key_fields})
        assert created.status_code == 201, created.text
    return team, created.json()


def chat(url: str, key: str, rid: str, **body: Any) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"messages": HELLO, **body},
        headers={"Authorization": f"Bearer {key}", "x-request-id": rid},
        timeout=30,
    )


def served(simulator: SimulatorThread, rid: str) -> dict[str, Any]:
    """The simulator's own log entry for a request, once it knows what it served."""
    entries = wait_until(lambda: [e for e in simulator.find(rid) if e.get("usage")], 10, f"simulator entry {rid}")
    assert len(entries) == 1, entries
    return entries[0]


def samples(url: str) -> list[Any]:
    text = scrape(url, timeout=20).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    return sum(s.value for s in samples(url) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def usage(url: str, **params: str) -> dict[str, Any]:
    with admin(url) as client:
        response = client.get("/usage", params=params)
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_line(path: Path, rid: str, logger: str = "gateway.requests") -> dict[str, Any]:
    """The line `logger` wrote about request `rid`: the request line, or its reconciliation
    (gateway.usage)."""

    def find() -> dict[str, Any] | None:
        return next((e for e in json_lines(path) if e.get("request_id") == rid and e["logger"] == logger), None)

    return wait_until(find, 15, f"the {logger} line of {rid}")


def cost_of(entry: dict[str, Any]) -> Decimal:
    return Decimal(repr(entry["cost"]))


class Served:
    def __init__(self, process: GatewayProcess, log: Path) -> None:
        self.url = process.url
        self.log = log
