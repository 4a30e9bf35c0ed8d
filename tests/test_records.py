"""Key and team records (app/auth/records.py) across replicas: a team's upstream secret is never
stored or shown, records have exactly their documented fields, the key secrets issued are random
(>= 128 bits), concurrent creation is idempotent across replicas, and a PATCH reaches cached keys
on every replica within a second.

Two in-process gateways (replicas A and B) share one real redis-server under a prefix of their own."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from app.auth.keys import hash_key, new_key, new_key_id
from app.simulator import SimulatorThread
from tests.redis_server import RedisServer
from tests.redis_server import dump as redis_dump
from tests.support import (
    ADMIN_KEY,
    TEAM_UPSTREAM_KEY,
    UPSTREAM_KEY,
    GatewayServer,
    gateway_settings,
    scrape,
    wait_until,
)
from tests.support import request_id as new_request_id

KEY_FORMAT = re.compile(r"^sk-gw-(?P<id>[a-z0-9]{12})-(?P<secret>[A-Za-z0-9]+)$")
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)$")
HELLO = [{"role": "user", "content": "Hello"}]
# The env var naming the team's OpenRouter key: unique, so no other test's setting can stand in.
UPSTREAM_ENV = "TEAM_KR_" + uuid.uuid4().hex[:10].upper() + "_OPENROUTER_KEY"

# The documented record fields (app/auth/records.py: LimitFields, KeyFields/KeyRecord, TeamFields/
# TeamRecord); the admin API never shows a key's `hash` or `previous` hashes, and adds
# `previous_secret_valid_until` to keys and `budget` (the spend) to a single key or team.
LIMIT_FIELDS = {"models", "rpm", "tpm", "max_concurrency", "budget_usd", "budget_period"}
KEY_FIELDS = LIMIT_FIELDS | {
    "expires_at",
    "metadata",
    "id",
    "name",
    "team",
    "created_at",
    "updated_at",
    "rotated_at",
    "last_used_at",
    "revoked",
    "revoked_at",
    "declared",
    "previous_secret_valid_until",
}
TEAM_FIELDS = LIMIT_FIELDS | {
    "app_url",
    "app_title",
    "categories",
    "upstream_key_env",
    "provider",
    "defaults",
    "metadata",
    "name",
    "created_at",
    "updated_at",
    "declared",
}


@pytest.fixture(scope="module")
def replicas(simulator: SimulatorThread, redis_server: RedisServer) -> Iterator[tuple[GatewayServer, GatewayServer]]:
    prefix = "kr" + uuid.uuid4().hex[:8]
    with pytest.MonkeyPatch.context() as env:
        env.setenv(UPSTREAM_ENV, TEAM_UPSTREAM_KEY)
        settings = gateway_settings(
            simulator.base_url, admin_key=ADMIN_KEY, store=redis_server.url, store_prefix=prefix
        )
        with GatewayServer(settings) as a, GatewayServer(settings) as b:
            yield a, b


def admin(gateway: GatewayServer) -> httpx.Client:
    return httpx.Client(base_url=gateway.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=20)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_team(gateway: GatewayServer, **fields: Any) -> str:
    name = unique("team")
    with admin(gateway) as client:
        response = client.post("/teams", json={"name": name, **fields})
    assert response.status_code == 201, response.text
    return name


def make_key(gateway: GatewayServer, team: str, **fields: Any) -> dict[str, Any]:
    with admin(gateway) as client:
        response = client.post("/keys", json={"name": unique("key"), "team": team, **fields})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def chat(gateway: GatewayServer, key: str, model: str, rid: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "x-request-id": rid or new_request_id()}
    body = {"model": model, "messages": HELLO}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=20)


# -- 1. a team's upstream secret is never stored or shown -----------------------------------------
def test_team_upstream_secret_is_used_but_never_stored_or_shown(
    replicas: tuple[GatewayServer, GatewayServer], redis_server: RedisServer, simulator: SimulatorThread
) -> None:
    a, b = replicas
    team = make_team(a, upstream_key_env=UPSTREAM_ENV, app_title="Secret Keepers")
    key = make_key(a, team)
    rid = new_request_id()
    assert chat(b, key["key"], "openai/gpt-4o-mini", rid).status_code == 200
    (sent,) = simulator.find(rid)
    assert sent["headers"]["authorization"] == f"Bearer {TEAM_UPSTREAM_KEY}"  # the secret was really in play

    secret = TEAM_UPSTREAM_KEY
    texts: dict[str, str] = {"redis": redis_dump(redis_server.url).decode("utf-8", "replace")}
    assert team in texts["redis"] and UPSTREAM_ENV in texts["redis"]  # the dump holds the team's record
    for name, gateway in (("a", a), ("b", b)):
        with admin(gateway) as client:
            shown = client.get(f"/teams/{team}")
            assert shown.status_code == 200 and shown.json()["upstream_key_env"] == UPSTREAM_ENV
            texts[f"{name} show"] = shown.text
            texts[f"{name} list"] = client.get("/teams").text
            texts[f"{name} keys"] = client.get("/keys", params={"team": team}).text
            texts[f"{name} patch"] = client.patch(f"/teams/{team}", json={"app_title": "Still Secret"}).text
        texts[f"{name} metrics"] = scrape(gateway.url, timeout=20).text
        texts[f"{name} openapi"] = httpx.get(gateway.url + "/openapi.json", timeout=20).text
    assert team in texts["a list"] and team in texts["b list"]
    for where, text in texts.items():
        assert text, where
        assert secret not in text, f"the team's upstream key shows in {where}"
        assert secret.removeprefix("sk-or-v1-") not in text, f"part of the team's upstream key shows in {where}"
        assert UPSTREAM_KEY not in text, f"the global upstream key shows in {where}"


# -- 2. the exact record shape ---------------------------------------------------------------------
def iso_utc(value: Any) -> datetime:
    assert isinstance(value, str) and ISO_UTC.match(value), f"{value!r} is not ISO 8601 UTC"
    stamp = datetime.fromisoformat(value)
    assert stamp.utcoffset() == timedelta(0)
    return stamp


def _check_times(record: dict[str, Any], *fields: str) -> None:
    moment = datetime.now(UTC)
    for field in fields:
        assert abs(moment - iso_utc(record[field])) < timedelta(minutes=1), f"{field}: {record[field]} is not now"


def test_records_have_exactly_the_documented_fields(replicas: tuple[GatewayServer, GatewayServer]) -> None:
    a, b = replicas
    limits: dict[str, Any] = {
        "models": ["openai/*", "deepseek/deepseek-v3.2"],
        "rpm": 120,
        "tpm": 50_000,
        "max_concurrency": 4,
        "budget_usd": 12.5,
        "budget_period": "day",
    }
    team = make_team(a, **limits, app_title="Shape Team", categories=["cli-agent"], metadata={"cost_center": "42"})
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    key_limits = {"models": ["openai/*"], "rpm": 30, "tpm": 9_000, "max_concurrency": 2, "budget_usd": 3.0}
    created = make_key(a, team, **key_limits, budget_period="total", expires_at=expires.isoformat(), metadata={"o": 1})
    assert set(created) == KEY_FIELDS | {"key"}

    with admin(b) as client:  # read back through the other replica: what the store holds
        team_shown = client.get(f"/teams/{team}").json()
        (team_listed,) = [t for t in client.get("/teams").json()["data"] if t["name"] == team]
        key_shown = client.get(f"/keys/{created['id']}").json()
        key_list = client.get("/keys", params={"team": team})

    assert set(team_shown) == TEAM_FIELDS | {"budget"}
    assert set(team_listed) == TEAM_FIELDS
    assert set(key_shown) == KEY_FIELDS | {"budget"}
    (key_listed,) = key_list.json()["data"]
    assert set(key_listed) == KEY_FIELDS

    for record in (team_shown, team_listed):
        assert {k: record[k] for k in limits} == limits
        assert record["app_title"] == "Shape Team" and record["metadata"] == {"cost_center": "42"}
        assert record["upstream_key_env"] is None and record["declared"] is False
        _check_times(record, "created_at", "updated_at")
    for record in (key_shown, key_listed):
        assert {k: record[k] for k in key_limits} == key_limits and record["budget_period"] == "total"
        assert iso_utc(record["expires_at"]) == expires
        assert (record["id"], record["name"], record["team"]) == (created["id"], created["name"], team)
        assert record["metadata"] == {"o": 1} and record["revoked"] is False and record["revoked_at"] is None
        _check_times(record, "created_at", "updated_at")
    assert key_shown["budget"]["limit_usd"] == 3.0 and team_shown["budget"]["limit_usd"] == 12.5

    secret = created["key"].rsplit("-", 1)[1]
    for text in (json.dumps(key_shown), key_list.text, json.dumps(team_shown), json.dumps(team_listed)):
        assert created["key"] not in text and secret not in text
        assert hash_key(created["key"]) not in text and '"hash"' not in text and '"previous"' not in text


# -- 3. secrets are random, >= 128 bits --------------------------------------------------------------
def test_secrets_are_unique_well_formed_and_random(replicas: tuple[GatewayServer, GatewayServer]) -> None:
    a, b = replicas
    team = make_team(a)
    keys: list[str] = []
    with admin(a) as client_a, admin(b) as client_b:
        for i in range(30):  # through the admin API, both replicas
            response = (client_a if i % 2 else client_b).post("/keys", json={"name": f"k{i}", "team": team})
            assert response.status_code == 201, response.text
            assert response.json()["key"].startswith(f"sk-gw-{response.json()['id']}-")
            keys.append(response.json()["key"])
    keys += [new_key(new_key_id()) for _ in range(70)]  # and the generator itself

    matches = [KEY_FORMAT.match(k) for k in keys]
    assert all(matches), [k for k, m in zip(keys, matches, strict=True) if not m]
    ids = [m["id"] for m in matches if m]
    secrets = [m["secret"] for m in matches if m]
    assert len(set(keys)) == len(set(ids)) == len(set(secrets)) == 100

    alphabet = set("".join(secrets))
    assert len(alphabet) >= 50, sorted(alphabet)
    shortest = min(len(s) for s in secrets)
    assert shortest * math.log2(len(alphabet)) >= 128, f"{shortest} characters of {len(alphabet)}"
    for position in range(shortest):  # no fixed or slowly changing position (a counter, a timestamp)
        column = {s[position] for s in secrets}
        assert len(column) >= 20, f"position {position} takes only {sorted(column)}"


# -- 5. concurrent creation is idempotent across replicas -------------------------------------------
async def _create_all(targets: list[str], body: dict[str, Any]) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(timeout=20, headers=headers, limits=httpx.Limits(max_connections=20)) as client:
        return list(await asyncio.gather(*(client.post(url + "/admin/keys", json=body) for url in targets)))


@pytest.mark.parametrize("round_", range(3))
def test_parallel_creation_gives_one_key(replicas: tuple[GatewayServer, GatewayServer], round_: int) -> None:
    a, b = replicas
    team = make_team(a)
    answers = asyncio.run(_create_all([a.url, b.url] * 5, {"name": "shared-bot", "team": team}))

    created = [r for r in answers if r.status_code == 201]
    assert len(created) == 1, [(r.status_code, r.text) for r in answers]
    key_id = created[0].json()["id"]
    refused = [r for r in answers if r.status_code != 201]
    assert len(refused) == 9
    for response in refused:
        assert response.status_code == 409, response.text
        assert response.headers["x-should-retry"] == "false"
        error = response.json()["error"]
        assert error["code"] == "key_exists" and error["metadata"] == {"id": key_id}
    for gateway in (a, b):
        with admin(gateway) as client:
            listed = client.get("/keys", params={"team": team}).json()["data"]
        assert [(k["id"], k["name"]) for k in listed] == [(key_id, "shared-bot")]
    assert chat(b, created[0].json()["key"], "openai/gpt-4o-mini").status_code == 200


# -- 6. a PATCH reaches cached keys ----------------------------------------------------------------
@pytest.mark.parametrize("across", [False, True], ids=["same-replica", "across-replicas"])
def test_patched_allowlist_reaches_cached_key(replicas: tuple[GatewayServer, GatewayServer], across: bool) -> None:
    a, b = replicas
    user = b if across else a
    key = make_key(a, make_team(a))
    for model in ("deepseek/deepseek-v3.2", "openai/gpt-4o-mini"):  # now cached on `user`, no allowlist
        assert chat(user, key["key"], model).status_code == 200

    with admin(a) as client:
        patched = client.patch(f"/keys/{key['id']}", json={"models": ["openai/*"]})
    patched_at = time.monotonic()
    assert patched.status_code == 200 and patched.json()["models"] == ["openai/*"]

    def refused_now() -> httpx.Response | None:
        response = chat(user, key["key"], "deepseek/deepseek-v3.2")
        return response if response.status_code == 403 else None

    refused = wait_until(refused_now, 10, "the narrower allowlist to reach auth")
    assert time.monotonic() - patched_at < 1.0
    assert refused is not None and refused.json()["error"]["code"] == "model_not_allowed"
    assert chat(user, key["key"], "openai/gpt-4o-mini").status_code == 200  # still a working key
