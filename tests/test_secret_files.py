"""Secrets from files, the Docker-secrets way: `<NAME>_FILE` names a file whose content, stripped,
is the secret `<NAME>`; `<NAME>` itself wins; a file that is missing or unreadable is a problem
named by its variable, and the secret never shows in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import ConfigError, Settings, load_settings

GATEWAY = Path(sys.executable).with_name("gateway")
SECRETS = {
    "GATEWAY_API_KEY": "sk-gw-bootstrap-from-a-file-0123456789",
    "GATEWAY_ADMIN_KEY": "admin-from-a-file-0123456789abcdef0123",
    "GATEWAY_METRICS_KEY": "metrics-from-a-file-0123456789abcdef01",
    "OPENROUTER_API_KEY": "sk-or-v1-from-a-file-0123456789abcdef",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("GATEWAY_", "OPENROUTER_")):
            monkeypatch.delenv(name)


def secrets_of(settings: Settings) -> dict[str, str | None]:
    fields = {
        "GATEWAY_API_KEY": settings.api_key,
        "GATEWAY_ADMIN_KEY": settings.admin_key,
        "GATEWAY_METRICS_KEY": settings.metrics_key,
        "OPENROUTER_API_KEY": settings.upstream.api_key,
    }
    return {name: value.get_secret_value() if value else None for name, value in fields.items()}


def test_each_secret_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, secret in SECRETS.items():
        path = tmp_path / name.lower()
        path.write_text(f"  {secret}\n\n")  # as `echo` and editors leave it: stripped
        monkeypatch.setenv(f"{name}_FILE", str(path))
    monkeypatch.setenv("OPENROUTER_BASE_URL", "http://127.0.0.1:9/api/v1")  # merges with the file's key
    settings = load_settings(config_file=None)
    assert secrets_of(settings) == SECRETS
    assert settings.upstream.base_url == "http://127.0.0.1:9/api/v1"


def test_the_variable_itself_wins_over_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, secret in SECRETS.items():
        path = tmp_path / name.lower()
        path.write_text("from-the-file-" + secret)
        monkeypatch.setenv(f"{name}_FILE", str(path))
        monkeypatch.setenv(name, secret)
    assert secrets_of(load_settings(config_file=None)) == SECRETS


def test_a_missing_or_unreadable_file_is_a_named_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_METRICS_KEY_FILE", str(tmp_path / "nowhere"))
    monkeypatch.setenv("OPENROUTER_API_KEY_FILE", str(tmp_path))  # a directory
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=None)
    assert caught.value.problems == [
        f"GATEWAY_METRICS_KEY_FILE: {tmp_path / 'nowhere'}: file not found",
        f"OPENROUTER_API_KEY_FILE: {tmp_path}: cannot be read (Is a directory)",
    ]


def test_a_placeholder_in_a_file_is_refused_like_any_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for content in ("", "changeme\n"):
        (tmp_path / "admin_key").write_text(content)
        monkeypatch.setenv("GATEWAY_ADMIN_KEY_FILE", str(tmp_path / "admin_key"))
        with pytest.raises(ConfigError) as caught:
            load_settings(config_file=None)
        assert caught.value.problems == [
            "admin_key (GATEWAY_ADMIN_KEY_FILE): looks like a placeholder, not a real secret"
        ]


def test_the_metrics_key_is_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_METRICS_KEY", "<your metrics key>")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=None)
    assert caught.value.problems == ["metrics_key (GATEWAY_METRICS_KEY): looks like a placeholder, not a real secret"]
    monkeypatch.setenv("GATEWAY_METRICS_KEY", SECRETS["GATEWAY_METRICS_KEY"])
    assert SECRETS["GATEWAY_METRICS_KEY"] not in repr(load_settings(config_file=None))
    config = tmp_path / "gateway.yaml"
    config.write_text("metrics_key: " + SECRETS["GATEWAY_METRICS_KEY"] + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=str(config))
    assert caught.value.problems == ["metrics_key: secrets are read from the environment only, remove it from the file"]


def test_serve_refuses_to_start_without_the_file(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "OPENROUTER_API_KEY": SECRETS["OPENROUTER_API_KEY"],
        "GATEWAY_ADMIN_KEY_FILE": str(tmp_path / "run/secrets/admin_key"),
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_PORT": "0",
    }
    result = subprocess.run([str(GATEWAY), "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"GATEWAY_ADMIN_KEY_FILE: {tmp_path / 'run/secrets/admin_key'}: file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_variable_counts_as_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`GATEWAY_ADMIN_KEY=` (as an env file or a compose `environment:` with no value leaves it)
    beside its `_FILE`: the file is read, as for OPENROUTER_API_KEY; an empty setting is its default."""
    for name, secret in SECRETS.items():
        (tmp_path / name.lower()).write_text(secret)
        monkeypatch.setenv(f"{name}_FILE", str(tmp_path / name.lower()))
        monkeypatch.setenv(name, "")
    for name in ("GATEWAY_PORT", "GATEWAY_UPSTREAM__DEADLINE_S", "GATEWAY_CONFIG", "GATEWAY_CONFIG_FILE"):
        monkeypatch.setenv(name, "")
    monkeypatch.chdir(tmp_path)  # no config/gateway.yaml: the default file, not one named on purpose
    settings = load_settings()
    assert secrets_of(settings) == SECRETS
    assert (settings.port, settings.upstream.deadline_s, settings.config_file) == (8080, 600.0, "config/gateway.yaml")


def test_the_store_url_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis URL holds its password: a Docker secret is a natural home for it."""
    url = "redis://:s3cret-pass@redis:6379/0"
    (tmp_path / "store").write_text(url + "\n")
    monkeypatch.setenv("GATEWAY_STORE_FILE", str(tmp_path / "store"))
    monkeypatch.setenv("GATEWAY_STORE", "")
    assert load_settings(config_file=None).store == url
    monkeypatch.setenv("GATEWAY_STORE", "memory")  # the variable itself wins, as for a secret
    assert load_settings(config_file=None).store == "memory"
    monkeypatch.delenv("GATEWAY_STORE")
    monkeypatch.setenv("GATEWAY_STORE_FILE", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=None)
    assert caught.value.problems == [f"GATEWAY_STORE_FILE: {tmp_path / 'nowhere'}: file not found"]


def test_other_settings_cannot_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`GATEWAY_PORT_FILE` would otherwise be ignored without a word; GATEWAY_CONFIG_FILE stays
    what it is, another name for GATEWAY_CONFIG."""
    (tmp_path / "value").write_text("9090\n")
    for name in ("GATEWAY_PORT_FILE", "gateway_upstream__deadline_s_file"):
        monkeypatch.setenv(name, str(tmp_path / "value"))
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=None)
    assert caught.value.problems == [
        "GATEWAY_PORT_FILE: only secrets and the store URL can come from a file",
        "gateway_upstream__deadline_s_file: only secrets and the store URL can come from a file",
    ]
    for name in ("GATEWAY_PORT_FILE", "gateway_upstream__deadline_s_file"):
        monkeypatch.delenv(name)
    (tmp_path / "gateway.yaml").write_text("port: 9090\n")
    monkeypatch.setenv("GATEWAY_CONFIG_FILE", str(tmp_path / "gateway.yaml"))
    assert load_settings().port == 9090
