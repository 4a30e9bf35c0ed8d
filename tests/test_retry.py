"""Retry timing (app/upstream/retry.py): the backoff is full jitter under a growing, capped
ceiling; Retry-After is read as seconds or an HTTP date, and a date is honoured by a gateway."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from app.errors import GatewayError
from app.simulator import SimulatorThread
from app.upstream.retry import backoff_s, retry_after_s
from tests.admission_support import (
    HELLO,
    MINI,
    chat,
)
from tests.support import (
    CLIENT_KEY,
    GatewayServer,
    gateway_settings,
    request_id,
    seeded,
)


def test_backoff_is_full_jitter_under_a_growing_capped_ceiling() -> None:
    base, cap, samples = 0.25, 2.0, 4000
    with seeded(4):
        for attempt in range(7):
            ceiling = min(cap, base * 2**attempt)
            waits = [backoff_s(attempt, base, cap) for _ in range(samples)]
            assert all(0 <= w <= ceiling for w in waits)
            assert min(waits) < 0.02 * ceiling and max(waits) > 0.98 * ceiling  # full jitter: from 0 up
            assert abs(sum(waits) / samples - ceiling / 2) < 0.05 * ceiling  # uniform
            assert len(set(waits)) > samples * 0.99


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    def error(value: str) -> GatewayError:
        return GatewayError(headers={"retry-after": value})

    soon = datetime.fromtimestamp(math.ceil(time.time()) + 3, UTC)
    waited = retry_after_s(error(format_datetime(soon, usegmt=True)))
    assert waited is not None and 2.9 < waited <= 4.0  # a whole second after now, plus 3
    assert retry_after_s(error(format_datetime(soon - timedelta(hours=1), usegmt=True))) == 0.0  # passed: go now
    assert retry_after_s(error("2")) == 2.0
    assert retry_after_s(error("soon")) is None
    assert retry_after_s(GatewayError()) is None


@pytest.fixture(scope="module")
def retrying(simulator: SimulatorThread) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        simulator.base_url,
        upstream={"retries": {"max_attempts": 2, "backoff_base_s": 0.01, "backoff_cap_s": 0.02, "budget_min": 5}},
    )
    with GatewayServer(settings) as gateway:
        yield gateway


def test_retry_after_as_an_http_date_is_honoured(retrying: GatewayServer, simulator: SimulatorThread) -> None:
    when = format_datetime(datetime.fromtimestamp(math.ceil(time.time()) + 2, UTC), usegmt=True)
    rid = request_id()
    sequence = [{"status": 429, "retry_after": when}, {}]
    body = {"model": MINI, "messages": HELLO, "simulator": {"id": uuid.uuid4().hex, "sequence": sequence}}
    response = chat(retrying, CLIENT_KEY, body, rid)
    assert response.status_code == 200, response.text
    first, second = sorted(simulator.find(rid), key=lambda e: e["time"])
    assert first["status"] == 429 and second["status"] == 200
    assert 1.0 <= second["time"] - first["time"] < 10  # the date, not the 20 ms backoff cap
