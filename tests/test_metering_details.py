"""Metering in detail (issue 5): every field of the per-request record, reconciliation of cut
streams (corrected, or given up on), budgets settled from the corrected record, the ledger's
bounded buffer, LLM-sized histogram buckets and bounded labels, budget gauges per team, and the
usage API's UTC days and date windows."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.catalog.models import Catalog
from app.settings import ModelsSettings
from app.simulator import SimulatorThread
from app.store.redis import RedisStore
from app.usage.ledger import Ledger
from app.usage.metrics import UNLISTED_MODEL_LABELS, Metrics
from app.usage.record import UsageRecord
from tests.redis_server import RedisServer
from tests.support import (
    ADMIN_KEY,
    METRICS_KEY,
    UPSTREAM_KEY,
    GatewayProcess,
    GatewayServer,
    free_port_number,
    gateway_settings,
    scrape,
    wait_until,
)

HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]
NANO_USD = Decimal("1e-9")


# -- helpers -------------------------------------------------------------------------------------
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


# -- a real `gateway serve` with JSON logs ---------------------------------------------------------
class Served:
    def __init__(self, process: GatewayProcess, log: Path) -> None:
        self.url = process.url
        self.log = log


@pytest.fixture(scope="module")
def served_gateway(simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("metering-details")
    config = folder / "gateway.yaml"
    config.write_text("models:\n  aliases:\n    mini-thinker: openai/gpt-5-mini\n")
    log = folder / "gateway.log"
    env = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_METRICS_KEY": METRICS_KEY,
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_BUDGET_GAUGES_REFRESH_S": "0.1",
        "GATEWAY_UPSTREAM__RETRIES__MAX_ATTEMPTS": "1",
    }
    with GatewayProcess(env, str(log)) as process:
        yield Served(process, log)


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


def test_budget_gauges_per_team_equal_the_spend(served_gateway: Served, simulator: SimulatorThread) -> None:
    """Point 6: gateway_budget_spent_usd / gateway_budget_limit_usd per team equal the admin
    API's settled spend and the configured budget."""
    url = served_gateway.url
    team = "g" + uuid.uuid4().hex[:10]
    with admin(url) as client:
        assert (
            client.post("/teams", json={"name": team, "budget_usd": 3.25, "budget_period": "month"}).status_code == 201
        )
        key = client.post("/keys", json={"name": "spender", "team": team}).json()
    rid = "gauge-" + uuid.uuid4().hex
    for n in range(2):
        assert chat(url, key["key"], f"{rid}-{n}", model="openai/gpt-4o-mini").status_code == 200
    cost = sum(cost_of(served(simulator, f"{rid}-{n}")) for n in range(2))

    def team_spent() -> float:
        with admin(url) as client:
            value: float = client.get(f"/teams/{team}").json()["budget"]["spent_usd"]
        return value

    wait_until(lambda: abs(Decimal(repr(team_spent())) - cost) < NANO_USD, 10, "the team's spend settled")
    spent = team_spent()
    wait_until(lambda: metric(url, "gateway_budget_spent_usd", team=team) == spent, 10, "the spent gauge")
    assert metric(url, "gateway_budget_limit_usd", team=team) == 3.25


def test_usage_by_utc_day_and_date_windows(served_gateway: Served, simulator: SimulatorThread) -> None:
    """Point 7: group_by=day gives the UTC day as YYYY-MM-DD; a from/to window that includes
    today has the run's sums, one that ends yesterday has none."""
    url = served_gateway.url
    team, key = team_and_key(url)
    first_day = datetime.now(UTC).date()
    rid = "days-" + uuid.uuid4().hex
    for n in range(3):
        assert chat(url, key["key"], f"{rid}-{n}", model="openai/gpt-4o-mini", stream=n == 1).status_code == 200
    entries = [served(simulator, f"{rid}-{n}") for n in range(3)]
    last_day = datetime.now(UTC).date()
    cost = sum(cost_of(e) for e in entries)
    prompt = sum(e["usage"]["prompt_tokens"] for e in entries)
    completion = sum(e["usage"]["completion_tokens"] for e in entries)

    by_day = wait_until(
        lambda: (r := usage(url, team=team, group_by="day"))["total"]["requests"] == 3 and r, 10, "the ledger"
    )
    assert len(by_day["data"]) == 1
    row = by_day["data"][0]
    assert set(row) == {
        "day",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "cached_tokens",
        "cost_usd",
    }
    assert row["day"] in {first_day.isoformat(), last_day.isoformat()}
    assert date.fromisoformat(row["day"]).isoformat() == row["day"]  # YYYY-MM-DD
    assert row["requests"] == 3 and row["prompt_tokens"] == prompt and row["completion_tokens"] == completion
    assert abs(Decimal(repr(row["cost_usd"])) - cost) < NANO_USD

    around = usage(
        url,
        team=team,
        group_by="day,key",
        **{"from": (first_day - timedelta(days=1)).isoformat(), "to": (last_day + timedelta(days=1)).isoformat()},
    )
    assert around["total"] == by_day["total"]
    assert [(r["day"], r["key"]) for r in around["data"]] == [(row["day"], f"{team}-key")]

    ending_yesterday = usage(
        url,
        team=team,
        **{"from": (first_day - timedelta(days=7)).isoformat(), "to": (first_day - timedelta(days=1)).isoformat()},
    )
    assert ending_yesterday["data"] == []
    assert ending_yesterday["total"]["requests"] == 0 and ending_yesterday["total"]["cost_usd"] == 0


# -- an in-process gateway (short reconciliation delays) ---------------------------------------------
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


def test_histograms_have_llm_buckets_and_bounded_labels(inprocess: GatewayServer) -> None:
    """Point 5: duration and TTFT buckets reach minutes (DESIGN §6: "to minutes, not 10 s") with
    sub-second resolution; 30 unknown models add no model label values."""
    url = inprocess.url
    _, key = team_and_key(url)
    rid = "buckets-" + uuid.uuid4().hex
    assert chat(url, key["key"], rid, model="openai/gpt-4o-mini", stream=True).status_code == 200
    refused = chat(url, key["key"], rid + "-warm", model="nobody/warm-up-" + uuid.uuid4().hex)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"

    def bounds(name: str) -> list[float]:
        found = {
            float(s.labels["le"])
            for s in samples(url)
            if s.name == name + "_bucket" and s.labels.get("model") == "openai/gpt-4o-mini"
        }
        return sorted(b for b in found if b != float("inf"))

    for name in ("gateway_request_duration_seconds", "gateway_time_to_first_token_seconds"):
        finite = bounds(name)
        assert finite[-1] >= 60, (name, finite)  # a minute-long call lands in a finite bucket
        assert len([b for b in finite if b > 10]) >= 2, (name, finite)  # resolution beyond 10 s
        assert finite[0] <= 0.1 and len([b for b in finite if b <= 1]) >= 4, (name, finite)

    def models() -> set[str]:
        return {s.labels["model"] for s in samples(url) if "model" in s.labels}

    before = models()
    refused_before = metric(url, "gateway_requests_total", status="404")
    names = [f"nobody/unknown-{uuid.uuid4().hex[:8]}-{n}" for n in range(30)]
    for n, name in enumerate(names):
        response = chat(url, key["key"], f"{rid}-{n}", model=name)
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert metric(url, "gateway_requests_total", status="404") == refused_before + 30  # they were metered
    assert models() == before
    text = scrape(url).text
    assert not [name for name in names if name in text]


def test_router_ids_forwarded_unlisted_have_bounded_labels(inprocess: GatewayServer) -> None:
    """`openrouter/…` and `~…` ids pass to OpenRouter unlisted (they are its routers), so a key can
    vary them at will: at most UNLISTED_MODEL_LABELS of them get a label of their own, the rest
    share "other", and listed models keep theirs."""
    url = inprocess.url
    _, key = team_and_key(url)
    rid = "router-ids-" + uuid.uuid4().hex

    def models() -> set[str]:
        return {s.labels["model"] for s in samples(url) if "model" in s.labels}

    before = models()
    names = [f"{prefix}junk-{uuid.uuid4().hex[:8]}-{n}" for n in range(60) for prefix in ("openrouter/", "~")]
    for n, name in enumerate(names):
        assert chat(url, key["key"], f"{rid}-{n}", model=name).status_code != 500
    added = models() - before
    assert "other" in added and len(added - {"other"}) <= UNLISTED_MODEL_LABELS
    assert chat(url, key["key"], rid + "-listed", model="deepseek/deepseek-v3.2").status_code == 200
    assert "deepseek/deepseek-v3.2" in models()


def test_a_router_id_with_any_suffix_is_not_a_listed_model() -> None:
    """`openrouter/auto` is in OpenRouter's catalogue; `openrouter/auto:<anything>` passes to it
    unlisted, so it must not count as listed (and get a label of its own) by its base."""

    async def fetch() -> list[dict[str, Any]]:
        return [{"id": "openrouter/auto"}, {"id": "openai/gpt-4o-mini"}]

    catalog = Catalog(fetch, 300, ModelsSettings())
    assert catalog.is_listed("openai/gpt-4o-mini") is None  # not loaded yet: no judgement
    asyncio.run(catalog.entries())
    assert catalog.is_listed("openrouter/auto") and catalog.is_listed("openai/gpt-4o-mini:nitro")
    for unlisted in ("openrouter/auto:" + uuid.uuid4().hex, "~openai/gpt-4o-mini", "openai/gpt-4o-mini:whatever"):
        assert catalog.is_listed(unlisted) is False, unlisted


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


# -- the ledger's buffer, over a Redis that is down, then back -----------------------------------------
def record(n: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"r{n}",
        time=time.time(),
        key_id="key0buffered",
        key_name="buffered",
        team="buffer-team",
        endpoint="chat.completions",
        model_requested=f"vendor/model-{n}",
        model=f"vendor/model-{n}",  # a group each, so each buffered record is counted on its own
        model_served=f"vendor/model-{n}",
        provider="Sim",
        stream=False,
        status=200,
        error_code=None,
        prompt_tokens=10 + n,
        completion_tokens=20 + n,
        reasoning_tokens=1 + n,
        cached_tokens=2,
        cost_usd=Decimal("0.000123456789") * (n + 1),
        cost_source="upstream",
    )


@pytest.mark.anyio
async def test_two_flushes_at_once_write_every_batch_exactly_once(redis_server: RedisServer) -> None:
    """The background flusher and the shutdown drain can flush at the same moment. Each takes the
    first batch waiting; the one that finishes second must not take another batch off the queue
    unwritten (it did: IndexError at a drain, or a batch lost)."""
    store = RedisStore(redis_server.url, prefix="f" + uuid.uuid4().hex[:8])
    ledger = Ledger(store, batch_size=2)
    try:
        for n in range(7):
            ledger.add(record(n))
        await asyncio.gather(ledger.flush(), ledger.flush(), ledger.flush())
        assert ledger.buffered == 0
        today = datetime.now(UTC).date()
        _, total = await ledger.query(today - timedelta(days=1), today + timedelta(days=1), ["model"])
        assert total["requests"] == 7
        assert total["prompt_tokens"] == sum(record(n).prompt_tokens for n in range(7))
    finally:
        await store.close()


@pytest.mark.anyio
async def test_ledger_buffer_is_bounded_counted_and_flushed_once() -> None:
    """Point 4: with the store down, at most max_buffered records wait, the excess is dropped and
    counted (callback and metric); when Redis comes back the buffer is written exactly once."""
    port = free_port_number()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="b" + uuid.uuid4().hex[:8], timeout_s=0.5)
    metrics = Metrics()
    ledger = Ledger(store, max_buffered=5, on_drop=metrics.ledger_dropped.inc)
    redis_server: RedisServer | None = None
    try:
        for n in range(8):
            ledger.add(record(n))
        assert ledger.dropped == 3 and ledger.buffered == 5
        await ledger.flush()  # the store is down: kept, not raised
        await ledger.flush()
        assert ledger.buffered == 5
        ledger.add(record(99))  # still full while it waits
        assert ledger.dropped == 4
        ledger.correct(record(1), record(2))  # both halves or neither: never a lone retraction
        assert ledger.dropped == 6 and ledger.buffered == 5

        def dropped_metric() -> float:
            family = text_string_to_metric_families(metrics.exposition().decode())
            return sum(s.value for f in family for s in f.samples if s.name == "gateway_ledger_dropped_records_total")

        assert dropped_metric() == 6

        redis_server = RedisServer()
        redis_server.port = port  # the address the store has been failing to reach
        redis_server.start()
        await ledger.flush()
        assert ledger.buffered == 0
        await ledger.flush()  # nothing is written twice
        today = datetime.now(UTC).date()
        data, total = await ledger.query(today - timedelta(days=1), today + timedelta(days=1), ["model"])
        kept = [record(n) for n in range(5)]
        assert total["requests"] == 5
        assert total["prompt_tokens"] == sum(r.prompt_tokens for r in kept)
        assert total["completion_tokens"] == sum(r.completion_tokens for r in kept)
        assert total["reasoning_tokens"] == sum(r.reasoning_tokens for r in kept)
        assert total["cached_tokens"] == 10
        assert abs(Decimal(repr(total["cost_usd"])) - sum(r.cost_usd for r in kept)) < Decimal("1e-15")
        assert [row["model"] for row in data] == [f"vendor/model-{n}" for n in range(5)]
        assert ledger.dropped == 6 and dropped_metric() == 6  # the four adds and the correction above
    finally:
        await store.close()
        if redis_server is not None:
            redis_server.cleanup()


def test_a_correction_is_buffered_whole_or_not_at_all() -> None:
    """A correction is a retraction and its replacement: with room for only one of them, neither
    is buffered (a lone retraction would undercount the usage until the next flush, forever)."""
    from app.store.memory import MemoryStore

    ledger = Ledger(MemoryStore(), max_buffered=3)
    ledger.add(record(1))
    ledger.add(record(2))
    ledger.correct(record(1), record(3))  # one place left: both dropped, counted
    assert ledger.dropped == 2 and ledger.buffered == 2
    ledger = Ledger(MemoryStore(), max_buffered=4)
    ledger.add(record(1))
    ledger.add(record(2))
    ledger.correct(record(1), record(3))  # room for both
    assert ledger.dropped == 0 and ledger.buffered == 4
