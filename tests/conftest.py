"""Fixtures: the OpenRouter simulator and the gateway as real servers on loopback, and the
official `openai` client pointed at the gateway."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.auth.keys import hash_key
from app.simulator import SimulatorThread
from app.store.base import Store
from app.store.memory import MemoryStore
from app.store.redis import RedisStore
from app.store.sqlite import SqliteStore
from tests.metering_support import Served
from tests.redis_server import RedisServer
from tests.redis_topology import ClusterSet, SentinelSet
from tests.support import (
    ADMIN_KEY,
    CLIENT_KEY,
    DECLARED_ID,
    DECLARED_KEY,
    METRICS_KEY,
    TEAM_UPSTREAM_KEY,
    UPSTREAM_KEY,
    GatewayProcess,
    GatewayServer,
    base_env,
    free_port_number,
    gateway_settings,
    wait_until,
)


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorThread]:
    sim = SimulatorThread(api_keys={UPSTREAM_KEY, TEAM_UPSTREAM_KEY}).start()
    yield sim
    sim.stop()


@pytest.fixture(scope="session")
def gateway(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    with GatewayServer(gateway_settings(simulator.base_url)) as server:
        yield server


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20) as sdk:
        yield sdk


@pytest.fixture
def http(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=20) as c:
        yield c


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def keyed(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    os.environ["TEAM_ML_OPENROUTER_KEY"] = TEAM_UPSTREAM_KEY
    settings = gateway_settings(
        simulator.base_url,
        admin_key=ADMIN_KEY,
        last_used_flush_s=0.2,
        teams=[{"name": "gitops", "models": ["openai/*"], "app_title": "GitOps Team"}],
        keys=[{"id": DECLARED_ID, "name": "ci", "team": "gitops", "hash": "sha256:" + hash_key(DECLARED_KEY)}],
    )
    with GatewayServer(settings) as server:
        yield server
    del os.environ["TEAM_ML_OPENROUTER_KEY"]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that stop, freeze or watch it."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def sentinel_set() -> Iterator[Callable[..., SentinelSet]]:
    """Starts a Redis Sentinel set (master, replica, three sentinels) per call, with SentinelSet's
    options; when the test ends, however it ends, every process is killed (or reaped, if the test
    killed it) and every folder removed."""
    with ExitStack() as started:
        yield lambda **options: started.enter_context(SentinelSet(**options))


@pytest.fixture
def cluster_set() -> Iterator[Callable[..., ClusterSet]]:
    """Starts a six-node Redis Cluster per call, with ClusterSet's options; cleaned up as `sentinel_set`."""
    with ExitStack() as started:
        yield lambda **options: started.enter_context(ClusterSet(**options))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Each contract test runs on the memory store, on a fresh SQLite file and on a real
    redis-server."""
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        sqlite_store = SqliteStore(tmp_path / "gateway.db")
        yield sqlite_store
        await sqlite_store.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_store = RedisStore(server.url, prefix="t" + uuid.uuid4().hex[:10])
    yield redis_store
    await redis_store.close()


@pytest.fixture(scope="session")
def served_gateway(simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A real `gateway serve` writing its JSON request log (the metering, metrics and usage
    report tests read it), with an alias to a reasoning model and quick budget gauges."""
    folder = tmp_path_factory.mktemp("metered")
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


@pytest.fixture(scope="session")
def admin_on_own_host(simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real `gateway serve` with the admin API on its own bind address (127.0.0.2), and its log."""
    admin_port = free_port_number()
    log = tmp_path_factory.mktemp("admin-host") / "gateway.log"
    env = base_env(simulator, GATEWAY_ADMIN_HOST="127.0.0.2", GATEWAY_ADMIN_PORT=str(admin_port))
    with GatewayProcess(env, str(log)) as gateway:
        admin_url = f"http://127.0.0.2:{admin_port}"
        wait_until(lambda: httpx.get(admin_url + "/healthz").status_code == 200, 10, "the admin listener")
        yield gateway, admin_url, log
