"""Prometheus metrics (DESIGN §6): counters for requests, tokens and cost; histograms with
buckets sized for LLM calls; bounded labels (team, key name, model, status, endpoint,
token_type, limit). Several workers share one view through prometheus_client's multiprocess
mode (`PROMETHEUS_MULTIPROC_DIR`, wiped by `gateway serve` at start); replicas are each scraped.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from app.usage.record import UsageRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LLM_SECONDS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
TTFT_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
OVERHEAD_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
TOKEN_TYPES = ("prompt", "completion", "reasoning", "cached")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by outcome.",
            ("team", "key", "model", "endpoint", "status"),
            registry=r,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens as OpenRouter counted them (reasoning is part of completion, cached part of prompt).",
            ("team", "key", "model", "token_type"),
            registry=r,
        )
        self.cost = Counter(
            "gateway_cost_usd", "Spend in USD (OpenRouter's usage.cost first).", ("team", "key", "model"), registry=r
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Whole request, as the client saw it.",
            ("model", "endpoint"),
            buckets=LLM_SECONDS,
            registry=r,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Streams: until the first data event.",
            ("model",),
            buckets=TTFT_SECONDS,
            registry=r,
        )
        self.upstream = Histogram(
            "gateway_upstream_duration_seconds",
            "Time spent waiting on OpenRouter.",
            ("model",),
            buckets=LLM_SECONDS,
            registry=r,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time the gateway itself added.",
            ("endpoint",),
            buckets=OVERHEAD_SECONDS,
            registry=r,
        )
        self.retries = Counter(
            "gateway_upstream_retries", "Retries toward OpenRouter, by cause.", ("reason",), registry=r
        )
        self.rate_limited = Counter(
            "gateway_rate_limited", "Requests refused by a limit.", ("limit", "scope"), registry=r
        )
        self.budget_spent = Gauge(
            "gateway_budget_spent_usd",
            "Settled spend of each team's budget period.",
            ("team",),
            multiprocess_mode="max",
            registry=r,
        )
        self.budget_limit = Gauge(
            "gateway_budget_limit_usd", "Each team's budget per period.", ("team",), multiprocess_mode="max", registry=r
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Requests being answered now.", multiprocess_mode="livesum", registry=r
        )
        self.store_errors = Counter("gateway_store_errors", "Store calls that failed (Redis down or slow).", registry=r)
        self.ledger_dropped = Counter(
            "gateway_ledger_dropped_records", "Usage records lost to a full buffer.", registry=r
        )
        self.reconciliations = Counter(
            "gateway_reconciliations",
            "Cut streams looked up in OpenRouter's generation stats, by outcome.",
            ("outcome",),
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, record: UsageRecord) -> None:
        team, key, model = record.team or "", record.key_name, record.model or ""
        self._child(self.requests, team, key, model, record.endpoint, str(record.status)).inc()
        self._child(self.duration, model, record.endpoint).observe(record.duration_s)
        self._child(self.overhead, record.endpoint).observe(record.overhead_s)
        if record.upstream_s is not None:
            self._child(self.upstream, model).observe(record.upstream_s)
        if record.ttft_s is not None:
            self._child(self.ttft, model).observe(record.ttft_s)

    def observe_usage(self, record: UsageRecord) -> None:
        team, key, model = record.team or "", record.key_name, record.model or ""
        for token_type, count in zip(
            TOKEN_TYPES,
            (record.prompt_tokens, record.completion_tokens, record.reasoning_tokens, record.cached_tokens),
            strict=True,
        ):
            if count:
                self._child(self.tokens, team, key, model, token_type).inc(count)
        if record.cost_usd:
            self._child(self.cost, team, key, model).inc(float(record.cost_usd))

    def exposition(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
