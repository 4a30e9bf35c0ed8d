"""The usage ledger: sums per UTC day, team, key and model, kept in the store.

Records are queued without blocking the response and written in batches, each batch applied
exactly once (an idempotency marker guards a retry after an ambiguous failure). While the
store is down, batches wait in a bounded buffer (counted) and go out when it returns. Money
is kept in integer pico-USD, so sums are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from app.errors import InvalidRequestError
from app.store.base import LedgerBatch, Store, StoreError
from app.usage.record import UsageRecord

log = logging.getLogger(__name__)

PICO = 10**12
MEASURES = ("requests", "prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "cost")
GROUPS = ("day", "team", "key", "model")
SEPARATOR = "|"


_DAY: list[Any] = [0.0, 0.0, ""]  # [start, end, "YYYYMMDD"] of the last day asked for


def day_of(timestamp: float) -> str:
    """The UTC day of a unix time, as YYYYMMDD (remembered for the day it falls in)."""
    start, end, name = _DAY
    if start <= timestamp < end:
        return str(name)
    day = datetime.fromtimestamp(timestamp, UTC).date()
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    _DAY[:] = [start, start + 86400, day.strftime("%Y%m%d")]
    return str(_DAY[2])


def _deltas(record: UsageRecord, sign: int, requests: int) -> dict[str, int]:
    return {
        "requests": requests,
        "prompt_tokens": sign * record.prompt_tokens,
        "completion_tokens": sign * record.completion_tokens,
        "reasoning_tokens": sign * record.reasoning_tokens,
        "cached_tokens": sign * record.cached_tokens,
        "cost": sign * int(record.cost_usd * PICO),
    }


class Ledger:
    def __init__(
        self,
        store: Store,
        max_buffered: int = 100_000,
        batch_size: int = 500,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self._queue: deque[tuple[UsageRecord, int, int]] = deque()
        self._batches: deque[LedgerBatch] = deque()
        self._max_buffered = max_buffered
        self._batch_size = batch_size
        self._wake = asyncio.Event()
        self._on_drop = on_drop
        self.dropped = 0
        self._down = False

    # -- writing -------------------------------------------------------------------------------
    def add(self, record: UsageRecord) -> None:
        """Count one request (queued; written shortly, in a batch)."""
        self._enqueue(record, 1, 1)

    def correct(self, old: UsageRecord, new: UsageRecord) -> None:
        """Replace a record's figures by better ones (an estimate by OpenRouter's own): both
        halves or neither, never the retraction without its replacement."""
        if not self._has_room(2):
            self._drop(2)
            return
        self._enqueue(old, -1, 0)
        self._enqueue(new, 1, 0)

    def _enqueue(self, record: UsageRecord, sign: int, requests: int) -> None:
        if not self._has_room(1):
            self._drop(1)
            return
        self._queue.append((record, sign, requests))
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    def _has_room(self, records: int) -> bool:
        """Whether `records` more fit the bound; queued batches are counted only when there are
        any (the store is down or a flush is under way), so a request pays a `len` here."""
        if self._batches:
            return self.buffered + records <= self._max_buffered
        return len(self._queue) + records <= self._max_buffered

    def _drop(self, records: int) -> None:
        self.dropped += records
        if self._on_drop:
            self._on_drop(records)

    @property
    def buffered(self) -> int:
        return len(self._queue) + sum(len(b.increments) for b in self._batches) // len(MEASURES)

    def _batch(self) -> LedgerBatch | None:
        if not self._queue:
            return None
        sums: dict[tuple[str, str, str], int] = {}
        names: dict[str, str] = {}
        for _ in range(min(len(self._queue), self._batch_size)):
            record, sign, requests = self._queue.popleft()
            group = SEPARATOR.join((record.team or "", record.key_id, (record.model or "").replace(SEPARATOR, "_")))
            names[record.key_id] = record.key_name
            for measure, delta in _deltas(record, sign, requests).items():
                if delta:
                    where = (day_of(record.time), group, measure)
                    sums[where] = sums.get(where, 0) + delta
        return LedgerBatch(secrets.token_hex(12), [(d, g, m, v) for (d, g, m), v in sums.items()], names)

    async def flush(self) -> None:
        """Write everything queued; on a store error keep it for the next flush. Flushes may
        overlap (the background flusher and the drain): both may write the first batch (the
        store applies a batch once), and only the one whose batch is still first removes it."""
        while True:
            if not self._batches:
                batch = self._batch()
                if batch is None:
                    return
                self._batches.append(batch)
            batch = self._batches[0]
            try:
                await self.store.ledger_apply(batch)
            except StoreError as exc:
                if not self._down:
                    log.warning("ledger store unreachable (%s); buffering records until it returns", exc)
                    self._down = True
                return
            if self._batches and self._batches[0] is batch:
                self._batches.popleft()
            if self._down:
                log.warning("ledger store reachable again; buffered records written")
                self._down = False

    async def run(self, every_s: float = 0.25) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), every_s)
            self._wake.clear()
            await self.flush()

    # -- reading -------------------------------------------------------------------------------
    async def query(
        self, start: date, end: date, group_by: Iterable[str], team: str | None = None, key: str | None = None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Sums per group over UTC days `start`..`end`. Keys are told apart by id (two teams may
        each have an `alice`): a row grouped by key carries its name, id and team. `key` filters
        by id, `team/name`, or a bare name that only one team has."""
        days = [(start + timedelta(days=n)).strftime("%Y%m%d") for n in range((end - start).days + 1)]
        stored, names = await self.store.ledger_read(days)
        columns = usage_columns(group_by)
        wanted = _key_ids(key, stored, names, team) if key is not None else None
        rows: dict[tuple[Any, ...], dict[str, int]] = {}
        total = dict.fromkeys(MEASURES, 0)
        for day, fields in stored.items():
            for name, value in fields.items():
                team_name, key_id, model, measure = name.split(SEPARATOR, 3)
                if (team is not None and team_name != team) or (wanted is not None and key_id not in wanted):
                    continue
                values = {
                    "day": f"{day[:4]}-{day[4:6]}-{day[6:]}",
                    "team": team_name or None,
                    "key": names.get(key_id, key_id),
                    "key_id": key_id,
                    "model": model or None,
                }
                row = rows.setdefault(tuple(values[c] for c in columns), dict.fromkeys(MEASURES, 0))
                row[measure] += value
                total[measure] += value
        data = [{**dict(zip(columns, k, strict=True)), **_shown(v)} for k, v in sorted(rows.items(), key=_order)]
        return data, _shown(total)


def usage_columns(group_by: Iterable[str]) -> list[str]:
    """A usage row's group columns: a key comes with its id and its team, since a name alone is
    only unique within a team."""
    groups = set(group_by)
    columns = []
    for group in GROUPS:
        if group in groups or (group == "team" and "key" in groups):
            columns.append(group)
        if group == "key" and group in groups:
            columns.append("key_id")
    return columns


def _key_ids(key: str, stored: dict[str, dict[str, int]], names: dict[str, str], team: str | None) -> set[str]:
    """The key ids a usage filter names: an id, `team/name`, or a name only one team has."""
    teams: dict[str, str] = {}  # key id -> its team, as the ledger recorded it
    for fields in stored.values():
        for field in fields:
            team_name, key_id, _ = field.split(SEPARATOR, 2)
            teams.setdefault(key_id, team_name)
    if key in teams or key in names:
        return {key}
    team_part, slash, name = key.rpartition("/")
    if slash:
        return {i for i, t in teams.items() if t == team_part and names.get(i) == name}
    ids = {i for i, t in teams.items() if names.get(i) == key and (team is None or t == team)}
    owners = sorted({teams[i] for i in ids})
    if len(owners) > 1:
        choices = ", ".join(f"{owner}/{key}" for owner in owners)
        raise InvalidRequestError(
            f"key: {key!r} names keys of several teams; name one as team/name ({choices}) or by its id.", param="key"
        )
    return ids


def _order(item: tuple[tuple[Any, ...], dict[str, int]]) -> tuple[str, ...]:
    return tuple("" if v is None else str(v) for v in item[0])


def _shown(sums: dict[str, int]) -> dict[str, Any]:
    shown: dict[str, Any] = {m: sums[m] for m in MEASURES if m != "cost"}
    shown["cost_usd"] = float(Decimal(sums["cost"]) / PICO)
    return shown
