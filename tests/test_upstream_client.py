"""The upstream client (app/upstream/client.py): OpenRouter is reached through one shared aiohttp
session whose connections sequential requests reuse, and the serving path never imports httpx."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import openai
import pytest

from app.simulator import SimulatorThread
from tests.support import (
    CLIENT_KEY,
    GatewayServer,
    gateway_settings,
    request_id,
)

HELLO = [{"role": "user", "content": "Hello there, catalogue!"}]


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=CLIENT_KEY, max_retries=0, timeout=20)


def test_upstream_is_one_aiohttp_session_and_serving_never_imports_httpx(gateway: GatewayServer) -> None:
    """OpenRouter is reached through one shared aiohttp session; httpx (measured ~7x slower under
    load on its default transport) serves the CLI and the tests only, and the serving path does
    not even import it."""
    import subprocess
    import sys

    import aiohttp

    session = gateway.server.config.app.state.gateway.client._session
    assert isinstance(session, aiohttp.ClientSession) and not session.closed
    probe = (
        "import sys, app.cli, app.cli.serve, app.server, app.logs, app.api.edge, app.upstream.client\n"
        "from app.main import create_app, create_admin_app\n"
        "print('httpx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


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
