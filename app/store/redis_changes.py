"""The Redis store's change notifications: published on a pub/sub channel, followed on a
connection of their own; every replica drops what it cached within milliseconds, and drops
everything if it ever loses the channel (it may have missed a message)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from app.store.base import ChangeListener, notify
from app.store.redis_calls import CLOSE_TIMEOUT_S, do

log = logging.getLogger(__name__)


class RedisChanges:
    """`redis` publishes; `pubsub_client` (no read timeout) listens. Both are `RedisStore`'s to close."""

    def __init__(self, redis: aioredis.Redis, pubsub_client: aioredis.Redis, channel: str) -> None:
        self._redis = redis
        self._pubsub_client = pubsub_client
        self.channel = channel
        self._listeners: list[ChangeListener] = []
        self._listener_task: asyncio.Task[None] | None = None
        self._closed = False

    async def stop(self) -> None:
        """Stop listening, waiting at most CLOSE_TIMEOUT_S for the listener to end."""
        self._closed = True
        if self._listener_task is not None:
            self._listener_task.cancel()
            await asyncio.wait({self._listener_task}, timeout=CLOSE_TIMEOUT_S)

    async def publish(self, change: str) -> None:
        await do(self._redis.publish(self.channel, change))
        await notify(self._listeners, change)  # this replica too, without waiting for the round trip

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)
        if self._listener_task is None:
            self._listener_task = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        """Follow the change channel for as long as the store is open, reconnecting as needed."""
        lost = False
        while not self._closed:  # not only cancellation: a library that swallows it must not keep us
            pubsub = self._pubsub_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if lost:
                    log.warning("change channel restored")
                    lost = False
                await notify(self._listeners, "*")  # anything could have changed while we were not listening
                while not self._closed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        await notify(self._listeners, message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the listener must outlive any Redis trouble
                if not lost:
                    log.warning("change channel lost (%s); reconnecting until it returns", exc)
                    lost = True
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):  # also when cancelled: a bounded wait
                        await pubsub.aclose()
