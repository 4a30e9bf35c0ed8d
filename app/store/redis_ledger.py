"""The Redis store's usage ledger: per day, one hash of sums by "team|key_id|model|measure"; the
key names by id; and a marker per batch (kept a week), so a batch sent again is not added twice
(`lua.LEDGER_APPLY`)."""

from __future__ import annotations

from typing import Any

from app.store import lua
from app.store.base import LedgerBatch
from app.store.redis_calls import RedisCalls, do


class RedisLedger:
    def __init__(self, calls: RedisCalls, tag: str) -> None:
        self._calls = calls
        self._redis = calls.redis
        self._tag = tag
        self._script = calls.register({"ledger_apply": lua.LEDGER_APPLY})["ledger_apply"]

    async def load_scripts(self) -> None:
        """Load the ledger's script now (see `RedisStore.prepare`)."""
        await self._calls.load(self._script)

    async def ledger_apply(self, batch: LedgerBatch) -> None:
        by_day: dict[str, list[tuple[str, int]]] = {}
        for day, group, measure, delta in batch.increments:
            by_day.setdefault(day, []).append((f"{group}|{measure}", delta))
        keys = [f"{self._tag}:ledger:batch:{batch.id}", f"{self._tag}:ledger:keynames"]
        args: list[Any] = [7 * 86400, len(by_day)]
        for day, items in by_day.items():
            keys.append(f"{self._tag}:ledger:{day}")
            args.append(len(items))
            for name, delta in items:
                args += [name, delta]
        for key_id, name in batch.key_names.items():
            args += [key_id, name]
        await self._calls.fast(self._script, keys, args)  # the lean client: redis-py costs ~1.5% of c=64 CPU here

    async def ledger_read(self, days: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(f"{self._tag}:ledger:{day}")
            pipe.hgetall(f"{self._tag}:ledger:keynames")
            results = await do(pipe.execute())
        stored = {
            day: {k.decode(): int(v) for k, v in fields.items()}
            for day, fields in zip(days, results[:-1], strict=True)
            if fields
        }
        return stored, {k.decode(): v.decode() for k, v in results[-1].items()}
