"""The usage ledger (app/usage/ledger.py): flushes running at once write every batch exactly once;
with the store down the buffer is bounded, its drops counted, and it is written once when Redis
is back; a correction is buffered whole or not at all."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.store.redis import RedisStore
from app.usage.ledger import Ledger
from app.usage.metrics import Metrics
from app.usage.record import UsageRecord
from tests.redis_server import RedisServer
from tests.support import (
    free_port_number,
)


def record(n: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"r{n}",
        time=time.time(),
        key_id="key0buffered",
        key_name="buffered",
        team="buffer-team",
        endpoint="chat.completions",
        model_requested=f"vendor/model-{n}",
        model=f"vendor/model-{n}",  # a group each, so each buffered record is counted on its own
        model_served=f"vendor/model-{n}",
        provider="Sim",
        stream=False,
        status=200,
        error_code=None,
        prompt_tokens=10 + n,
        completion_tokens=20 + n,
        reasoning_tokens=1 + n,
        cached_tokens=2,
        cost_usd=Decimal("0.000123456789") * (n + 1),
        cost_source="upstream",
    )


@pytest.mark.anyio
async def test_two_flushes_at_once_write_every_batch_exactly_once(redis_server: RedisServer) -> None:
    """The background flusher and the shutdown drain can flush at the same moment. Each takes the
    first batch waiting; the one that finishes second must not take another batch off the queue
    unwritten (it did: IndexError at a drain, or a batch lost)."""
    store = RedisStore(redis_server.url, prefix="f" + uuid.uuid4().hex[:8])
    ledger = Ledger(store, batch_size=2)
    try:
        for n in range(7):
            ledger.add(record(n))
        await asyncio.gather(ledger.flush(), ledger.flush(), ledger.flush())
        assert ledger.buffered == 0
        today = datetime.now(UTC).date()
        _, total = await ledger.query(today - timedelta(days=1), today + timedelta(days=1), ["model"])
        assert total["requests"] == 7
        assert total["prompt_tokens"] == sum(record(n).prompt_tokens for n in range(7))
    finally:
        await store.close()


@pytest.mark.anyio
async def test_ledger_buffer_is_bounded_counted_and_flushed_once() -> None:
    """Point 4: with the store down, at most max_buffered records wait, the excess is dropped and
    counted (callback and metric); when Redis comes back the buffer is written exactly once."""
    port = free_port_number()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="b" + uuid.uuid4().hex[:8], timeout_s=0.5)
    metrics = Metrics()
    ledger = Ledger(store, max_buffered=5, on_drop=metrics.ledger_dropped.inc)
    redis_server: RedisServer | None = None
    try:
        for n in range(8):
            ledger.add(record(n))
        assert ledger.dropped == 3 and ledger.buffered == 5
        await ledger.flush()  # the store is down: kept, not raised
        await ledger.flush()
        assert ledger.buffered == 5
        ledger.add(record(99))  # still full while it waits
        assert ledger.dropped == 4
        ledger.correct(record(1), record(2))  # both halves or neither: never a lone retraction
        assert ledger.dropped == 6 and ledger.buffered == 5

        def dropped_metric() -> float:
            family = text_string_to_metric_families(metrics.exposition().decode())
            return sum(s.value for f in family for s in f.samples if s.name == "gateway_ledger_dropped_records_total")

        assert dropped_metric() == 6

        redis_server = RedisServer()
        redis_server.port = port  # the address the store has been failing to reach
        redis_server.start()
        await ledger.flush()
        assert ledger.buffered == 0
        await ledger.flush()  # nothing is written twice
        today = datetime.now(UTC).date()
        data, total = await ledger.query(today - timedelta(days=1), today + timedelta(days=1), ["model"])
        kept = [record(n) for n in range(5)]
        assert total["requests"] == 5
        assert total["prompt_tokens"] == sum(r.prompt_tokens for r in kept)
        assert total["completion_tokens"] == sum(r.completion_tokens for r in kept)
        assert total["reasoning_tokens"] == sum(r.reasoning_tokens for r in kept)
        assert total["cached_tokens"] == 10
        assert abs(Decimal(repr(total["cost_usd"])) - sum(r.cost_usd for r in kept)) < Decimal("1e-15")
        assert [row["model"] for row in data] == [f"vendor/model-{n}" for n in range(5)]
        assert ledger.dropped == 6 and dropped_metric() == 6  # the four adds and the correction above
    finally:
        await store.close()
        if redis_server is not None:
            redis_server.cleanup()


def test_a_correction_is_buffered_whole_or_not_at_all() -> None:
    """A correction is a retraction and its replacement: with room for only one of them, neither
    is buffered (a lone retraction would undercount the usage until the next flush, forever)."""
    from app.store.memory import MemoryStore

    ledger = Ledger(MemoryStore(), max_buffered=3)
    ledger.add(record(1))
    ledger.add(record(2))
    ledger.correct(record(1), record(3))  # one place left: both dropped, counted
    assert ledger.dropped == 2 and ledger.buffered == 2
    ledger = Ledger(MemoryStore(), max_buffered=4)
    ledger.add(record(1))
    ledger.add(record(2))
    ledger.correct(record(1), record(3))  # room for both
    assert ledger.dropped == 0 and ledger.buffered == 4
