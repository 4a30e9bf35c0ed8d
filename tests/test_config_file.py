"""The YAML config file cannot silently drop anything: a key given twice is a problem naming the
file and line; problems are in our words, with "did you mean" for a misspelt setting; a declared
key must name a team declared in the file or held by the store."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from app.auth.keys import hash_key, new_key, new_key_id
from app.auth.records import KeyRecord, TeamFields, TeamRecord
from app.auth.registry import Registry
from app.settings import ConfigError, Settings, load_settings
from app.store.base import Store
from app.store.redis import RedisStore
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, UPSTREAM_KEY, free_port_number

GATEWAY = Path(sys.executable).with_name("gateway")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENROUTER_"))}


def gateway(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed `gateway` with good secrets and nothing else from this environment."""
    secrets = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "OPENROUTER_API_KEY": UPSTREAM_KEY}
    return subprocess.run(
        [str(GATEWAY), *args],
        cwd=cwd,
        env={**clean_env(), **secrets, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def key_entry(team: str, name: str = "ci") -> str:
    key_id = new_key_id()
    return f"  - id: {key_id}\n    name: {name}\n    team: {team}\n    hash: sha256:{hash_key(new_key(key_id))}\n"


# -- keys given twice ----------------------------------------------------------------------------
PASTED_UNDER_SHIPPED = """\
models:
  aliases:
    fast: openai/gpt-4o-mini
keys: []
teams:
  - name: ops
keys:
{entry}"""


def test_a_second_top_level_keys_is_a_problem_naming_file_and_lines(tmp_path: Path) -> None:
    """The issue's trap: a `keys:` block pasted under the shipped `keys: []`; YAML keeps the last,
    so one of the two vanished and `check` said OK."""
    path = tmp_path / "gateway.yaml"
    path.write_text(PASTED_UNDER_SHIPPED.format(entry=key_entry("ops")))
    with pytest.raises(ConfigError) as caught:
        Settings(config_file=str(path))
    assert caught.value.problems == [
        f"{path}:7: 'keys' is given twice (first at line 4); YAML keeps only the last",
    ]
    checked = gateway(tmp_path, "check", "--config", str(path))
    assert checked.returncode == 1
    assert f"problem: {path}:7: 'keys' is given twice (first at line 4)" in checked.stderr
    served = gateway(tmp_path, "serve", "--config", str(path), "--port", str(free_port_number()))
    assert served.returncode == 2 and f"problem: {path}:7: 'keys' is given twice" in served.stderr
    assert "Traceback" not in checked.stderr + served.stderr


def test_keys_given_twice_are_found_at_every_level(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "upstream:\n"
        "  retries:\n"
        "    max_attempts: 2\n"
        "    max_attempts: 5\n"
        "models:\n"
        "  aliases: {fast: openai/gpt-4o-mini, fast: openai/gpt-5-mini}\n"
        "teams:\n"
        "  - name: ml\n"
        "    rpm: 5\n"
        "    rpm: 50\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=str(path))
    assert caught.value.problems == [
        f"{path}:4: 'max_attempts' is given twice (first at line 3); YAML keeps only the last",
        f"{path}:6: 'fast' is given twice (first at line 6); YAML keeps only the last",
        f"{path}:10: 'rpm' is given twice (first at line 9); YAML keeps only the last",
    ]


def test_keys_given_twice_do_not_hide_the_other_problems(tmp_path: Path) -> None:
    """`check` prints every problem: the repeats, and what is wrong with the file as YAML reads
    it (the last of each kept), in one run."""
    path = tmp_path / "gateway.yaml"
    path.write_text("port: 8080\nport: http\nuptream: {deadline_s: 3}\napi_key: sk-gw-in-the-file-0123456789\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=str(path))
    assert caught.value.problems == [
        f"{path}:2: 'port' is given twice (first at line 1); YAML keeps only the last",
        "api_key: secrets are read from the environment only, remove it from the file",
        "port: expected a whole number, not 'http'",
        "uptream: unknown setting; did you mean 'upstream'?",
    ]
    checked = gateway(tmp_path, "check", "--config", str(path))
    assert checked.returncode == 1
    assert [line.removeprefix("problem: ") for line in checked.stderr.splitlines()] == caught.value.problems


def test_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    """`<<: *anchor` then a key of its own is YAML's way to override, not a repeat."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "limits:\n  team_defaults: &base {rpm: 60, tpm: 1000}\n  key_defaults:\n    <<: *base\n    rpm: 10\n"
    )
    settings = load_settings(config_file=str(path))
    assert (settings.limits.key_defaults.rpm, settings.limits.key_defaults.tpm) == (10, 1000)


# -- problems in our words -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("uptream:\n  deadline_s: 30\n", "uptream: unknown setting; did you mean 'upstream'?"),
        ("upstream:\n  retires: {max_attempts: 2}\n", "upstream.retires: unknown setting; did you mean 'retries'?"),
        ("limits:\n  globl: {rpm: 5}\n", "limits.globl: unknown setting; did you mean 'global'?"),
        ("teams:\n  - name: ml\n    rpmm: 5\n", "teams.0.rpmm: unknown setting; did you mean 'rpm'?"),
        ("zzzz: 1\n", "zzzz: unknown setting"),
        ("port: http\n", "port: expected a whole number, not 'http'"),
        ("upstream:\n  deadline_s: soon\n", "upstream.deadline_s: expected a number, not 'soon'"),
        ("upstream:\n  deadline_s: -1\n", "upstream.deadline_s: must be greater than 0, not -1"),
        ("log_requests: perhaps\n", "log_requests: expected true or false, not 'perhaps'"),
        ("cors_origins: '*'\n", "cors_origins: expected a list, not '*'"),
        ("models:\n  per_model: {x/y: {defaults: [a]}}\n", "models.per_model.x/y.defaults: expected a mapping"),
        ("limits:\n  on_store_error: {budgets: maybe}\n", "expected 'open' or 'closed', not 'maybe'"),
        ("attribution:\n  categories: [a, b, c]\n", "attribution.categories: at most 2 items, not 3"),
        ("keys:\n  - {id: abc}\n", "keys.0.name: required, and not given"),
    ],
)
def test_problems_are_in_our_words(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=str(path))
    assert any(problem in p for p in caught.value.problems), caught.value.problems
    assert not any("Input should" in p or "Extra inputs" in p or "Value error" in p for p in caught.value.problems)


def test_check_says_did_you_mean(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("uptream:\n  deadline_s: 30\n")
    result = gateway(tmp_path, "check", "--config", "gateway.yaml")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "problem: uptream: unknown setting; did you mean 'upstream'?"


ZERO = "must be at least 1; leave it out for no limit"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("limits:\n  global: {rpm: 0}\n", f"limits.global.rpm: {ZERO}"),
        ("limits:\n  team_defaults: {tpm: 0}\n", f"limits.team_defaults.tpm: {ZERO}"),
        ("limits:\n  key_defaults: {max_concurrency: 0}\n", f"limits.key_defaults.max_concurrency: {ZERO}"),
        ("teams:\n  - {name: ml, rpm: 0}\n", f"teams.0.rpm: {ZERO}"),
        (
            "teams: [{name: ml}]\nkeys:\n" + key_entry("ml") + "    max_concurrency: 0\n",
            f"keys.0.max_concurrency: {ZERO}",
        ),
    ],
)
def test_a_zero_rate_limit_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    """0 requests a minute refuses every request, while many mean "no limit" by it: refused,
    saying how to have no limit. A budget of 0 stays allowed: it is how spend is stopped."""
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=str(path))
    assert caught.value.problems == [problem]
    path.write_text("limits:\n  global: {budget_usd: 0}\nteams:\n  - {name: ml, budget_usd: 0, rpm: 1}\n")
    assert load_settings(config_file=str(path)).limits.global_.budget_usd == 0


# -- declared keys need a team -------------------------------------------------------------------
def test_check_refuses_a_declared_key_whose_team_is_declared_nowhere(tmp_path: Path) -> None:
    """With the memory store nothing is stored before the start: only the file's teams count."""
    path = tmp_path / "gateway.yaml"
    path.write_text("teams:\n  - name: ops\nkeys:\n" + key_entry("ops") + key_entry("nowhere"))
    result = gateway(tmp_path, "check", "--config", str(path), GATEWAY_STORE="memory")
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and problems[0].startswith("problem: keys.1.team: no team 'nowhere' under teams:")
    assert "memory store starts empty" in problems[0]
    stored = gateway(tmp_path, "check", "--config", str(path))  # the default store: a (new, empty) SQLite file
    assert stored.returncode == 1 and "no team 'nowhere' under teams: in the file, nor in the store" in stored.stderr
    path.write_text("teams:\n  - name: ops\nkeys:\n" + key_entry("ops"))
    assert gateway(tmp_path, "check", "--config", str(path), GATEWAY_STORE="memory").returncode == 0


def test_serve_refuses_a_declared_key_whose_team_is_declared_nowhere(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("keys:\n" + key_entry("nowhere"))
    result = gateway(tmp_path, "serve", "--config", str(path), "--port", str(free_port_number()))
    assert result.returncode == 2
    assert "problem: keys.0.team: no team 'nowhere'" in result.stderr
    assert "refusing to start" in result.stderr and "Traceback" not in result.stderr


def test_the_app_itself_refuses_in_one_line(tmp_path: Path) -> None:
    """Run by uvicorn directly (`uvicorn app.main:create_app --factory`, as main.py documents),
    without the CLI's checks first, the app's own start refuses the key in one line."""
    path = tmp_path / "gateway.yaml"
    path.write_text("keys:\n" + key_entry("nowhere"))
    uvicorn = str(GATEWAY.with_name("uvicorn"))
    port = str(free_port_number())
    result = subprocess.run(
        [uvicorn, "app.main:create_app", "--factory", "--host", "127.0.0.1", "--port", port],
        cwd=tmp_path,
        env={**clean_env(), "GATEWAY_CONFIG": str(path), "OPENROUTER_API_KEY": UPSTREAM_KEY},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "problem: keys.0.team: no team 'nowhere'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_team_held_by_the_store_counts(tmp_path: Path, redis_server: RedisServer) -> None:
    """A key may be declared for a team made through the admin API (kept in Redis); `check`
    and `serve` read the store for it, and refuse a team found in neither."""
    prefix = "t" + uuid.uuid4().hex[:10]

    async def create_team() -> None:
        store = RedisStore(redis_server.url, prefix=prefix)
        try:
            await Registry(store).create_team("stored", TeamFields())
        finally:
            await store.close()

    asyncio.run(create_team())
    path = tmp_path / "gateway.yaml"
    path.write_text("keys:\n" + key_entry("stored"))
    env = {"GATEWAY_STORE": redis_server.url, "GATEWAY_STORE_PREFIX": prefix}
    checked = gateway(tmp_path, "check", "--config", str(path), **env)
    assert checked.returncode == 0, checked.stderr
    assert "1 declared key" in checked.stdout
    path.write_text("keys:\n" + key_entry("stored") + key_entry("elsewhere", "bot"))
    checked = gateway(tmp_path, "check", "--config", str(path), **env)
    assert checked.returncode == 1
    assert "problem: keys.1.team: no team 'elsewhere' under teams: in the file, nor in the store" in checked.stderr
    served = gateway(tmp_path, "serve", "--config", str(path), "--port", str(free_port_number()), **env)
    assert served.returncode == 2 and "problem: keys.1.team: no team 'elsewhere'" in served.stderr


def test_check_says_when_only_declared_teams_could_count(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("keys:\n" + key_entry("stored"))
    down = f"redis://127.0.0.1:{free_port_number()}/0"
    result = gateway(tmp_path, "check", "--config", str(path), GATEWAY_STORE=down)
    assert result.returncode == 1
    assert "problem: store: redis://127.0.0.1:" in result.stderr
    assert "keys.0.team: no team 'stored' under teams: in the file (the store does not answer" in result.stderr


@pytest.mark.anyio
async def test_loading_declared_entries_refuses_a_key_without_a_team(store: Store) -> None:
    """The gateway's own start (not only the CLI) refuses, before writing anything; a team that
    was declared and is withdrawn from the file now does not count either."""
    registry = Registry(store)
    declared = TeamRecord(name="gitops", declared=True)
    key = KeyRecord(id=new_key_id(), name="ci", team="gitops", hash="1" * 64, declared=True)
    with pytest.raises(ConfigError, match=r"keys\.0\.team: no team 'gitops'"):
        await registry.load_declared([], [key])
    assert await store.get_key(key.id) is None
    await registry.load_declared([declared], [key])
    with pytest.raises(ConfigError, match=r"keys\.0\.team: no team 'gitops'"):
        await registry.load_declared([], [key])  # gitops was only declared: it goes with the file
    await registry.create_team("made", TeamFields())
    made = key.model_copy(update={"team": "made"})
    await registry.load_declared([], [made])  # a team made through the API counts
    assert (await store.get_key(key.id)) is not None
