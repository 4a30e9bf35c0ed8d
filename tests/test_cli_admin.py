"""`gateway teams …` and `gateway keys …` against a running gateway's admin API; `--url` beats
GATEWAY_URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from tests.admission_support import make_team
from tests.support import ADMIN_KEY, GatewayServer, free_port_number, wait_until

GATEWAY = Path(sys.executable).with_name("gateway")


def run(gateway: GatewayServer, *args: str, admin_key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    if admin_key:
        env["GATEWAY_ADMIN_KEY"] = admin_key
    env["GATEWAY_URL"] = gateway.url
    return subprocess.run([str(GATEWAY), *args], env=env, capture_output=True, text=True, timeout=60)


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_teams_commands(keyed: GatewayServer) -> None:
    team = "cli-" + uuid.uuid4().hex[:8]
    created = as_json(
        run(
            keyed,
            "teams",
            "create",
            team,
            "--models",
            "openai/*",
            "deepseek/*",
            "--rpm",
            "60",
            "--budget-usd",
            "25",
            "--app-title",
            "CLI Team",
            "--category",
            "cli-agent",
            "--provider",
            '{"data_collection": "deny"}',
            "--json",
        )
    )
    assert created["models"] == ["openai/*", "deepseek/*"] and created["budget_period"] == "month"
    assert created["provider"] == {"data_collection": "deny"}

    listing = run(keyed, "teams", "list")
    assert listing.returncode == 0 and listing.stdout.splitlines()[0].split()[:2] == ["NAME", "MODELS"]
    assert any(line.startswith(team) and "openai/*,deepseek/*" in line for line in listing.stdout.splitlines())

    updated = as_json(run(keyed, "teams", "update", team, "--tpm", "5000", "--clear", "rpm", "--json"))
    assert updated["tpm"] == 5000 and updated["rpm"] is None
    shown = run(keyed, "teams", "show", team)
    assert "app_title" in shown.stdout and "CLI Team" in shown.stdout

    assert run(keyed, "teams", "delete", team).returncode == 0
    missing = run(keyed, "teams", "show", team)
    assert missing.returncode == 1 and "404" in missing.stderr and "team_not_found" in missing.stderr


def test_a_zero_rate_limit_is_refused(keyed: GatewayServer) -> None:
    """0 would refuse every request: the command says how to have no limit instead."""
    refused = run(keyed, "teams", "create", "cli-" + uuid.uuid4().hex[:8], "--rpm", "0")
    assert refused.returncode == 1
    assert "rpm: must be at least 1; leave it out for no limit" in refused.stderr, refused.stderr


def test_keys_commands(keyed: GatewayServer) -> None:
    team = "cli-" + uuid.uuid4().hex[:8]
    assert run(keyed, "teams", "create", team).returncode == 0
    created = run(
        keyed,
        "keys",
        "create",
        "--name",
        "alice",
        "--team",
        team,
        "--models",
        "openai/*",
        "--expires-in",
        "30d",
        "--rpm",
        "10",
        "--metadata",
        '{"owner": "alice"}',
    )
    assert created.returncode == 0, created.stderr
    plaintext = created.stdout.strip()  # the secret alone on stdout; the record on stderr
    assert plaintext.startswith("sk-gw-") and created.stdout == plaintext + "\n"
    key_id = plaintext[6:18]
    assert key_id in created.stderr and plaintext not in created.stderr

    response = httpx.get(keyed.url + "/v1/models", headers={"Authorization": f"Bearer {plaintext}"})
    assert response.status_code == 200

    again = run(keyed, "keys", "create", "--name", "alice", "--team", team)
    assert again.returncode == 1 and "409" in again.stderr and "key_exists" in again.stderr

    listed = as_json(run(keyed, "keys", "list", "--team", team, "--json"))
    assert [k["id"] for k in listed] == [key_id] and "key" not in listed[0]
    table = run(keyed, "keys", "list", "--team", team)
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "TEAM"] and key_id in table.stdout

    updated = as_json(run(keyed, "keys", "update", key_id, "--name", "alice2", "--budget-usd", "2", "--json"))
    assert updated["name"] == "alice2" and updated["budget_usd"] == 2
    rotated = as_json(run(keyed, "keys", "rotate", key_id, "--grace", "60", "--json"))
    assert rotated["id"] == key_id and rotated["key"] != plaintext
    assert as_json(run(keyed, "keys", "show", key_id, "--json"))["previous_secret_valid_until"]
    revoked = as_json(run(keyed, "keys", "revoke", key_id, "--json"))
    assert revoked["revoked"] is True
    assert as_json(run(keyed, "keys", "list", "--team", team, "--active", "--json")) == []
    response = httpx.get(keyed.url + "/v1/models", headers={"Authorization": f"Bearer {rotated['key']}"})
    assert response.status_code == 401


def test_active_keys_leave_out_expired_ones(keyed: GatewayServer) -> None:
    team = "cli-" + uuid.uuid4().hex[:8]
    assert run(keyed, "teams", "create", team).returncode == 0
    soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()  # still future when the CLI has started
    expiring = as_json(run(keyed, "keys", "create", "--name", "brief", "--team", team, "--expires-at", soon, "--json"))
    lasting = as_json(run(keyed, "keys", "create", "--name", "lasting", "--team", team, "--json"))
    wait_until(lambda: datetime.now(UTC) > datetime.fromisoformat(expiring["expires_at"]), 10, "the expiry")
    active = as_json(run(keyed, "keys", "list", "--team", team, "--active", "--json"))
    assert [k["id"] for k in active] == [lasting["id"]]
    assert {k["id"] for k in as_json(run(keyed, "keys", "list", "--team", team, "--json"))} == {
        expiring["id"],
        lasting["id"],
    }


def test_url_goes_before_or_after_the_command(keyed: GatewayServer) -> None:
    down = "http://127.0.0.1:9"  # GATEWAY_URL (set by run) points at the live gateway; --url wins over it
    for args in (("--url", down, "teams", "list"), ("teams", "list", "--url", down)):
        result = run(keyed, *args)
        assert result.returncode == 1 and "cannot reach the gateway at http://127.0.0.1:9" in result.stderr
    assert run(keyed, "--url", keyed.url, "teams", "list").returncode == 0


def test_cli_needs_the_admin_key(keyed: GatewayServer) -> None:
    result = run(keyed, "teams", "list", admin_key=None)
    assert result.returncode == 1 and "GATEWAY_ADMIN_KEY" in result.stderr
    wrong = run(keyed, "teams", "list", admin_key="sk-not-the-admin-key")
    assert wrong.returncode == 1 and "401" in wrong.stderr


def test_generate_prints_a_declarable_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(GATEWAY), "keys", "generate", "--name", "ci", "--team", "ops"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    plaintext = result.stderr.split("key: ", 1)[1].split()[0]  # stdout is the item alone, pasted under keys:
    config = tmp_path / "gateway.yaml"
    config.write_text("teams:\n  - name: ops\nkeys:\n" + result.stdout)
    from app.auth.keys import hash_key
    from app.settings import Settings

    settings = Settings(config_file=str(config))
    assert settings.keys[0].hash == hash_key(plaintext) and settings.keys[0].id == plaintext[6:18]


def test_usage_command(keyed: GatewayServer) -> None:
    team = "cli-" + uuid.uuid4().hex[:8]
    assert run(keyed, "teams", "create", team).returncode == 0
    created = as_json(run(keyed, "keys", "create", "--name", "spender", "--team", team, "--json"))
    for _ in range(2):
        response = httpx.post(
            keyed.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {created['key']}"},
            json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 200
    cost = 2 * response.json()["usage"]["cost"]

    from tests.support import wait_until

    report = wait_until(
        lambda: (r := as_json(run(keyed, "usage", "--team", team, "--json")))["total"]["requests"] == 2 and r,
        10,
        "ledger",
    )
    assert abs(report["total"]["cost_usd"] - cost) < 1e-12
    assert report["data"][0]["key"] == "spender" and report["data"][0]["team"] == team

    table = run(keyed, "usage", "--team", team, "--group-by", "key,model")
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["TEAM", "KEY", "KEY_ID", "MODEL", "REQUESTS"]  # a key with its team and id
    assert lines[-1].split()[0] == "TOTAL" and lines[-1].split()[1] == "2"
    csv_text = run(keyed, "usage", "--team", team, "--group-by", "model", "--csv").stdout
    assert csv_text.splitlines()[0].startswith("model,requests,") and csv_text.splitlines()[-1].startswith("total,2,")
    bad = run(keyed, "usage", "--group-by", "planet")
    assert bad.returncode == 1 and "group_by" in bad.stderr


def cli(*args: str, env_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_URL": env_url}
    return subprocess.run([str(GATEWAY), *args], env=env, capture_output=True, text=True, timeout=60)


def test_cli_url_flag_wins_over_gateway_url(keyed: GatewayServer) -> None:
    a = keyed
    team = make_team(a, rpm=7)
    nowhere = f"http://127.0.0.1:{free_port_number()}"

    shown = cli("teams", "show", team, "--url", a.url, "--json", env_url=nowhere)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["name"] == team and json.loads(shown.stdout)["rpm"] == 7

    missed = cli("teams", "show", team, "--url", nowhere, "--json", env_url=a.url)
    assert missed.returncode != 0 and missed.stdout == ""
    assert f"cannot reach the gateway at {nowhere}" in missed.stderr
