"""The compose stack, checked without a Docker engine: the compose file through
`docker-compose config`, and the configs it mounts (the image itself: tests/test_image.py); the stop timeout covers the
drain, and promtool accepts the Prometheus config."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.settings import Settings
from tests.support import require_tool

ROOT = Path(__file__).resolve().parent.parent


def compose_env() -> dict[str, str]:
    """What compose requires from the environment (it refuses to start without each)."""
    return {
        **os.environ,
        "OPENROUTER_API_KEY": "sk-or-v1-compose-check",
        "GATEWAY_ADMIN_KEY": "compose-check-admin",
        "GRAFANA_ADMIN_PASSWORD": "compose-check-grafana",
    }


def test_compose_file_validates(tmp_path: Path) -> None:
    services = compose_stack()["services"]
    assert {"gateway", "lb", "redis", "prometheus", "grafana"} <= set(services)
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 2
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["environment"]["GATEWAY_STORE"].startswith("redis://redis")
    assert "ports" not in gateway  # replicas sit behind the load balancer's one published port
    published = [p["published"] if isinstance(p, dict) else p for p in services["lb"]["ports"]]
    assert published in ([8080], ["8080"], ["8080:8080"])
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    mounts = json.dumps(services["prometheus"]["volumes"]) + json.dumps(services["grafana"]["volumes"])
    assert "prometheus.yml" in mounts and "provisioning" in mounts and "dashboards" in mounts
    for required in ("OPENROUTER_API_KEY", "GRAFANA_ADMIN_PASSWORD"):  # required, never defaulted
        missing = compose_config({k: v for k, v in compose_env().items() if k != required})
        assert missing.returncode != 0 and required in missing.stderr


@pytest.mark.parametrize("path", ["config/nginx/nginx.conf", "config/prometheus/prometheus.yml"])
def test_stack_configs_point_at_every_replica(path: str) -> None:
    text = (ROOT / path).read_text()
    assert "gateway:8080" in text or ("names: [gateway]" in text and "port: 8080" in text)


def test_the_published_port_does_not_serve_metrics() -> None:
    """Metrics name keys and teams and show their spend; Prometheus scrapes each replica on the
    compose network, so the load balancer's public port answers 404 for them."""
    text = (ROOT / "config/nginx/nginx.conf").read_text()
    block = text[text.index("location = /metrics") :]
    assert block[: block.index("}")].split("#")[0].split("{")[1].split() == ["return", "404;"]
    assert text.index("location = /metrics") < text.index("location / {")


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    compose = require_tool("docker-compose", "docker-compose")
    return subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


def compose_stack() -> dict[str, Any]:
    result = compose_config(compose_env())
    assert result.returncode == 0, result.stderr
    stack: dict[str, Any] = yaml.safe_load(result.stdout)
    return stack


def host_ip(port: str | int | dict[str, Any]) -> str | None:
    """The address a published port binds: `host_ip` (compose v2) or `IP:published:target` (v1)."""
    if isinstance(port, dict):
        return port.get("host_ip")
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else None


def secret_paths(service: dict[str, Any]) -> dict[str, str]:
    """Where compose mounts each of a service's secrets (`/run/secrets/<target>`) → the secret's name."""
    paths = {}
    for entry in service.get("secrets", []):
        entry = entry if isinstance(entry, dict) else {"source": entry}
        target = entry.get("target") or entry["source"]
        paths[target if target.startswith("/") else f"/run/secrets/{target}"] = entry["source"]
    return paths


def test_only_the_load_balancer_listens_beyond_the_host() -> None:
    """Prometheus and Grafana show spend by key and team: published on 127.0.0.1 only."""
    services = compose_stack()["services"]
    assert services["prometheus"]["ports"] and services["grafana"]["ports"]
    for name, service in services.items():
        if name != "lb":
            for port in service.get("ports", []):
                assert host_ip(port) == "127.0.0.1", (name, port)
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "compose-check-grafana"  # from the environment, no default
    for path in ("docker-compose.yml", "README.md", *(f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md"))):
        text = (ROOT / path).read_text()
        assert "admin / admin" not in text and "admin/admin" not in text and ":-admin}" not in text, path


def test_prometheus_scrapes_with_the_secret_the_gateway_reads() -> None:
    stack = compose_stack()
    services = stack["services"]
    scrape = yaml.safe_load((ROOT / "config/prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    authorization = scrape["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer" and "credentials" not in authorization
    credentials_file = authorization["credentials_file"]
    mounted = secret_paths(services["prometheus"])
    assert credentials_file in mounted  # the file Prometheus reads is one compose mounts there
    secret = mounted[credentials_file]
    assert stack["secrets"][secret]["file"].endswith("/secrets/metrics_key")
    gateway = services["gateway"]
    assert secret_paths(gateway).get(credentials_file) == secret  # the same secret at the same path
    assert gateway["environment"]["GATEWAY_METRICS_KEY_FILE"] == credentials_file
    assert "GATEWAY_METRICS_KEY" not in gateway["environment"]
    assert "secrets/" in (ROOT / ".gitignore").read_text().splitlines()  # the key is never committed


def test_the_secrets_directory_is_made_private_wherever_it_is_made() -> None:
    """docs/production.md and compose's comments make `secrets/` the same way: readable by its owner only."""
    for path in ("docker-compose.yml", "docs/production.md"):
        made = re.findall(r"mkdir [^&\n]*secrets", (ROOT / path).read_text())
        assert made and set(made) == {"mkdir -p -m 700 secrets"}, (path, made)


def seconds(duration: str | int | float) -> float:
    """A compose duration ("40s", "1m30s", "1500ms") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration.strip(), duration
    return sum(float(number) * units[unit] for number, unit in parts)


def test_compose_stop_timeout_covers_the_drain() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gateways = {
        name: service
        for name, service in services.items()
        if "build" in service or "gateway" in str(service.get("image", "")).split(":")[0].split("/")[-1]
    }
    assert "gateway" in gateways
    defaults = Settings.model_fields
    for name, service in gateways.items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        delay = float(environment.get("GATEWAY_SHUTDOWN_DELAY_S", defaults["shutdown_delay_s"].default))
        grace = float(environment.get("GATEWAY_SHUTDOWN_GRACE_S", defaults["shutdown_grace_s"].default))
        stop = seconds(service.get("stop_grace_period", "10s"))  # compose's default
        assert stop >= delay + grace + 10, f"{name}: stop_grace_period {stop}s < {delay} + {grace} + 10 s"


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    """promtool also checks the files the config names: the scrape key's secret, which compose
    mounts at /run/secrets/metrics_key, is given here at a path of the test's own."""
    promtool = require_tool("promtool", "prometheus")
    secret = tmp_path / "metrics_key"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    text = (ROOT / "config/prometheus/prometheus.yml").read_text()
    assert text.count("/run/secrets/metrics_key") == 1
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/run/secrets/metrics_key", str(secret)))
    check = subprocess.run(
        [promtool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout + check.stderr
