"""Forwarding to OpenRouter with retries, a retry budget, per-model circuit breakers and
fallback models, all within the request's one deadline.

A try that fails before anything reached the client is retried when the failure is
transient (upstream/retry.py); a non-streaming body is read and checked inside the try, so
an error hidden in an HTTP 200 is retried too. Once a stream's response has begun, no retry.
When the gateway has spent its retries, the error carries `x-should-retry: false` so the
client's SDK does not multiply them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping

import orjson

from app.call import ProxyCall
from app.errors import CircuitOpenError, GatewayError, UpstreamError, UpstreamTimeoutError
from app.normalize.response import body_error, error_from_status
from app.settings import UpstreamSettings
from app.upstream.breaker import CircuitBreaker
from app.upstream.client import OpenRouterClient, UpstreamResponse
from app.upstream.retry import RetryBudget, backoff_s, is_retryable, retry_after_s

Outcome = UpstreamResponse | bytes  # an open stream, or a whole checked JSON body


class Forwarder:
    def __init__(
        self, client: OpenRouterClient, settings: UpstreamSettings, first_byte_timeout: Callable[[str], float | None]
    ) -> None:
        self.client = client
        self.settings = settings
        self.retries = settings.retries
        self.budget = RetryBudget(settings.retries.budget_ratio, settings.retries.budget_min)
        self.breaker = CircuitBreaker(
            settings.breaker.failure_threshold, settings.breaker.open_base_s, settings.breaker.open_cap_s
        )
        self._first_byte_timeout = first_byte_timeout
        self.on_retry: Callable[[str], None] | None = None

    async def send(
        self,
        call: ProxyCall,
        models: list[str | None],
        body_for: Callable[[str | None], bytes],
        headers: Mapping[str, str],
    ) -> Outcome:
        """Try each model in turn (the asked one, then its fallbacks) until one answers."""
        last: GatewayError | None = None
        for model in models:
            if model is not None and not self.breaker.allow(model):
                wait = str(max(1, math.ceil(self.breaker.retry_in_s(model))))
                last = CircuitOpenError(
                    f"'{model}' keeps failing upstream; the gateway paused sending it requests.",
                    headers={"retry-after": wait},
                )
                continue
            try:
                outcome = await self._tries(call, model, body_for(model), headers)
            except GatewayError as error:
                last = error
                if not is_retryable(error):
                    if model is not None:
                        self.breaker.success(model)  # OpenRouter answered; the model is not down
                    raise
                if model is not None:
                    self.breaker.failure(model)
                if call.time_left() <= 0 or call.client_disconnected:
                    break  # (a client gone: no fallback, nobody would get its answer)
                continue
            if model is not None:
                self.breaker.success(model)
            call.model_used = model
            return outcome
        assert last is not None
        if is_retryable(last) or isinstance(last, CircuitOpenError):
            last.headers["x-should-retry"] = "false"
        raise last

    async def _tries(self, call: ProxyCall, model: str | None, body: bytes, headers: Mapping[str, str]) -> Outcome:
        attempt = 0
        holding_budget = False
        try:
            while True:
                call.attempts += 1
                try:
                    return await self._try(call, model, body, headers)
                except GatewayError as error:
                    if holding_budget:
                        self.budget.release()
                        holding_budget = False
                    wait = max(
                        backoff_s(attempt, self.retries.backoff_base_s, self.retries.backoff_cap_s),
                        retry_after_s(error) or 0.0,
                    )
                    if (
                        not is_retryable(error)
                        or call.client_disconnected  # nobody would get the answer, but OpenRouter would bill it
                        or attempt + 1 >= self.retries.max_attempts
                        or wait >= call.time_left()
                        or not self.budget.try_acquire()
                    ):
                        raise
                    holding_budget = True
                    attempt += 1
                    await asyncio.sleep(wait)
                    if call.client_disconnected:
                        raise
                    if self.on_retry:
                        self.on_retry(_reason(error))
                    call.retries += 1
        finally:
            if holding_budget:
                self.budget.release()

    async def _try(self, call: ProxyCall, model: str | None, body: bytes, headers: Mapping[str, str]) -> Outcome:
        left = call.time_left()
        if left <= 0:
            raise UpstreamTimeoutError("The request's deadline passed before OpenRouter answered.")
        per_try = (self._first_byte_timeout(model) if model else None) or self.settings.first_byte_timeout_s
        call.upstream_started = call.upstream_started or time.perf_counter()
        read_within = None if call.stream else max(0.001, left)
        response = await self.client.post(call.endpoint.upstream_path, body, headers, min(per_try, left), read_within)
        call.first_byte = time.perf_counter()
        call.generation_id = response.headers.get("x-generation-id")
        if response.status >= 300:
            raise error_from_status(response.status, await response.read(), response.headers)
        if call.stream:
            return response
        raw = response.body if response.body is not None else await response.read()
        call.upstream_done = time.perf_counter()
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            call.usage_unread()
            raise UpstreamError(
                "OpenRouter returned a body that is not JSON.", code="upstream_invalid_response"
            ) from None
        usage = None
        if isinstance(parsed, dict):
            usage = call.endpoint.usage_of(parsed)
            call.model_served = parsed["model"] if isinstance(parsed.get("model"), str) else call.model_served
            call.provider = parsed["provider"] if isinstance(parsed.get("provider"), str) else call.provider
        if usage is None:
            call.usage_unread()
        else:  # read usage first: a 200 carrying an error may still be billed
            call.add_usage(usage)
        error = body_error(parsed, call.endpoint.expect)
        if error is not None:
            raise error
        call.parsed = parsed
        return raw


def _reason(error: GatewayError) -> str:
    status = getattr(error, "upstream_status", None)
    return str(status) if status else (error.code or "error")
