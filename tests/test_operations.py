"""Operations (issue 7), the points the other suites show only in part: the request id on every
response; the team in the request log; the admin API on its own bind address; SIGTERM with
`--workers 2`; a Redis outage with keys made through the admin API; the compose stop timeout
covering the drain (and promtool accepting the Prometheus config); no internals in any answer
to hostile input."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.settings import Settings
from app.simulator import SimulatorThread
from tests.redis_server import RedisServer, ledger_sums
from tests.support import (
    ADMIN_KEY,
    CLIENT_KEY,
    UPSTREAM_KEY,
    GatewayProcess,
    GatewayServer,
    free_port_number,
    require_tool,
    wait_until,
)
from tests.test_metering import simulator_sums

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
GENERATED = re.compile(r"req_[0-9a-f]{24}")


def base_env(simulator: SimulatorThread, **extra: str) -> dict[str, str]:
    return {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_CONFIG": "/dev/null",
        **extra,
    }


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- 1. the request id is returned on every response ------------------------------------------------
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


# -- 2. and 3. the team in the request log; the admin API on its own bind address ------------------
@pytest.fixture(scope="module")
def fenced(simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Any:
    admin_port = free_port_number()
    log = tmp_path_factory.mktemp("fenced") / "gateway.log"
    env = base_env(simulator, GATEWAY_ADMIN_HOST="127.0.0.2", GATEWAY_ADMIN_PORT=str(admin_port))
    with GatewayProcess(env, str(log)) as gateway:
        admin_url = f"http://127.0.0.2:{admin_port}"
        wait_until(lambda: httpx.get(admin_url + "/healthz").status_code == 200, 10, "the admin listener")
        yield gateway, admin_url, log


def test_the_request_log_names_the_team_and_the_key(fenced: tuple[GatewayProcess, str, Path]) -> None:
    gateway, admin_url, log = fenced
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


def test_the_admin_api_on_its_own_bind_address(fenced: tuple[GatewayProcess, str, Path]) -> None:
    gateway, admin_url, _ = fenced
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


# -- 4. SIGTERM with `gateway serve --workers 2` -----------------------------------------------------
def zombie_status(pid: int) -> int | None:
    """The wait status of an exited, not yet reaped process (field 52 of /proc/<pid>/stat), or
    None while it runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        raise AssertionError(f"worker {pid} was reaped before its exit status was read") from None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[49]) if fields[0] == "Z" else None


async def open_stream(url: str, rid: str, opened: list[int]) -> str:
    body = {
        "model": "openai/gpt-4o-mini",
        "messages": HI,
        "stream": True,
        "simulator": {"words": 30, "chunk_delay_ms": 100},  # about 3 s
    }
    text = ""
    headers = {**CLIENT, "x-request-id": rid}
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", url + CHAT, json=body, headers=headers) as answer,
    ):
        assert answer.status_code == 200
        async for chunk in answer.aiter_text():
            if not text:
                opened.append(1)
            text += chunk
    return text


def test_sigterm_drains_every_worker(simulator: SimulatorThread, tmp_path: Path) -> None:
    redis_server = RedisServer().start()
    prefix = "wk" + uuid.uuid4().hex[:8]
    log = tmp_path / "gateway.log"
    env = base_env(
        simulator,
        GATEWAY_STORE=redis_server.url,
        GATEWAY_STORE_PREFIX=prefix,
        GATEWAY_SHUTDOWN_GRACE_S="15",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    gateway = GatewayProcess(env, str(log), args=("--workers", "2"))
    try:
        gateway.start()
        supervisor = gateway.process

        def started() -> list[int]:
            pids = [int(m) for m in re.findall(r"Started server process \[(\d+)\]", log.read_text())]
            ready = log.read_text().count("Application startup complete")
            return pids if len(pids) == 2 and ready == 2 else []

        workers = wait_until(started, 30, "two workers")
        marker = "workers-" + uuid.uuid4().hex

        async def scenario() -> list[str]:
            opened: list[int] = []
            streams = [asyncio.ensure_future(open_stream(gateway.url, f"{marker}-{i}", opened)) for i in range(6)]
            deadline = asyncio.get_running_loop().time() + 30
            while len(opened) < 6:
                assert asyncio.get_running_loop().time() < deadline, "the streams did not open"
                await asyncio.sleep(0.01)
            supervisor.send_signal(signal.SIGTERM)
            # The supervisor passes SIGTERM on to each worker, then waits for them. Hold it there
            # (SIGSTOP) so the workers' exit statuses can be read before it reaps them.
            terminated = f"Terminated child process [{workers[-1]}]"
            while terminated not in log.read_text():
                assert asyncio.get_running_loop().time() < deadline, "the supervisor did not stop its workers"
                await asyncio.sleep(0.005)
            supervisor.send_signal(signal.SIGSTOP)
            try:
                texts = await asyncio.gather(*streams)
                while None in (statuses := [zombie_status(pid) for pid in workers]):
                    assert asyncio.get_running_loop().time() < deadline + 30, "the workers did not exit"
                    await asyncio.sleep(0.01)
            finally:
                supervisor.send_signal(signal.SIGCONT)
            assert statuses == [0, 0], f"worker wait statuses {statuses} (signal number if killed)"
            return texts

        texts = asyncio.run(scenario())
        assert supervisor.wait(30) == 0
        gateway.process = None
        assert all(t.endswith("data: [DONE]\n\n") for t in texts)  # the streams finished, none cut
        text = log.read_text()
        assert text.count("Application shutdown complete") == 2 and "Traceback" not in text, text[-3000:]
        sums = ledger_sums(redis_server.url, prefix)
        assert sums["requests"] == 6, sums  # every request reached the ledger before the exit
        assert sums["completion_tokens"] == 6 * 30
    finally:
        gateway.stop()
        redis_server.cleanup()


# -- 5. a Redis outage with keys made through the admin API -----------------------------------------
def test_redis_outage_with_admin_created_keys(simulator: SimulatorThread, tmp_path: Path) -> None:
    redis_server = RedisServer(appendonly=True).start()  # keys and teams survive its restart
    env = base_env(simulator, GATEWAY_STORE=redis_server.url, GATEWAY_STORE_PREFIX="ou" + uuid.uuid4().hex[:8])
    marker = "outage-" + uuid.uuid4().hex
    counter = iter(range(1000))
    try:
        with (
            GatewayProcess(env, str(tmp_path / "gateway.log")) as gateway,
            httpx.Client(base_url=gateway.url, timeout=20) as http,
        ):
            team = "ops-" + uuid.uuid4().hex[:6]
            assert http.post("/admin/teams", json={"name": team}, headers=ADMIN).status_code == 201
            live = http.post("/admin/keys", json={"name": "live", "team": team}, headers=ADMIN).json()
            gone = http.post("/admin/keys", json={"name": "gone", "team": team}, headers=ADMIN).json()

            def chat(key: str, stream: bool = False) -> httpx.Response:
                body = {"model": "openai/gpt-4o-mini", "messages": HI, "stream": stream}
                headers = {"Authorization": f"Bearer {key}", "x-request-id": f"{marker}-{next(counter)}"}
                return http.post(CHAT, json=body, headers=headers)

            assert chat(live["key"]).status_code == 200  # known (cached) before the outage
            assert chat(gone["key"]).status_code == 200
            assert http.post(f"/admin/keys/{gone['id']}/revoke", headers=ADMIN).status_code == 200
            wait_until(lambda: chat(gone["key"]).status_code == 401, 10, "the revocation")

            redis_server.stop()
            for i in range(8):
                answer = chat(live["key"], stream=i % 2 == 1)
                assert answer.status_code == 200, answer.text  # no limits: admitted while the store is down
                refused = chat(gone["key"])
                assert refused.status_code == 401, refused.text  # revoked stays revoked
                assert refused.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/readyz").status_code == 503

            redis_server.start()
            served = simulator_sums(simulator, marker)
            assert served["billed"] == 10  # the live key's 9 and the gone key's 1 (before its revocation)

            def usage_of(key_id: str) -> dict[str, Any] | None:
                answer = http.get("/admin/usage", params={"key": key_id}, headers=ADMIN)
                return answer.json()["total"] if answer.status_code == 200 else None

            def settled() -> bool:
                live_total, gone_total = usage_of(live["id"]), usage_of(gone["id"])
                if live_total is None or gone_total is None:
                    return False
                cost = Decimal(repr(live_total["cost_usd"])) + Decimal(repr(gone_total["cost_usd"]))
                return (
                    live_total["requests"] == 9
                    and gone_total["requests"] == 1
                    and abs(cost - served["cost"]) < Decimal("1e-9")
                    and live_total["completion_tokens"] + gone_total["completion_tokens"] == served["completion"]
                    and live_total["prompt_tokens"] + gone_total["prompt_tokens"] == served["prompt"]
                )

            wait_until(settled, 30, "the ledger to hold every successful request")
            assert http.get("/readyz").status_code == 200
    finally:
        redis_server.cleanup()


# -- 6. the compose stop timeout covers the drain; promtool accepts the Prometheus config ----------
def seconds(duration: str | int | float) -> float:
    """A compose duration ("40s", "1m30s", "1500ms") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration.strip(), duration
    return sum(float(number) * units[unit] for number, unit in parts)


def test_compose_stop_timeout_covers_the_drain() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gateways = {
        name: service
        for name, service in services.items()
        if "build" in service or "gateway" in str(service.get("image", "")).split(":")[0].split("/")[-1]
    }
    assert "gateway" in gateways
    defaults = Settings.model_fields
    for name, service in gateways.items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        delay = float(environment.get("GATEWAY_SHUTDOWN_DELAY_S", defaults["shutdown_delay_s"].default))
        grace = float(environment.get("GATEWAY_SHUTDOWN_GRACE_S", defaults["shutdown_grace_s"].default))
        stop = seconds(service.get("stop_grace_period", "10s"))  # compose's default
        assert stop >= delay + grace + 10, f"{name}: stop_grace_period {stop}s < {delay} + {grace} + 10 s"


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    """promtool also checks the files the config names: the scrape key's secret, which compose
    mounts at /run/secrets/metrics_key, is given here at a path of the test's own."""
    promtool = require_tool("promtool", "prometheus")
    secret = tmp_path / "metrics_key"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    text = (ROOT / "config/prometheus/prometheus.yml").read_text()
    assert text.count("/run/secrets/metrics_key") == 1
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/run/secrets/metrics_key", str(secret)))
    check = subprocess.run(
        [promtool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout + check.stderr


# -- 7. hostile input never gets internals back --------------------------------------------------
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
