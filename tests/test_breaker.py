"""The circuit breaker (app/upstream/breaker.py): its open time grows, is jittered and capped,
one half-open trial at a time, and a success closes it back to the base."""

from __future__ import annotations

from app.upstream.breaker import CircuitBreaker
from tests.support import (
    seeded,
    wait_until,
)


def test_breaker_open_time_grows_is_jittered_and_capped() -> None:
    with seeded(6):
        spread = CircuitBreaker(threshold=1, base_s=10.0, cap_s=40.0)
        firsts = []
        for n in range(300):
            spread.failure(f"m{n}")
            firsts.append(spread.retry_in_s(f"m{n}"))
        assert all(7.9 <= t <= 12.0 for t in firsts)  # base x [0.8, 1.2]
        assert min(firsts) < 8.4 and max(firsts) > 11.6 and len({round(t, 3) for t in firsts}) > 250

    # Driven through its half-open trials in real time: each failed trial reopens it for longer.
    base, cap, model = 0.2, 0.8, "x/flaky"
    breaker = CircuitBreaker(threshold=2, base_s=base, cap_s=cap)
    breaker.failure(model)
    assert breaker.allow(model)  # one failure is below the threshold
    breaker.failure(model)
    opens = []
    for opening in range(4):
        opens.append(breaker.retry_in_s(model))
        span = min(cap, base * 2**opening)  # 0.2, 0.4, 0.8, then capped at 0.8
        assert 0.8 * span - 0.05 <= opens[-1] <= 1.2 * span
        assert not breaker.allow(model)
        wait_until(lambda: breaker.allow(model), 5, "half-open trial")
        assert not breaker.allow(model)  # one trial at a time
        breaker.failure(model)
    assert opens[0] < opens[1] < opens[2] and max(opens) <= 1.2 * cap
    breaker.success(model)  # closed: the next opening starts from the base again
    breaker.failure(model)
    breaker.failure(model)
    assert breaker.retry_in_s(model) <= 1.2 * base
