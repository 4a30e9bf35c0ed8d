"""The compose stack, checked without a Docker engine: the compose file through
`docker-compose config`, and the configs it mounts (the image itself: tests/test_image.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import require_tool

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_validates(tmp_path: Path) -> None:
    compose = require_tool("docker-compose", "docker-compose")
    env = {**os.environ, "OPENROUTER_API_KEY": "sk-or-v1-compose-check", "GATEWAY_ADMIN_KEY": "compose-check-admin"}
    result = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    stack = yaml.safe_load(result.stdout)
    services = stack["services"]
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
    missing = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={k: v for k, v in env.items() if k != "OPENROUTER_API_KEY"},
    )
    assert missing.returncode != 0 and "OPENROUTER_API_KEY" in missing.stderr  # secrets are required, not defaulted


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
