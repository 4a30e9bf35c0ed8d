"""The container image, checked as far as a machine without a Docker engine allows: its build
context computed as Docker computes it (docker-py's .dockerignore matching) holds every COPY
source and nothing secret; hadolint is clean; and the very commands the Dockerfile runs install
exactly uv.lock into a fresh environment that serves, passes the HEALTHCHECK and stops on SIGTERM."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
from docker.utils.build import exclude_paths

from app.simulator import SimulatorThread
from tests.support import ADMIN_KEY, UPSTREAM_KEY, wait_until
from tests.test_demo import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for op, arg in instructions():
        if op == "FROM":
            out.append([])
        out[-1].append((op, arg))
    return out


def build_context() -> set[str]:
    """What `docker build .` sends: every path that .dockerignore does not leave out."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return set(exclude_paths(str(ROOT), patterns, "Dockerfile"))


def copy_sources() -> list[str]:
    """The context paths of every COPY that does not copy from a stage."""
    sources = []
    for op, arg in instructions():
        if op == "COPY" and "--from=" not in arg:
            sources += [part for part in arg.split()[:-1] if not part.startswith("--")]
    return sources


def stage_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, arg in stage:
        if op == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arg)))
    return env


def test_dockerfile_structure() -> None:
    steps = instructions()
    bases = [arg for op, arg in steps if op == "FROM"]
    assert len(bases) == 2 and all(b.startswith("python:3.11-slim") for b in bases)  # multi-stage, slim
    final = stages()[-1]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = json.loads(next(arg for op, arg in final if op == "ENTRYPOINT"))
    command = json.loads(next(arg for op, arg in final if op == "CMD"))
    assert entrypoint == ["gateway"] and command == ["serve"]  # exec form: the server is PID 1
    healthcheck = next(arg for op, arg in final if op == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "CMD [" in healthcheck
    env = stage_env(final)
    assert env["GATEWAY_CONFIG"] == "/etc/gateway/gateway.yaml"
    assert any(op == "VOLUME" and env["GATEWAY_DATA_DIR"] in arg for op, arg in final)  # the store's data
    baked = " ".join(arg for op, arg in steps if op in ("ENV", "ARG"))
    assert not re.search(r"(API_KEY|ADMIN_KEY|METRICS_KEY)", baked)  # no secret baked into the image


def test_build_context_holds_every_copy_source_and_nothing_private() -> None:
    context = build_context()
    sources = copy_sources()
    assert {"uv.lock", "pyproject.toml", "app", "config/gateway.yaml"} <= set(sources)
    for source in sources:
        assert any(path == source or fnmatch.fnmatch(path, source) for path in context), f"{source} not in context"
    assert any(path.startswith("app/") and path.endswith(".py") for path in context)
    for private in (".git", ".venv", "data", "secrets", "tests"):
        assert not any(path == private or path.startswith(private + "/") for path in context), private


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_installs_with_the_pinned_uv() -> None:
    """The build stage installs the same uv as CI and the tests, so `--locked` means the same."""
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    pinned = next(spec for spec in dev if spec.startswith("uv=="))
    build = " ".join(arg for op, arg in stages()[0] if op == "RUN")
    assert f"pip install --no-cache-dir {pinned}" in build
    assert pinned in (ROOT / ".ci/run").read_text()


def test_the_dockerfile_commands_install_the_lock_and_serve(tmp_path: Path, simulator: SimulatorThread) -> None:
    """The build stage's commands, run in a copy of the build context (the uv they install is
    the test environment's own, the same pinned version), then the runtime stage's settings."""
    source = tmp_path / "context"
    for path in sorted(build_context()):
        if (ROOT / path).is_file():
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, source / path)
    build, runtime = stages()
    target = tmp_path / "opt-gateway"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))},
        **stage_env(build),
        "UV_PROJECT_ENVIRONMENT": str(target),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    for op, arg in build:
        if op == "RUN" and not arg.startswith("pip install"):
            result = subprocess.run(arg, shell=True, cwd=source, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
    assert not (target / "bin/pytest").exists()  # --no-dev: no test tools in the image
    frozen = subprocess.run(
        [str(BIN / "uv"), "pip", "freeze", "--python", str(target / "bin/python")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {p["name"]: p["version"] for p in lock["package"] if "version" in p}
    installed = dict(line.split("==") for line in frozen.stdout.splitlines() if "==" in line)
    assert installed and all(locked[name] == version for name, version in installed.items()), installed
    assert {"fastapi", "uvicorn", "aiohttp"} <= set(installed)
    serve_and_stop(tmp_path, target, runtime, simulator)


def serve_and_stop(tmp_path: Path, target: Path, runtime: list[tuple[str, str]], simulator: SimulatorThread) -> None:
    config, data = tmp_path / "gateway.yaml", tmp_path / "data"
    shutil.copy(ROOT / "config/gateway.yaml", config)
    data.mkdir()
    port = free_port()
    env = {
        **stage_env(runtime),
        "PATH": f"{target / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_DATA_DIR": str(data),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "OPENROUTER_BASE_URL": simulator.base_url,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_SHUTDOWN_GRACE_S": "2",
    }
    entrypoint = json.loads(next(arg for op, arg in runtime if op == "ENTRYPOINT"))
    command = json.loads(next(arg for op, arg in runtime if op == "CMD"))
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            [str(target / "bin" / entrypoint[0]), *entrypoint[1:], *command], env=env, stdout=log, stderr=log, cwd=data
        )
    try:

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return process.poll() is not None

        wait_until(up, 30, "the installed gateway")
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        healthcheck = next(arg for op, arg in runtime if op == "HEALTHCHECK")
        probe = json.loads(re.search(r"CMD (\[.*\])", healthcheck).group(1))  # type: ignore[union-attr]
        probe = [str(target / "bin" / probe[0]), *(part.replace("8080", str(port)) for part in probe[1:])]
        assert subprocess.run(probe, env=env, timeout=30).returncode == 0
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()  # never leave the installed gateway running
            process.wait(10)
            raise
        assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
