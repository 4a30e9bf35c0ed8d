"""The container and the compose stack, checked without a Docker engine: the Dockerfile's
structure, then the very commands it runs (build wheels, install them alone into a fresh
environment, start `gateway serve`, run the HEALTHCHECK, stop with SIGTERM); the compose file
through `docker-compose config`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.simulator import SimulatorThread
from tests.support import ADMIN_KEY, UPSTREAM_KEY, require_tool, wait_until
from tests.test_demo import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_structure() -> None:
    steps = instructions()
    bases = [arg for op, arg in steps if op == "FROM"]
    assert len(bases) == 2 and all(b.startswith("python:3.11-slim") for b in bases)  # multi-stage, slim
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = json.loads(next(arg for op, arg in final if op == "ENTRYPOINT"))
    command = json.loads(next(arg for op, arg in final if op == "CMD"))
    assert entrypoint == ["gateway"] and command == ["serve"]  # exec form: the server is PID 1
    healthcheck = next(arg for op, arg in final if op == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "CMD [" in healthcheck
    env = " ".join(arg for op, arg in final if op == "ENV")
    assert "GATEWAY_CONFIG=/etc/gateway/gateway.yaml" in env
    baked = " ".join(arg for op, arg in steps if op in ("ENV", "ARG"))
    assert not re.search(r"(API_KEY|ADMIN_KEY)", baked)  # no secret baked into the image


def test_dockerfile_commands_build_and_run_the_gateway(tmp_path: Path, simulator: SimulatorThread) -> None:
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--wheel-dir", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [
            str(venv / "bin/pip"),
            "install",
            "--no-cache-dir",
            "--no-index",
            "--find-links",
            str(wheels),
            "openrouter-gateway",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]  # the wheels alone suffice: nothing from outside

    config = tmp_path / "gateway.yaml"
    shutil.copy(ROOT / "config/gateway.yaml", config)
    port = free_port()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "OPENROUTER_BASE_URL": simulator.base_url,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_SHUTDOWN_GRACE_S": "2",
    }
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen([str(venv / "bin/gateway"), "serve"], env=env, stdout=log, stderr=log, cwd=tmp_path)
    try:

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return process.poll() is not None

        wait_until(up, 30, "the installed gateway")
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        healthcheck = json.loads(
            re.search(r"CMD (\[.*\])", next(arg for op, arg in instructions() if op == "HEALTHCHECK")).group(1)
        )  # type: ignore[union-attr]
        probe = [str(venv / "bin/python"), *healthcheck[1:]]
        probe = [part.replace("8080", str(port)) for part in probe]
        assert subprocess.run(probe, env=env, timeout=30).returncode == 0
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()  # never leave the installed gateway running
            process.wait(10)
            raise
        assert code == 0


def compose_env() -> dict[str, str]:
    """What compose requires from the environment (it refuses to start without each)."""
    return {
        **os.environ,
        "OPENROUTER_API_KEY": "sk-or-v1-compose-check",
        "GATEWAY_ADMIN_KEY": "compose-check-admin",
        "GRAFANA_ADMIN_PASSWORD": "compose-check-grafana",
    }


def test_compose_file_validates(tmp_path: Path) -> None:
    compose = require_tool("docker-compose", "docker-compose")
    env = compose_env()
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
    no_password = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={k: v for k, v in env.items() if k != "GRAFANA_ADMIN_PASSWORD"},
    )
    assert no_password.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in no_password.stderr


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


def compose_stack() -> dict[str, Any]:
    compose = require_tool("docker-compose", "docker-compose")
    env = compose_env()
    result = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
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
    for path in ("docker-compose.yml", "README.md"):
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
