"""Two gateway processes sharing one real Redis: what one replica changes, the other honours
within a second; a restart keeps every key and team; no raw key is stored or logged."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.simulator import SimulatorThread
from tests.redis_server import RedisServer
from tests.redis_server import dump as redis_dump
from tests.support import ADMIN_KEY, UPSTREAM_KEY, GatewayProcess, wait_until

HELLO = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture(scope="module")
def replica_env(simulator: SimulatorThread, redis_server: RedisServer) -> dict[str, str]:
    return {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_STORE": redis_server.url,
        "GATEWAY_STORE_PREFIX": "r" + uuid.uuid4().hex[:8],
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_LOG_LEVEL": "debug",
    }


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replica-logs")


@pytest.fixture(scope="module")
def replicas(replica_env: dict[str, str], logs: Path) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    with GatewayProcess(replica_env, str(logs / "a.log")) as a, GatewayProcess(replica_env, str(logs / "b.log")) as b:
        yield a, b


def admin(replica: GatewayProcess) -> httpx.Client:
    return httpx.Client(base_url=replica.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)


def chat(replica: GatewayProcess, key: str) -> int:
    return httpx.post(
        replica.url + "/v1/chat/completions", json=HELLO, headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).status_code


def new_key(replica: GatewayProcess) -> dict[str, Any]:
    team = "team-" + uuid.uuid4().hex[:8]
    with admin(replica) as client:
        assert client.post("/teams", json={"name": team}).status_code == 201
        response = client.post("/keys", json={"name": "bot", "team": team})
        assert response.status_code == 201
        created: dict[str, Any] = response.json()
        return created


def test_revocation_through_a_is_honoured_by_b_within_a_second(replicas: tuple[GatewayProcess, GatewayProcess]) -> None:
    a, b = replicas
    key = new_key(a)
    assert chat(b, key["key"]) == 200  # b has the key cached now
    with admin(a) as client:
        assert client.post(f"/keys/{key['id']}/revoke").status_code == 200
    revoked_at = time.monotonic()
    wait_until(lambda: chat(b, key["key"]) == 401, 5, "revocation on replica b")
    assert time.monotonic() - revoked_at < 1.0


def test_rotation_through_a_reaches_b_and_the_grace_period_ends(
    replicas: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = replicas
    key = new_key(a)
    assert chat(b, key["key"]) == 200
    asked_at = time.monotonic()  # the grace period starts between this and `rotated_at`
    with admin(a) as client:
        rotated = client.post(f"/keys/{key['id']}/rotate", json={"grace_period_s": 2}).json()
    rotated_at = time.monotonic()
    wait_until(lambda: chat(b, rotated["key"]) == 200, 5, "new secret on replica b")
    assert time.monotonic() - rotated_at < 1.0
    assert chat(b, key["key"]) == 200  # still in its grace period
    wait_until(lambda: chat(b, key["key"]) == 401, 10, "grace period end on replica b")
    assert time.monotonic() - asked_at >= 2.0
    assert chat(b, rotated["key"]) == 200


def test_restart_keeps_keys_and_teams(
    replica_env: dict[str, str], logs: Path, replicas: tuple[GatewayProcess, GatewayProcess]
) -> None:
    a, _ = replicas
    key = new_key(a)
    with GatewayProcess(replica_env, str(logs / "c.log")) as c:
        assert chat(c, key["key"]) == 200
    with GatewayProcess(replica_env, str(logs / "d.log")) as d:  # started after c stopped
        assert chat(d, key["key"]) == 200
        with admin(d) as client:
            assert client.get(f"/keys/{key['id']}").json()["team"] == key["team"]
            assert key["team"] in {t["name"] for t in client.get("/teams").json()["data"]}


def test_no_raw_key_in_redis_or_logs(
    replicas: tuple[GatewayProcess, GatewayProcess], redis_server: RedisServer, logs: Path
) -> None:
    a, b = replicas
    key = new_key(a)
    assert chat(b, key["key"]) == 200
    assert chat(b, key["key"] + "x") == 401
    secret = key["key"].rsplit("-", 1)[1]

    dump = redis_dump(redis_server.url)
    assert key["id"].encode() in dump
    assert secret.encode() not in dump and ADMIN_KEY.encode() not in dump and UPSTREAM_KEY.encode() not in dump

    text = "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
    assert text  # debug logging was on
    assert secret not in text and ADMIN_KEY not in text and UPSTREAM_KEY not in text
