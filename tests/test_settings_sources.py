"""Settings reach the gateway through `Settings` (app/settings.py), not the environment: only the
modules listed here touch `os.environ`, each for a reason of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from app.settings import Settings
from app.usage.metrics import LocalCounter, Metrics, SharedCounter

APP = Path(__file__).resolve().parent.parent / "app"
ENVIRON = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}

# The modules that may touch the environment, and why.
ALLOWED = {
    # The settings themselves: GATEWAY_*, <NAME>_FILE secrets, OPENROUTER_*, a team's
    # `upstream_key_env`, and PROMETHEUS_MULTIPROC_DIR (Settings.metrics_multiprocess_dir).
    "settings.py",
    # `gateway serve` sets PROMETHEUS_MULTIPROC_DIR (prometheus_client reads it on import, in each
    # worker) and GATEWAY_CONFIG for the worker processes, which load their own settings.
    "cli/serve.py",
    # `gateway check` warns of GATEWAY_* variables that name no setting: the environment is its input.
    "cli/check.py",
    # The admin CLI is a client of a running gateway: GATEWAY_URL and GATEWAY_ADMIN_KEY say which
    # gateway and with what key, and are no setting of a gateway.
    "cli/admin.py",
}


def readers() -> set[str]:
    """Modules under app/ naming `os.environ`, `os.getenv` and the like, or importing them from os."""
    found = set()
    for path in APP.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ENVIRON:
                hit = isinstance(node.value, ast.Name) and node.value.id == "os"
            elif isinstance(node, ast.ImportFrom) and node.module == "os":
                hit = any(alias.name in ENVIRON for alias in node.names)
            else:
                continue
            if hit:
                found.add(path.relative_to(APP).as_posix())
    return found


def test_only_the_settings_and_the_cli_read_the_environment() -> None:
    assert readers() <= ALLOWED, "read it in app/settings.py and pass it through Settings"


def test_each_allowed_module_still_needs_it() -> None:
    assert readers() == ALLOWED, "drop a module that no longer reads the environment from ALLOWED"


def test_the_multiprocess_directory_reaches_metrics_through_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert Settings(config_file=None).metrics_multiprocess_dir is None
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert Settings(config_file=None).metrics_multiprocess_dir == str(tmp_path)


def test_metrics_share_files_only_when_told() -> None:
    assert isinstance(Metrics().requests, LocalCounter)
    shared = Metrics(multiprocess=True)
    assert shared.multiprocess and isinstance(shared.requests, SharedCounter)
