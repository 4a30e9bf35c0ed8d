"""Structured logs: every line is one JSON object; one line per request with ids, key name,
team, model, status, tokens, cost and durations; prompts and completions only when asked for;
never a secret."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.simulator import SimulatorThread
from tests.support import (
    ADMIN_KEY,
    CLIENT_KEY,
    METRICS_KEY,
    UPSTREAM_KEY,
    GatewayProcess,
    scrape,
    wait_until,
)

SECRET_PROMPT = "my-private-prompt-" + uuid.uuid4().hex


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(simulator: SimulatorThread, tmp_path: Path, **env: str) -> tuple[list[dict[str, Any]], str]:
    log = tmp_path / "gateway.log"
    base = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_CONFIG": "/dev/null",
        **env,
    }
    rid = "log-test-" + uuid.uuid4().hex
    with GatewayProcess(base, str(log)) as gateway:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}", "x-request-id": rid}
        body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
        assert httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers).status_code == 200
        streamed = {**body, "stream": True}
        assert (
            httpx.post(
                gateway.url + "/v1/chat/completions", json=streamed, headers={**headers, "x-request-id": rid + "-s"}
            ).status_code
            == 200
        )
        refused = httpx.post(
            gateway.url + "/v1/chat/completions",
            json={**body, "model": "nobody/nothing"},
            headers={**headers, "x-request-id": rid + "-e"},
        )
        assert refused.status_code == 404
        wait_until(
            lambda: len([line for line in lines(log) if line.get("request_id", "").startswith(rid)]) == 3,
            10,
            "the request lines",
        )
    return lines(log), rid


def test_one_json_line_per_request(simulator: SimulatorThread, tmp_path: Path) -> None:
    entries, rid = run(simulator, tmp_path)
    assert all(isinstance(e, dict) and {"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["logger"].startswith("uvicorn") for e in entries)  # uvicorn's own lines are JSON too
    assert not [e for e in entries if "color_message" in e or "\x1b[" in json.dumps(e)]  # no terminal colours
    requests = {e["request_id"]: e for e in entries if e.get("message") == "request"}
    plain, streamed, refused = requests[rid], requests[rid + "-s"], requests[rid + "-e"]
    for entry in (plain, streamed):
        assert entry["status"] == 200 and entry["key"] == "bootstrap" and entry["model"] == "openai/gpt-4o-mini"
        assert entry["prompt_tokens"] > 0 and entry["completion_tokens"] > 0
        assert float(entry["cost_usd"]) > 0 and entry["cost_source"] == "upstream"
        assert entry["duration_ms"] > 0 and entry["upstream_ms"] > 0 and entry["overhead_ms"] >= 0
        assert entry["generation_id"].startswith("gen-")
    assert streamed["stream"] is True and streamed["ttft_ms"] > 0
    assert refused["status"] == 404 and refused["error_code"] == "model_not_found"
    text = json.dumps(entries)
    assert SECRET_PROMPT not in text and "Hello from" not in text  # no prompts, no completions
    for secret in (CLIENT_KEY, ADMIN_KEY, UPSTREAM_KEY):
        assert secret not in text


@pytest.mark.parametrize("level", ["warning"])
def test_request_lines_follow_the_level(simulator: SimulatorThread, tmp_path: Path, level: str) -> None:
    log = tmp_path / "quiet.log"
    env = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_LOG_LEVEL": level,
    }
    with GatewayProcess(env, str(log)) as gateway:
        body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        assert (
            httpx.post(
                gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
            ).status_code
            == 200
        )
    entries = lines(log)
    assert not [e for e in entries if e.get("message") == "request"]
    # what is at the level still is logged: the warning that the drain began, at the stop
    assert [e for e in entries if e["level"] == "warning" and "draining" in e["message"]], entries


def test_text_format_keeps_the_fields(simulator: SimulatorThread, tmp_path: Path) -> None:
    log = tmp_path / "text.log"
    env = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_LOG_FORMAT": "text",
    }
    rid = "text-" + uuid.uuid4().hex
    with GatewayProcess(env, str(log)) as gateway:
        body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
        headers = {"Authorization": f"Bearer {CLIENT_KEY}", "x-request-id": rid}
        assert httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers).status_code == 200
        line = wait_until(
            lambda: next((x for x in log.read_text().splitlines() if f"request_id={rid}" in x), None),
            10,
            "the request line",
        )
    assert " INFO gateway.requests request " in line, line
    for field in ("status=200", "key=bootstrap", "model=openai/gpt-4o-mini", "cost_source=upstream"):
        assert field in line, line
    assert "prompt_tokens=" in line and "duration_ms=" in line
    assert SECRET_PROMPT not in log.read_text() and CLIENT_KEY not in log.read_text()


def test_bodies_only_when_enabled(simulator: SimulatorThread, tmp_path: Path) -> None:
    entries, rid = run(simulator, tmp_path, GATEWAY_LOG_BODIES="true")
    plain = next(e for e in entries if e.get("request_id") == rid)
    assert SECRET_PROMPT in plain["request_body"]
    assert "Hello from openai/gpt-4o-mini" in plain["response_body"]
    streamed = next(e for e in entries if e.get("request_id") == rid + "-s")
    assert SECRET_PROMPT in streamed["request_body"]
    assert "data: {" in streamed["response_body"] and "data: [DONE]" in streamed["response_body"]
    assert '"content":"Hello' in streamed["response_body"].replace(" ", "")
    assert CLIENT_KEY not in json.dumps(entries)  # headers are never logged, even then


def test_a_refused_secret_of_a_known_key_is_logged_under_its_id(simulator: SimulatorThread, tmp_path: Path) -> None:
    """A rotated-out, revoked or expired key still names its key (the public id is part of it):
    the 401's request line and its count say whose it is, so an old secret left in some script
    can be found."""
    log = tmp_path / "refused.log"
    env = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_METRICS_KEY": METRICS_KEY,
        "GATEWAY_CONFIG": "/dev/null",
    }
    rid = "refused-" + uuid.uuid4().hex
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    with GatewayProcess(env, str(log)) as gateway, httpx.Client(base_url=gateway.url, timeout=20) as http:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert http.post("/admin/teams", json={"name": "ml"}, headers=admin).status_code == 201
        key = http.post("/admin/keys", json={"name": "alice", "team": "ml"}, headers=admin).json()
        rotated = http.post(f"/admin/keys/{key['id']}/rotate", json={"grace_period_s": 0}, headers=admin).json()
        soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
        brief = http.post("/admin/keys", json={"name": "bob", "team": "ml", "expires_at": soon}, headers=admin).json()

        def send(secret: str, suffix: str) -> int:
            headers = {"Authorization": f"Bearer {secret}", "x-request-id": rid + suffix}
            return http.post("/v1/chat/completions", json=body, headers=headers).status_code

        assert send(key["key"], "-old") == 401  # the secret before the rotation
        assert http.post(f"/admin/keys/{key['id']}/revoke", headers=admin).status_code == 200
        assert send(rotated["key"], "-revoked") == 401
        assert send("sk-gw-nobodyatall-" + "x" * 32, "-unknown") == 401
        wait_until(lambda: datetime.now(UTC).isoformat() > soon, 5, "bob's key to expire")
        assert send(brief["key"], "-expired") == 401

        def refusals() -> dict[str, dict[str, Any]]:
            found = {e["request_id"]: e for e in lines(log) if e.get("request_id", "").startswith(rid)}
            return found if len(found) == 4 else {}

        entries = wait_until(refusals, 10, "the four request lines")
        counted = scrape(gateway.url).text
    for suffix, refused in (("-old", key), ("-revoked", key), ("-expired", brief)):
        entry = entries[rid + suffix]
        assert (entry["status"], entry["key_id"], entry["key"], entry["team"]) == (
            401,
            refused["id"],
            refused["name"],
            "ml",
        )
    assert entries[rid + "-unknown"]["key_id"] == ""  # no such key: nobody to name
    for name, count in (("alice", 2.0), ("bob", 1.0)):  # counted under the key too, not only logged
        labels = f'endpoint="chat.completions",key="{name}",model="",status="401",team="ml"'
        assert f"gateway_requests_total{{{labels}}} {count}" in counted
    assert key["key"] not in log.read_text() and rotated["key"] not in log.read_text()


CHAT = "/v1/chat/completions"


HI = [{"role": "user", "content": "hi"}]


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_request_log_names_the_team_and_the_key(admin_on_own_host: tuple[GatewayProcess, str, Path]) -> None:
    gateway, admin_url, log = admin_on_own_host
    team = "logged-" + uuid.uuid4().hex[:6]
    assert httpx.post(admin_url + "/admin/teams", json={"name": team}, headers=ADMIN).status_code == 201
    created = httpx.post(admin_url + "/admin/keys", json={"name": "ci-runner", "team": team}, headers=ADMIN)
    assert created.status_code == 201, created.text
    key = created.json()
    rid = "team-log-" + uuid.uuid4().hex
    answer = httpx.post(
        gateway.url + CHAT,
        json={"model": "openai/gpt-4o-mini", "messages": HI},
        headers={"Authorization": f"Bearer {key['key']}", "x-request-id": rid},
        timeout=20,
    )
    assert answer.status_code == 200, answer.text
    line = wait_until(
        lambda: next((e for e in log_lines(log) if e.get("request_id") == rid and e["message"] == "request"), None),
        10,
        "the request line",
    )
    assert line["team"] == team and line["key"] == "ci-runner" and line["key_id"] == key["id"]
    assert line["status"] == 200 and line["model"] == "openai/gpt-4o-mini"
    assert key["key"] not in log.read_text()
