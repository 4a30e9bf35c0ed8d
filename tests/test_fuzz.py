"""Property-based fuzzing with schemathesis against the gateway's own OpenAPI schema, with the
right credentials so requests reach the handlers: no input may produce a 5xx or a crash."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from app.simulator import SimulatorThread
from tests.support import ADMIN_KEY, CLIENT_KEY, GatewayServer, gateway_settings


@pytest.fixture(scope="module")
def fuzzed(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    with GatewayServer(gateway_settings(simulator.base_url, admin_key=ADMIN_KEY)) as server:
        yield server


def operations(url: str) -> list[Any]:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def fuzz(
    operation: Any, mode: schemathesis.GenerationMode, url: str, failures: list[str], statuses: Counter[int]
) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_KEY if operation.path.startswith('/admin') else CLIENT_KEY}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, headers=auth, timeout=30)
        statuses[response.status_code] += 1
        if response.status_code >= 500 or "Traceback" in response.text:
            failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> {response.status_code}")
            return
        content_type = response.headers.get("content-type") or [""]
        if response.status_code >= 400 and content_type[0].startswith("application/json"):
            assert {"message", "type", "code"} <= set(response.json()["error"])

    with contextlib.suppress(Unsatisfiable):  # nothing here can be made invalid (GET /healthz, negative mode)
        run()


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_input_makes_a_server_error(fuzzed: GatewayServer, mode: schemathesis.GenerationMode) -> None:
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    tried = operations(fuzzed.url)
    assert any(op.path == "/v1/chat/completions" for op in tried) and any(op.path.startswith("/admin") for op in tried)
    for operation in tried:
        fuzz(operation, mode, fuzzed.url, failures, statuses)
    assert not failures, failures[:10]
    assert sum(statuses.values()) >= 5 * len(tried), statuses  # the handlers were really exercised
    assert any(400 <= status < 500 for status in statuses), statuses
    assert httpx.get(fuzzed.url + "/healthz").status_code == 200  # and the process is still up
