"""The default store keeps its data and is shared by workers: `gateway serve --workers 2` with
GATEWAY_STORE unset (the SQLite file in GATEWAY_DATA_DIR) answers a key made through either
worker on every request, holds an RPM limit, a budget and a concurrency cap exactly across both
over HTTP, refuses a revoked key on both within a second, and after `kill -9` of the whole
process group starts again with every team, key, revocation, settled spend and usage total as
it was."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from app.limits import estimate
from app.simulator import SimulatorThread
from tests.admission_support import MINI, catalogue_prices, nano_ceil
from tests.support import ADMIN_KEY, UPSTREAM_KEY, GatewayProcess, wait_until
from tests.test_limits import overlap

HELLO = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


def gateway_env(simulator: SimulatorThread, data_dir: Path, metrics_dir: Path) -> dict[str, str]:
    return {  # no GATEWAY_STORE: the default store
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_DATA_DIR": str(data_dir),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }


@pytest.fixture
def workers(simulator: SimulatorThread, tmp_path: Path) -> Any:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = gateway_env(simulator, tmp_path / "data", metrics)
    with GatewayProcess(env, str(tmp_path / "gateway.log"), args=("--workers", "2")) as gateway:
        yield gateway, metrics


def admin(gateway: GatewayProcess) -> httpx.Client:
    return httpx.Client(base_url=gateway.url + "/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)


def new_key(gateway: GatewayProcess, **limits: Any) -> dict[str, Any]:
    team = "team-" + uuid.uuid4().hex[:8]
    with admin(gateway) as client:
        assert client.post("/teams", json={"name": team}).status_code == 201
        response = client.post("/keys", json={"name": "bot", "team": team, **limits})
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created


def burst(gateway: GatewayProcess, key: str, count: int, body: dict[str, Any] = HELLO) -> list[httpx.Response]:
    """`count` requests at once, each on a new connection (so the kernel spreads them over the
    workers)."""

    async def send() -> list[httpx.Response]:
        limits = httpx.Limits(max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30, limits=limits, headers=headers) as client:
            return list(await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(count))))

    return asyncio.run(send())


def served_by_worker(metrics_dir: Path) -> dict[str, float]:
    """Requests each worker process has answered, from its own multiprocess counter file."""
    served = {}
    for path in metrics_dir.glob("counter_*.db"):
        families = MultiProcessCollector.merge([str(path)], accumulate=False)
        served[path.stem.split("_")[-1]] = sum(
            s.value for f in families for s in f.samples if s.name == "gateway_requests_total"
        )
    return served


def worker_pids(gateway: GatewayProcess) -> list[int]:
    """The serving workers of `gateway serve --workers N`: the supervisor's children, less
    multiprocessing's resource tracker."""
    pid = gateway.process.pid
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [c for c in children if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def burst_on_each(
    gateway: GatewayProcess, simulator: SimulatorThread, key: str, counts: tuple[int, int], body: dict[str, Any] = HELLO
) -> list[httpx.Response]:
    """`counts[0]` requests taken by one worker, then `counts[1]` by the other, all in flight
    together. The kernel's spread over the workers' shared socket is too uneven to rely on (the
    first worker awake accepts every connection waiting), so the other worker is stopped
    (SIGSTOP) while one takes its share; a share is taken once each of its requests has been
    answered or has reached the simulator."""
    first, second = worker_pids(gateway)
    marker = uuid.uuid4().hex

    def taken(wave: list[asyncio.Task[httpx.Response]], ids: list[str]) -> bool:
        upstream = {e["headers"].get("x-request-id") for e in simulator.requests()}
        return all(task.done() or rid in upstream for task, rid in zip(wave, ids, strict=True))

    async def send() -> list[httpx.Response]:
        limits = httpx.Limits(max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30, limits=limits, headers=headers) as client:
            sent: list[asyncio.Task[httpx.Response]] = []
            for n, paused in enumerate((second, first)):
                os.kill(paused, signal.SIGSTOP)
                try:
                    ids = [f"{marker}-{n}-{i}" for i in range(counts[n])]
                    wave = [
                        asyncio.create_task(client.post("/v1/chat/completions", json=body, headers={"x-request-id": i}))
                        for i in ids
                    ]
                    sent += wave
                    deadline = time.monotonic() + 20
                    while not taken(wave, ids):
                        assert time.monotonic() < deadline, "a worker did not take its share"
                        await asyncio.sleep(0.01)
                finally:
                    os.kill(paused, signal.SIGCONT)
            return list(await asyncio.gather(*sent))

    return asyncio.run(send())


def test_two_workers_share_keys_limits_and_revocations(
    workers: tuple[GatewayProcess, Path], simulator: SimulatorThread
) -> None:
    gateway, metrics = workers
    key = new_key(gateway)
    before = served_by_worker(metrics)
    statuses = [r.status_code for r in burst_on_each(gateway, simulator, key["key"], (5, 5))]
    assert statuses == [200] * 10  # with a store per worker: 401 from the one that did not make it
    assert both_took_part(metrics, before), "both workers served the key"

    # an RPM limit of 6: exactly 6 of 12, whichever worker each reached
    before = served_by_worker(metrics)
    limited = new_key(gateway, rpm=6)
    answered = [r.status_code for r in burst_on_each(gateway, simulator, limited["key"], (4, 8))]
    assert sorted(answered) == [200] * 6 + [429] * 6 and answered[:4] == [200] * 4
    assert both_took_part(metrics, before)

    with admin(gateway) as client:
        assert client.post(f"/keys/{key['id']}/revoke").status_code == 200
    revoked_at = time.monotonic()
    while True:  # each burst reaches both workers' caches (they hold the key from above)
        started = time.monotonic()
        if all(r.status_code == 401 for r in burst_on_each(gateway, simulator, key["key"], (5, 5))):
            break
        assert started - revoked_at < REVOKED_WITHIN_S, "a worker still admits the revoked key"
    assert started - revoked_at < REVOKED_WITHIN_S


# docs/keys-and-teams.md's "within a second" is each worker reading the change table every 0.25 s (shown
# without processes in test_store_sqlite.py, under 1.0 s); here two workers, the test's bursts
# and another suite share two loaded cores, so the whole round trip gets a margin.
REVOKED_WITHIN_S = 2.5


def both_took_part(metrics: Path, before: dict[str, float]) -> bool:
    after = served_by_worker(metrics)
    return len(after) == 2 and all(after[pid] > before.get(pid, 0) for pid in after)


def test_two_workers_hold_a_budget_exactly(workers: tuple[GatewayProcess, Path], simulator: SimulatorThread) -> None:
    """Slow requests, all in flight at once: each holds its worst case (max_tokens at the
    catalogue's price) until settled, so a budget of 5.5 worst cases admits exactly 5 of 16: 3
    taken by one worker, then 2 of 13 by the other, which sees the first's reservations; what
    they really cost stays within the budget."""
    gateway, metrics = workers
    body = {**HELLO, "max_tokens": 1000, "simulator": {"ttfb_ms": 1500}}
    worst = nano_ceil(estimate.worst_case_cost(estimate.prompt_tokens(body), 1000, catalogue_prices(MINI)))
    budget_nano = 5 * worst + worst // 2
    before = served_by_worker(metrics)
    key = new_key(gateway, budget_usd=budget_nano / 10**9, budget_period="total")
    answered = burst_on_each(gateway, simulator, key["key"], (3, 13), body)
    assert sorted(r.status_code for r in answered) == [200] * 5 + [429] * 11
    assert [r.status_code for r in answered[:3]] == [200] * 3
    assert {r.json()["error"]["code"] for r in answered if r.status_code == 429} == {"insufficient_quota"}
    cost = sum(Decimal(repr(r.json()["usage"]["cost"])) for r in answered if r.status_code == 200)

    def settled() -> bool:
        with admin(gateway) as client:
            shown = client.get(f"/keys/{key['id']}").json()["budget"]["spent_usd"]
        return abs(Decimal(repr(shown)) - cost) < Decimal("1e-9")

    wait_until(settled, 10, "the five settled")
    assert cost * 10**9 <= budget_nano + worst
    assert both_took_part(metrics, before)


def test_two_workers_hold_a_concurrency_cap_exactly(
    workers: tuple[GatewayProcess, Path], simulator: SimulatorThread
) -> None:
    """Slow requests, all in flight at once, at max_concurrency 3: 2 taken by one worker, then
    1 of 10 by the other; never more upstream at a time, the rest refused with 429."""
    gateway, metrics = workers
    before = served_by_worker(metrics)
    key = new_key(gateway, max_concurrency=3)
    marker = uuid.uuid4().hex
    body = {**HELLO, "user": marker, "simulator": {"ttfb_ms": 1500}}
    answered = burst_on_each(gateway, simulator, key["key"], (2, 10), body)
    assert sorted(r.status_code for r in answered) == [200] * 3 + [429] * 9
    assert {r.json()["error"]["type"] for r in answered if r.status_code == 429} == {"requests"}
    upstream = [e for e in simulator.requests() if marker in e["body"]]
    assert len(upstream) == 3 and overlap(upstream) <= 3
    assert both_took_part(metrics, before)


def test_a_kill_9_loses_nothing_settled(simulator: SimulatorThread, tmp_path: Path) -> None:
    data = tmp_path / "data"
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = gateway_env(simulator, data, metrics)
    first = GatewayProcess(env, str(tmp_path / "first.log"), args=("--workers", "2"), own_group=True).start()
    try:
        spender = new_key(first, budget_usd=5)
        gone = new_key(first)
        with admin(first) as client:
            assert client.post(f"/keys/{gone['id']}/revoke").status_code == 200
        replies = burst(first, spender["key"], 8)
        assert [r.status_code for r in replies] == [200] * 8
        cost = sum(r.json()["usage"]["cost"] for r in replies)
        assert cost > 0

        def settled() -> tuple[dict[str, Any], dict[str, Any]] | None:
            with admin(first) as client:
                shown = client.get(f"/keys/{spender['id']}").json()
                total = client.get("/usage").json()["total"]
            if abs(shown["budget"]["spent_usd"] - cost) < 1e-9 and total["requests"] == 8:
                return shown, total
            return None

        shown, total = wait_until(settled, 10, "the spend and the ledger to settle")
    finally:
        first.kill_group()

    with GatewayProcess(env, str(tmp_path / "second.log"), args=("--workers", "2")) as second, admin(second) as client:
        again = client.get(f"/keys/{spender['id']}").json()
        assert again["budget"] == shown["budget"]  # the period's settled spend, to the nano-dollar
        assert {k: v for k, v in again.items() if k != "last_used_at"} == {
            k: v
            for k, v in shown.items()
            if k != "last_used_at"  # (flushed every few seconds)
        }
        assert client.get("/usage").json()["total"] == total
        teams = {t["name"] for t in client.get("/teams").json()["data"]}
        assert {spender["team"], gone["team"]} <= teams
        assert client.get(f"/keys/{gone['id']}").json()["revoked"] is True
        assert [r.status_code for r in burst(second, gone["key"], 4)] == [401] * 4
        assert [r.status_code for r in burst(second, spender["key"], 4)] == [200] * 4

    stored = b"".join(p.read_bytes() for p in data.iterdir())
    assert spender["id"].encode() in stored
    for secret in (spender["key"].rsplit("-", 1)[1], gone["key"].rsplit("-", 1)[1], ADMIN_KEY, UPSTREAM_KEY):
        assert secret.encode() not in stored  # keys are stored by hash only
