"""Issue 2, the points not shown elsewhere: the model catalogue is cached with a TTL; the
simulator's `usage.cost` follows the prices of its own `/models`; `/api/v1` serves completions,
embeddings and model retrieval like `/v1`; the OpenAI SDK snippet `serve --demo` prints works
as pasted; sequential requests reuse the shared upstream session's connections."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.simulator import SimulatorThread
from app.simulator.catalogue import MODELS
from tests.support import (
    CLIENT_KEY,
    UPSTREAM_KEY,
    GatewayServer,
    free_port_number,
    gateway_settings,
    request_id,
    wait_until,
)

HELLO = [{"role": "user", "content": "Hello there, catalogue!"}]
GATEWAY_BINARY = Path(sys.executable).with_name("gateway")


def extra(obj: Any, name: str) -> Any:
    return (obj.model_extra or {}).get(name)


def catalogue(simulator: SimulatorThread) -> dict[str, dict[str, Any]]:
    """The simulator's own `/models`, read over HTTP as the gateway reads OpenRouter's."""
    body = httpx.get(simulator.base_url + "/models", timeout=10).json()
    return {m["id"]: m for m in body["data"]}


def is_embedding(model: dict[str, Any]) -> bool:
    return bool(model["architecture"]["output_modalities"] == ["embeddings"])


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=CLIENT_KEY, max_retries=0, timeout=20)


# -- 1. the catalogue is cached with a TTL ---------------------------------------------------------


def test_models_are_fetched_once_per_ttl_and_keep_pricing() -> None:
    ttl = 3.0
    sim = SimulatorThread(api_keys={UPSTREAM_KEY}).start()  # its own, so every GET /models is ours
    try:

        def fetches() -> list[dict[str, Any]]:
            return [e for e in sim.requests() if e["method"] == "GET" and e["path"] == "/api/v1/models"]

        settings = gateway_settings(sim.base_url, upstream={"catalog_ttl_s": ttl})
        with GatewayServer(settings) as gateway, sdk(gateway.url + "/v1") as client:
            started = time.monotonic()
            first = {m.id: m for m in client.models.list()}
            second = {m.id: m for m in client.models.list()}
            client.models.retrieve("openai/gpt-4o-mini")
            assert time.monotonic() - started < ttl, "the machine is too slow for this TTL"
            assert len(fetches()) == 1  # three answers within the TTL, one upstream GET /models
            assert first.keys() == second.keys()
            for listed in MODELS:  # OpenRouter's pricing and context fields survive as extras
                ours = first[listed["id"]]
                assert extra(ours, "pricing") == listed["pricing"]
                assert extra(ours, "context_length") == listed["context_length"]
                assert extra(ours, "top_provider") == listed["top_provider"]
            deepseek = first["deepseek/deepseek-v3.2"]
            assert extra(deepseek, "context_length") == 163840
            assert extra(deepseek, "pricing")["prompt"] == "0.00000028"
            assert extra(deepseek, "pricing")["completion"] == "0.0000004"

            fetched_at = time.monotonic()
            wait_until(lambda: time.monotonic() - fetched_at > ttl, 10, "the TTL to pass")
            stale = {m.id: m for m in client.models.list()}  # served at once, refreshed behind it
            assert stale.keys() == first.keys()
            wait_until(lambda: len(fetches()) == 2, 10, "a second GET /models after the TTL")
            again = client.models.retrieve("deepseek/deepseek-v3.2")
            assert extra(again, "context_length") == 163840
            assert extra(again, "pricing") == extra(deepseek, "pricing")
            assert len(fetches()) == 2  # fresh again: no third fetch
    finally:
        sim.stop()


# -- 2. the simulator's cost follows the prices it lists -----------------------------------------


def expected_cost(model: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> float:
    pricing = model["pricing"]
    return float(
        prompt_tokens * Decimal(pricing["prompt"])
        + completion_tokens * Decimal(pricing["completion"])
        + Decimal(pricing.get("request", "0"))
    )


def chat_model_ids() -> list[str]:
    return [m["id"] for m in MODELS if m["architecture"]["output_modalities"] != ["embeddings"]]


@pytest.mark.parametrize("model_id", chat_model_ids())
def test_chat_cost_is_tokens_times_the_listed_prices(
    model_id: str, client: openai.OpenAI, simulator: SimulatorThread
) -> None:
    model = catalogue(simulator)[model_id]
    rid = request_id()
    reply = client.chat.completions.create(
        model=model_id, messages=HELLO, extra_body={"simulator": {"words": 12}}, extra_headers={"x-request-id": rid}
    )
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens >= 12
    cost = extra(usage, "cost")
    assert cost == pytest.approx(expected_cost(model, usage.prompt_tokens, usage.completion_tokens), abs=1e-12)
    if model_id.endswith(":free"):
        assert cost == 0
    else:
        assert cost > 0
    (logged,) = simulator.find(rid)
    assert logged["cost"] == cost  # what the simulator served is what the client was told


def test_streamed_usage_cost_follows_the_listed_prices(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    model = catalogue(simulator)["deepseek/deepseek-v3.2"]
    stream = client.chat.completions.create(
        model="deepseek/deepseek-v3.2",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"simulator": {"words": 20}},
    )
    usage = [c.usage for c in stream if c.usage is not None][-1]
    cost = extra(usage, "cost")
    assert cost > 0
    assert cost == pytest.approx(expected_cost(model, usage.prompt_tokens, usage.completion_tokens), abs=1e-12)


def test_embedding_cost_follows_the_listed_prices(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    models = [m for m in catalogue(simulator).values() if is_embedding(m)]
    assert len(models) >= 2
    costs = {}
    for model in models:
        result = client.embeddings.create(model=model["id"], input=["one text to embed", "and another, longer one"])
        usage = result.usage
        assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens
        cost = extra(usage, "cost")
        assert cost > 0
        assert cost == pytest.approx(expected_cost(model, usage.prompt_tokens, 0), abs=1e-12)
        costs[model["id"]] = cost
    assert len(set(costs.values())) == len(costs)  # priced per model, not one flat rate


# -- 3. /api/v1 works like /v1 ----------------------------------------------------------------


def test_api_v1_prefix_serves_completions_embeddings_and_models_like_v1(gateway: GatewayServer) -> None:
    with sdk(gateway.url + "/v1") as v1, sdk(gateway.url + "/api/v1") as api:
        results = []
        for client in (v1, api):
            text = client.completions.create(model="openai/gpt-4o-mini", prompt="Say hello")
            streamed = "".join(
                c.choices[0].text
                for c in client.completions.create(model="openai/gpt-4o-mini", prompt="Say hello", stream=True)
                if c.choices
            )
            vectors = client.embeddings.create(model="openai/text-embedding-3-small", input=["alpha", "beta"])
            model = client.models.retrieve("deepseek/deepseek-v3.2")
            alias = client.models.retrieve("gpt-4o-mini")
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve("nobody/no-such-model")
            assert text.object == "text_completion" and text.choices[0].text
            assert streamed == text.choices[0].text
            assert vectors.object == "list" and len(vectors.data) == 2 and extra(vectors.usage, "cost") > 0
            assert model.id == "deepseek/deepseek-v3.2" and extra(model, "context_length") == 163840
            assert extra(alias, "alias_of") == "openai/gpt-4o-mini"
            results.append(
                (
                    text.choices[0].text,
                    text.usage.model_dump() if text.usage else None,
                    [d.embedding for d in vectors.data],
                    model.model_dump(),
                    alias.model_dump(),
                )
            )
        assert results[0] == results[1]


# -- 4. the demo's OpenAI SDK snippet works as printed ------------------------------------------


def test_demo_prints_an_sdk_snippet_that_answers(tmp_path: Path) -> None:
    assert GATEWAY_BINARY.exists(), "install the project (uv sync, or uv run pytest) to get the console script"
    port = free_port_number()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENROUTER_", "OPENAI_"))}
    nowhere = "http://192.0.2.1:9/unreachable"  # the demo and the snippet must need none of these
    env.update(OPENROUTER_BASE_URL=nowhere, OPENAI_BASE_URL=nowhere, OPENAI_API_KEY="sk-not-the-demo-key")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    out = tmp_path / "demo.out"
    with out.open("w") as sink:
        process = subprocess.Popen(
            [str(GATEWAY_BINARY), "serve", "--demo", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:

        def up() -> bool:
            if process.poll() is not None:
                return True
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, "demo start")
        assert process.poll() is None, out.read_text()
        printed = out.read_text()
        found = re.search(r"^( +from openai import OpenAI\n(?: +.*\n)+)", printed, re.M)
        assert found, printed
        snippet = textwrap.dedent(found.group(1))
        assert f"127.0.0.1:{port}" in snippet and "print(" in snippet
        result = subprocess.run(
            [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Hello from deepseek/deepseek-v3.2"), result.stdout
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, out.read_text()


# -- 5. one shared upstream session: connections are reused -------------------------------------


class CountingProxy:
    """A plain TCP relay in front of the simulator that counts the connections it accepts."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.peers: list[int] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="counting-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, peer = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self.peers.append(int(peer[1]))
                self._sockets += [inbound, outbound]
            for src, dst in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.peers)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def proxied(simulator: SimulatorThread) -> Iterator[tuple[GatewayServer, CountingProxy]]:
    proxy = CountingProxy(simulator.port)
    try:
        with GatewayServer(gateway_settings(f"http://127.0.0.1:{proxy.port}/api/v1")) as server:
            yield server, proxy
    finally:
        proxy.close()


def test_sequential_requests_reuse_upstream_connections(
    proxied: tuple[GatewayServer, CountingProxy], simulator: SimulatorThread
) -> None:
    gateway, proxy = proxied
    ids = [request_id() for _ in range(12)]
    with sdk(gateway.url + "/v1") as client:
        for n, rid in enumerate(ids):
            headers = {"x-request-id": rid}
            if n % 3 == 0:
                client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO, extra_headers=headers)
            elif n % 3 == 1:
                chunks = client.chat.completions.create(
                    model="openai/gpt-4o-mini", messages=HELLO, stream=True, extra_headers=headers
                )
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                client.embeddings.create(model="openai/text-embedding-3-small", input="reuse", extra_headers=headers)
    assert all(len(simulator.find(rid)) == 1 for rid in ids)  # every request went through the relay
    # 12 requests and the catalogue fetch, one after another: one pooled connection carries them
    # (two allowed, should the pool ever drop one); a session per request would open 13.
    assert 1 <= proxy.connections <= 2, proxy.peers
