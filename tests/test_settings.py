"""Configuration: environment over YAML over defaults; secrets only from the environment;
`gateway check` names each problem by its path in the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.config_file import SECRETS, Secret
from app.settings import ConfigError, Settings, load_settings
from app.variables import strays

GATEWAY = Path(sys.executable).with_name("gateway")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("GATEWAY_", "OPENROUTER_")):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = Settings(config_file=None)
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert settings.upstream.base_url == "https://openrouter.ai/api/v1"
    assert settings.upstream.api_key is None
    assert (settings.store, settings.data_dir) == ("sqlite", "data")  # a file that survives restarts


def test_env_over_yaml_over_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "port: 9000\nhost: 10.0.0.1\nupstream:\n  deadline_s: 30\n  connect_timeout_s: 2\n")
    settings = Settings(config_file=path)
    assert (settings.port, settings.host, settings.upstream.deadline_s) == (9000, "10.0.0.1", 30)
    monkeypatch.setenv("GATEWAY_PORT", "9100")
    monkeypatch.setenv("GATEWAY_UPSTREAM__DEADLINE_S", "45")
    settings = Settings(config_file=path)
    assert (settings.port, settings.host) == (9100, "10.0.0.1")
    assert (settings.upstream.deadline_s, settings.upstream.connect_timeout_s) == (45, 2)


def test_openrouter_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-v1-abcdef0123456789")
    monkeypatch.setenv("OPENROUTER_BASE_URL", "http://127.0.0.1:9999/api/v1/")
    monkeypatch.setenv("GATEWAY_API_KEY", "sk-gw-0123456789abcdef")
    monkeypatch.setenv("GATEWAY_HOST", "127.0.0.1")
    settings = Settings(config_file=None)
    assert settings.upstream.api_key is not None
    assert settings.upstream.api_key.get_secret_value() == "sk-or-v1-abcdef0123456789"
    assert settings.upstream.base_url == "http://127.0.0.1:9999/api/v1"
    assert settings.api_key is not None and settings.host == "127.0.0.1"
    assert "sk-or-v1-abcdef0123456789" not in repr(settings)


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", write(tmp_path, "port: 7000\n"))
    assert Settings().port == 7000
    monkeypatch.setenv("GATEWAY_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"missing\.yaml: file not found"):
        Settings()


def test_secrets_are_refused_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "api_key: sk-gw-123456789\nupstream:\n  api_key: sk-or-v1-123456789\n")
    with pytest.raises(ConfigError) as caught:
        Settings(config_file=path)
    assert any(p.startswith("api_key:") for p in caught.value.problems)
    assert any(p.startswith("upstream.api_key:") for p in caught.value.problems)


@pytest.mark.parametrize(
    "value", ["changeme", "your-key-here", "<OPENROUTER_API_KEY>", "sk-or-v1-xxxxxxxx", "", "sk-or-v1-...", "sk-gw-…"]
)
def test_placeholder_secrets_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"upstream\.api_key: .*placeholder"):
        load_settings(config_file=None, upstream={"api_key": value})


@pytest.mark.parametrize("secret", SECRETS, ids=lambda secret: secret.env)
def test_a_placeholder_names_the_variable_it_came_from(monkeypatch: pytest.MonkeyPatch, secret: Secret) -> None:
    monkeypatch.setenv(secret.env, "sk-or-v1-...")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=None)
    assert caught.value.problems == [f"{secret.name} ({secret.env}): looks like a placeholder, not a real secret"]


@pytest.mark.parametrize(
    ("variable", "warning"),
    [
        ("GATEWAY_UPSTREAM_DEADLINE_S", "did you mean GATEWAY_UPSTREAM__DEADLINE_S?"),  # one _ for __
        ("GATEWAY_ADMINKEY", "did you mean GATEWAY_ADMIN_KEY?"),
        ("GATEWAY_LIMITS__GLOBAL_RPM", "did you mean GATEWAY_LIMITS__GLOBAL__RPM?"),  # an alias: `global`
        ("GATEWAY_UPSTREAM__RETRIES_MAX_ATTEMPTS", "did you mean GATEWAY_UPSTREAM__RETRIES__MAX_ATTEMPTS?"),
        ("GATEWAY_LOG_LEVLE", "did you mean GATEWAY_LOG_LEVEL?"),
        ("gateway_hots", "did you mean GATEWAY_HOST?"),  # read whatever its case
        ("GATEWAY_ZZZ", None),
    ],
)
def test_a_variable_naming_no_setting_is_a_warning(variable: str, warning: str | None) -> None:
    expected = f"{variable} is not a setting" + (f"; {warning}" if warning else "")
    assert strays({variable: "1", "PATH": "/bin"}) == [expected]


@pytest.mark.parametrize(
    "variable",
    [
        "GATEWAY_PORT",
        "GATEWAY_UPSTREAM__DEADLINE_S",
        "GATEWAY_UPSTREAM__RETRIES__MAX_ATTEMPTS",  # two sections deep
        "GATEWAY_LIMITS__GLOBAL__RPM",
        "GATEWAY_LIMITS__ON_STORE_ERROR__BUDGETS",
        "GATEWAY_MODELS__ALIASES__FAST",  # a mapping's entries
        "GATEWAY_MODELS__PER_MODEL__GPT4__FALLBACKS",
        "GATEWAY_UPSTREAM",  # a whole section, as JSON
        "GATEWAY_URL",  # the CLI's
        "GATEWAY_CONFIG",
        "GATEWAY_CONFIG_FILE",
        "GATEWAY_ADMIN_KEY_FILE",
        "GATEWAY_METRICS_KEY_FILE",
        "GATEWAY_API_KEY_FILE",
        "GATEWAY_STORE_FILE",
        "GATEWAY_PORT_FILE",  # a problem of its own (only secrets come from files): not warned of twice
        "GATEWAY_SERVICE_HOST",  # Kubernetes' links to a service named `gateway`
        "GATEWAY_SERVICE_PORT",
        "GATEWAY_SERVICE_PORT_HTTP",
        "GATEWAY_PORT_8080_TCP",
        "GATEWAY_PORT_8080_TCP_PROTO",
        "GATEWAY_PORT_8080_TCP_PORT",
        "GATEWAY_PORT_8080_TCP_ADDR",
        "OPENROUTER_API_KEY",
        "GATEWAYS",
    ],
)
def test_known_variables_are_not_warned_of(variable: str) -> None:
    assert strays({variable: "1"}) == []


def test_shipped_example_config_is_valid() -> None:
    settings = Settings(config_file="config/gateway.yaml")
    assert settings.models.per_model["deepseek/deepseek-v3.2"].defaults == {"reasoning": {"enabled": True}}


def run_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as data_dir:  # `check` opens the default store's file
        return subprocess.run(
            [str(GATEWAY), "check", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "GATEWAY_DATA_DIR": data_dir, **(env or {})},
        )


def test_check_names_every_problem_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
upstream:
  deadline_s: -1
  base_url: ftp://nowhere
  retires: 3
attribution:
  app_title: "two\\nlines"
  categories: [Cli Agent, ok-one, three]
models:
  aliases: {fast: gpt-4o-mini}
  per_model:
    deepseek/deepseek-v3.2: {defaults: [not, a, mapping]}
port: http
""",
    )
    result = run_check("--config", path)
    assert result.returncode == 1
    for where in (
        "upstream.deadline_s",
        "upstream.base_url",
        "upstream.retires",
        "attribution.app_title",
        "attribution.categories",
        "models.aliases",
        "models.per_model.deepseek/deepseek-v3.2.defaults",
        "port",
    ):
        assert f"problem: {where}:" in result.stderr, (where, result.stderr)


def test_check_passes_a_good_config_with_secrets_set(tmp_path: Path) -> None:
    env = {"OPENROUTER_API_KEY": "sk-or-v1-0123456789abcdef", "GATEWAY_API_KEY": "sk-gw-bootstrap-0123456789abcdef"}
    result = run_check("--config", "config/gateway.yaml", env=env)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    missing = run_check("--config", "config/gateway.yaml")
    assert missing.returncode == 1
    assert "problem: upstream.api_key: OPENROUTER_API_KEY is not set" in missing.stderr


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"admin_host": "127.0.0.1"}, "admin_host needs admin_port"),
        ({"port": 9000, "admin_port": 9000}, "admin_port must differ from port"),
    ],
)
def test_admin_address_is_checked(overrides: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings(config_file=None, **overrides)
    assert load_settings(config_file=None, port=9000, admin_port=9001, admin_host="127.0.0.1").admin_port == 9001
