"""Metering (app/usage/meter.py): every field of the per-request record, cut streams reconciled
from /generation (or their estimate kept when it never answers), budgets settled from the
corrected record, requests refused for their body metered too, and a response metered once
sent even when its client is gone."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.simulator import SimulatorThread
from tests.metering_support import (
    HELLO,
    NANO_USD,
    Served,
    admin,
    chat,
    cost_of,
    log_line,
    metric,
    served,
    team_and_key,
    usage,
)
from tests.support import (
    ADMIN_KEY,
    CLIENT_KEY,
    GatewayServer,
    gateway_settings,
    scrape,
    wait_until,
)

MODEL = "openai/gpt-4o-mini"


def test_request_record_carries_every_field(served_gateway: Served, simulator: SimulatorThread) -> None:
    """Point 1: one JSON log line per request with time, team, key, requested vs served model,
    provider, endpoint, stream, status, every token kind, cost and its source, overhead,
    upstream time and TTFT, each equal to what the simulator served."""
    url = served_gateway.url
    team, key = team_and_key(url)
    rid = "fields-" + uuid.uuid4().hex
    before = datetime.now(UTC)
    response = chat(
        url,
        key["key"],
        rid,
        model="mini-thinker",  # an alias of openai/gpt-5-mini, a reasoning model
        stream=True,
        simulator={"cached_tokens": 5, "model_served": "openai/gpt-5-mini-2025-08-07", "provider": "Azure"},
    )
    assert response.status_code == 200 and "data: [DONE]" in response.text
    entry = log_line(served_gateway.log, rid)
    after = datetime.now(UTC)
    sim = served(simulator, rid)
    usage_served = sim["usage"]

    logged_at = datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= logged_at <= after + timedelta(seconds=1)
    assert entry["logger"] == "gateway.requests" and entry["level"] == "info"
    assert entry["team"] == team and entry["key"] == f"{team}-key" and entry["key_id"] == key["id"]
    assert entry["model_requested"] == "mini-thinker"
    assert entry["model"] == "openai/gpt-5-mini"
    assert entry["model_served"] == "openai/gpt-5-mini-2025-08-07" == sim["model_served"]
    assert entry["provider"] == "Azure"
    assert entry["endpoint"] == "chat.completions" and entry["stream"] is True
    assert entry["status"] == 200 and entry["error_code"] is None
    assert entry["generation_id"] == sim["generation_id"]
    assert entry["prompt_tokens"] == usage_served["prompt_tokens"] > 5
    assert entry["completion_tokens"] == usage_served["completion_tokens"]
    assert entry["reasoning_tokens"] == usage_served["completion_tokens_details"]["reasoning_tokens"] > 0
    assert entry["cached_tokens"] == usage_served["prompt_tokens_details"]["cached_tokens"] == 5
    assert Decimal(entry["cost_usd"]) == cost_of(sim) > 0
    assert entry["cost_source"] == "upstream" and entry["estimated"] is False
    assert entry["duration_ms"] > 0 and entry["upstream_ms"] > 0 and entry["overhead_ms"] >= 0
    assert entry["upstream_ms"] + entry["overhead_ms"] == pytest.approx(entry["duration_ms"], abs=0.01)
    assert 0 < entry["ttft_ms"] <= entry["duration_ms"]
    assert key["key"] not in served_gateway.log.read_text()

    plain = chat(url, key["key"], rid + "-plain", model="openai/gpt-4o-mini")  # not streamed: no TTFT
    assert plain.status_code == 200
    line = log_line(served_gateway.log, rid + "-plain")
    assert line["stream"] is False and line["ttft_ms"] is None and line["model_served"] == "openai/gpt-4o-mini"
    assert line["provider"] == "OpenAI" and Decimal(line["cost_usd"]) == cost_of(served(simulator, rid + "-plain"))


def test_cut_stream_is_reconciled_from_generation(served_gateway: Served, simulator: SimulatorThread) -> None:
    """Point 2: a stream reset before its usage chunk is logged as a catalogue estimate, then,
    after /generation 404ed twice, corrected to OpenRouter's figures (cost_source generation);
    the ledger and the reconciliation counter follow."""
    url = served_gateway.url
    team, key = team_and_key(url)
    reconciled_before = metric(url, "gateway_reconciliations_total", outcome="reconciled")
    rid = "cut-" + uuid.uuid4().hex
    response = chat(
        url,
        key["key"],
        rid,
        model="openai/gpt-4o-mini",
        stream=True,
        simulator={"words": 40, "reset_after": 4, "cached_tokens": 10, "generation_404s": 2},
    )
    assert response.status_code == 200 and "data: [DONE]" not in response.text
    sim = served(simulator, rid)
    assert sim["failed"] is True

    estimate = log_line(served_gateway.log, rid)
    assert estimate["estimated"] is True and estimate["cost_source"] == "catalogue"
    assert estimate["generation_id"] == sim["generation_id"]
    assert abs(Decimal(estimate["cost_usd"]) - cost_of(sim)) > NANO_USD  # cached tokens: only OpenRouter knew

    corrected = log_line(served_gateway.log, rid, "gateway.usage")
    assert corrected["message"].startswith(f"generation {sim['generation_id']} reconciled")
    assert corrected["generation_id"] == sim["generation_id"]
    assert corrected["cost_source"] == "generation" and corrected["estimated"] is False
    assert corrected["team"] == team and corrected["key"] == f"{team}-key"
    assert Decimal(corrected["cost_usd"]) == cost_of(sim)  # exactly OpenRouter's figure
    assert corrected["prompt_tokens"] == sim["usage"]["prompt_tokens"]
    assert corrected["completion_tokens"] == sim["usage"]["completion_tokens"]
    assert corrected["cached_tokens"] == 10 and estimate["cached_tokens"] == 0  # only OpenRouter knew
    assert simulator.simulator.generation_misses[sim["generation_id"]] == 0  # both 404s were used up

    def ledger_cost() -> Decimal:
        return Decimal(repr(usage(url, team=team)["total"]["cost_usd"]))

    wait_until(lambda: abs(ledger_cost() - cost_of(sim)) < NANO_USD, 10, "the ledger corrected")
    total = usage(url, team=team)["total"]
    assert total["requests"] == 1
    assert total["prompt_tokens"] == sim["usage"]["prompt_tokens"]
    assert total["completion_tokens"] == sim["usage"]["completion_tokens"]
    assert metric(url, "gateway_reconciliations_total", outcome="reconciled") == reconciled_before + 1
    assert abs(Decimal(repr(metric(url, "gateway_cost_usd_total", team=team))) - cost_of(sim)) < NANO_USD


def test_budget_settles_from_the_corrected_record(served_gateway: Served, simulator: SimulatorThread) -> None:
    """Point 3: a cut stream on a budgeted key: its spend ends equal to what OpenRouter billed."""
    url = served_gateway.url
    _, key = team_and_key(url, budget_usd=5, budget_period="day")
    rid = "budget-cut-" + uuid.uuid4().hex
    response = chat(
        url,
        key["key"],
        rid,
        model="openai/gpt-4o-mini",
        stream=True,
        simulator={"words": 40, "reset_after": 4, "cached_tokens": 10},
    )
    assert response.status_code == 200
    sim = served(simulator, rid)
    estimate = log_line(served_gateway.log, rid)
    assert estimate["cost_source"] == "catalogue"
    assert abs(Decimal(estimate["cost_usd"]) - cost_of(sim)) > NANO_USD  # so the settled figure tells them apart

    def spent() -> Decimal:
        with admin(url) as client:
            return Decimal(repr(client.get(f"/keys/{key['id']}").json()["budget"]["spent_usd"]))

    wait_until(lambda: abs(spent() - cost_of(sim)) < NANO_USD, 15, "the spend settled from the corrected record")
    assert log_line(served_gateway.log, rid, "gateway.usage")["cost_source"] == "generation"


@pytest.fixture(scope="module")
def inprocess(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    settings = gateway_settings(simulator.base_url, admin_key=ADMIN_KEY, reconcile_delays_s=[0.05, 0.05, 0.05])
    with GatewayServer(settings) as server:
        yield server


def test_unreconcilable_stream_keeps_its_estimate(
    inprocess: GatewayServer, simulator: SimulatorThread, caplog: pytest.LogCaptureFixture
) -> None:
    """Point 2, second case: /generation never answers; after the last retry the catalogue
    estimate stands in the ledger and the counters, and the outcome is counted as gave_up."""
    url = inprocess.url
    caplog.set_level(logging.INFO, logger="gateway.requests")
    team, key = team_and_key(url)
    gave_up_before = metric(url, "gateway_reconciliations_total", outcome="gave_up")
    reconciled_before = metric(url, "gateway_reconciliations_total", outcome="reconciled")
    rid = "never-" + uuid.uuid4().hex
    response = chat(
        url,
        key["key"],
        rid,
        model="openai/gpt-4o-mini",
        stream=True,
        simulator={"words": 40, "reset_after": 4, "cached_tokens": 10, "generation_404s": 1000},
    )
    assert response.status_code == 200
    sim = served(simulator, rid)
    line = wait_until(
        lambda: next((r.__dict__ for r in caplog.records if r.__dict__.get("request_id") == rid), None),
        10,
        "the request's log record",
    )
    assert line["estimated"] is True and line["cost_source"] == "catalogue"
    estimate = Decimal(line["cost_usd"])
    assert estimate > 0 and abs(estimate - cost_of(sim)) > NANO_USD

    wait_until(
        lambda: metric(url, "gateway_reconciliations_total", outcome="gave_up") == gave_up_before + 1,
        10,
        "the reconciliation to give up",
    )
    assert simulator.simulator.generation_misses[sim["generation_id"]] == 1000 - 3  # three lookups, all 404
    assert metric(url, "gateway_reconciliations_total", outcome="reconciled") == reconciled_before
    total = wait_until(lambda: (t := usage(url, team=team)["total"])["requests"] == 1 and t, 10, "the ledger")
    assert abs(Decimal(repr(total["cost_usd"])) - estimate) < NANO_USD
    assert total["completion_tokens"] == line["completion_tokens"]
    assert total["prompt_tokens"] == line["prompt_tokens"] and total["cached_tokens"] == 0
    assert abs(Decimal(repr(metric(url, "gateway_cost_usd_total", team=team))) - estimate) < NANO_USD


def test_requests_refused_for_their_body_are_metered_too(inprocess: GatewayServer) -> None:
    """An authenticated request refused for its body (400, 413, 415) is a request of its key: it is
    counted, timed and logged like any other, though nothing reached OpenRouter."""
    url = inprocess.url
    _, key = team_and_key(url)
    headers = {"Authorization": f"Bearer {key['key']}", "content-type": "application/json"}
    bad = [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'{"messages": "hello"}', 400),
        (b'{"model": "openai/gpt-4o-mini", "messages": [], "stream": "yes"}', 400),
        (b"{}" + b" " * (17 * 1024 * 1024), 413),
    ]
    for body, status in bad:
        response = httpx.post(url + "/v1/chat/completions", content=body, headers=headers, timeout=30)
        assert response.status_code == status, response.text
    wrong_type = httpx.post(url + "/v1/embeddings", content=b"x", headers={**headers, "content-type": "text/plain"})
    assert wrong_type.status_code == 415
    unknown_before = metric(url, "gateway_requests_total", key="", status="401")
    for bad in ("Bearer sk-gw-nosuchkey000-" + "x" * 32, "Bearer not-a-key", "Basic abc"):
        refused = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO}, headers={"Authorization": bad})
        assert refused.status_code == 401
    assert metric(url, "gateway_requests_total", key="", status="401") == unknown_before + 3  # counted, key unknown
    counted = {
        status: metric(url, "gateway_requests_total", key=key["name"], status=status)
        for status in ("400", "413", "415")
    }
    assert counted == {"400": 4, "413": 1, "415": 1}
    assert metric(url, "gateway_requests_total", key=key["name"], endpoint="embeddings", status="415") == 1


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but `_created` (a timestamp), by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


def answered(url: str) -> float:
    """Requests counted as answered (200) or as left by their client (499)."""
    page = samples(scrape(url, timeout=10).content)
    return sum(
        value
        for (name, labels), value in page.items()
        if name == "gateway_requests_total" and dict(labels)["status"] in ("200", "499")
    )


def test_a_response_is_metered_once_sent_even_if_the_client_is_gone(gateway: GatewayServer) -> None:
    """The client sends a request and closes its socket without reading the answer: the
    request is still counted, once."""
    before = answered(gateway.url)
    body = httpx.Request(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "simulator": {"ttfb_ms": 150}},
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in body.headers.items() if k.lower() != "host"
        )
        raw.sendall(head.encode() + b"\r\n" + body.read())
    counted = wait_until(lambda: answered(gateway.url) - before, 10, "the request metered")
    assert counted == 1  # a double record would be made in the same loop turn as the first
