"""The Redis store's key and team records: JSON strings under the store's hash tag, with the
key-id and team sets, each team's key names (unique within it) and the keys' last use. A record's
writes that must agree run as one script."""

from __future__ import annotations

from datetime import datetime

from app.auth.records import KeyRecord, TeamRecord
from app.store.redis_calls import RedisCalls, do

_CREATE_TEAM = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX') then
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
_DELETE_TEAM = """
redis.call('SREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""
# KEYS: key record, key-id set, names hash of the team; ARGV: id, name, json
_CREATE_KEY = """
if redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[1]) == 0 then
  return redis.call('HGET', KEYS[3], ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return false
"""
# KEYS: key record, names hash; ARGV: id, old name, new name, json
_UPDATE_KEY = """
if ARGV[2] ~= ARGV[3] then
  local holder = redis.call('HGET', KEYS[2], ARGV[3])
  if holder and holder ~= ARGV[1] then return holder end
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
end
redis.call('SET', KEYS[1], ARGV[4])
return false
"""
# KEYS: key record, key-id set, names hash, last-used hash; ARGV: id, name
_DELETE_KEY = """
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[3], ARGV[2]) end
redis.call('HDEL', KEYS[4], ARGV[1])
return redis.call('DEL', KEYS[1])
"""


class RedisRecords:
    def __init__(self, calls: RedisCalls, tag: str) -> None:
        self._redis = calls.redis
        self._calls = calls
        self._tag = tag
        self._teams_key = f"{tag}:teams"
        self._keys_key = f"{tag}:keys"
        self._last_used_key = f"{tag}:lastused"
        self._scripts = calls.register(
            {
                "create_team": _CREATE_TEAM,
                "delete_team": _DELETE_TEAM,
                "create_key": _CREATE_KEY,
                "update_key": _UPDATE_KEY,
                "delete_key": _DELETE_KEY,
            }
        )

    def _team(self, name: str) -> str:
        return f"{self._tag}:team:{name}"

    def _key(self, key_id: str) -> str:
        return f"{self._tag}:key:{key_id}"

    def _names(self, team: str) -> str:
        return f"{self._tag}:keynames:{team}"

    # -- teams -----------------------------------------------------------------------------
    async def create_team(self, team: TeamRecord) -> bool:
        created = await self._calls.run(
            self._scripts["create_team"], [self._team(team.name), self._teams_key], [team.name, team.model_dump_json()]
        )
        return bool(created)

    async def get_team(self, name: str) -> TeamRecord | None:
        raw = await do(self._redis.get(self._team(name)))
        return TeamRecord.model_validate_json(raw) if raw else None

    async def list_teams(self) -> list[TeamRecord]:
        names = sorted(n.decode() for n in await do(self._redis.smembers(self._teams_key)))
        if not names:
            return []
        raws = await do(self._redis.mget([self._team(n) for n in names]))
        return [TeamRecord.model_validate_json(raw) for raw in raws if raw]

    async def update_team(self, team: TeamRecord) -> bool:
        updated = await do(self._redis.set(self._team(team.name), team.model_dump_json(), xx=True))
        return bool(updated)

    async def delete_team(self, name: str) -> bool:
        return bool(await self._calls.run(self._scripts["delete_team"], [self._team(name), self._teams_key], [name]))

    # -- keys ------------------------------------------------------------------------------
    async def create_key(self, key: KeyRecord) -> str | None:
        holder = await self._calls.run(
            self._scripts["create_key"],
            [self._key(key.id), self._keys_key, self._names(key.team)],
            [key.id, key.name, key.model_dump_json()],
        )
        return holder.decode() if holder else None

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._key(key_id))
            pipe.hget(self._last_used_key, key_id)
            raw, last_used = await do(pipe.execute())
        return self._with_last_used(raw, last_used) if raw else None

    async def list_keys(self, team: str | None = None) -> list[KeyRecord]:
        ids = [i.decode() for i in await do(self._redis.smembers(self._keys_key))]
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.mget([self._key(i) for i in ids])
            pipe.hmget(self._last_used_key, ids)
            raws, used = await do(pipe.execute())
        keys = [self._with_last_used(raw, u) for raw, u in zip(raws, used, strict=True) if raw]
        return sorted((k for k in keys if team is None or k.team == team), key=lambda k: k.created_at)

    @staticmethod
    def _with_last_used(raw: bytes, last_used: bytes | None) -> KeyRecord:
        key = KeyRecord.model_validate_json(raw)
        if last_used:
            key.last_used_at = datetime.fromisoformat(last_used.decode())
        return key

    async def update_key(self, key: KeyRecord, old_name: str) -> str | None:
        holder = await self._calls.run(
            self._scripts["update_key"],
            [self._key(key.id), self._names(key.team)],
            [key.id, old_name, key.name, key.model_dump_json(exclude={"last_used_at"})],
        )
        return holder.decode() if holder else None

    async def delete_key(self, key_id: str) -> bool:
        key = await self.get_key(key_id)
        if key is None:
            return False
        keys = [self._key(key_id), self._keys_key, self._names(key.team), self._last_used_key]
        return bool(await self._calls.run(self._scripts["delete_key"], keys, [key_id, key.name]))

    async def touch_keys(self, last_used: dict[str, datetime]) -> None:
        if last_used:
            await do(self._redis.hset(self._last_used_key, mapping={k: v.isoformat() for k, v in last_used.items()}))
