"""A real `redis-server` on a free port (and a unix socket), for tests that need Redis; with
`tls`, it listens on that port with TLS only. Missing redis-server skips those tests locally and
fails them under CI=true (a skipped test in CI counts as missing)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from app.store.redis import RedisStore
from tests.certificates import Certificates


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(
        self, appendonly: bool = False, tls: Certificates | None = None, tls_auth_clients: bool = False
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed (CI must install it)")
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="gateway-redis-")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.appendonly = appendonly
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Plain: by address. TLS: by the name in the server's certificate (`localhost`), with no
        TLS options yet (a test adds the ones it means)."""
        return f"rediss://localhost:{self.port}/0" if self.tls else f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.binary,
                *self._listen_args(),
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                self.socket,
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self._ping():
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return [
            *("--port", "0", "--tls-port", str(self.port)),
            *("--tls-cert-file", str(self.tls.server_cert), "--tls-key-file", str(self.tls.server_key)),
            *("--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "yes" if self.tls_auth_clients else "no"),
        ]

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as plain:
            if self.tls is None:
                plain.sendall(b"PING\r\n")
                return plain.recv(16).startswith(b"+PONG")
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
            with context.wrap_socket(plain, server_hostname="localhost") as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def down_while(self, progress: Callable[[], int], answered: int = 10, timeout: float = 60) -> None:
        """Stop the server until `answered` more requests (counted by `progress`) were answered
        without it, then start it again."""
        self.stop()
        before = progress()
        deadline = time.monotonic() + timeout
        while progress() < before + answered:
            if time.monotonic() > deadline:
                raise AssertionError(f"{answered} requests were not answered with Redis down")
            time.sleep(0.01)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def dump(url: str) -> bytes:
    """Every key and value in the server, as bytes: for scanning it for secrets."""
    import redis

    client = redis.Redis.from_url(url)
    readers = {
        "string": client.get,
        "hash": client.hgetall,
        "set": client.smembers,
        "zset": lambda name: client.zrange(name, 0, -1, withscores=True),
        "list": lambda name: client.lrange(name, 0, -1),
    }
    out = b""
    try:
        for name in client.scan_iter(match="*", count=1000):
            kind = client.type(name).decode()
            if kind == "none":  # gone since the scan saw it (a lease set emptied by a settlement)
                continue
            out += name + b"=" + repr(readers[kind](name)).encode() + b"\n"
    finally:
        client.close()
    return out


def ledger_sums(url: str, prefix: str) -> dict[str, int]:
    """Today's ledger in a Redis store, summed per measure (requests, tokens, cost, ...)."""

    async def read() -> tuple[dict[str, dict[str, int]], dict[str, str]]:
        store = RedisStore(url, prefix=prefix)
        try:
            return await store.ledger_read([datetime.now(UTC).strftime("%Y%m%d")])
        finally:
            await store.close()

    stored, _ = asyncio.run(read())
    sums: dict[str, int] = {}
    for fields in stored.values():
        for name, value in fields.items():
            measure = name.rsplit("|", 1)[1]
            sums[measure] = sums.get(measure, 0) + value
    return sums
