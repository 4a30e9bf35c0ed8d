"""One redis-server process of a test topology (tests/redis_topology.py): started on a free port,
asked questions on fresh connections, killed with SIGKILL, and its log kept for error messages."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

import pytest
import redis

HOST = "127.0.0.1"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def find_binary(name: str) -> str:
    """The path of a Redis program; without it, the test is skipped locally and fails under CI=true."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (CI must install it)")
        pytest.skip(f"{name} is not installed")
    return found


def poll(probe: Callable[[], T], timeout: float, what: str, explain: Callable[[], object] | None = None) -> T:
    """Call `probe` until it returns something truthy (a Redis error counts as not yet); after
    `timeout` seconds fail, saying what `explain` returns (the state that was waited on), if given."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except redis.RedisError as error:
            last = error
        if time.monotonic() > deadline:
            try:
                last = explain() if explain else last
            except redis.RedisError as error:
                last = error
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}: {last if isinstance(last, str) else repr(last)}"
            )
        time.sleep(0.05)


class Node:
    """One redis-server process: its port, its folder (log, config, data), and the command line that
    starts it, built from the node (its port and folder) each time it starts."""

    def __init__(self, folder: Path, command: Callable[[Node], list[str]], password: str | None = None) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self.command = command
        self.password = password
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, port: int | None = None) -> Self:
        """Start on `port`, or on a free port (another one if a concurrent test took it first)."""
        for _ in range(1 if port else 5):
            self.port = port or free_port()
            with (self.folder / "redis.log").open("ab") as log:
                self.process = subprocess.Popen(self.command(self), cwd=self.folder, stdout=log, stderr=log)
            if self._answers():
                return self
        raise RuntimeError(f"redis-server did not start in {self.folder}: {self.log_tail()}")

    def _answers(self, timeout: float = 20) -> bool:
        """Poll until this process answers (not another server that took the port), or has exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process is not None and self.process.poll() is None:
            try:
                if self.info("server")["process_id"] == self.process.pid:
                    return True
                break  # another server answers on this port: this one cannot bind it
            except redis.RedisError:
                time.sleep(0.02)
        self.kill()
        return False

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=HOST,
            port=self.port,
            password=self.password,
            socket_timeout=2,
            socket_connect_timeout=2,
            decode_responses=True,
        )

    def call(self, *args: Any) -> Any:
        """One command on a fresh connection (closed after), its reply decoded."""
        with self.client() as conn:
            return conn.execute_command(*args)

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as conn:
            return conn.info(section)

    def kill(self) -> float:
        """SIGKILL, as a crash or an OOM kill would; returns `time.monotonic()` at the kill."""
        killed_at = time.monotonic()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)
        return killed_at

    def log_tail(self, lines: int = 15) -> str:
        path = self.folder / "redis.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _flags(options: dict[str, str]) -> list[str]:
    return [arg for name, value in options.items() for arg in (f"--{name}", value)]


def data_command(binary: str, password: str | None, **extra: str) -> Callable[[Node], list[str]]:
    """A data node's command line (options with `_` for `-`): no persistence, and a replica's first
    sync starts at once (diskless sync otherwise waits 5 s for more replicas)."""
    options = {"bind": HOST, "save": "", "appendonly": "no", "repl-diskless-sync-delay": "0"}
    if password:
        options |= {"requirepass": password, "masterauth": password}
    options |= {name.replace("_", "-"): value for name, value in extra.items()}
    return lambda node: [binary, "--port", str(node.port), "--dir", str(node.folder), *_flags(options)]
