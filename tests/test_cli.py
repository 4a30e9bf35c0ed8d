"""The `gateway` command: `serve` refuses to start without its secrets; `simulate` serves the
simulator on its own port, with `GET /generation` answering after its brief 404."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from app.auth.records import KeyFields, TeamFields
from app.auth.registry import Registry
from app.simulator import SimulatorThread
from app.store.sqlite import SqliteStore
from tests.support import UPSTREAM_KEY, wait_until
from tests.test_demo import free_port

GATEWAY = Path(sys.executable).with_name("gateway")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENROUTER_"))}


def test_serve_refuses_without_keys(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(GATEWAY), "serve", "--port", str(free_port())],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "admin_key: no client could get in" in result.stderr
    assert "upstream.api_key: OPENROUTER_API_KEY is not set" in result.stderr


def test_admin_key_alone_is_a_way_in(tmp_path: Path) -> None:
    """Since key management, GATEWAY_API_KEY is only an optional bootstrap key."""
    env = {
        **clean_env(),
        "GATEWAY_ADMIN_KEY": "sk-admin-0123456789abcdef0123456789abcdef",
        "OPENROUTER_API_KEY": "sk-or-v1-0123456789",
    }
    result = subprocess.run(
        [str(GATEWAY), "check", "--config", str(tmp_path / "none.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "file not found" in result.stderr
    (tmp_path / "gateway.yaml").write_text("port: 8080\n")
    result = subprocess.run(
        [str(GATEWAY), "check", "--config", str(tmp_path / "gateway.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_serve_refuses_placeholder_keys(tmp_path: Path) -> None:
    env = {**clean_env(), "GATEWAY_API_KEY": "changeme", "OPENROUTER_API_KEY": "sk-or-v1-xxxxxxxxxxxx"}
    result = subprocess.run([str(GATEWAY), "serve"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "placeholder" in result.stderr


def test_simulate_serves_openrouter(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [str(GATEWAY), "simulate", "--port", str(port), "--api-key", "sk-or-test-key"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:

        def models() -> httpx.Response | None:
            try:
                return httpx.get(base + "/models", timeout=1)
            except httpx.HTTPError:
                return None

        catalogue = wait_until(models, 30, "simulator start").json()
        ids = {m["id"] for m in catalogue["data"]}
        assert {
            "deepseek/deepseek-v3.2",
            "openai/text-embedding-3-small",
            "meta-llama/llama-3.3-70b-instruct:free",
        } <= ids
        deepseek = next(m for m in catalogue["data"] if m["id"] == "deepseek/deepseek-v3.2")
        assert deepseek["pricing"]["prompt"] == "0.00000028" and deepseek["context_length"] == 163840

        auth = {"Authorization": "Bearer sk-or-test-key"}
        assert (
            httpx.post(base + "/chat/completions", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        reply = httpx.post(
            base + "/chat/completions",
            headers=auth,
            json={"model": "deepseek/deepseek-v3.2", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert reply.status_code == 200 and reply.headers["x-generation-id"] == reply.json()["id"]
        gen = f"{base}/generation?id={reply.json()['id']}"
        assert httpx.get(gen, headers=auth).status_code == 404  # "often 404s for a moment"
        stats = httpx.get(gen, headers=auth).json()["data"]
        assert stats["total_cost"] == reply.json()["usage"]["cost"]
        assert stats["tokens_completion"] == reply.json()["usage"]["completion_tokens"]
        log = httpx.get(f"http://127.0.0.1:{port}/_sim/requests").json()
        assert any(e["path"] == "/api/v1/chat/completions" and e["status"] == 200 for e in log)
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_gateway(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        **clean_env(),
        "GATEWAY_ADMIN_KEY": "sk-admin-0123456789abcdef0123456789abcdef",
        "OPENROUTER_API_KEY": "sk-or-v1-0123456789",
    }
    return subprocess.run(
        [str(GATEWAY), *args], cwd=tmp_path, env={**full, **env}, capture_output=True, text=True, timeout=60
    )


def test_an_unreachable_store_is_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    """Keys, teams and limits live in the store: `check` reports it unreachable, and `serve`
    refuses to start with the same line (a supervisor restarts it until Redis is back)."""
    down = f"redis://:s3cret-pass@127.0.0.1:{free_port()}/0"
    checked = run_gateway(tmp_path, "check", GATEWAY_STORE=down)
    assert checked.returncode == 1
    assert "problem: store: redis://127.0.0.1:" in checked.stderr and "does not answer" in checked.stderr
    served = run_gateway(tmp_path, "serve", "--port", str(free_port()), GATEWAY_STORE=down)
    assert served.returncode == 2 and "refusing to start" in served.stderr
    malformed = run_gateway(tmp_path, "check", GATEWAY_STORE="redis://:s3cret-pass@localhost:abc/0")
    assert malformed.returncode == 1 and "problem: store: redis://" in malformed.stderr
    for result in (checked, served, malformed):
        assert "Traceback" not in result.stderr + result.stdout and "s3cret-pass" not in result.stderr


def test_check_says_when_the_default_config_file_is_missing(tmp_path: Path) -> None:
    result = run_gateway(tmp_path, "check")  # run where no config/gateway.yaml exists
    assert result.returncode == 0, result.stderr
    assert "config/gateway.yaml not found" in result.stdout


def test_simulate_on_a_taken_port_is_one_clear_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_gateway(tmp_path, "simulate", "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2 and "problem: cannot listen on 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_refuses_workers_before_printing_its_keys(tmp_path: Path) -> None:
    result = run_gateway(tmp_path, "serve", "--demo", "--workers", "2", "--port", str(free_port()))
    assert result.returncode == 2 and "--demo runs one process" in result.stderr
    assert "sk-gw-" not in result.stdout


STRONG_ADMIN = "sk-admin-0123456789abcdef0123456789abcdef"
STRONG_METRICS = "sk-metrics-0123456789abcdef0123456789abcdef"
OPENROUTER = "sk-or-v1-0123456789"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        (
            {"GATEWAY_ADMIN_KEY": "admin-0123456789abcdef"},
            "admin_key: GATEWAY_ADMIN_KEY has 22 characters; use at least 32",
        ),
        ({"GATEWAY_ADMIN_KEY": "a" * 40}, "admin_key: GATEWAY_ADMIN_KEY repeats a few characters"),
        ({"GATEWAY_ADMIN_KEY": "changeme"}, "admin_key (GATEWAY_ADMIN_KEY): looks like a placeholder"),
        # the bootstrap key has no team and no limits: as hard to guess as the admin key
        ({"GATEWAY_API_KEY": "sk-gw-short-bootstrap"}, "api_key: GATEWAY_API_KEY has 21 characters; use at least 32"),
        ({"GATEWAY_API_KEY": "ab" * 20}, "api_key: GATEWAY_API_KEY repeats a few characters"),
        ({"GATEWAY_API_KEY": STRONG_ADMIN}, "api_key: GATEWAY_API_KEY equals GATEWAY_ADMIN_KEY"),
        ({"GATEWAY_API_KEY": OPENROUTER}, "api_key: GATEWAY_API_KEY equals OPENROUTER_API_KEY"),
        (
            {"GATEWAY_ADMIN_KEY": OPENROUTER * 2, "OPENROUTER_API_KEY": OPENROUTER * 2},
            "admin_key: GATEWAY_ADMIN_KEY equals",
        ),
        # the scrape key opens /metrics (every key's and team's spend): as hard to guess as the admin key
        (
            {"GATEWAY_METRICS_KEY": "metrics-0123456789"},
            "metrics_key: GATEWAY_METRICS_KEY has 18 characters; use at least 32",
        ),
        ({"GATEWAY_METRICS_KEY": "m" * 40}, "metrics_key: GATEWAY_METRICS_KEY repeats a few characters"),
        ({"GATEWAY_METRICS_KEY": STRONG_ADMIN}, "metrics_key: GATEWAY_METRICS_KEY equals GATEWAY_ADMIN_KEY"),
        (
            {"GATEWAY_METRICS_KEY": STRONG_METRICS, "GATEWAY_API_KEY": STRONG_METRICS},
            "metrics_key: GATEWAY_METRICS_KEY equals GATEWAY_API_KEY; every client holding the bootstrap key",
        ),
        (
            {"GATEWAY_METRICS_KEY": OPENROUTER * 2, "OPENROUTER_API_KEY": OPENROUTER * 2},
            "metrics_key: GATEWAY_METRICS_KEY equals OPENROUTER_API_KEY",
        ),
    ],
)
def test_weak_or_shared_secrets_are_refused(tmp_path: Path, env: dict[str, str], problem: str) -> None:
    """`check` and `serve` refuse the same way; no secret is printed."""
    checked = run_gateway(tmp_path, "check", **env)
    assert checked.returncode == 1 and f"problem: {problem}" in checked.stderr, checked.stderr
    served = run_gateway(tmp_path, "serve", "--port", str(free_port()), **env)
    assert served.returncode == 2 and f"problem: {problem}" in served.stderr, served.stderr
    for secret in {STRONG_ADMIN, OPENROUTER, *env.values()}:
        assert secret not in checked.stdout + checked.stderr + served.stdout + served.stderr


def test_check_counts_what_it_loaded_and_warns_about_memory(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(
        "teams: [{name: ml}, {name: ops}]\n"
        "keys:\n"
        f"  - {{id: aaaaaaaaaaaa, name: ci, team: ml, hash: {'a' * 64}}}\n"
        "models:\n  aliases: {fast: openai/gpt-4o-mini}\n"
    )
    result = run_gateway(tmp_path, "check", "--config", "gateway.yaml", GATEWAY_STORE="memory")
    assert result.returncode == 0, result.stderr
    assert "2 declared teams, 1 declared key, 1 alias," in result.stdout
    assert "warning: store: memory" in result.stderr and "a restart loses them" in result.stderr


def test_check_says_what_the_store_holds_and_counts_its_keys_as_a_way_in(tmp_path: Path) -> None:
    """Keys made through the admin API live in the store: with no admin, bootstrap or declared
    key, an active one there lets clients in, so `check` and `serve` accept it; a revoked or
    expired one does not. `check` says what it counted where."""

    async def fill() -> str:
        store = SqliteStore(tmp_path / "data" / "gateway.db")
        try:
            registry = Registry(store)
            for team in ("ml", "ops"):
                await registry.create_team(team, TeamFields())
            alice, _ = await registry.create_key("alice", "ml", KeyFields())
            bob, _ = await registry.create_key("bob", "ml", KeyFields())
            await registry.revoke_key(bob.id)
            carol, _ = await registry.create_key("carol", "ops", KeyFields())
            past = datetime.now(UTC) - timedelta(days=1)
            await store.update_key(carol.model_copy(update={"expires_at": past}), old_name="carol")
            return alice.id
        finally:
            await store.close()

    alice = asyncio.run(fill())
    no_admin = {"GATEWAY_ADMIN_KEY": ""}  # empty: unset
    checked = run_gateway(tmp_path, "check", **no_admin)
    assert checked.returncode == 0, checked.stderr
    assert "0 declared teams, 0 declared keys, 0 aliases" in checked.stdout
    assert "; store holds 2 teams, 3 keys (1 active)" in checked.stdout
    log = serve_until_ready(tmp_path, **no_admin)
    assert "no client could get in" not in log

    async def revoke() -> None:
        store = SqliteStore(tmp_path / "data" / "gateway.db")
        try:
            await Registry(store).revoke_key(alice)
        finally:
            await store.close()

    asyncio.run(revoke())
    refused = run_gateway(tmp_path, "check", **no_admin)
    assert refused.returncode == 1 and "problem: admin_key: no client could get in" in refused.stderr


def serve_until_ready(tmp_path: Path, **env: str) -> str:
    """`gateway serve` started, waited for until it answers, and stopped: what it wrote on stderr."""
    port = free_port()
    full = {**clean_env(), "GATEWAY_ADMIN_KEY": STRONG_ADMIN, "OPENROUTER_API_KEY": OPENROUTER, **env}
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [str(GATEWAY), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=full,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, "gateway start")
    finally:
        process.terminate()
        process.wait(timeout=30)
    return log.read_text()


def test_variables_that_name_no_setting_are_warned_of(tmp_path: Path) -> None:
    """A typo in a `GATEWAY_*` variable would be ignored without a word: `check`, and `serve`
    before it serves, warn of each with the setting meant. Other users of the prefix are left
    alone: the CLI's GATEWAY_URL, the config file's names, the `<NAME>_FILE` forms, and
    Kubernetes' links to a service named `gateway`."""
    (tmp_path / "admin_key").write_text(STRONG_ADMIN)
    env = {
        "GATEWAY_UPSTREAM_DEADLINE_S": "120",
        "GATEWAY_ADMINKEY": "x",
        "GATEWAY_URL": "http://gateway:8080",
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_CONFIG_FILE": "/dev/null",
        "GATEWAY_ADMIN_KEY_FILE": str(tmp_path / "admin_key"),
        "GATEWAY_SERVICE_HOST": "10.0.0.1",
        "GATEWAY_SERVICE_PORT": "8080",
        "GATEWAY_SERVICE_PORT_HTTP": "8080",
        "GATEWAY_PORT_8080_TCP": "tcp://10.0.0.1:8080",
        "GATEWAY_PORT_8080_TCP_PROTO": "tcp",
        "GATEWAY_PORT_8080_TCP_PORT": "8080",
        "GATEWAY_PORT_8080_TCP_ADDR": "10.0.0.1",
    }
    warnings = [
        "warning: GATEWAY_ADMINKEY is not a setting; did you mean GATEWAY_ADMIN_KEY?",
        "warning: GATEWAY_UPSTREAM_DEADLINE_S is not a setting; did you mean GATEWAY_UPSTREAM__DEADLINE_S?",
    ]
    checked = run_gateway(tmp_path, "check", **env)
    assert checked.returncode == 0, checked.stderr
    assert [line for line in checked.stderr.splitlines() if line.startswith("warning:")] == warnings
    assert serve_until_ready(tmp_path, **env).splitlines()[:2] == warnings


def test_kubernetes_port_variable_is_named_as_such(tmp_path: Path) -> None:
    """Kubernetes sets GATEWAY_PORT=tcp://<ip>:<port> in every pod when a service is named
    `gateway`: the problem names that cause, not a failed whole-number parse."""
    checked = run_gateway(tmp_path, "check", GATEWAY_PORT="tcp://10.0.0.1:8080")
    assert checked.returncode == 1
    assert (
        "problem: port: GATEWAY_PORT=tcp://10.0.0.1:8080: looks like a Kubernetes service variable "
        "(a service named gateway); name the service otherwise or set GATEWAY_PORT=8080"
    ) in checked.stderr
    assert "whole number" not in checked.stderr


def test_check_online_tries_the_openrouter_key(tmp_path: Path, simulator: SimulatorThread) -> None:
    good = run_gateway(
        tmp_path, "check", "--online", OPENROUTER_BASE_URL=simulator.base_url, OPENROUTER_API_KEY=UPSTREAM_KEY
    )
    assert good.returncode == 0, good.stderr
    assert "OpenRouter key OK: label 'sk-or-v1-sim...', no credit limit" in good.stdout
    wrong = "sk-or-v1-not-a-key-the-simulator-knows"
    refused = run_gateway(
        tmp_path, "check", "--online", OPENROUTER_BASE_URL=simulator.base_url, OPENROUTER_API_KEY=wrong
    )
    assert refused.returncode == 1
    assert f"problem: upstream.api_key: {simulator.base_url}/key refused the OpenRouter key (401: User not found.)" in (
        refused.stderr
    )
    down = f"http://127.0.0.1:{free_port()}/api/v1"
    unreachable = run_gateway(tmp_path, "check", "--online", OPENROUTER_BASE_URL=down)
    assert unreachable.returncode == 1 and f"problem: upstream.base_url: {down}/key: " in unreachable.stderr
    for result in (good, refused, unreachable):
        assert UPSTREAM_KEY not in result.stdout + result.stderr and wrong not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr


def test_a_wrong_base_url_is_not_blamed_on_the_key(tmp_path: Path, simulator: SimulatorThread) -> None:
    """`GET {base_url}/key` answering 404 means the path is wrong (here `/api/v1` left out), not
    the key; without `--online`, an openrouter.ai URL off `/api/v1` is warned of."""
    root = simulator.base_url.removesuffix("/api/v1")
    lost = run_gateway(tmp_path, "check", "--online", OPENROUTER_BASE_URL=root, OPENROUTER_API_KEY=UPSTREAM_KEY)
    assert lost.returncode == 1
    assert (
        f"problem: upstream.base_url: {root}/key answered 404: is the base URL right? "
        "OpenRouter's is https://openrouter.ai/api/v1"
    ) in lost.stderr
    assert "refused the OpenRouter key" not in lost.stderr
    for url in ("https://openrouter.ai/v1", "https://openrouter.ai", "https://openrouter.ai/api/v1/chat"):
        offline = run_gateway(tmp_path, "check", OPENROUTER_BASE_URL=url)
        assert offline.returncode == 0, offline.stderr
        assert f"warning: upstream.base_url: {url} is on openrouter.ai, whose API is under /api/v1" in offline.stderr
    right = run_gateway(tmp_path, "check", OPENROUTER_BASE_URL="https://openrouter.ai/api/v1/")
    assert right.returncode == 0 and "warning" not in right.stderr, right.stderr


def test_serve_on_a_taken_port_is_one_line_before_any_demo_key(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        demo = run_gateway(tmp_path, "serve", "--demo", "--port", port)
        plain = run_gateway(tmp_path, "serve", "--host", "127.0.0.1", "--port", port)
    assert demo.returncode == 2 and f"problem: cannot listen on 127.0.0.1:{port}: " in demo.stderr
    assert "sk-gw-" not in demo.stdout + demo.stderr and "curl" not in demo.stdout
    assert plain.returncode == 2 and f"problem: cannot listen on 127.0.0.1:{port}: " in plain.stderr
    for result in (demo, plain):
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2, result.stderr


def test_serve_says_when_it_runs_without_a_config_file(tmp_path: Path) -> None:
    """Run from a directory without config/gateway.yaml, `serve` says at start that it has no
    aliases nor declared entries, and how to name the file."""
    said = serve_until_ready(tmp_path)
    note = said.splitlines()[0]
    assert note.startswith(f"note: no config file (config/gateway.yaml not found in {tmp_path})"), note
    assert "no model aliases, declared teams or declared keys" in note and "GATEWAY_CONFIG" in note


def test_serve_refuses_workers_on_the_memory_store(tmp_path: Path) -> None:
    """Each worker would hold its own keys, limits and budgets: a key made through one would be
    unknown to the others."""
    result = run_gateway(tmp_path, "serve", "--workers", "2", "--port", str(free_port()), GATEWAY_STORE="memory")
    assert result.returncode == 2
    assert "problem: store: the memory store lives inside one process" in result.stderr
    assert "its own keys, limits and budgets" in result.stderr and "Traceback" not in result.stderr


def test_an_unusable_data_directory_is_one_clear_line(tmp_path: Path) -> None:
    """The default store is a file in the data directory: one that cannot be made is a problem
    `check` reports and `serve` refuses to start on."""
    (tmp_path / "taken").write_text("a file where the data directory should be")
    checked = run_gateway(tmp_path, "check", GATEWAY_DATA_DIR=str(tmp_path / "taken"))
    assert checked.returncode == 1
    assert f"problem: store: cannot use sqlite {tmp_path / 'taken' / 'gateway.db'}:" in checked.stderr
    served = run_gateway(tmp_path, "serve", "--port", str(free_port()), GATEWAY_DATA_DIR=str(tmp_path / "taken"))
    assert served.returncode == 2 and "refusing to start" in served.stderr
    for result in (checked, served):
        assert "Traceback" not in result.stderr + result.stdout


def test_the_default_store_is_a_file_in_the_data_directory(tmp_path: Path) -> None:
    """`check` creates no database (run under sudo, it would leave a root-owned file the service
    user's `serve` cannot open): it says the file is created at first start, and `serve` does."""
    result = run_gateway(tmp_path, "check")  # GATEWAY_STORE and GATEWAY_DATA_DIR unset
    assert result.returncode == 0, result.stderr
    db = tmp_path / "data" / "gateway.db"
    assert f"store sqlite {db} (created at first start)," in result.stdout  # the file, by its absolute path
    assert not (tmp_path / "data").exists()
    said = serve_until_ready(tmp_path)
    assert db.is_file()  # `data` in the working directory
    # where it listens, which store, and that the store is new and empty
    assert re.search(rf"listening on http://127\.0\.0\.1:\d+; store sqlite {re.escape(str(db))}", said), said
    assert f"store: {db} did not exist: starting with a new, empty store" in said
    again = run_gateway(tmp_path, "check")  # the file exists now: opened, and named as it is
    assert again.returncode == 0 and f"store sqlite {db}, " in again.stdout, again.stderr
    assert "did not exist" not in serve_until_ready(tmp_path)  # the store it kept: no warning


def test_check_creates_no_data_directory_however_deep(tmp_path: Path) -> None:
    """Nor the directories above the file; a declared key's team is looked for in the file only
    (the store is empty until it is created), and said so."""
    (tmp_path / "gateway.yaml").write_text(f"keys: [{{id: aaaaaaaaaaaa, name: ci, team: ml, hash: {'a' * 64}}}]\n")
    deep = tmp_path / "var" / "lib" / "gateway"
    result = run_gateway(tmp_path, "check", "--config", "gateway.yaml", GATEWAY_DATA_DIR=str(deep))
    assert result.returncode == 1
    assert "no team 'ml' under teams: in the file, nor in the store (created empty at first start)" in result.stderr
    assert not (tmp_path / "var").exists()
    (tmp_path / "gateway.yaml").write_text("teams: [{name: ml}]\n")
    result = run_gateway(tmp_path, "check", "--config", "gateway.yaml", GATEWAY_DATA_DIR=str(deep))
    assert result.returncode == 0, result.stderr
    assert f"store sqlite {deep / 'gateway.db'} (created at first start)" in result.stdout
    assert not (tmp_path / "var").exists()


def test_check_refuses_a_data_directory_it_could_not_create(tmp_path: Path) -> None:
    """Where the file would go must be writable; as root, `check` runs without the capability
    that lets root write anywhere, as a service user would."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    command = [str(GATEWAY), "check"]
    if os.geteuid() == 0:
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *command]
        if shutil.which("setpriv") is None or subprocess.run([*command[:3], "true"]).returncode != 0:
            pytest.skip("root, and setpriv cannot drop its capabilities here")
    env = {**clean_env(), "GATEWAY_ADMIN_KEY": STRONG_ADMIN, "OPENROUTER_API_KEY": OPENROUTER}
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env={**env, "GATEWAY_DATA_DIR": str(locked / "data")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    problem = f"problem: store: cannot use sqlite {locked / 'data' / 'gateway.db'}: {locked} is not writable"
    assert problem in result.stderr, result.stderr
    assert not (locked / "data").exists()
