"""`gateway serve --workers 2`: requests spread over two worker processes, yet `/metrics`
(answered by either one) counts every request once; the multiprocess directory is wiped at
start; promtool accepts the aggregated output."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.simulator import SimulatorThread
from tests.support import CLIENT_KEY, METRICS_KEY, UPSTREAM_KEY, GatewayProcess, require_tool, scrape


def total_requests(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total"
    )


def test_two_workers_count_every_request_once(simulator: SimulatorThread, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_99999.db").write_bytes(b"stale from a previous run")
    env = {
        "OPENROUTER_BASE_URL": simulator.base_url,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEY": CLIENT_KEY,
        "GATEWAY_METRICS_KEY": METRICS_KEY,
        "GATEWAY_CONFIG": "/dev/null",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    with GatewayProcess(env, str(tmp_path / "gateway.log"), args=("--workers", "2")) as gateway:
        assert not (metrics_dir / "counter_99999.db").exists()  # wiped at start

        async def send(count: int) -> list[int]:
            limits = httpx.Limits(max_keepalive_connections=0)  # new connections: both workers get some
            async with httpx.AsyncClient(
                base_url=gateway.url, timeout=30, limits=limits, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
            ) as client:
                responses = await asyncio.gather(
                    *(
                        client.post(
                            "/v1/chat/completions",
                            json={
                                "model": "openai/gpt-4o-mini",
                                "messages": [{"role": "user", "content": "hi"}],
                                "stream": i % 2 == 0,
                            },
                        )
                        for i in range(count)
                    )
                )
                return [r.status_code for r in responses]

        # Which worker accepts a new connection is the kernel's choice: one worker can take a
        # whole burst (seen once in CI), so bursts are sent until both have served some.
        sent = 0
        for _ in range(10):
            assert asyncio.run(send(30)) == [200] * 30
            sent += 30
            pids = {p.name.split("_")[-1] for p in metrics_dir.glob("*.db")}
            if len(pids) >= 2:
                break
        assert len(pids) >= 2, "both workers served requests"
        for _ in range(6):  # whichever worker answers the scrape, the totals are the same
            text = scrape(gateway.url).text
            assert total_requests(text) == sent
        promtool = require_tool("promtool", "prometheus")
        check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        assert check.returncode == 0 and not check.stdout.strip(), check
