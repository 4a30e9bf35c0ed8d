"""A client that drops a stream cancels the upstream request: OpenRouter (the simulator) sees
its connection closed within a second, whether chunks are flowing or upstream is silent."""

from __future__ import annotations

import time

import openai
import pytest

from app.simulator import SimulatorThread
from tests.support import request_id, wait_until


@pytest.mark.parametrize(
    "knobs",
    [
        {"words": 400, "chunk_delay_ms": 20},
        {"words": 50, "stall_after": 4},
    ],
    ids=["flowing", "upstream-silent"],
)
def test_client_disconnect_cancels_upstream(
    client: openai.OpenAI, simulator: SimulatorThread, knobs: dict[str, int]
) -> None:
    rid = request_id()
    stream = client.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": "Tell me a long story"}],
        stream=True,
        extra_body={"simulator": knobs},
        extra_headers={"x-request-id": rid},
    )
    for received, _ in enumerate(stream, start=1):
        if received == 3:
            break
    stream.close()
    closed_at = time.time()

    (entry,) = wait_until(lambda: [e for e in simulator.find(rid) if e["disconnected"]], 5, "upstream disconnect")
    assert entry["disconnected_at"] - closed_at < 1.0
    assert entry["completed"] is False
    assert entry["usage"]["completion_tokens"] < 400  # generation stopped early
