"""Calls to the Redis store's server, and the one place Redis's errors become `StoreError`:
commands and scripts through redis-py's pool, and the request path's scripts as EVALSHA on the
lean client (`resp`), loaded again when Redis has lost them."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from app.store import resp
from app.store.base import StoreError

CLOSE_TIMEOUT_S = 2.0  # the longest a shutdown waits on Redis at any one step


async def do(coro: Any) -> Any:
    """Await a redis-py call."""
    try:
        return await coro
    except (RedisError, OSError) as exc:
        raise StoreError(f"redis: {exc}") from exc


class RedisCalls:
    """One Redis through its two clients, both owned by `RedisStore`: redis-py's pool
    (`redis`) and the lean client (`lean`)."""

    def __init__(self, redis: aioredis.Redis, lean: resp.RespClient) -> None:
        self.redis = redis
        self.lean = lean

    def register(self, sources: dict[str, str]) -> dict[str, AsyncScript]:
        """Scripts by name, each sent by its SHA (`run`, `fast`)."""
        return {name: self.redis.register_script(src) for name, src in sources.items()}

    async def run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """A script through redis-py, which loads it if Redis lacks it."""
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def load(self, script: AsyncScript) -> None:
        await do(self.redis.script_load(script.script))

    async def fast(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        command = resp.encode(b"EVALSHA", script.sha, len(keys), *keys, *args)
        return await self.fast_command(command, script)

    async def fast_command(self, command: bytes, script: AsyncScript) -> Any:
        """EVALSHA on the lean client; the script is loaded on first use (or after a flush)."""
        try:
            return await self.lean.call(command)
        except StoreError as exc:
            return await self.without_script(exc, command, script)

    async def without_script(self, exc: StoreError, command: bytes, script: AsyncScript) -> Any:
        """An EVALSHA failed: if Redis lacked the script, load it and send the command again."""
        if "NOSCRIPT" not in str(exc):
            raise exc
        await do(self.redis.script_load(script.script))
        return await self.lean.call(command)
