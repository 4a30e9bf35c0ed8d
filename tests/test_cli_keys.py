"""`gateway keys …` as scripts use it: a new secret is the only line on stdout (so
`KEY=$(gateway keys create …)` holds it); `keys generate --config FILE` adds the key to the file in
place; a reader that closes its pipe early ends the command quietly."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from app.auth.keys import hash_key
from app.settings import Settings
from app.simulator import SimulatorThread
from tests.support import ADMIN_KEY, UPSTREAM_KEY, GatewayServer

GATEWAY = Path(sys.executable).with_name("gateway")
ROOT = Path(__file__).resolve().parent.parent
KEY_LINE = re.compile(r"^sk-gw-[a-z0-9]{12}-[A-Za-z0-9]{32}\n$")


def gateway(*args: str, url: str = "", stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENROUTER_"))}
    env |= {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_URL": url}
    return subprocess.run([str(GATEWAY), *args], env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60)


def models_status(gateway_url: str, key: str) -> int:
    return httpx.get(gateway_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=20).status_code


# -- a new secret on stdout ----------------------------------------------------------------------
def test_create_and_rotate_print_the_secret_alone_on_stdout(keyed: GatewayServer) -> None:
    team = "cli-" + uuid.uuid4().hex[:8]
    assert gateway("teams", "create", team, url=keyed.url).returncode == 0
    created = gateway("keys", "create", "--name", "alice", "--team", team, url=keyed.url)
    assert created.returncode == 0, created.stderr
    assert KEY_LINE.match(created.stdout), created.stdout  # what KEY=$(gateway keys create …) holds
    key = created.stdout.strip()
    assert models_status(keyed.url, key) == 200
    assert "the key on standard output is shown once" in created.stderr  # captured: nothing is "above"
    assert key[6:18] in created.stderr and key not in created.stderr

    rotated = gateway("keys", "rotate", key[6:18], url=keyed.url)
    assert rotated.returncode == 0, rotated.stderr
    assert KEY_LINE.match(rotated.stdout) and rotated.stdout != created.stdout
    assert models_status(keyed.url, rotated.stdout.strip()) == 200 and models_status(keyed.url, key) == 401

    as_json = gateway("keys", "create", "--name", "bob", "--team", team, "--json", url=keyed.url)
    body = json.loads(as_json.stdout)
    assert body["name"] == "bob" and models_status(keyed.url, body["key"]) == 200


def test_a_reader_closing_the_pipe_early_ends_the_command_quietly(keyed: GatewayServer) -> None:
    """`gateway keys list --json | head -1`: head exits, the next write meets a closed pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first write
    try:
        result = gateway("keys", "list", "--json", url=keyed.url, stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored"


def test_head_of_a_long_listing_is_quiet(keyed: GatewayServer) -> None:
    """The same through a shell pipeline: `head -1` takes a line of a listing larger than a pipe's
    buffer and leaves."""
    team = "pipe-" + uuid.uuid4().hex[:8]
    assert (
        gateway("teams", "create", team, "--metadata", json.dumps({"pad": "x" * 100_000}), url=keyed.url).returncode
        == 0
    )
    env = {**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_URL": keyed.url}
    try:
        result = subprocess.run(
            ["bash", "-c", f"'{GATEWAY}' teams list --json | head -1; echo \"exit ${{PIPESTATUS[0]}}\""],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        assert gateway("teams", "delete", team, url=keyed.url).returncode == 0  # the session's gateway, kept small
    assert result.stdout.splitlines() == ["[", "exit 141"], result.stdout
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


# -- keys generate -------------------------------------------------------------------------------
def lines_kept(before: str, after: str) -> list[str]:
    """The lines of `after` that are not in `before`, checking that `before`'s lines all stay, in order."""
    added, rest = [], iter(before.splitlines())
    expected = next(rest, None)
    for line in after.splitlines():
        if line == expected:
            expected = next(rest, None)
        else:
            added.append(line)
    assert expected is None, f"line {expected!r} of the file was lost"
    return added


def test_generate_adds_the_key_to_the_shipped_file_in_place(tmp_path: Path) -> None:
    """The shipped `keys: []` becomes `keys:` with the item; every other line of the file (its
    comments too) is kept; a second key follows the first; stdout holds only the key."""
    config = tmp_path / "gateway.yaml"
    shutil.copy(ROOT / "config/gateway.yaml", config)
    shipped = config.read_text()
    first = gateway("keys", "generate", "--name", "ci", "--team", "ops", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert KEY_LINE.match(first.stdout)
    added = lines_kept(shipped.replace("\nkeys: []\n", "\nkeys:\n"), config.read_text())
    key = first.stdout.strip()
    assert added == [
        f"  - id: {key[6:18]}",
        "    name: ci",
        "    team: ops",
        f"    hash: sha256:{hash_key(key)}",
    ]
    assert "team 'ops' is not declared" in first.stderr  # a hint, not a refusal: the store may hold it
    second = gateway("keys", "generate", "--name", "deploy", "--team", "ops", "--config", str(config))
    assert second.returncode == 0, second.stderr
    declared = Settings(config_file=str(config)).keys
    assert [(k.id, k.name, k.hash) for k in declared] == [
        (key[6:18], "ci", hash_key(key)),
        (second.stdout[6:18], "deploy", hash_key(second.stdout.strip())),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "port: 8080\nteams:\n- name: ops\n",  # no keys: at all, the file's lists at column 0
        "keys:      # none yet\nteams: [{name: ops}]\n",  # keys: with nothing after it
        "keys: ~\nteams: [{name: ops}]",  # null, and no newline at the end
        "teams:\n    -   name: ops\nkeys:\n    -   id: aaaaaaaaaaaa\n        name: old\n        team: ops\n"
        f"        hash: {'a' * 64}\n# the end\n",  # a list of its own layout; a comment after it
        f'keys: [{{id: aaaaaaaaaaaa, name: old, team: ops, hash: "{"a" * 64}"}}]\nteams: [{{name: ops}}]\n',
    ],
)
def test_generate_handles_each_shape_of_keys(tmp_path: Path, text: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    result = gateway("keys", "generate", "--name", "ci", "--team", "ops", "--config", str(config))
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    declared = Settings(config_file=str(config)).keys
    assert (declared[-1].id, declared[-1].hash) == (key[6:18], hash_key(key))
    assert "not declared" not in result.stderr
    for line in text.splitlines():
        if not line.startswith("keys:"):
            assert line in config.read_text().splitlines(), line


def test_generate_leaves_a_file_it_cannot_use_alone(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    broken = "keys: []\nteams: []\nkeys: []\n"
    config.write_text(broken)
    result = gateway("keys", "generate", "--name", "ci", "--team", "ops", "--config", str(config))
    assert result.returncode == 1 and result.stdout == ""
    assert f"problem: {config}:3: 'keys' is given twice (first at line 1)" in result.stderr
    assert config.read_text() == broken
    taken = "keys:\n  - {id: aaaaaaaaaaaa, name: ci, team: ops, hash: " + "a" * 64 + "}\nteams: [{name: ops}]\n"
    config.write_text(taken)
    result = gateway("keys", "generate", "--name", "ci", "--team", "ops", "--config", str(config))
    assert result.returncode == 1 and result.stdout == "" and config.read_text() == taken
    assert "keys: key name 'ops/ci' is declared more than once" in result.stderr
    bad_name = gateway("keys", "generate", "--name", "no spaces", "--team", "ops", "--config", str(config))
    assert bad_name.returncode == 1 and "problem: --name: 1-64 letters" in bad_name.stderr


def test_generate_edits_the_file_a_symlink_points_to(tmp_path: Path) -> None:
    """A config reached through symlinks (a Kubernetes ConfigMap's `..data`, stow) stays a
    symlink: the file it points to gets the key and keeps its mode (and owner, where we may)."""
    real = tmp_path / "..2030_01_01" / "gateway.yaml"
    real.parent.mkdir()
    real.write_text("teams: [{name: ops}]\nkeys: []\n")
    real.chmod(0o640)
    owner = (65534, 65534) if os.geteuid() == 0 else (os.geteuid(), os.getegid())  # nobody's, if we may
    os.chown(real, *owner)
    (tmp_path / "..data").symlink_to("..2030_01_01")
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "gateway.yaml"
    config.symlink_to("../..data/gateway.yaml")
    result = gateway("keys", "generate", "--name", "ci", "--team", "ops", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert config.is_symlink() and os.readlink(config) == "../..data/gateway.yaml"
    assert (tmp_path / "..data").is_symlink()
    key = result.stdout.strip()
    assert [(k.id, k.hash) for k in Settings(config_file=str(real)).keys] == [(key[6:18], hash_key(key))]
    status = real.stat()
    assert (status.st_mode & 0o7777, status.st_uid, status.st_gid) == (0o640, *owner)
    assert sorted(p.name for p in real.parent.iterdir()) == ["gateway.yaml"]  # no temporary file left


def test_generate_without_a_file_prints_only_the_item(tmp_path: Path) -> None:
    """The item goes on stdout, ready to paste under `keys:`; the key on stderr (a redirect
    never writes the secret into a file)."""
    result = gateway("keys", "generate", "--name", "ci", "--team", "ops")
    assert result.returncode == 0, result.stderr
    item = yaml.safe_load("keys:\n" + result.stdout)["keys"]
    key = re.search(r"sk-gw-[a-z0-9]{12}-[A-Za-z0-9]{32}", result.stderr)
    assert key and "sk-gw-" not in result.stdout and "keys:" not in result.stdout
    assert item == [{"id": key.group()[6:18], "name": "ci", "team": "ops", "hash": f"sha256:{hash_key(key.group())}"}]
    scripted = json.loads(gateway("keys", "generate", "--name", "ci", "--team", "ops", "--json").stdout)
    assert scripted["hash"] == f"sha256:{hash_key(scripted['key'])}" and scripted["id"] == scripted["key"][6:18]


@pytest.fixture
def shipped_with_a_key(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    config = tmp_path / "gateway.yaml"
    config.write_text((ROOT / "config/gateway.yaml").read_text().replace("teams: []", "teams:\n  - name: ops"))
    result = gateway("keys", "generate", "--name", "ci", "--team", "ops", "--config", str(config))
    assert result.returncode == 0, result.stderr
    yield config, result.stdout.strip()


def test_a_generated_key_gets_in(shipped_with_a_key: tuple[Path, str], simulator: SimulatorThread) -> None:
    config, key = shipped_with_a_key
    settings = Settings(
        config_file=str(config), store="memory", upstream={"base_url": simulator.base_url, "api_key": UPSTREAM_KEY}
    )
    with GatewayServer(settings) as server:
        assert models_status(server.url, key) == 200
        assert models_status(server.url, key[:-1] + ("A" if key[-1] != "A" else "B")) == 401
