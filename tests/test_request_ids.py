"""Request ids (app/request_ids.py): the client's sane x-request-id comes back on every kind of
response, fast-lane answers included; one is generated when none is sent; an insane one is
replaced; raw control bytes never reach the app."""

from __future__ import annotations

import re
import socket
import uuid
from typing import Any

import httpx
import pytest

from tests.support import (
    ADMIN_KEY,
    CLIENT_KEY,
    GatewayServer,
)

CHAT = "/v1/chat/completions"


HI = [{"role": "user", "content": "hi"}]


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}


GENERATED = re.compile(r"req_[0-9a-f]{24}")


def every_kind_of_response(url: str, rid: bytes | None) -> dict[str, httpx.Response]:
    """One response of each kind, all sent with `rid` as x-request-id (or none)."""
    sent = {"x-request-id": rid} if rid is not None else {}
    team = "rid-" + uuid.uuid4().hex[:8]
    answers: dict[str, httpx.Response] = {}
    with httpx.Client(base_url=url, timeout=20) as http:
        body = {"model": "openai/gpt-4o-mini", "messages": HI, "stream": True}
        with http.stream("POST", CHAT, json=body, headers={**CLIENT, **sent}) as streamed:
            text = "".join(streamed.iter_text())
        assert streamed.status_code == 200 and text.endswith("data: [DONE]\n\n")
        answers["stream"] = streamed
        answers["/metrics"] = http.get("/metrics", headers={**ADMIN, **sent})
        for path in ("/healthz", "/readyz", "/openapi.json"):
            answers[path] = http.get(path, headers=sent)
        answers["/v1/models"] = http.get("/v1/models", headers={**CLIENT, **sent})
        answers["admin 201"] = http.post("/admin/teams", json={"name": team}, headers={**ADMIN, **sent})
        answers["admin 200"] = http.get(f"/admin/teams/{team}", headers={**ADMIN, **sent})
        answers["admin 204"] = http.delete(f"/admin/teams/{team}", headers={**ADMIN, **sent})
        answers["404"] = http.get("/no/such/route", headers={**CLIENT, **sent})
    expected = {"admin 201": 201, "admin 204": 204, "404": 404}
    for kind, response in answers.items():
        assert response.status_code == expected.get(kind, 200), (kind, response.status_code)
    return answers


def test_the_clients_sane_request_id_comes_back_on_every_response(keyed: GatewayServer) -> None:
    rid = "ops-" + uuid.uuid4().hex
    for kind, response in every_kind_of_response(keyed.url, rid.encode()).items():
        assert response.headers.get("x-request-id") == rid, kind


def test_a_request_id_is_generated_when_none_is_sent(keyed: GatewayServer) -> None:
    answers = every_kind_of_response(keyed.url, None)
    seen = set()
    for kind, response in answers.items():
        rid = response.headers.get("x-request-id", "")
        assert GENERATED.fullmatch(rid), (kind, rid)
        seen.add(rid)
    assert len(seen) == len(answers) == 10  # one per response, never reused


@pytest.mark.parametrize(
    "insane",
    [b"x" * 300, b"has spaces inside", b"tab\tinside", b"caf\xc3\xa9", b"quote\"and'<script>"],
    ids=["300-chars", "spaces", "control-char-tab", "non-ascii", "quotes-are-sane"],
)
def test_an_insane_request_id_is_replaced(keyed: GatewayServer, insane: bytes) -> None:
    sane = all(33 <= byte < 127 for byte in insane) and len(insane) <= 128
    for kind, response in every_kind_of_response(keyed.url, insane).items():
        rid = response.headers.get("x-request-id", "")
        if sane:  # printable ASCII without spaces is kept, quotes included
            assert rid == insane.decode(), kind
        else:
            assert GENERATED.fullmatch(rid), (kind, rid)


def test_raw_control_bytes_in_the_request_id_never_reach_the_app(keyed: GatewayServer) -> None:
    """DEL or \\x01 in a header are refused by the HTTP parser itself (400, plain text): the id can
    neither be echoed nor logged."""
    for value in (b"abc\x01def", b"abc\x7fdef"):
        with socket.create_connection(("127.0.0.1", keyed.port), timeout=10) as conn:
            conn.sendall(
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-request-id: " + value + b"\r\n\r\n"
            )
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        head = answer.split(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 400 ") and value not in answer, answer


HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]


MODEL = "openai/gpt-4o-mini"


def test_every_fast_lane_answer_carries_the_request_id(gateway: GatewayServer) -> None:
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    many_headers = {f"x-filler-{i}": "y" for i in range(120)}
    cases: dict[str, tuple[dict[str, str], Any, int]] = {
        "200": (auth, {"model": MODEL, "messages": HELLO}, 200),
        "401": ({"Authorization": "Bearer sk-gw-nope"}, {"model": MODEL, "messages": HELLO}, 401),
        "400": (auth, {"model": MODEL}, 400),
        "upstream 503": (auth, {"model": MODEL, "messages": HELLO, "simulator": {"status": 503}}, 502),
        "431": ({**auth, **many_headers}, {"model": MODEL, "messages": HELLO}, 431),
    }
    with httpx.Client(base_url=gateway.url, timeout=20) as http:
        for kind, (headers, body, status) in cases.items():
            rid = f"hot-{kind.replace(' ', '-')}-{uuid.uuid4().hex[:8]}"
            response = http.post("/v1/chat/completions", json=body, headers={**headers, "x-request-id": rid})
            assert response.status_code == status, (kind, response.text)
            assert response.headers.get("x-request-id") == rid, kind
            assert response.headers.get("content-type", "").startswith("application/json"), kind
            assert list(response.headers.keys()).count("x-request-id") == 1, kind
