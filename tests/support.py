"""Real servers on loopback for the tests: the gateway on uvicorn, in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import uvicorn

from app.main import create_app
from app.server import BatchingHttpToolsProtocol
from app.settings import Settings
from app.simulator import SimulatorThread

CLIENT_KEY = "sk-gw-test-client-key-0123456789abcdef"
METRICS_KEY = "sk-gw-metrics-test-0123456789abcdef"
UPSTREAM_KEY = "sk-or-v1-simulated-upstream-key-for-tests"
T = TypeVar("T")


class GatewayServer:
    """`create_app(settings)` served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            access_log=False,
            loop="asyncio",
            http=BatchingHttpToolsProtocol,  # the product's protocol: every test's responses go through it
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            self.loop.close()

    @property
    def gateway(self) -> Any:
        """The app's Gateway (for the few tests that drive it directly, e.g. the drain)."""
        app: Any = self.server.config.loaded_app
        while not hasattr(app, "state"):
            app = app.app
        return app.state.gateway

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayServer:
        self._thread.start()
        wait_until(lambda: self.server.started or not self._thread.is_alive(), 15, "gateway start")
        if not self.server.started:
            raise RuntimeError("the gateway did not start")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_until(predicate: Callable[[], T], timeout: float, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def scrape(url: str, timeout: float = 20) -> httpx.Response:
    """GET /metrics with the scrape key (`GATEWAY_METRICS_KEY`), as Prometheus does."""
    return httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=timeout)


def request_id() -> str:
    return "test-" + uuid.uuid4().hex


def gateway_settings(simulator_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "config_file": None,
        "store": "memory",  # in-process gateways keep nothing on disk unless a test asks
        "api_key": CLIENT_KEY,
        "metrics_key": METRICS_KEY,
        # One try and no circuit breaker: these gateways show how single answers are mapped;
        # retries and breakers have gateways of their own in test_resilience.py.
        "upstream": {
            "base_url": simulator_url,
            "api_key": UPSTREAM_KEY,
            "retries": {"max_attempts": 1},
            "breaker": {"failure_threshold": 1_000_000},
        },
        "attribution": {
            "app_url": "https://example.com/our-app",
            "app_title": "Gateway Tests",
            "categories": ["cli-agent", "programming-app"],
        },
        "models": {
            "default": "openai/gpt-4o-mini",
            "aliases": {"gpt-4o-mini": "openai/gpt-4o-mini", "thinker": "deepseek/deepseek-v3.2"},
            "per_model": {"deepseek/deepseek-v3.2": {"defaults": {"reasoning": {"enabled": True}}}},
        },
    }
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            base[name] = {**base[name], **value}
        else:
            base[name] = value
    return Settings(**base)


ADMIN_KEY = "sk-gw-admin-test-0123456789abcdef"
DECLARED_ID = "declared0key"
DECLARED_KEY = "sk-gw-declared0key-DeclaredSecretForTests0123456789"
TEAM_UPSTREAM_KEY = "sk-or-v1-team-ml-upstream-key-for-tests"


class GatewayProcess:
    """`gateway serve` as a real separate process (a replica), configured by environment."""

    def __init__(self, env: dict[str, str], log_path: str, args: tuple[str, ...] = (), own_group: bool = False) -> None:
        import os
        import shutil
        import socket
        import sys
        import tempfile
        import weakref
        from pathlib import Path

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENROUTER_"))}
        # The default store is a file: each process gets a data directory of its own (removed
        # with this object) unless the test names a store or a directory to share.
        data_dir = tempfile.mkdtemp(prefix="gateway-data-")
        weakref.finalize(self, shutil.rmtree, data_dir, True)
        self.env = {
            **clean,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.port),
            "GATEWAY_DATA_DIR": data_dir,
            **env,
        }
        self.binary = str(Path(sys.executable).with_name("gateway"))
        self.log_path = log_path
        self.args = args
        self.own_group = own_group  # its own process group: `kill_group` reaches its workers too
        self.process: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayProcess:
        import subprocess
        from pathlib import Path

        import httpx

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "serve", *self.args],
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=self.own_group,
            )

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited: {Path(self.log_path).read_text()[-2000:]}")
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, "gateway process ready")
        return self

    def stop(self) -> int:
        import subprocess

        if self.process is None:
            return 0
        process, self.process = self.process, None
        process.terminate()
        try:
            code: int = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()  # never leave a gateway behind
            process.wait(10)
            raise
        return code

    def kill_group(self) -> None:
        """SIGKILL to the gateway and its workers at once, as a crash or an OOM kill would."""
        import os
        import signal

        assert self.own_group, "start it with own_group=True"
        process, self.process = self.process, None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def require_tool(name: str, package: str) -> str:
    """The path of a system tool; missing, the test skips locally and fails under CI=true."""
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (Debian package {package})")
        pytest.skip(f"{name} is not installed")
    return path


def free_port_number() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(simulator: SimulatorThread, **extra: str) -> dict[str, str]:
    return {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_CONFIG": "/dev/null",
        **extra,
    }


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
