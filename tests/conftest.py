"""Fixtures: the OpenRouter simulator and the gateway as real servers on loopback, and the
official `openai` client pointed at the gateway."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from app.simulator import SimulatorThread
from tests.support import CLIENT_KEY, UPSTREAM_KEY, GatewayServer, gateway_settings


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorThread]:
    sim = SimulatorThread(api_keys={UPSTREAM_KEY}).start()
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
