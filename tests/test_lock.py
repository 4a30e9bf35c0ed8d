"""The lock: uv.lock agrees with pyproject.toml, the test environment is exactly the lock, the
lint and type tools are pinned exactly, and libraries whose internals the code reads are bounded."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UV = Path(sys.executable).with_name("uv")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def uv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(UV), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_lock_agrees_with_pyproject() -> None:
    result = uv("lock", "--check", "--offline")
    assert result.returncode == 0, result.stderr


def test_the_test_environment_is_the_lock() -> None:
    """Every locked package is installed at its locked version (the project itself aside)."""
    result = uv("sync", "--locked", "--check", "--inexact", "--no-install-project")
    assert result.returncode == 0, result.stderr


def test_lint_and_type_tools_are_pinned_exactly() -> None:
    dev = PROJECT["dependency-groups"]["dev"]
    for tool in ("ruff", "mypy", "types-pyyaml", "uv"):
        spec = next(s for s in dev if re.split(r"[=<>!~\[ ]", s, maxsplit=1)[0].lower() == tool)
        assert re.fullmatch(rf"(?i){tool}==[\w.]+", spec), spec


def test_libraries_whose_internals_we_read_are_bounded() -> None:
    """app/server.py subclasses uvicorn's HttpToolsProtocol; app/usage/metrics.py uses
    prometheus_client.utils: a new minor of either is taken only through a new lock."""
    specs = {re.split(r"[=<>!~\[]", s, maxsplit=1)[0]: s for s in PROJECT["project"]["dependencies"]}
    for name in ("uvicorn", "prometheus-client"):
        assert "<" in specs[name], specs[name]
    assert PROJECT["build-system"]["requires"][0].startswith("setuptools==")


def test_every_documented_uv_run_refuses_a_stale_lock() -> None:
    """Without `--locked`, `uv run` re-locks when pyproject.toml changed, and installs that."""
    for path in [ROOT / "README.md", ROOT / ".ci/run", *sorted((ROOT / "docs").glob("*.md"))]:
        runs = re.findall(r"uv run(?! --locked)[^\n`]*", path.read_text())
        assert not runs, f"{path.relative_to(ROOT)}: {runs}"
