"""What the tests of the agent APIs (Responses, Messages) share: a gateway with an admin key and
quick /generation lookups, a fresh team key per test, and the sums to compare the ledger with
what the simulator billed."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.simulator import SimulatorThread
from tests.support import ADMIN_KEY, GatewayServer, gateway_settings, scrape, wait_until


def agent_gateway(simulator: SimulatorThread, **overrides: Any) -> GatewayServer:
    settings = gateway_settings(
        simulator.base_url, admin_key=ADMIN_KEY, reconcile_delays_s=[0.05, 0.1, 0.2, 0.4, 0.8], **overrides
    )
    return GatewayServer(settings)


def admin(gateway: GatewayServer) -> httpx.Client:
    return httpx.Client(base_url=gateway.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)


def new_key(gateway: GatewayServer, **limits: Any) -> dict[str, Any]:
    team = "team-" + uuid.uuid4().hex[:8]
    with admin(gateway) as client:
        assert client.post("/teams", json={"name": team}).status_code == 201
        response = client.post("/keys", json={"name": "agent", "team": team, **limits})
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created


def billed(simulator: SimulatorThread, marker: str) -> tuple[int, Decimal]:
    """Generations the simulator billed for requests whose id starts with `marker`, and their cost."""
    entries = [
        e
        for e in simulator.requests()
        if e["headers"].get("x-request-id", "").startswith(marker) and e.get("generation_id")
    ]
    return len(entries), sum((Decimal(repr(e["cost"])) for e in entries), Decimal(0))


def key_usage(gateway: GatewayServer, key: dict[str, Any]) -> dict[str, Any]:
    with admin(gateway) as client:
        report: dict[str, Any] = client.get("/usage", params={"key": key["id"]}).json()
    return report["total"]


def team_metrics(gateway: GatewayServer, team: str) -> tuple[Decimal, set[str]]:
    """The cost counter of one team on /metrics, and the endpoints its requests were counted on."""
    cost, endpoints = Decimal(0), set()
    for family in text_string_to_metric_families(scrape(gateway.url).text):
        for sample in family.samples:
            if sample.labels.get("team") != team:
                continue
            if sample.name == "gateway_cost_usd_total":
                cost += Decimal(repr(sample.value))
            elif sample.name == "gateway_requests_total":
                endpoints.add(sample.labels["endpoint"])
    return cost, endpoints


def wait_for_ledger(gateway: GatewayServer, simulator: SimulatorThread, key: dict[str, Any], marker: str) -> Decimal:
    """Until the key's ledger cost equals what the simulator billed (to 1e-9 USD); that cost."""

    def agreed() -> Decimal | None:
        count, cost = billed(simulator, marker)
        total = key_usage(gateway, key)
        shown = Decimal(repr(total["cost_usd"]))
        return cost if count and abs(shown - cost) < Decimal("1e-9") and cost > 0 else None

    return wait_until(agreed, 15, "the ledger to equal what the simulator billed")


def parse_sse(text: str) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) per SSE event; comments skipped, `[DONE]` kept as a string."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        name = next((line[6:].strip() for line in lines if line.startswith("event:")), None)
        data = "\n".join(line[5:].strip() for line in lines if line.startswith("data:"))
        events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


def logged(simulator: SimulatorThread, rid: str) -> dict[str, Any]:
    """The simulator's one log entry for this request id."""
    (entry,) = simulator.find(rid)
    return entry


def generation(http: httpx.Client, gen_id: str) -> dict[str, Any]:
    """GET /generation until it answers (it 404s at first, as OpenRouter's does)."""
    found = wait_until(lambda: (r := http.get("/generation", params={"id": gen_id})).status_code == 200 and r, 5)
    data: dict[str, Any] = found.json()["data"]
    return data


def cut_stream(
    http: httpx.Client, simulator: SimulatorThread, path: str, body: dict[str, Any], rid: str
) -> tuple[bytes, dict[str, Any]]:
    """A stream the simulator cuts (`reset_after`): what arrived before the cut, and the
    simulator's log entry once it has billed the generation; its /generation cost agrees."""
    received = b""
    with (
        pytest.raises(httpx.HTTPError),
        http.stream("POST", path, json=body, headers={"x-request-id": rid}) as answer,
    ):
        for chunk in answer.iter_bytes():
            received += chunk
    entry = wait_until(lambda: (e := logged(simulator, rid)).get("generation_id") and e, 5)
    assert entry["failed"] and generation(http, entry["generation_id"])["total_cost"] == entry["cost"]
    return received, entry
