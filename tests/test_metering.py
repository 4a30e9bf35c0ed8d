"""Exact usage and cost: after a mixed run (streams and not, tools, reasoning, embeddings,
retries, errors, a billed error, broken streams and a client disconnect, two teams, two keys),
the ledger (`/admin/usage`, JSON and CSV) and the Prometheus counters equal, to 1e-9 USD and to
the token, what the simulator's own log says it served, once cut streams are reconciled."""

from __future__ import annotations

import csv
import io
import subprocess
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.simulator import SimulatorThread
from tests.support import ADMIN_KEY, METRICS_KEY, GatewayServer, gateway_settings, require_tool, scrape, wait_until

HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}


@pytest.fixture(scope="module")
def metered(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        simulator.base_url,
        admin_key=ADMIN_KEY,
        upstream={
            "retries": {"max_attempts": 2, "backoff_base_s": 0.01, "backoff_cap_s": 0.02},
            "breaker": {"failure_threshold": 1_000_000},
        },
    )
    with GatewayServer(settings) as server:
        yield server


def admin(gateway: GatewayServer) -> httpx.Client:
    return httpx.Client(base_url=gateway.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"})


def simulator_sums(simulator: SimulatorThread, marker: str) -> dict[str, Any]:
    sums: dict[str, Any] = {"cost": Decimal(0), "prompt": 0, "completion": 0, "reasoning": 0, "cached": 0, "billed": 0}
    for entry in simulator.requests():
        if not entry["headers"].get("x-request-id", "").startswith(marker) or not entry.get("usage"):
            continue
        usage = entry["usage"]
        sums["billed"] += 1
        sums["cost"] += Decimal(repr(entry["cost"]))
        sums["prompt"] += usage["prompt_tokens"]
        sums["completion"] += usage.get("completion_tokens", 0)
        sums["reasoning"] += (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
        sums["cached"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return sums


def mixed_run(gateway: GatewayServer, key: str, marker: str) -> None:
    counter = iter(range(1000))

    def rid() -> dict[str, str]:
        return {"x-request-id": f"{marker}-{next(counter)}"}

    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30) as client:
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO, extra_headers=rid())
        client.chat.completions.create(
            model="deepseek/deepseek-v3.2", messages=HELLO, reasoning_effort="high", extra_headers=rid()
        )
        client.chat.completions.create(
            model="openai/gpt-4o-mini",
            messages=HELLO,
            tools=[TOOL],
            extra_headers=rid(),
            extra_body={"simulator": {"cached_tokens": 5}},
        )
        for variant in ("empty_choices", "choice", "finish"):
            list(
                client.chat.completions.create(
                    model="anthropic/claude-sonnet-4.5",
                    messages=HELLO,
                    stream=True,
                    tools=[TOOL] if variant == "choice" else None,
                    stream_options={"include_usage": variant != "finish"},
                    extra_headers=rid(),
                    extra_body={"simulator": {"usage_variant": variant}, "reasoning": {"max_tokens": 1024}},
                )
            )
        client.completions.create(model="openai/gpt-4o-mini", prompt="Say hi", extra_headers=rid())
        client.embeddings.create(model="openai/text-embedding-3-small", input=["one", "two words"], extra_headers=rid())
        client.chat.completions.create(
            model="openai/gpt-5-mini",
            messages=HELLO,
            extra_headers=rid(),  # 503, retried
            extra_body={"simulator": {"id": uuid.uuid4().hex, "sequence": [{"status": 503}, {}]}},
        )
        client.chat.completions.create(
            model="openai/gpt-4o-mini",
            messages=HELLO,
            extra_headers=rid(),  # billed error
            extra_body={"simulator": {"id": uuid.uuid4().hex, "sequence": [{"error_body_200": "choice"}, {}]}},
        )
        with pytest.raises(openai.BadRequestError):  # an upstream 400: nothing billed
            client.chat.completions.create(
                model="openai/gpt-4o-mini",
                messages=HELLO,
                extra_headers=rid(),
                extra_body={"simulator": {"status": 400}},
            )
        for knobs in ({"stream_error": 1, "error_after": 3}, {"reset_after": 4}, {"usage_variant": "none"}):
            with pytest.raises(openai.APIError) if "usage_variant" not in knobs else _nothing():
                list(
                    client.chat.completions.create(
                        model="google/gemini-2.5-flash",
                        messages=HELLO,
                        stream=True,
                        extra_headers=rid(),
                        extra_body={"simulator": knobs},
                    )
                )
        stream = client.chat.completions.create(  # the client walks away mid-stream
            model="deepseek/deepseek-v3.2",
            messages=HELLO,
            stream=True,
            extra_headers=rid(),
            extra_body={"simulator": {"words": 300, "chunk_delay_ms": 10}},
        )
        for index, _ in enumerate(stream):
            if index == 5:
                break
        stream.close()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def counters(gateway: GatewayServer) -> dict[str, Any]:
    text = scrape(gateway.url).text
    out: dict[str, Any] = {"cost": 0.0, "tokens": {}, "requests": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_cost_usd_total":
                out["cost"] += sample.value
            elif sample.name == "gateway_tokens_total":
                kind = sample.labels["token_type"]
                out["tokens"][kind] = out["tokens"].get(kind, 0) + sample.value
            elif sample.name == "gateway_requests_total":
                out["requests"] += sample.value
    return out


def test_ledger_usage_api_and_counters_equal_what_was_served(
    metered: GatewayServer, simulator: SimulatorThread
) -> None:
    with admin(metered) as client:
        for team in ("alpha", "beta"):
            assert client.post("/teams", json={"name": team}).status_code == 201
        keys = {
            team: client.post("/keys", json={"name": f"{team}-key", "team": team}).json() for team in ("alpha", "beta")
        }
    marker = "meter-" + uuid.uuid4().hex
    for team, key in keys.items():
        mixed_run(metered, key["key"], f"{marker}-{team}")
    # 15 billed generations a run; the disconnected one is logged once the simulator notices.
    served = wait_until(lambda: (s := simulator_sums(simulator, marker))["billed"] == 2 * 15 and s, 10, "the log")
    assert served["cached"] == 10 and served["reasoning"] > 0

    def usage(params: dict[str, str] | None = None) -> dict[str, Any]:
        with admin(metered) as client:
            report: dict[str, Any] = client.get("/usage", params=params or {}).json()
            return report

    def matches() -> bool:  # reconciliation of the cut streams happens in the background
        total = usage()["total"]
        return (
            abs(Decimal(repr(total["cost_usd"])) - served["cost"]) < Decimal("1e-9")
            and total["completion_tokens"] == served["completion"]
        )

    wait_until(matches, 20, "the ledger to match the simulator")
    total = usage()["total"]
    assert total["prompt_tokens"] == served["prompt"]
    assert total["completion_tokens"] == served["completion"]
    assert total["reasoning_tokens"] == served["reasoning"]
    assert total["cached_tokens"] == served["cached"]
    assert total["requests"] == 2 * 15  # every request sent to OpenRouter (its retries included in it)

    by_key = usage({"group_by": "team,key,model,day"})["data"]
    for team in ("alpha", "beta"):
        rows = [r for r in by_key if r["team"] == team]
        assert {r["key"] for r in rows} == {f"{team}-key"}
        mine = simulator_sums(simulator, f"{marker}-{team}")
        assert abs(sum(Decimal(repr(r["cost_usd"])) for r in rows) - mine["cost"]) < Decimal("1e-9")
        assert sum(r["completion_tokens"] for r in rows) == mine["completion"]
    filtered = usage({"group_by": "model", "key": "beta-key"})
    assert abs(
        Decimal(repr(filtered["total"]["cost_usd"])) - simulator_sums(simulator, f"{marker}-beta")["cost"]
    ) < Decimal("1e-9")

    with admin(metered) as client:
        text = client.get("/usage", params={"group_by": "team"}, headers={"Accept": "text/csv"}).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[-1]["team"] == "total"
    assert abs(Decimal(rows[-1]["cost_usd"]) - served["cost"]) < Decimal("1e-9")

    exposition = scrape(metered.url).text
    for key in keys.values():  # keys appear by name only, never their secret
        assert key["key"] not in exposition and key["key"].rsplit("-", 1)[1] not in exposition
        assert f'key="{key["name"]}"' in exposition
    metrics = counters(metered)
    assert abs(Decimal(repr(metrics["cost"])) - served["cost"]) < Decimal("1e-9")
    assert metrics["tokens"] == {
        "prompt": served["prompt"],
        "completion": served["completion"],
        "reasoning": served["reasoning"],
        "cached": served["cached"],
    }


def test_every_billed_try_is_metered_even_when_its_usage_could_not_be_read(
    metered: GatewayServer, simulator: SimulatorThread
) -> None:
    """A try answered with a body the gateway cannot read may still be billed (a 200 that is not
    JSON): its generation is looked up and added to what the other tries used, in the ledger,
    the budget and the counters alike."""
    with admin(metered) as client:
        team = team_of(client)
        key = client.post("/keys", json={"name": "tries-" + team, "team": team, "budget_usd": 10}).json()
    marker = "unread-" + uuid.uuid4().hex
    body = {
        "model": "deepseek/deepseek-v3.2",
        "messages": HELLO,
        # billed with its usage (an error in a 200: retried), then billed with a body that is not JSON
        "simulator": {"id": uuid.uuid4().hex, "sequence": [{"error_body_200": "choice"}, {"malformed": "json"}]},
    }
    httpx.post(
        metered.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key['key']}", "x-request-id": marker},
        timeout=30,
    )
    served = wait_until(lambda: (s := simulator_sums(simulator, marker))["billed"] == 2 and s, 10, "both tries billed")

    def spent() -> tuple[Decimal, Decimal, int]:
        with admin(metered) as client:
            total = client.get("/usage", params={"key": key["id"]}).json()["total"]
            budget = client.get(f"/keys/{key['id']}").json()["budget"]["spent_usd"]
        return Decimal(repr(total["cost_usd"])), Decimal(repr(budget)), total["completion_tokens"]

    wait_until(lambda: spent()[0] > 0 and abs(spent()[0] - served["cost"]) < Decimal("1e-9"), 20, "both in the ledger")
    completion = spent()[2]
    assert completion == served["completion"]
    wait_until(lambda: abs(spent()[1] - served["cost"]) < Decimal("1e-9"), 10, "both in the budget")
    text = scrape(metered.url).text
    counted = sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_cost_usd_total" and s.labels.get("key") == key["name"]
    )
    assert abs(Decimal(repr(counted)) - served["cost"]) < Decimal("1e-9")


def test_usage_api_rejects_bad_queries(metered: GatewayServer) -> None:
    with admin(metered) as client:
        for params in (
            {"group_by": "planet"},
            {"from": "2026-02-01", "to": "2026-01-01"},
            {"from": "yesterday"},
            {"from": "2020-01-01", "to": "2026-01-01"},
        ):
            response = client.get("/usage", params=params)
            assert response.status_code == 400, (params, response.text)
            assert response.json()["error"]["type"] == "invalid_request_error"
        empty = client.get("/usage", params={"from": "2001-01-01", "to": "2001-01-31"}).json()
        assert empty == {
            "data": [],
            "total": {
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "reasoning_tokens": 0,
                "cached_tokens": 0,
                "cost_usd": 0.0,
            },
        }


def test_usage_api_edges(metered: GatewayServer) -> None:
    """Days at either end of the calendar are a valid, empty report (not a 500); an empty filter
    (`team=`, as a form or a script may send it) is no filter; a group named twice is one column."""
    with admin(metered) as client:
        for params in (
            {"from": "9999-12-31", "to": "9999-12-31"},
            {"to": "9999-12-31"},
            {"from": "0001-01-01", "to": "0001-01-31"},
        ):
            response = client.get("/usage", params=params)
            assert response.status_code == 200, (params, response.text)
            assert response.json()["data"] == [] and response.json()["total"]["requests"] == 0
        key = client.post("/keys", json={"name": "edges-" + uuid.uuid4().hex[:8], "team": team_of(client)}).json()
        reply = httpx.post(
            metered.url + "/v1/chat/completions",
            json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key['key']}"},
            timeout=30,
        )
        assert reply.status_code == 200
        wait_until(lambda: client.get("/usage", params={"key": key["id"]}).json()["data"], 10, "the ledger")
        plain = client.get("/usage", params={"group_by": "team,key,model,day"}).json()
        assert (
            plain["data"]
            and client.get("/usage", params={"group_by": "team,key,model,day", "team": "", "key": ""}).json() == plain
        )
        csv_text = client.get("/usage", params={"group_by": "day,day"}, headers={"accept": "text/csv"}).text
        assert csv_text.splitlines()[0].split(",")[:2] == ["day", "requests"]


def team_of(client: httpx.Client) -> str:
    name = "edges-" + uuid.uuid4().hex[:8]
    assert client.post("/teams", json={"name": name}).status_code == 201
    return name


def test_promtool_accepts_the_metrics(metered: GatewayServer) -> None:
    promtool = require_tool("promtool", "prometheus")
    text = scrape(metered.url).content
    assert b"gateway_requests_total" in text and b"gateway_request_duration_seconds_bucket" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


def test_metrics_route_is_explicit(metered: GatewayServer) -> None:
    response = httpx.get(
        metered.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, follow_redirects=False
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert httpx.get(metered.url + "/metrics/", follow_redirects=False).status_code == 404
