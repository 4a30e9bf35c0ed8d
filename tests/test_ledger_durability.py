"""The ledger loses nothing, and counts nothing twice, when Redis restarts during a run."""

from __future__ import annotations

import threading
import time
import uuid
from decimal import Decimal

import httpx

from app.simulator import SimulatorThread
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, CLIENT_KEY, GatewayServer, gateway_settings, wait_until
from tests.test_metering import simulator_sums


def test_redis_restart_mid_run(simulator: SimulatorThread) -> None:
    redis_server = RedisServer(appendonly=True).start()
    try:
        settings = gateway_settings(
            simulator.base_url, admin_key=ADMIN_KEY, store=redis_server.url, store_prefix="d" + uuid.uuid4().hex[:8]
        )
        with GatewayServer(settings) as gateway:
            marker = "durable-" + uuid.uuid4().hex
            sent = 0
            halfway = threading.Event()

            def run() -> None:
                nonlocal sent
                with httpx.Client(
                    base_url=gateway.url, timeout=30, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
                ) as client:
                    for i in range(60):
                        response = client.post(
                            "/v1/chat/completions",
                            headers={"x-request-id": f"{marker}-{i}"},
                            json={
                                "model": "openai/gpt-4o-mini",
                                "stream": i % 3 == 0,
                                "messages": [{"role": "user", "content": f"request {i}"}],
                            },
                        )
                        assert response.status_code == 200
                        sent += 1
                        if i == 20:
                            halfway.set()
                        time.sleep(0.02)

            worker = threading.Thread(target=run)
            worker.start()
            assert halfway.wait(30)
            redis_server.down_while(lambda: sent)  # requests go on while the ledger's store is gone
            worker.join(60)
            assert sent == 60

            served = simulator_sums(simulator, marker)
            assert served["billed"] == 60

            def usage() -> dict[str, object] | None:
                response = httpx.get(gateway.url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                if response.status_code != 200:
                    return None
                total: dict[str, object] = response.json()["total"]
                return total if total["requests"] == 60 else None

            total = wait_until(usage, 20, "buffered records flushed")
            assert total["prompt_tokens"] == served["prompt"]
            assert total["completion_tokens"] == served["completion"]
            assert abs(Decimal(repr(total["cost_usd"])) - served["cost"]) < Decimal("1e-9")
    finally:
        redis_server.cleanup()
