"""The Prometheus metrics (app/usage/metrics.py): the in-process counter and histogram families
export exactly what prometheus_client would, each family once; the in-flight gauge is live;
histograms have LLM-sized buckets; model labels stay bounded (unknown models, router ids); the
budget gauges per team equal the settled spend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.simulator import SimulatorThread
from app.usage.metrics import (
    LLM_SECONDS,
    OVERHEAD_SECONDS,
    UNLISTED_MODEL_LABELS,
    LocalCounter,
    LocalHistogram,
    Metrics,
)
from tests.metering_support import (
    HELLO,
    NANO_USD,
    Served,
    admin,
    chat,
    cost_of,
    metric,
    served,
    team_and_key,
)
from tests.metering_support import samples as scraped_samples
from tests.support import (
    ADMIN_KEY,
    GatewayServer,
    gateway_settings,
    scrape,
    wait_until,
)

MODEL = "openai/gpt-4o-mini"


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but `_created` (a timestamp), by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


@pytest.mark.parametrize("buckets", [LLM_SECONDS, OVERHEAD_SECONDS], ids=["llm", "overhead"])
def test_local_histogram_exports_what_prometheus_client_would(buckets: tuple[float, ...]) -> None:
    values = [0.0, 0.00005, *buckets, *(b * 1.0001 for b in buckets), buckets[-1] * 10, 0.3, 0.3, 7.77]
    reference = CollectorRegistry()
    theirs = Histogram("h_seconds", "doc", ("model", "endpoint"), buckets=buckets, registry=reference)
    ours = LocalHistogram("h_seconds", "doc", ("model", "endpoint"), buckets)
    for i, value in enumerate(values):
        labels = ("m" + str(i % 3), "chat")
        theirs.labels(*labels).observe(value)
        ours.observe(labels, value)
    mine = CollectorRegistry()
    mine.register(_Wrap(ours))
    expected, got = samples(generate_latest(reference)), samples(generate_latest(mine))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert len([k for k in got if k[0] == "h_seconds_bucket"]) == 3 * (len(buckets) + 1)  # +Inf included


def test_local_counter_exports_what_prometheus_client_would() -> None:
    reference = CollectorRegistry()
    theirs = Counter("c_usd", "doc", ("team", "key"), registry=reference)
    ours = LocalCounter("c_usd", "doc", ("team", "key"))
    for i, amount in enumerate([1, 0.000123, 2.5, 1e-9, 40]):
        labels = ("t" + str(i % 2), "k")
        theirs.labels(*labels).inc(amount)
        ours.inc(labels, amount)
    mine = CollectorRegistry()
    mine.register(_Wrap(ours))
    assert samples(generate_latest(mine)) == samples(generate_latest(reference))


class _Wrap:
    def __init__(self, family: LocalCounter | LocalHistogram) -> None:
        self.family = family

    def collect(self) -> Any:
        yield self.family.collect()


def test_a_process_exports_the_request_families_once() -> None:
    """One process (no PROMETHEUS_MULTIPROC_DIR): the families are in-process and each is exported
    once, with HELP and TYPE, so promtool and Prometheus accept the page."""
    metrics = Metrics()
    assert not metrics.multiprocess and isinstance(metrics.duration, LocalHistogram)
    text = metrics.exposition().decode()
    for name in ("gateway_requests_total", "gateway_request_duration_seconds", "gateway_in_flight_requests"):
        assert text.count(f"# TYPE {name} ") == 1, name


def in_flight(url: str) -> float:
    page = scrape(url, timeout=10).content
    return samples(page)[("gateway_in_flight_requests", ())]


def test_in_flight_gauge_counts_open_requests(gateway: GatewayServer, http: httpx.Client) -> None:
    """A stream that goes silent stays in flight until its client leaves; one that ends does not."""
    stalled = {"model": MODEL, "messages": HELLO, "stream": True, "simulator": {"words": 30, "stall_after": 2}}
    ending = {"model": MODEL, "messages": HELLO, "stream": True, "simulator": {"words": 30, "chunk_delay_ms": 20}}
    assert in_flight(gateway.url) == 0
    with http.stream("POST", "/v1/chat/completions", json=stalled) as first:
        assert first.status_code == 200
        with http.stream("POST", "/v1/chat/completions", json=ending) as second:
            assert second.status_code == 200
            wait_until(lambda: in_flight(gateway.url) == 2, 10, "two requests in flight")
            assert "".join(second.iter_text()).endswith("data: [DONE]\n\n")
        wait_until(lambda: in_flight(gateway.url) == 1, 10, "one request in flight")
    wait_until(lambda: in_flight(gateway.url) == 0, 10, "no request in flight once the client left")


@pytest.fixture(scope="module")
def inprocess(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    settings = gateway_settings(simulator.base_url, admin_key=ADMIN_KEY, reconcile_delays_s=[0.05, 0.05, 0.05])
    with GatewayServer(settings) as server:
        yield server


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
            for s in scraped_samples(url)
            if s.name == name + "_bucket" and s.labels.get("model") == "openai/gpt-4o-mini"
        }
        return sorted(b for b in found if b != float("inf"))

    for name in ("gateway_request_duration_seconds", "gateway_time_to_first_token_seconds"):
        finite = bounds(name)
        assert finite[-1] >= 60, (name, finite)  # a minute-long call lands in a finite bucket
        assert len([b for b in finite if b > 10]) >= 2, (name, finite)  # resolution beyond 10 s
        assert finite[0] <= 0.1 and len([b for b in finite if b <= 1]) >= 4, (name, finite)

    def models() -> set[str]:
        return {s.labels["model"] for s in scraped_samples(url) if "model" in s.labels}

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
        return {s.labels["model"] for s in scraped_samples(url) if "model" in s.labels}

    before = models()
    names = [f"{prefix}junk-{uuid.uuid4().hex[:8]}-{n}" for n in range(60) for prefix in ("openrouter/", "~")]
    for n, name in enumerate(names):
        assert chat(url, key["key"], f"{rid}-{n}", model=name).status_code != 500
    added = models() - before
    assert "other" in added and len(added - {"other"}) <= UNLISTED_MODEL_LABELS
    assert chat(url, key["key"], rid + "-listed", model="deepseek/deepseek-v3.2").status_code == 200
    assert "deepseek/deepseek-v3.2" in models()


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
