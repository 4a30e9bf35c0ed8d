"""The memory store: one process, nothing shared, gone at exit. For `serve --demo` and tests."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from app.auth.records import KeyRecord, TeamRecord
from app.limits.checks import Check, Reserve, Settlement, Verdict
from app.limits.windows import MemoryLimits
from app.store.base import ChangeListener, LedgerBatch, notify


class MemoryStore:
    def __init__(self) -> None:
        self._teams: dict[str, str] = {}
        self._keys: dict[str, str] = {}  # records kept as JSON, so callers never share objects
        self._names: dict[tuple[str, str], str] = {}
        self._last_used: dict[str, datetime] = {}
        self._listeners: list[ChangeListener] = []
        self._limits = MemoryLimits()
        self._ledger: dict[str, dict[str, int]] = {}
        self._key_names: dict[str, str] = {}
        self._batches_seen: set[str] = set()
        self._settled: dict[str, None] = {}  # settlement batches applied, oldest first

    async def ping(self) -> None:
        return None

    async def prepare(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def create_team(self, team: TeamRecord) -> bool:
        if team.name in self._teams:
            return False
        self._teams[team.name] = team.model_dump_json()
        return True

    async def get_team(self, name: str) -> TeamRecord | None:
        raw = self._teams.get(name)
        return TeamRecord.model_validate_json(raw) if raw else None

    async def list_teams(self) -> list[TeamRecord]:
        return [TeamRecord.model_validate_json(raw) for _, raw in sorted(self._teams.items())]

    async def update_team(self, team: TeamRecord) -> bool:
        if team.name not in self._teams:
            return False
        self._teams[team.name] = team.model_dump_json()
        return True

    async def delete_team(self, name: str) -> bool:
        return self._teams.pop(name, None) is not None

    async def create_key(self, key: KeyRecord) -> str | None:
        holder = self._names.get((key.team, key.name))
        if holder is not None:
            return holder
        self._names[(key.team, key.name)] = key.id
        self._keys[key.id] = key.model_dump_json()
        return None

    async def get_key(self, key_id: str) -> KeyRecord | None:
        raw = self._keys.get(key_id)
        if raw is None:
            return None
        key = KeyRecord.model_validate_json(raw)
        if key_id in self._last_used:
            key.last_used_at = self._last_used[key_id]
        return key

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]:
        keys = [await self.get_key(key_id) for key_id in self._keys]
        return sorted((k for k in keys if k and (team is None or k.team == team)), key=lambda k: k.created_at)

    async def update_key(self, key: KeyRecord, old_name: str) -> str | None:
        if key.name != old_name:
            holder = self._names.get((key.team, key.name))
            if holder is not None and holder != key.id:
                return holder
            self._names.pop((key.team, old_name), None)
            self._names[(key.team, key.name)] = key.id
        self._keys[key.id] = key.model_dump_json()
        return None

    async def delete_key(self, key_id: str) -> bool:
        raw = self._keys.pop(key_id, None)
        if raw is None:
            return False
        key = KeyRecord.model_validate_json(raw)
        self._names.pop((key.team, key.name), None)
        self._last_used.pop(key_id, None)
        return True

    async def touch_keys(self, last_used: dict[str, datetime]) -> None:
        for key_id, when in last_used.items():
            if key_id in self._keys:
                self._last_used[key_id] = max(when, self._last_used.get(key_id, when))

    async def admit(self, checks: Sequence[Check], member: str, lease_ms: int, headroom: int = 1) -> Verdict:
        return self._limits.admit(checks, member, lease_ms, headroom)

    async def settle(
        self, settlements: Sequence[Settlement], batch: str = "", reserve: Sequence[Reserve] = ()
    ) -> list[Verdict]:
        if not batch or batch not in self._settled:
            if batch:
                self._settled[batch] = None
                if len(self._settled) > 100_000:
                    del self._settled[next(iter(self._settled))]  # the oldest: retries come soon
            self._limits.settle(settlements)
        return [self._limits.admit(r.checks, r.member, r.lease_ms, r.headroom) for r in reserve]

    async def renew(self, leases: Sequence[tuple[Check, str]], lease_ms: int) -> None:
        self._limits.renew(leases, lease_ms)

    async def budget_spent(self, check: Check) -> int:
        return self._limits.spent(check.name)

    async def sweep(self) -> int:
        return self._limits.sweep()

    async def ledger_apply(self, batch: LedgerBatch) -> None:
        if batch.id in self._batches_seen:
            return
        self._batches_seen.add(batch.id)
        for day, group, measure, delta in batch.increments:
            fields = self._ledger.setdefault(day, {})
            name = f"{group}|{measure}"
            fields[name] = fields.get(name, 0) + delta
        self._key_names.update(batch.key_names)

    async def ledger_read(self, days: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
        return {d: dict(self._ledger[d]) for d in days if d in self._ledger}, dict(self._key_names)

    async def publish(self, change: str) -> None:
        await notify(self._listeners, change)

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
