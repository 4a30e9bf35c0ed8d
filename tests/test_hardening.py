"""Hostile input and the authorisation matrix: limits on headers and nesting, huge numbers,
invalid UTF-8, header injection through attribution fields, path traversal in ids, CORS off by
default, the admin API on its own address; every route refuses every wrong credential with the
right status. No input gets a 5xx, a stack trace or an internal path."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
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
    GatewayServer,
    free_port_number,
)

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def clean(response: httpx.Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert "Traceback" not in response.text and "/work/" not in response.text and ".py" not in response.text
    assert response.headers.get("x-request-id")
    body: dict[str, Any] = response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def test_header_limits(http: httpx.Client) -> None:
    many = {f"x-extra-{i}": "1" for i in range(150)}
    assert clean(http.post(CHAT, json={"messages": HI}, headers=many), 431)["code"] == "request_header_fields_too_large"
    huge = {"x-big": "y" * 40_000}
    assert clean(http.get("/v1/models", headers=huge), 431)["code"] == "request_header_fields_too_large"


@pytest.mark.parametrize("depth", [80, 5000])
def test_deep_nesting_is_refused(http: httpx.Client, depth: int) -> None:
    raw = (
        json.dumps({"model": "openai/gpt-4o-mini", "messages": HI, "metadata": nested(depth)})
        if depth < 900
        else '{"messages": [], "x": ' + "[" * depth + "]" * depth + "}"
    )
    error = clean(http.post(CHAT, content=raw, headers={"content-type": "application/json"}), 400)
    assert error["code"] in ("json_too_deep", "invalid_json")


def test_deep_nesting_in_admin_bodies(keyed: GatewayServer) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
    for raw in (
        '{"name": "deep", "metadata": ' + "[" * 3000 + "]" * 3000 + "}",
        json.dumps({"name": "deep2", "provider": nested(200)}),
    ):
        response = httpx.post(keyed.url + "/admin/teams", content=raw, headers=headers)
        clean(response, (400, 422))


@pytest.mark.parametrize(
    "field",
    [
        '"max_tokens": 1e400',
        '"temperature": 123456789012345678901234567890123',
        '"seed": -99999999999999999999999999',
        '"max_tokens": 1.7976931348623157e308',
    ],
)
def test_huge_numbers(http: httpx.Client, field: str) -> None:
    raw = '{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], ' + field + "}"
    response = http.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert response.status_code in (200, 400), response.text  # answered or refused, never a 5xx
    if response.status_code == 400:
        clean(response, 400)


@pytest.mark.parametrize(
    "body", [{"name": "t", "rpm": 1e30}, {"name": "t", "budget_usd": 1e308}, {"name": "t", "tpm": -1e20}]
)
def test_huge_numbers_in_admin(keyed: GatewayServer, body: dict[str, Any]) -> None:
    response = httpx.post(keyed.url + "/admin/teams", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    clean(response, (400, 422))


def test_invalid_utf8_everywhere(keyed: GatewayServer) -> None:
    for path, headers in (
        (CHAT, {"Authorization": f"Bearer {CLIENT_KEY}"}),
        ("/admin/teams", {"Authorization": f"Bearer {ADMIN_KEY}"}),
    ):
        response = httpx.post(
            keyed.url + path,
            content=b'{"name": "\xff\xfe", "messages": []}',
            headers={**headers, "content-type": "application/json"},
        )
        clean(response, (400, 422))


@pytest.mark.parametrize(
    "field",
    [
        {"app_title": "Legit\r\nX-Injected: yes"},
        {"app_url": "https://a.example\nX: y"},
        {"categories": ["cli-agent\r\nx-evil: 1"]},
        {"app_title": "tab\tinside"},
    ],
)
def test_header_injection_through_attribution(keyed: GatewayServer, field: dict[str, Any]) -> None:
    response = httpx.post(
        keyed.url + "/admin/teams",
        json={"name": "inj-" + uuid.uuid4().hex[:6], **field},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    clean(response, (400, 422))


@pytest.mark.parametrize(
    "path",
    [
        "/admin/teams/..%2F..%2Fetc%2Fpasswd",
        "/admin/keys/%2e%2e%2fadmin",
        "/admin/keys/" + "a" * 5000,
        "/admin/teams/%00",
        "/v1/models/..%2F..%2Fadmin",
    ],
)
def test_path_traversal(keyed: GatewayServer, path: str) -> None:
    key = CLIENT_KEY if path.startswith("/v1") else ADMIN_KEY
    response = httpx.get(keyed.url + path, headers={"Authorization": f"Bearer {key}"})
    clean(response, 404)


def test_cors_is_off_by_default(http: httpx.Client) -> None:
    preflight = http.options(CHAT, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    response = http.post(CHAT, json={"messages": HI}, headers={"Origin": "https://evil.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


@pytest.fixture(scope="module")
def fenced(
    simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, int]]:
    admin_port = free_port_number()
    env = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_ADMIN_PORT": str(admin_port),
        "GATEWAY_CORS_ORIGINS": '["https://app.example"]',
    }
    path = tmp_path_factory.mktemp("fenced") / "gateway.log"
    with GatewayProcess(env, str(path)) as gateway:
        yield gateway, admin_port


def test_admin_api_on_its_own_port(fenced: tuple[GatewayProcess, int]) -> None:
    gateway, admin_port = fenced
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    clean(httpx.get(gateway.url + "/admin/teams", headers=admin), 404)
    clean(httpx.get(gateway.url + "/metrics", headers=admin), 404)  # names keys and teams, shows spend: not here
    assert clean(httpx.get(f"http://127.0.0.1:{admin_port}/metrics"), 401)["code"] == "invalid_api_key"
    assert b"gateway_requests_total" in httpx.get(f"http://127.0.0.1:{admin_port}/metrics", headers=admin).content
    listing = httpx.get(f"http://127.0.0.1:{admin_port}/admin/teams", headers=admin)
    assert listing.status_code == 200 and listing.json()["object"] == "list"
    client = {"Authorization": f"Bearer {CLIENT_KEY}"}
    assert httpx.get(f"http://127.0.0.1:{admin_port}/v1/models", headers=client).status_code == 404
    for path in (CHAT, "/api/v1/chat/completions", "/v1/embeddings", "/v1/completions"):  # no inference there
        inference = httpx.post(f"http://127.0.0.1:{admin_port}{path}", json={"messages": HI}, headers=client)
        clean(inference, 404)
    assert (
        httpx.post(
            gateway.url + CHAT, json={"messages": HI}, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        ).status_code
        == 200
    )


def test_cors_when_configured(fenced: tuple[GatewayProcess, int]) -> None:
    gateway, _ = fenced
    preflight = httpx.options(
        gateway.url + CHAT,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    response = httpx.post(
        gateway.url + CHAT,
        json={"messages": HI},
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "Origin": "https://app.example"},
    )
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.post(
        gateway.url + CHAT,
        json={"messages": HI},
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "Origin": "https://evil.example"},
    )
    assert "access-control-allow-origin" not in other.headers


# -- the authorisation matrix ---------------------------------------------------------------------
CLIENT_ROUTES = [
    (method, prefix + path)
    for prefix in ("/v1", "/api/v1")
    for method, path in (
        ("POST", "/chat/completions"),
        ("POST", "/completions"),
        ("POST", "/embeddings"),
        ("GET", "/models"),
        ("GET", "/models/openai/gpt-4o-mini"),
    )
]
ADMIN_ROUTES = [
    ("GET", "/admin/teams"),
    ("POST", "/admin/teams"),
    ("GET", "/admin/teams/gitops"),
    ("PATCH", "/admin/teams/gitops"),
    ("DELETE", "/admin/teams/gitops"),
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys"),
    ("GET", "/admin/keys/declared0key"),
    ("PATCH", "/admin/keys/declared0key"),
    ("POST", "/admin/keys/declared0key/revoke"),
    ("POST", "/admin/keys/declared0key/rotate"),
    ("GET", "/admin/usage"),
]
BODIES = {
    "/chat/completions": {"model": "deepseek/deepseek-v3.2", "messages": HI},
    "/completions": {"model": "deepseek/deepseek-v3.2", "prompt": "hi"},
    "/embeddings": {"model": "qwen/qwen3-embedding-8b", "input": "hi"},
}


@pytest.fixture(scope="module")
def credentials(keyed: GatewayServer) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    team = "authz-" + uuid.uuid4().hex[:6]
    other = "authz-other-" + uuid.uuid4().hex[:6]
    httpx.post(keyed.url + "/admin/teams", json={"name": team}, headers=admin).raise_for_status()
    httpx.post(
        keyed.url + "/admin/teams", json={"name": other, "models": ["openai/*"]}, headers=admin
    ).raise_for_status()
    revoked = httpx.post(keyed.url + "/admin/keys", json={"name": "r", "team": team}, headers=admin).json()
    httpx.post(keyed.url + f"/admin/keys/{revoked['id']}/revoke", headers=admin).raise_for_status()
    foreign = httpx.post(keyed.url + "/admin/keys", json={"name": "f", "team": other}, headers=admin).json()
    return {"revoked": revoked["key"], "other_team": foreign["key"]}


def call(gateway: GatewayServer, method: str, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = next((b for suffix, b in BODIES.items() if path.endswith(suffix)), None)
    if path.startswith("/admin") and method in ("POST", "PATCH"):
        body = {}
    return httpx.request(method, gateway.url + path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path"), CLIENT_ROUTES)
def test_client_routes_refuse_wrong_credentials(
    keyed: GatewayServer, credentials: dict[str, str], method: str, path: str
) -> None:
    for key in (None, "sk-gw-wrongwrongwr-" + "x" * 32, credentials["revoked"], ADMIN_KEY, UPSTREAM_KEY):
        assert clean(call(keyed, method, path, key), 401)["code"] == "invalid_api_key", key
    if method == "POST":  # a key of a team that may not use this model
        assert clean(call(keyed, method, path, credentials["other_team"]), 403)["code"] == "model_not_allowed"
    elif path.endswith("gpt-4o-mini"):
        assert call(keyed, method, path, credentials["other_team"]).status_code == 200
    else:  # the other team's key sees only its own models
        models = {m["id"] for m in call(keyed, method, path, credentials["other_team"]).json()["data"]}
        assert models and all(m.startswith("openai/") or "/" not in m for m in models)


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_routes_refuse_non_admin_credentials(
    keyed: GatewayServer, credentials: dict[str, str], method: str, path: str
) -> None:
    for key in (None, "wrong", CLIENT_KEY, credentials["other_team"], credentials["revoked"], UPSTREAM_KEY):
        assert clean(call(keyed, method, path, key), 401)["code"] == "invalid_api_key", key


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/docs"])
def test_public_routes(keyed: GatewayServer, path: str) -> None:
    assert httpx.get(keyed.url + path).status_code == 200


def test_metrics_refuse_every_credential_but_the_scrape_and_admin_keys(
    keyed: GatewayServer, credentials: dict[str, str]
) -> None:
    for key in (None, "wrong", CLIENT_KEY, credentials["other_team"], credentials["revoked"], UPSTREAM_KEY):
        refused = call(keyed, "GET", "/metrics", key)
        assert clean(refused, 401)["code"] == "invalid_api_key", key
        assert "gateway_" not in refused.text
    for key in (METRICS_KEY, ADMIN_KEY):
        assert b"gateway_requests_total" in call(keyed, "GET", "/metrics", key).content


def test_no_secret_in_the_schema(keyed: GatewayServer, tmp_path: Path) -> None:
    text = httpx.get(keyed.url + "/openapi.json").text
    for secret in (ADMIN_KEY, CLIENT_KEY, UPSTREAM_KEY):
        assert secret not in text


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}


def test_the_admin_api_on_its_own_bind_address(admin_on_own_host: tuple[GatewayProcess, str, Path]) -> None:
    gateway, admin_url, _ = admin_on_own_host
    admin_port = int(admin_url.rsplit(":", 1)[1])
    listing = httpx.get(admin_url + "/admin/teams", headers=ADMIN)
    assert listing.status_code == 200 and listing.json()["object"] == "list"
    with pytest.raises(httpx.ConnectError):  # bound to 127.0.0.2 only
        httpx.get(f"http://127.0.0.1:{admin_port}/admin/teams", headers=ADMIN, timeout=5)
    on_main = httpx.get(gateway.url + "/admin/teams", headers=ADMIN)
    assert on_main.status_code == 404 and on_main.json()["error"]["code"] == "unknown_url"
    assert httpx.post(gateway.url + "/admin/teams", json={"name": "x"}, headers=ADMIN).status_code == 404
    inference = httpx.post(
        admin_url + CHAT, json={"model": "openai/gpt-4o-mini", "messages": HI}, headers=CLIENT, timeout=20
    )
    assert inference.status_code == 404, inference.text
    served = httpx.post(
        gateway.url + CHAT, json={"model": "openai/gpt-4o-mini", "messages": HI}, headers=CLIENT, timeout=20
    )
    assert served.status_code == 200  # the same body is served on the main address


LEAKS = ("Traceback", 'File "', "/work/", "site-packages", '.py"')


CHAT_FIELDS = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "n",
    "stop",
    "seed",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "reasoning",
    "reasoning_effort",
    "provider",
    "models",
    "transforms",
    "usage",
    "metadata",
    "prediction",
    "modalities",
]


WRONG = ["text", 12345, -1.5, True, None, [], [1, "a", None], {"x": {"y": [1]}}, 10**30, ""]


def no_internals(answer: httpx.Response, what: str) -> None:
    for leak in LEAKS:
        assert leak not in answer.text, (what, answer.status_code, answer.text[:500])
    assert answer.status_code != 500, (what, answer.text[:500])  # an unhandled error in the gateway


@pytest.mark.parametrize("field", CHAT_FIELDS)
def test_wrong_types_in_every_chat_field(keyed: GatewayServer, field: str) -> None:
    with httpx.Client(base_url=keyed.url, headers=CLIENT, timeout=20) as http:
        for i, value in enumerate(WRONG):
            body: dict[str, Any] = {"model": "openai/gpt-4o-mini", "messages": HI, field: value}
            if field != "stream":
                body["stream"] = i % 2 == 1
            with http.stream("POST", CHAT, json=body) as answer:
                answer.read()
            no_internals(answer, f"{field}={value!r}")


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        (CHAT, b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
        (CHAT, b"\xc3\x28\xa0\xa1"),
        ("/v1/embeddings", b'{"model": "qwen/qwen3-embedding-8b", "input": "\xed\xa0\x80"}'),
        ("/v1/completions", b'{"model": "openai/gpt-4o-mini", "prompt": "\x80"}'),
        ("/admin/teams", b'{"name": "\xff"}'),
        ("/admin/keys", b'{"name": "k", "team": "\xf0\x28\x8c\x28"}'),
        (CHAT, b'{"model": "openai/gpt-4o-mini", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}"),
        (CHAT, b'{"model": "openai/gpt-4o-mini", "messages": [], "temperature": 1e99999}'),
        (CHAT, b'{"model": "openai/gpt-4o-mini", "messages": [], "n": -' + b"9" * 400 + b"}"),
        ("/admin/keys", b'{"name": "k", "team": "t", "rpm": ' + b"9" * 5000 + b"}"),
        ("/admin/teams", b'{"name": "t", "budget_usd": 1e99999}'),
        (CHAT, b"[]"),
        (CHAT, b"null"),
        (CHAT, b'"a string"'),
        ("/admin/teams", b"12345"),
    ],
)
def test_invalid_utf8_and_huge_numbers(keyed: GatewayServer, path: str, raw: bytes) -> None:
    headers = {**(ADMIN if path.startswith("/admin") else CLIENT), "content-type": "application/json"}
    answer = httpx.post(keyed.url + path, content=raw, headers=headers, timeout=20)
    no_internals(answer, f"{path} {raw[:60]!r}")
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "GET", "POST", "OPTIONS", "TRACE"])
def test_unknown_methods_on_known_paths(keyed: GatewayServer, method: str) -> None:
    paths = [
        CHAT,
        "/api/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/openai/gpt-4o-mini",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/admin/teams",
        "/admin/keys",
        "/admin/usage",
        "/admin/keys/nosuchkey000/revoke",
    ]
    for path in paths:
        headers = ADMIN if path.startswith("/admin") else CLIENT
        answer = httpx.request(method, keyed.url + path, headers=headers, content=b"{}", timeout=20)
        no_internals(answer, f"{method} {path}")
        assert answer.status_code < 500, (method, path, answer.status_code)
        if answer.status_code == 405:
            assert answer.json()["error"]["code"] == "http_405"
