"""Who may read /metrics (key and team names, spend): the scrape key `GATEWAY_METRICS_KEY` or the
admin key, on whichever address serves it; with neither set, nobody, and the answer says how."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.simulator import SimulatorThread
from tests.support import (
    ADMIN_KEY,
    CLIENT_KEY,
    METRICS_KEY,
    UPSTREAM_KEY,
    GatewayProcess,
    GatewayServer,
    free_port_number,
    gateway_settings,
)

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def refused(response: httpx.Response, status: int) -> dict[str, str]:
    """An OpenAI error envelope and not one line of the exposition."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json"
    assert "gateway_" not in response.text and "# TYPE" not in response.text
    error: dict[str, str] = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    return error


@pytest.fixture(scope="module")
def unkeyed(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    """No scrape key and no admin key: /metrics is off."""
    with GatewayServer(gateway_settings(simulator.base_url, metrics_key=None)) as server:
        yield server


def test_without_a_credential_metrics_answer_401(keyed: GatewayServer) -> None:
    error = refused(httpx.get(keyed.url + "/metrics"), 401)
    assert error["code"] == "invalid_api_key" and "GATEWAY_METRICS_KEY" in error["message"]
    for authorization in ("Basic " + METRICS_KEY, "Bearer", METRICS_KEY, "Bearer " + METRICS_KEY[:-1]):
        answer = httpx.get(keyed.url + "/metrics", headers={"Authorization": authorization})
        assert refused(answer, 401)["code"] == "invalid_api_key", authorization


def test_the_scrape_key_and_the_admin_key_open_metrics(keyed: GatewayServer) -> None:
    for key in (METRICS_KEY, ADMIN_KEY):
        answer = httpx.get(keyed.url + "/metrics", headers=bearer(key))
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        assert b"# TYPE gateway_requests_total counter" in answer.content


def test_the_scrape_key_opens_nothing_else(keyed: GatewayServer) -> None:
    scrape = bearer(METRICS_KEY)
    assert refused(httpx.get(keyed.url + "/admin/teams", headers=scrape), 401)["code"] == "invalid_api_key"
    assert refused(httpx.get(keyed.url + "/admin/usage", headers=scrape), 401)["code"] == "invalid_api_key"
    assert refused(httpx.get(keyed.url + "/v1/models", headers=scrape), 401)["code"] == "invalid_api_key"
    chat = httpx.post(keyed.url + CHAT, json={"model": "openai/gpt-4o-mini", "messages": HI}, headers=scrape)
    assert refused(chat, 401)["code"] == "invalid_api_key"


def test_with_neither_key_metrics_are_off_and_say_how_to_turn_them_on(unkeyed: GatewayServer) -> None:
    for headers in ({}, bearer(METRICS_KEY), bearer(CLIENT_KEY)):
        error = refused(httpx.get(unkeyed.url + "/metrics", headers=headers), 403)
        assert error["code"] == "metrics_disabled" and "set GATEWAY_METRICS_KEY" in error["message"]
    assert httpx.get(unkeyed.url + "/healthz").status_code == 200  # the rest stays open


def test_every_address_wants_the_credential_read_from_a_secret_file(simulator: SimulatorThread, tmp_path: Path) -> None:
    """`gateway serve` with the admin API on its own port and the scrape key from a file, as
    compose gives it: the main port does not serve /metrics, the admin port wants a key."""
    secret = tmp_path / "metrics_key"
    secret.write_text(METRICS_KEY + "\n")
    admin_port = free_port_number()
    env = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_METRICS_KEY_FILE": str(secret),
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_ADMIN_PORT": str(admin_port),
    }
    with GatewayProcess(env, str(tmp_path / "gateway.log")) as gateway:
        admin_url = f"http://127.0.0.1:{admin_port}"
        for headers in ({}, bearer(METRICS_KEY), bearer(ADMIN_KEY)):
            assert refused(httpx.get(gateway.url + "/metrics", headers=headers), 404)["code"] == "unknown_url"
        assert refused(httpx.get(admin_url + "/metrics"), 401)["code"] == "invalid_api_key"
        assert refused(httpx.get(admin_url + "/metrics", headers=bearer(CLIENT_KEY)), 401)["code"] == "invalid_api_key"
        for key in (METRICS_KEY, ADMIN_KEY):
            assert b"gateway_requests_total" in httpx.get(admin_url + "/metrics", headers=bearer(key)).content
    assert METRICS_KEY not in (tmp_path / "gateway.log").read_text()
