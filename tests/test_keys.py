"""Virtual keys and teams through the admin API and on the request path: formats, hashing,
allowlists, rotation, revocation, expiry, team attribution and policy, declared entries, and
bad admin input (never a 500); key secrets and the admin key compared in constant time, never
with `==`."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.auth.keys import KeyAuthenticator, hash_key, new_key, new_key_id
from app.auth.records import KeyFields, TeamFields
from app.auth.registry import Registry
from app.auth.teams import TeamPolicyFactory
from app.errors import AuthenticationError
from app.settings import AttributionSettings
from app.simulator import SimulatorThread
from app.store.sqlite import SqliteStore
from tests.support import (
    ADMIN_KEY,
    CLIENT_KEY,
    DECLARED_ID,
    DECLARED_KEY,
    TEAM_UPSTREAM_KEY,
    UPSTREAM_KEY,
    GatewayServer,
    gateway_settings,
    wait_until,
)
from tests.support import request_id as new_request_id

HELLO = [{"role": "user", "content": "Hello"}]
KEY_FORMAT = re.compile(r"^sk-gw-[a-z0-9]{12}-[A-Za-z0-9]{32}$")


@pytest.fixture
def admin(keyed: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keyed.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client


def unique(prefix: str) -> str:
    return f"{prefix}-{new_key_id()}"


def make_team(admin: httpx.Client, **fields: Any) -> str:
    name = unique("team")
    response = admin.post("/teams", json={"name": name, **fields})
    assert response.status_code == 201, response.text
    return name


def make_key(admin: httpx.Client, team: str, **fields: Any) -> dict[str, Any]:
    response = admin.post("/keys", json={"name": unique("key"), "team": team, **fields})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def sdk(gateway: GatewayServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_admin_api_is_off_without_admin_key(gateway: GatewayServer) -> None:
    for method, path in (("GET", "/admin/teams"), ("POST", "/admin/keys"), ("GET", "/admin/keys/abc")):
        response = httpx.request(method, gateway.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "admin_api_disabled"
        assert "GATEWAY_ADMIN_KEY" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-admin-key", f"Bearer {CLIENT_KEY}", f"Bearer {DECLARED_KEY}", f"Basic {ADMIN_KEY}"],
)
def test_admin_api_refuses_other_keys(keyed: GatewayServer, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.get(keyed.url + "/admin/keys", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_key_is_shown_once_and_stored_hashed(keyed: GatewayServer, admin: httpx.Client) -> None:
    team = make_team(admin)
    created = make_key(admin, team, metadata={"owner": "alice"})
    assert KEY_FORMAT.match(created["key"])
    assert created["key"].startswith(f"sk-gw-{created['id']}-")
    assert created["metadata"] == {"owner": "alice"} and created["revoked"] is False

    shown = admin.get(f"/keys/{created['id']}").json()
    listing = admin.get("/keys", params={"team": team}).text
    for text in (json.dumps(shown), listing):
        assert created["key"] not in text and created["key"].rsplit("-", 1)[1] not in text
        assert hash_key(created["key"]) not in text and '"hash"' not in text
    assert [k["id"] for k in admin.get("/keys", params={"team": team}).json()["data"]] == [created["id"]]

    with sdk(keyed, created["key"]) as client:
        assert client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO).choices[0].message.content


def test_same_name_in_team_is_an_idempotent_409(admin: httpx.Client) -> None:
    team = make_team(admin)
    first = make_key(admin, team)
    for _ in range(2):
        again = admin.post("/keys", json={"name": first["name"], "team": team})
        assert again.status_code == 409
        assert again.headers["x-should-retry"] == "false"
        assert again.json()["error"]["code"] == "key_exists"
        assert again.json()["error"]["metadata"] == {"id": first["id"]}
    assert len(admin.get("/keys", params={"team": team}).json()["data"]) == 1
    assert admin.post("/teams", json={"name": team}).status_code == 409
    assert "revoked" not in again.json()["error"]["message"]
    admin.post(f"/keys/{first['id']}/revoke")
    held = admin.post("/keys", json={"name": first["name"], "team": team})
    assert held.status_code == 409 and held.json()["error"]["metadata"] == {"id": first["id"]}
    assert (
        "a revoked key keeps its name" in held.json()["error"]["message"]
        and "rotate" in held.json()["error"]["message"]
    )


def test_unusable_keys_get_401(keyed: GatewayServer, admin: httpx.Client) -> None:
    team = make_team(admin)
    revoked = make_key(admin, team)
    assert admin.post(f"/keys/{revoked['id']}/revoke").json()["revoked"] is True
    expiring = make_key(admin, team, expires_at=(datetime.now(UTC) + timedelta(seconds=1.5)).isoformat())
    with sdk(keyed, expiring["key"]) as client:
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)  # works until it expires
    unknown = new_key(new_key_id())
    tampered = revoked["key"][:-1] + ("A" if revoked["key"][-1] != "A" else "B")
    candidates = [unknown, tampered, "sk-gw-short", "not-a-key", revoked["key"], UPSTREAM_KEY]
    wait_until(lambda: datetime.now(UTC) > datetime.fromisoformat(expiring["expires_at"]), 5, "expiry")
    candidates.append(expiring["key"])
    for key in candidates:
        with sdk(keyed, key) as client, pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
        assert caught.value.status_code == 401
        assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]


def test_allowlist_applies_to_requests_and_model_listing(keyed: GatewayServer, admin: httpx.Client) -> None:
    team = make_team(admin, models=["openai/*", "deepseek/*"])
    key = make_key(admin, team, models=["openai/*"])  # narrower than its team
    with sdk(keyed, key["key"]) as client:
        assert client.chat.completions.create(model="gpt-4o-mini", messages=HELLO).choices  # alias -> openai/
        for model in ("deepseek/deepseek-v3.2", "thinker", "anthropic/claude-sonnet-4.5"):
            with pytest.raises(openai.PermissionDeniedError) as caught:
                client.chat.completions.create(model=model, messages=HELLO)
            assert caught.value.body["code"] == "model_not_allowed"  # type: ignore[index]
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(
                model="openai/gpt-4o-mini", messages=HELLO, extra_body={"models": ["anthropic/claude-sonnet-4.5"]}
            )
        with pytest.raises(openai.PermissionDeniedError):
            client.embeddings.create(model="qwen/qwen3-embedding-8b", input="x")
        listed = {m.id for m in client.models.list()}
        assert listed and all(m.startswith("openai/") or m == "gpt-4o-mini" for m in listed)
        assert "openai/text-embedding-3-small" in listed
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("deepseek/deepseek-v3.2")
    with sdk(keyed, make_key(admin, team)["key"]) as client:  # the team's list, inherited
        assert "deepseek/deepseek-v3.2" in {m.id for m in client.models.list()}


def test_a_key_with_an_allowlist_must_name_its_model(simulator: SimulatorThread) -> None:
    """Without `model` and without `models.default`, OpenRouter would serve the account's default
    model, which no allowlist can vouch for: refused, unless `models` names the candidates (each
    checked). Keys without an allowlist still reach OpenRouter's default."""
    settings = gateway_settings(simulator.base_url, admin_key=ADMIN_KEY, models={"default": None})
    with (
        GatewayServer(settings) as server,
        httpx.Client(
            base_url=server.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=20
        ) as admin,
    ):
        for team, key_models in ((make_team(admin, models=["openai/*"]), None), (make_team(admin), ["openai/*"])):
            key = make_key(admin, team, **({"models": key_models} if key_models else {}))
            with httpx.Client(base_url=server.url, headers=bearer(key), timeout=20) as http:
                for body in (
                    {"messages": HELLO},
                    {"model": None, "messages": HELLO},
                    {"models": [], "messages": HELLO},
                ):
                    refused = http.post("/v1/chat/completions", json=body)
                    assert refused.status_code == 403, refused.text
                    assert refused.json()["error"]["code"] == "model_not_allowed"
                    assert refused.json()["error"]["param"] == "model"
                named = http.post("/v1/chat/completions", json={"models": ["openai/gpt-4o-mini"], "messages": HELLO})
                assert named.status_code == 200, named.text
                other_model = {"models": ["anthropic/claude-sonnet-4.5"], "messages": HELLO}
                other = http.post("/v1/chat/completions", json=other_model)
                assert other.status_code == 403 and other.json()["error"]["param"] == "models"
        with httpx.Client(base_url=server.url, headers=bearer(make_key(admin, make_team(admin))), timeout=20) as http:
            assert http.post("/v1/chat/completions", json={"messages": HELLO}).status_code == 200


def test_a_request_without_model_is_judged_on_the_configured_default(keyed: GatewayServer, admin: httpx.Client) -> None:
    allowed = make_key(admin, make_team(admin, models=["openai/*"]))  # the default, openai/gpt-4o-mini
    refused = make_key(admin, make_team(admin, models=["deepseek/*"]))
    with httpx.Client(base_url=keyed.url, timeout=20) as http:
        assert http.post("/v1/chat/completions", json={"messages": HELLO}, headers=bearer(allowed)).status_code == 200
        answer = http.post("/v1/chat/completions", json={"messages": HELLO}, headers=bearer(refused))
        assert answer.status_code == 403 and "openai/gpt-4o-mini" in answer.json()["error"]["message"]


def bearer(key: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


def test_rotation_keeps_id_and_honours_grace(keyed: GatewayServer, admin: httpx.Client) -> None:
    team = make_team(admin)
    original = make_key(admin, team)
    rotated = admin.post(f"/keys/{original['id']}/rotate", json={"grace_period_s": 1.5}).json()
    assert rotated["id"] == original["id"] and rotated["key"] != original["key"]
    assert rotated["previous_secret_valid_until"] is not None and rotated["rotated_at"] is not None
    with sdk(keyed, rotated["key"]) as new, sdk(keyed, original["key"]) as old:
        assert new.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO).choices
        assert old.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO).choices  # in grace

        def old_refused() -> bool:
            try:
                old.models.list()
                return False
            except openai.AuthenticationError:
                return True

        wait_until(old_refused, 5, "grace period end")
        assert new.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO).choices

    again = admin.post(f"/keys/{original['id']}/rotate").json()  # default grace: 0
    with sdk(keyed, rotated["key"]) as old, pytest.raises(openai.AuthenticationError):
        old.models.list()
    with sdk(keyed, again["key"]) as new:
        assert new.models.list()


def test_team_attribution_policy_and_upstream_key(
    keyed: GatewayServer, admin: httpx.Client, simulator: SimulatorThread
) -> None:
    ml = make_team(
        admin,
        app_title="ML Research",
        categories=["cli-agent"],
        upstream_key_env="TEAM_ML_OPENROUTER_KEY",
        provider={"data_collection": "deny", "zdr": True},
        defaults={"temperature": 0.3},
    )
    other = make_team(admin)
    ml_key, other_key = make_key(admin, ml)["key"], make_key(admin, other)["key"]
    body = {"provider": {"data_collection": "allow", "order": ["deepinfra"]}, "temperature": 0.9}

    sent = {}
    for name, key in (("ml", ml_key), ("other", other_key)):
        rid = new_request_id()
        with sdk(keyed, key) as client:
            client.chat.completions.create(
                model="openai/gpt-4o-mini", messages=HELLO, extra_body=body, extra_headers={"x-request-id": rid}
            )
        (sent[name],) = simulator.find(rid)

    ml_headers, ml_body = sent["ml"]["headers"], json.loads(sent["ml"]["body"])
    assert ml_headers["x-openrouter-title"] == ml_headers["x-title"] == "ML Research"
    assert ml_headers["x-openrouter-categories"] == "cli-agent"
    assert ml_headers["http-referer"] == "https://example.com/our-app"  # not overridden
    assert ml_headers["authorization"] == f"Bearer {TEAM_UPSTREAM_KEY}"
    assert ml_body["provider"] == {"data_collection": "deny", "order": ["deepinfra"], "zdr": True}  # policy wins
    assert ml_body["temperature"] == 0.9  # defaults do not override the client

    other_headers, other_body = sent["other"]["headers"], json.loads(sent["other"]["body"])
    assert other_headers["x-openrouter-title"] == "Gateway Tests"
    assert other_headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert other_body["provider"] == body["provider"]

    assert admin.patch(f"/teams/{ml}", json={"app_title": "ML Platform"}).status_code == 200
    rid = new_request_id()
    with sdk(keyed, ml_key) as client:  # a team change reaches cached keys at once
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO, extra_headers={"x-request-id": rid})
    assert simulator.find(rid)[0]["headers"]["x-openrouter-title"] == "ML Platform"


def test_team_defaults_fill_in(keyed: GatewayServer, admin: httpx.Client, simulator: SimulatorThread) -> None:
    team = make_team(admin, defaults={"temperature": 0.3, "reasoning": {"effort": "low"}})
    rid = new_request_id()
    with sdk(keyed, make_key(admin, team)["key"]) as client:
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO, extra_headers={"x-request-id": rid})
    body = json.loads(simulator.find(rid)[0]["body"])
    assert body["temperature"] == 0.3 and body["reasoning"] == {"effort": "low"}


def test_team_without_its_upstream_key_is_refused_clearly(keyed: GatewayServer, admin: httpx.Client) -> None:
    team = make_team(admin, upstream_key_env="TEAM_NOBODY_SET_THIS_KEY")
    with sdk(keyed, make_key(admin, team)["key"]) as client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
    assert caught.value.status_code == 503 and caught.value.body["code"] == "upstream_key_missing"  # type: ignore[index]


def test_declared_entries_work_and_are_read_only(
    keyed: GatewayServer, admin: httpx.Client, simulator: SimulatorThread
) -> None:
    rid = new_request_id()
    with sdk(keyed, DECLARED_KEY) as client:
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO, extra_headers={"x-request-id": rid})
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="deepseek/deepseek-v3.2", messages=HELLO)
    assert simulator.find(rid)[0]["headers"]["x-openrouter-title"] == "GitOps Team"
    shown = admin.get(f"/keys/{DECLARED_ID}").json()
    assert shown["declared"] is True and shown["team"] == "gitops"
    for response in (
        admin.post(f"/keys/{DECLARED_ID}/revoke"),
        admin.patch(f"/keys/{DECLARED_ID}", json={"rpm": 1}),
        admin.post(f"/keys/{DECLARED_ID}/rotate"),
        admin.patch("/teams/gitops", json={"rpm": 1}),
        admin.delete("/teams/gitops"),
    ):
        assert response.status_code == 409 and response.json()["error"]["code"] == "read_only"


def test_last_used_is_recorded(keyed: GatewayServer, admin: httpx.Client) -> None:
    key = make_key(admin, make_team(admin))
    assert key["last_used_at"] is None
    before = datetime.now(UTC)
    with sdk(keyed, key["key"]) as client:
        client.models.list()
    shown = wait_until(lambda: admin.get(f"/keys/{key['id']}").json()["last_used_at"], 5, "last_used_at")
    assert datetime.fromisoformat(shown) >= before - timedelta(seconds=1)


def test_team_and_key_updates(admin: httpx.Client) -> None:
    team = make_team(admin, rpm=10, budget_usd=5)
    assert admin.get(f"/teams/{team}").json()["budget_period"] == "month"  # a budget needs a period
    updated = admin.patch(f"/teams/{team}", json={"rpm": None, "tpm": 1000}).json()
    assert updated["rpm"] is None and updated["tpm"] == 1000 and updated["budget_usd"] == 5
    key = make_key(admin, team)
    renamed = admin.patch(f"/keys/{key['id']}", json={"name": "renamed", "budget_usd": 1.5, "budget_period": "day"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "renamed"
    assert renamed.json()["budget_period"] == "day"
    other = make_key(admin, team)
    clash = admin.patch(f"/keys/{other['id']}", json={"name": "renamed"})
    assert clash.status_code == 409 and clash.json()["error"]["code"] == "key_exists"
    assert admin.delete(f"/teams/{team}").status_code == 409  # active keys
    for k in (key, other):
        admin.post(f"/keys/{k['id']}/revoke")
    assert admin.delete(f"/teams/{team}").status_code == 204
    assert admin.get(f"/teams/{team}").status_code == 404


def test_a_zero_rate_limit_is_refused(admin: httpx.Client, keyed: GatewayServer) -> None:
    """0 would refuse every request, while many mean "no limit" by it: refused, saying how to
    have no limit. A budget of 0 stays allowed (it stops spend). A record stored with a 0
    before this refusal still loads and is shown."""
    team = make_team(admin)
    key = make_key(admin, team)
    for method, path, body, field in [
        ("POST", "/teams", {"name": unique("team"), "rpm": 0}, "rpm"),
        ("PATCH", f"/teams/{team}", {"tpm": 0}, "tpm"),
        ("POST", "/keys", {"name": unique("key"), "team": team, "max_concurrency": 0}, "max_concurrency"),
        ("PATCH", f"/keys/{key['id']}", {"rpm": 0}, "rpm"),
    ]:
        response = admin.request(method, path, json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"] == f"{field}: must be at least 1; leave it out for no limit"
    assert admin.patch(f"/teams/{team}", json={"budget_usd": 0}).json()["budget_usd"] == 0
    store = keyed.gateway.registry.store
    assert keyed.loop is not None
    stored = asyncio.run_coroutine_threadsafe(store.get_key(key["id"]), keyed.loop).result(10)
    legacy = stored.model_copy(update={"rpm": 0})
    asyncio.run_coroutine_threadsafe(store.update_key(legacy, old_name=stored.name), keyed.loop).result(10)
    assert admin.get(f"/keys/{key['id']}").json()["rpm"] == 0
    assert any(k["id"] == key["id"] for k in admin.get("/keys", params={"team": team}).json()["data"])


@pytest.mark.parametrize(
    "raw", [b"{not json", b'{"name": "\xff"}', b"[" * 3000 + b"]" * 3000, b'{"rpm": 1' + b"0" * 5000 + b"}"]
)
def test_admin_bodies_that_are_not_json_get_a_clear_400(admin: httpx.Client, raw: bytes) -> None:
    response = admin.post("/teams", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and error["message"] == "The body is not valid JSON."


def test_keys_list_in_pages(admin: httpx.Client) -> None:
    team = make_team(admin)
    made = [make_key(admin, team)["id"] for _ in range(5)]
    everything = admin.get("/keys", params={"team": team}).json()
    assert [k["id"] for k in everything["data"]] == made and everything["has_more"] is False
    pages, after = [], None
    while True:
        page = admin.get("/keys", params={"team": team, "limit": 2, **({"after": after} if after else {})}).json()
        pages.append([k["id"] for k in page["data"]])
        if not page["has_more"]:
            break
        after = pages[-1][-1]
    assert pages == [made[0:2], made[2:4], made[4:5]]
    admin.post(f"/keys/{made[1]}/revoke")  # filtered out, yet still a place to continue from
    active = admin.get("/keys", params={"team": team, "include_revoked": "false", "after": made[1], "limit": 2}).json()
    assert [k["id"] for k in active["data"]] == made[2:4] and active["has_more"] is True
    unknown = admin.get("/keys", params={"team": team, "after": "nosuchkey000"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "after"
    assert admin.get("/keys", params={"limit": 0}).status_code == 400


def test_changing_a_budget_amount_keeps_its_period(admin: httpx.Client) -> None:
    """Only a budget set without any period gets the default month; a PATCH of the amount alone
    (API or CLI) must not turn a daily or lifetime budget into a monthly one."""
    team = make_team(admin, budget_usd=100, budget_period="total")
    assert admin.patch(f"/teams/{team}", json={"budget_usd": 200}).json()["budget_period"] == "total"
    assert admin.get(f"/teams/{team}").json()["budget_period"] == "total"
    key = make_key(admin, team, budget_usd=10, budget_period="day")
    patched = admin.patch(f"/keys/{key['id']}", json={"budget_usd": 30}).json()
    assert (patched["budget_usd"], patched["budget_period"]) == (30, "day")
    assert admin.get(f"/keys/{key['id']}").json()["budget_period"] == "day"
    plain = make_key(admin, team)  # no budget yet: a new amount alone gets the default period
    assert admin.patch(f"/keys/{plain['id']}", json={"budget_usd": 5}).json()["budget_period"] == "month"
    explicit = admin.patch(f"/keys/{key['id']}", json={"budget_usd": 7, "budget_period": None}).json()
    assert explicit["budget_period"] == "month"  # asked for no period with a budget: the default


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/teams", {}, "name"),
        ("POST", "/teams", {"name": "bad name!"}, "name"),
        ("POST", "/teams", {"name": "t1", "rpm": -1}, "rpm"),
        ("POST", "/teams", {"name": "t1", "tpm": "lots"}, "tpm"),
        ("POST", "/teams", {"name": "t1", "budget_usd": -0.01}, "budget_usd"),
        ("POST", "/teams", {"name": "t1", "budget_period": "week"}, "budget_period"),
        ("POST", "/teams", {"name": "t1", "models": ["openai/[gpt"]}, "models"),
        ("POST", "/teams", {"name": "t1", "models": ["has space/x"]}, "models"),
        ("POST", "/teams", {"name": "t1", "models": "openai/*"}, "models"),
        ("POST", "/teams", {"name": "t1", "categories": ["Not Valid"]}, "categories"),
        ("POST", "/teams", {"name": "t1", "app_title": "two\nlines"}, "app_title"),
        ("POST", "/teams", {"name": "t1", "upstream_key_env": "lower-case"}, "upstream_key_env"),
        ("POST", "/teams", {"name": "t1", "provider": ["deny"]}, "provider"),
        ("POST", "/teams", {"name": "t1", "surprise": 1}, "surprise"),
        ("POST", "/keys", {"team": "gitops"}, "name"),
        ("POST", "/keys", {"name": "k"}, "team"),
        ("POST", "/keys", {"name": "k", "team": "no-such-team"}, "team"),
        ("POST", "/keys", {"name": "k", "team": "gitops", "max_concurrency": -5}, "max_concurrency"),
        ("POST", "/keys", {"name": "k", "team": "gitops", "expires_at": "next tuesday"}, "expires_at"),
        ("POST", "/keys", {"name": "k", "team": "gitops", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ("POST", "/keys", {"name": "k", "team": "gitops", "metadata": "x"}, "metadata"),
        ("POST", "/keys", {"name": "k", "team": "gitops", "rpm": 1.5}, "rpm"),
        ("PATCH", "/teams/gitops", {"rpm": True}, "rpm"),
        ("POST", f"/keys/{DECLARED_ID}/rotate", {"grace_period_s": -1}, "grace_period_s"),
    ],
)
def test_bad_admin_input_names_the_field(
    admin: httpx.Client, method: str, path: str, body: dict[str, Any], field: str
) -> None:
    response = admin.request(method, path, json=body)
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert field in error["message"] or error["param"] == field, error


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'"x"', b"\xff\xfe"])
def test_admin_body_not_an_object(admin: httpx.Client, raw: bytes) -> None:
    response = admin.post("/teams", content=raw, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422)
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "path",
    [
        "/keys/..%2F..%2Fetc%2Fpasswd",
        "/keys/UPPERCASEID1",
        "/keys/aaaaaaaaaaaa",
        "/teams/no-such-team",
        "/teams/..",
        "/keys/aaaaaaaaaaaa/revoke",
    ],
)
def test_unknown_admin_resources_are_404(admin: httpx.Client, path: str) -> None:
    method = "POST" if path.endswith("revoke") else "GET"
    response = admin.request(method, path)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_admin_api_is_in_the_openapi_schema(keyed: GatewayServer) -> None:
    schema = httpx.get(keyed.url + "/openapi.json").json()
    for path in (
        "/admin/teams",
        "/admin/teams/{name}",
        "/admin/keys",
        "/admin/keys/{key_id}",
        "/admin/keys/{key_id}/revoke",
        "/admin/keys/{key_id}/rotate",
    ):
        assert path in schema["paths"], path
    assert any(s.get("scheme") == "bearer" for s in schema["components"]["securitySchemes"].values())
    created = schema["paths"]["/admin/keys"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert created["$ref"].endswith("KeyWithSecret")


def test_bootstrap_key_still_works(keyed: GatewayServer) -> None:
    with sdk(keyed, CLIENT_KEY) as client:
        assert client.chat.completions.create(model="deepseek/deepseek-v3.2", messages=HELLO).choices
    assert time.time() > 0


@pytest.mark.anyio
async def test_a_record_read_while_a_change_lands_is_not_kept(tmp_path: Path) -> None:
    """A key read from the store while a change is announced (another worker revoking it) may be
    the record from before the change: it serves the request under way, but is not cached, or a
    revoked key would keep working until the cache's TTL."""
    store = SqliteStore(tmp_path / "gateway.db")  # its reads suspend (a thread): the load is really under way
    try:
        registry = Registry(store)
        await registry.create_team("ml", TeamFields())
        record, plaintext = await registry.create_key("bot", "ml", KeyFields())
        teams = TeamPolicyFactory(AttributionSettings(), "Bearer sk-or-upstream", lambda _: None)
        authenticator = KeyAuthenticator(store, teams, cache_ttl_s=30)
        first = asyncio.ensure_future(authenticator.authenticate(f"Bearer {plaintext}"))
        await asyncio.sleep(0)  # authenticate starts the load ...
        await asyncio.sleep(0)  # ... which asks the store's thread for the record
        authenticator.invalidate(f"key:{record.id}")  # as the change feed does, mid-load
        assert (await first).key_id == record.id
        # The change itself, announced too early above (or its announcement lost in a crash):
        await store.update_key(record.model_copy(update={"revoked": True}), record.name)
        with pytest.raises(AuthenticationError, match="revoked"):
            await authenticator.authenticate(f"Bearer {plaintext}")
    finally:
        await store.close()


APP = Path(__file__).resolve().parent.parent / "app"


SENSITIVE = ("hash", "secret", "digest", "admin_key")


def _names_in(node: ast.expr) -> list[str]:
    """The identifiers an expression reads (variables, attributes, called functions)."""
    found: list[str] = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            found.append(sub.id)
        elif isinstance(sub, ast.Attribute):
            found.append(sub.attr)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub is not node:
            found.append(sub.value)  # dict keys: record["hash"]
    return found


def _sensitive(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return False  # comparing with None or a literal is no secret comparison
    return any(word in name.lower() for name in _names_in(node) for word in SENSITIVE)


def _sources() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(APP.rglob("*.py"))}


def _equality_on_secrets(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, sides[:-1], sides[1:], strict=True):
            if not isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn):
                continue
            if isinstance(left, ast.Constant) or isinstance(right, ast.Constant):
                continue
            if _sensitive(left) or _sensitive(right):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_secrets_are_never_compared_with_equality() -> None:
    planted = "if record.hash == digest: ...\nok = self._bootstrap is None\nif admin_key_hash != sent: ...\n"
    assert len(_equality_on_secrets(ast.parse(planted))) == 2  # the scan catches what it looks for
    sources = _sources()
    assert len(sources) > 20 and APP / "auth" / "keys.py" in sources
    offenders = [
        f"{p.relative_to(APP.parent)}:{hit}" for p, tree in sources.items() for hit in _equality_on_secrets(tree)
    ]
    assert offenders == []


def _calls_compare_digest(function: ast.AST) -> bool:
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "compare_digest"
        for node in ast.walk(function)
    )


def _uses(function: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Attribute | ast.Name) and name in _names_in(n) for n in ast.walk(function))


def test_key_and_admin_key_checks_use_compare_digest() -> None:
    sources = _sources()
    functions = {
        (path.relative_to(APP.parent).as_posix(), node.name): node
        for path, tree in sources.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    # every function that reads a stored key hash or the admin key's hash must compare it in constant time
    readers = {where: f for where, f in functions.items() if _uses(f, "admin_key_hash") or _uses(f, "_bootstrap")}
    readers |= {where: f for where, f in functions.items() if where[0] == "app/auth/keys.py" and _uses(f, "hash")}
    checks = {where for where, f in readers.items() if _calls_compare_digest(f)}
    assert ("app/auth/keys.py", "_secret_matches") in checks  # a key's secret
    assert ("app/auth/keys.py", "authenticate") in checks  # the bootstrap key
    admin_checks = {where for where in checks if _uses(functions[where], "admin_key_hash")}
    assert admin_checks, "the admin key is not checked with compare_digest"
    assert ("app/api/admin.py", "require_admin") in admin_checks  # the admin API's guard
