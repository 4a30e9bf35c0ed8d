"""`gateway serve --demo` from the installed console script, in an empty directory with no
configuration and no network, answers the curl command it prints, and the OpenAI SDK
snippet it prints works as pasted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from tests.support import free_port_number, wait_until

GATEWAY = Path(sys.executable).with_name("gateway")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.skipif(shutil.which("curl") is None and not os.environ.get("CI"), reason="curl is not installed")
def test_demo_answers_the_printed_curl(tmp_path: Path) -> None:
    assert GATEWAY.exists(), "install the project (uv sync, or uv run pytest) to get the console script"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENROUTER_"))}
    env["OPENROUTER_BASE_URL"] = "http://192.0.2.1:9/unreachable"  # the demo must not need it
    out = tmp_path / "demo.out"
    with out.open("w") as sink:
        process = subprocess.Popen(
            [str(GATEWAY), "serve", "--demo", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: healthy(f"http://127.0.0.1:{port}/healthz") or process.poll() is not None, 30, "demo start")
        assert process.poll() is None, out.read_text()
        printed = out.read_text()
        curl = re.search(r"  curl (.+?)\n\n", printed, re.S)
        assert curl, printed
        command = curl.group(1).replace("\\\n", " ")
        result = subprocess.run(
            f"curl -s --max-time 20 {command}", shell=True, capture_output=True, text=True, timeout=30
        )
        reply = json.loads(result.stdout)
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["content"].startswith("Hello from deepseek/deepseek-v3.2")
        assert reply["usage"]["cost"] > 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, out.read_text()


GATEWAY_BINARY = Path(sys.executable).with_name("gateway")


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
