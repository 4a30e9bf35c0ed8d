"""The limits that apply to one request, as store-neutral checks, and the store's verdict.

Kinds: `requests` and `tokens` (token buckets of the limit, refilled continuously at the limit
per minute; a token estimate is taken first and the unused part given back), `concurrency`
(leases that expire unless renewed) and `budget` (nano-USD per calendar period in UTC; holds
are leases, settled to the real cost).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

WINDOW_MS = 60_000  # buckets refill their whole limit over this
NANO = 10**9
BUCKET_KINDS = ("requests", "tokens")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 µs more, per check
class Check:
    scope: str  # key | team | global
    scope_id: str
    kind: str  # requests | tokens | concurrency | budget
    limit: int
    amount: int = 1
    period: str = ""  # budgets: d20261128 | m202611 | total
    ttl_s: int = 0  # budgets: how long the period's spend is kept
    name: str = field(default="", compare=False, repr=False)  # the store key's stem (derived if not given)

    def __post_init__(self) -> None:
        if not self.name:
            stem = f"{self.kind}:{self.scope}:{self.scope_id}"
            self.name = f"{stem}:{self.period}" if self.period else stem


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    failed: int | None = None  # the index of the check that refused
    retry_after_ms: int = 0  # -1: waiting will never help
    used: int = 0  # what the refusing check had in use
    states: list[tuple[int, int]] = field(default_factory=list)  # (remaining, reset_ms) per check


@dataclass(frozen=True, slots=True)
class Reserve:
    """A reservation sent with a settlement batch (admission ahead): `checks` held for `member`,
    admitted as `Store.admit` would."""

    checks: Sequence[Check]
    member: str
    lease_ms: int
    headroom: int = 1


@dataclass(slots=True)
class Settlement:
    """The end of a request for one check: tokens given back to a TPM bucket (negative: taken),
    nano-USD added to a budget's spend; concurrency slots and budget holds are released."""

    check: Check
    member: str
    value: int


_PERIODS: dict[str, tuple[float, str, float]] = {}  # period -> (valid until, id, ends at), for "now"


def budget_period(period: str, moment: datetime | None = None) -> tuple[str, int]:
    """(period id, seconds to keep its spend) for a calendar budget period in UTC."""
    if moment is None:
        now = time.time()
        cached = _PERIODS.get(period)
        if cached is not None and now < cached[0]:
            return cached[1], int(cached[2] - now)
        period_id, keep = _budget_period(period, datetime.fromtimestamp(now, UTC))
        # Periods change on minute boundaries (midnight is one), so this is good until the next one.
        _PERIODS[period] = ((now // 60 + 1) * 60, period_id, now + keep)
        return period_id, keep
    return _budget_period(period, moment)


def _budget_period(period: str, moment: datetime) -> tuple[str, int]:
    moment = moment.astimezone(UTC)  # the calendar is UTC's, whatever zone the moment was given in
    if period == "day":
        end = datetime(moment.year, moment.month, moment.day, tzinfo=UTC) + timedelta(days=1)
        return "d" + moment.strftime("%Y%m%d"), int((end - moment).total_seconds()) + 2 * 86400
    if period == "month":
        end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
        return "m" + moment.strftime("%Y%m"), int((end - moment).total_seconds()) + 7 * 86400
    return "total", 0


def format_duration(ms: int) -> str:
    """OpenAI's style for x-ratelimit-reset-*: 20ms, 1s, 1.5s, 6m0s, 1h2m3s."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text
