"""The Grafana dashboard: valid, provisioned with a fixed datasource uid, and every PromQL
expression in it answered with data by a real Prometheus scraping a gateway under load."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.simulator import SimulatorThread
from tests.support import ADMIN_KEY, METRICS_KEY, GatewayServer, gateway_settings, require_tool, wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config/grafana/dashboards/gateway.json"
DATASOURCES = ROOT / "config/grafana/provisioning/datasources/prometheus.yml"
PROVIDERS = ROOT / "config/grafana/provisioning/dashboards/gateway.yml"
PROMETHEUS = ROOT / "config/prometheus/prometheus.yml"
GRAFANA_VARIABLES = {"$__rate_interval": "20s", "$__range": "5m", "$team": ".*"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel["targets"]]


def test_dashboard_is_valid_and_provisioned() -> None:
    board = dashboard()
    assert board["uid"] == "openrouter-gateway" and board["title"]
    text = DASHBOARD.read_text()
    assert "${DS_" not in text and "__inputs" not in board  # nothing to fill in at import
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "gateway-prometheus"
    provider = yaml.safe_load(PROVIDERS.read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}
        assert panel["targets"] and all(
            t["expr"] and t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"]
        )
        assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in (
        "spend by team",
        "by key",
        "by model",
        "tokens per second",
        "status",
        "p50",
        "first token",
        "overhead",
        "rate-limit",
        "budget",
        "retries",
    ):
        assert topic in titles, topic


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def busy_gateway(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        simulator.base_url,
        admin_key=ADMIN_KEY,
        budget_gauges_refresh_s=0.5,
        upstream={"retries": {"max_attempts": 2, "backoff_base_s": 0.01}},
    )
    with GatewayServer(settings) as server:
        yield server


def scrape_configs(target: str, key_file: Path) -> list[dict[str, Any]]:
    """The shipped job (config/prometheus/prometheus.yml) pointed at `target`, its credentials
    file at `key_file`; and the same job without a credential, which must be refused."""
    shipped = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"][0]
    job = {name: value for name, value in shipped.items() if name != "dns_sd_configs"}
    job["static_configs"] = [{"targets": [target]}]
    job["authorization"] = {**shipped["authorization"], "credentials_file": str(key_file)}
    anonymous = {name: value for name, value in job.items() if name != "authorization"}
    return [job, {**anonymous, "job_name": "anonymous"}]


@pytest.fixture
def prometheus(busy_gateway: GatewayServer, tmp_path: Path) -> Iterator[str]:
    binary = require_tool("prometheus", "prometheus")
    key_file = tmp_path / "metrics_key"
    key_file.write_text(METRICS_KEY + "\n")  # as `openssl rand -hex 32 > secrets/metrics_key` leaves it
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": scrape_configs(busy_gateway.url.removeprefix("http://"), key_file),
            }
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 30, "prometheus ready")
        yield url
    finally:
        process.terminate()
        process.wait(30)


def load(gateway: GatewayServer, stop: threading.Event) -> None:
    """Traffic that exercises every panel: streams, spend, errors, retries, limits, budgets."""
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        team = "dash-" + uuid.uuid4().hex[:6]
        client.post("/admin/teams", json={"name": team, "budget_usd": 100}, headers=admin)
        key = client.post("/admin/keys", json={"name": "k", "team": team}, headers=admin).json()["key"]
        tight = client.post("/admin/keys", json={"name": "tight", "team": team, "rpm": 1}, headers=admin).json()["key"]
        auth = {"Authorization": f"Bearer {key}"}
        hello = [{"role": "user", "content": "hello"}]
        while not stop.is_set():
            client.post("/v1/chat/completions", headers=auth, json={"model": "openai/gpt-4o-mini", "messages": hello})
            client.post(
                "/v1/chat/completions",
                headers=auth,
                json={"model": "deepseek/deepseek-v3.2", "messages": hello, "stream": True},
            )
            client.post(
                "/v1/chat/completions",
                headers=auth,
                json={
                    "model": "openai/gpt-4o-mini",
                    "messages": hello,
                    "simulator": {"id": uuid.uuid4().hex, "sequence": [{"status": 503}, {}]},
                },
            )
            client.post(
                "/v1/chat/completions",
                headers=auth,
                json={"model": "openai/gpt-4o-mini", "messages": hello, "simulator": {"status": 400}},
            )
            client.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {tight}"},
                json={"model": "openai/gpt-4o-mini", "messages": hello},
            )
            stop.wait(0.1)


def test_every_dashboard_query_returns_data(busy_gateway: GatewayServer, prometheus: str) -> None:
    stop = threading.Event()
    worker = threading.Thread(target=load, args=(busy_gateway, stop), daemon=True)
    worker.start()
    try:
        for title, expr in expressions():
            query = expr
            for variable, value in GRAFANA_VARIABLES.items():
                query = query.replace(variable, value)

            def answered(query: str = query) -> list[Any]:
                body = httpx.get(prometheus + "/api/v1/query", params={"query": query}, timeout=10).json()
                assert body["status"] == "success", body  # the expression is valid PromQL
                result: list[Any] = body["data"]["result"]
                return result

            wait_until(answered, 30, f"data for {title!r}: {query}")
    finally:
        stop.set()
        worker.join(30)


def test_prometheus_scrapes_with_the_key_and_is_refused_without(busy_gateway: GatewayServer, prometheus: str) -> None:
    def targets() -> dict[str, dict[str, Any]]:
        body = httpx.get(prometheus + "/api/v1/targets", timeout=10).json()
        found = {t["labels"]["job"]: t for t in body["data"]["activeTargets"] if t["health"] != "unknown"}
        return found if len(found) == 2 else {}

    scraped = wait_until(targets, 30, "both jobs scraped")
    assert scraped["gateway"]["health"] == "up", scraped["gateway"]
    assert scraped["anonymous"]["health"] == "down" and "401" in scraped["anonymous"]["lastError"], scraped
    up = httpx.get(prometheus + "/api/v1/query", params={"query": "up"}, timeout=10).json()["data"]["result"]
    assert {r["metric"]["job"]: r["value"][1] for r in up} == {"gateway": "1", "anonymous": "0"}
