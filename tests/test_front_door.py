"""Bad input at the gateway's door gets a clear OpenAI-style 4xx, never a 500; every response
carries a request id; health endpoints answer."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.simulator import SimulatorThread
from tests.support import CLIENT_KEY, GatewayServer, gateway_settings

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def error_of(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert "Traceback" not in response.text and "/app/" not in response.text
    error: dict[str, object] = body["error"]
    return error


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b'{"model": "openai/gpt-4o-mini", "messages": [', "invalid_json", None),
        (b"", "invalid_json", None),
        (b"\xff\xfe{not utf-8}", "invalid_json", None),
        (b'[{"role": "user", "content": "hi"}]', "invalid_json", None),
        (b'"just a string"', "invalid_json", None),
        (b"42", "invalid_json", None),
        (b'{"model": "openai/gpt-4o-mini"}', "missing_required_parameter", "messages"),
        (b'{"model": "openai/gpt-4o-mini", "messages": []}', "invalid_type", "messages"),
        (b'{"model": "openai/gpt-4o-mini", "messages": "hi"}', "invalid_type", "messages"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', "invalid_type", "model"),
        (
            b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
            "invalid_type",
            "stream",
        ),
        (
            b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream_options": 1}',
            "invalid_type",
            "stream_options",
        ),
        *(
            (
                b'{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (name.encode(), value),
                "invalid_type",
                name,
            )
            for name in ("max_tokens", "max_completion_tokens")
            for value in (b'"100"', b"-5", b"0", b"1.5", b"1e30", b"true")
        ),
    ],
)
def test_bad_bodies_get_400(http: httpx.Client, raw: bytes, code: str, param: str | None) -> None:
    error = error_of(http.post(CHAT, content=raw, headers=JSON), 400)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code and error["param"] == param


def test_completions_and_embeddings_require_their_fields(http: httpx.Client) -> None:
    assert error_of(http.post("/v1/completions", json={"model": "openai/gpt-4o-mini"}), 400)["param"] == "prompt"
    assert (
        error_of(http.post("/v1/embeddings", json={"model": "openai/text-embedding-3-small"}), 400)["param"] == "input"
    )


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_wrong_content_type_gets_415(http: httpx.Client, content_type: str) -> None:
    response = http.post(
        CHAT, content=b'{"messages": [{"role": "user", "content": "hi"}]}', headers={"content-type": content_type}
    )
    assert error_of(response, 415)["code"] == "unsupported_media_type"


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
def test_compressed_bodies_get_415(http: httpx.Client, encoding: str) -> None:
    """Not read as garbled JSON (gzip) nor silently as plain text (a mislabelled body)."""
    response = http.post(
        CHAT,
        content=b'{"messages": [{"role": "user", "content": "hi"}]}',
        headers={**JSON, "content-encoding": encoding},
    )
    error = error_of(response, 415)
    assert error["code"] == "unsupported_media_type" and error["param"] == "content-encoding"


def test_missing_content_type_is_read_as_json(http: httpx.Client) -> None:
    request = http.build_request("POST", CHAT, content=b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert "content-type" not in request.headers
    assert http.send(request).status_code == 200


@pytest.fixture(scope="module")
def small_gateway(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    with GatewayServer(gateway_settings(simulator.base_url, max_body_bytes=2048)) as server:
        yield server


def test_oversized_body_gets_413(small_gateway: GatewayServer) -> None:
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 4096 + b'"}]}'
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", **JSON}
    response = httpx.post(small_gateway.url + CHAT, content=big, headers=headers)
    assert error_of(response, 413)["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no content-length: the limit holds while reading
        yield big[:1000]
        yield big[1000:]

    response = httpx.post(small_gateway.url + CHAT, content=chunked(), headers=headers)
    assert error_of(response, 413)["code"] == "request_too_large"
    ok = httpx.post(
        small_gateway.url + CHAT, content=b'{"messages": [{"role": "user", "content": "hi"}]}', headers=headers
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Basic abc", f"Bearer {CLIENT_KEY}x", "Bearer sk-gw-wrong", CLIENT_KEY]
)
def test_bad_keys_get_401(gateway: GatewayServer, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (
        ("POST", CHAT),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/openai/gpt-4o-mini"),
        ("POST", "/api/v1/chat/completions"),
    ):
        response = httpx.request(
            method,
            gateway.url + path,
            headers=headers,
            json={"messages": [{"role": "user", "content": "hi"}]} if method == "POST" else None,
        )
        error = error_of(response, 401)
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert error_of(http.get("/v1/nothing-here"), 404)["code"] == "unknown_url"
    assert error_of(http.get(CHAT), 405)["type"] == "invalid_request_error"


def test_request_id_taken_from_client_or_made(http: httpx.Client) -> None:
    mine = http.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]}, headers={"x-request-id": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    made = http.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]})
    assert made.headers["x-request-id"].startswith("req_")
    hostile = http.post(CHAT, json={"messages": []}, headers={"x-request-id": "a b\tc"})
    assert hostile.headers["x-request-id"].startswith("req_")


def test_health(gateway: GatewayServer) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    for path in ("/healthz", "/readyz"):  # load balancers that probe with HEAD
        probed = httpx.head(gateway.url + path)
        assert probed.status_code == 200


def test_a_repeated_authorization_header_is_read_the_same_on_every_route(gateway: GatewayServer) -> None:
    """The first one counts, on the OpenAI routes' fast lane as on the rest."""
    for first, second, status in ((CLIENT_KEY, "sk-gw-wrong", 200), ("sk-gw-wrong", CLIENT_KEY, 401)):
        headers = [("authorization", f"Bearer {first}"), ("authorization", f"Bearer {second}")]
        chat = httpx.post(
            gateway.url + CHAT, json={"messages": [{"role": "user", "content": "hi"}]}, headers=headers, timeout=20
        )
        models = httpx.get(gateway.url + "/v1/models", headers=headers)
        assert (chat.status_code, models.status_code) == (status, status)


def test_openapi_documents_the_api(gateway: GatewayServer) -> None:
    paths = httpx.get(gateway.url + "/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/healthz", "/readyz"):
        assert path in paths
