"""The real Codex CLI and Claude Code, configured exactly as docs/agents.md says, finish a task
through `gateway serve --demo` (offline: the demo simulates OpenRouter), and the gateway meters
it on /v1/responses and /v1/messages.

The CLIs come from agents/package-lock.json (`npm ci --prefix agents`, as .ci/run does); without
them these tests skip locally and fail under CI=true."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import free_port_number, wait_until

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = Path(sys.executable).with_name("gateway")
AGENT_BIN = ROOT / "agents" / "node_modules" / ".bin"
DOC = ROOT / "docs" / "agents.md"
DOC_URL = "http://localhost:8080"
TASK = "Reply with the word pong"
RUN_TIMEOUT = 50  # seconds; each CLI takes about one against the demo


@dataclass
class Demo:
    url: str
    key: str
    admin_key: str
    output: Path

    def request_logs(self) -> list[dict[str, Any]]:
        """The gateway's request log lines (JSON, one per request) printed so far."""
        records = []
        for line in self.output.read_text().splitlines():
            if line.startswith("{") and '"logger":"gateway.requests"' in line:
                records.append(json.loads(line))
        return records


def require_agent(name: str) -> Path:
    """An agent CLI from agents/node_modules; missing, skip locally and fail under CI=true."""
    path = AGENT_BIN / name
    if not path.exists():
        message = f"{name} is not installed: run `npm ci --prefix agents` (agents/package-lock.json)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """`gateway serve --demo` from the installed console script, in an empty directory."""
    assert GATEWAY.exists(), "install the project (uv sync, or uv run pytest) to get the console script"
    directory = tmp_path_factory.mktemp("demo")
    port = free_port_number()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENROUTER_"))}
    env["OPENROUTER_BASE_URL"] = "http://192.0.2.1:9/unreachable"  # the demo must not need it
    output = directory / "demo.out"
    with output.open("w") as sink:
        process = subprocess.Popen(
            [str(GATEWAY), "serve", "--demo", "--port", str(port)],
            cwd=directory,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: healthy(url) or process.poll() is not None, 30, "demo start")
        assert process.poll() is None, output.read_text()
        printed = wait_until(lambda: "GATEWAY_ADMIN_KEY=" in (text := output.read_text()) and text, 10, "demo banner")
        key = re.search(r"Bearer (sk-gw-demo-\w+)", printed)
        admin_key = re.search(r"GATEWAY_ADMIN_KEY=(\S+)", printed)
        assert key and admin_key, printed
        yield Demo(url, key.group(1), admin_key.group(1), output)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, output.read_text()


def documented(marker: str) -> str:
    """The fenced block of docs/agents.md that contains `marker`: the tests use what users read."""
    blocks = re.findall(r"```\w*\n(.*?)```", DOC.read_text(), re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"docs/agents.md: want one block with {marker!r}, found {len(found)}"
    return found[0]


def documented_exports(marker: str) -> dict[str, str]:
    """`export NAME=value …` lines of a documented shell block (comments dropped)."""
    env: dict[str, str] = {}
    for line in documented(marker).splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            for word in words[1:]:
                name, _, value = word.partition("=")
                env[name] = value
    return env


def run_agent(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a CLI in its own process group with no stdin; on timeout, end the group and fail."""
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{Path(argv[0]).name} did not finish in {RUN_TIMEOUT}s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def base_env(home: Path) -> dict[str, str]:
    """A throwaway HOME and nothing of the caller's agent or proxy settings."""
    home.mkdir()
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}


def assert_metered(demo: Demo, endpoint: str, model: str) -> None:
    """The request log shows a 200 on `endpoint`, and /admin/usage counts it with a cost. A
    streamed answer's cost may come later, from OpenRouter's /generation: poll for it."""

    def logged() -> list[dict[str, Any]]:
        return [r for r in demo.request_logs() if (r["endpoint"], r["model"], r["status"]) == (endpoint, model, 200)]

    def usage_row() -> dict[str, Any] | None:
        answer = httpx.get(
            demo.url + "/admin/usage",
            params={"group_by": "model"},
            headers={"Authorization": f"Bearer {demo.admin_key}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        row = next((row for row in answer.json()["data"] if row["model"] == model), None)
        return row if row and row["requests"] >= 1 and row["cost_usd"] > 0 else None

    try:
        wait_until(logged, 10, f"a {endpoint} request in the request log")
    except AssertionError:
        seen = [(r["endpoint"], r["model"], r["status"]) for r in demo.request_logs()]
        raise AssertionError(f"no {endpoint} request for {model} answered 200; the gateway logged {seen}") from None
    wait_until(usage_row, 20, f"/admin/usage to show {model} with a cost")


def test_codex_exec_through_the_responses_route(demo: Demo, tmp_path: Path) -> None:
    codex = require_agent("codex")
    env = base_env(tmp_path / "home")
    config = documented("[model_providers.gateway]").replace(DOC_URL, demo.url)
    model = re.search(r'^model = "([^"]+)"', config, re.M)
    env_key = re.search(r'^env_key = "([^"]+)"', config, re.M)
    assert model and env_key, config
    codex_home = tmp_path / "home" / ".codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(config)
    env |= {"CODEX_HOME": str(codex_home), env_key.group(1): demo.key}
    work = tmp_path / "work"
    work.mkdir()

    argv = [str(codex), "exec", "--strict-config", "--skip-git-repo-check", "--sandbox", "read-only", TASK]
    result = run_agent(argv, env, work)

    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert f"Hello from {model.group(1)}!" in result.stdout, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert_metered(demo, "responses", model.group(1))


def test_claude_code_print_through_the_messages_route(demo: Demo, tmp_path: Path) -> None:
    claude = require_agent("claude")
    env = base_env(tmp_path / "home")
    documented_env = documented_exports("ANTHROPIC_BASE_URL")
    assert documented_env["ANTHROPIC_BASE_URL"] == DOC_URL, documented_env
    env |= documented_env | {"ANTHROPIC_BASE_URL": demo.url, "ANTHROPIC_AUTH_TOKEN": demo.key}
    model = env["ANTHROPIC_MODEL"]
    work = tmp_path / "work"
    work.mkdir()

    result = run_agent([str(claude), "-p", "--no-session-persistence", TASK], env, work)

    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert f"Hello from {model}!" in result.stdout, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert_metered(demo, "messages", model)
