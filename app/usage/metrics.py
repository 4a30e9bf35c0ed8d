"""Prometheus metrics (DESIGN §6): counters for requests, tokens and cost; histograms with
buckets sized for LLM calls; bounded labels (team, key name, model, status, endpoint,
token_type, limit). Several workers share one view through prometheus_client's multiprocess
mode (`PROMETHEUS_MULTIPROC_DIR`, wiped by `gateway serve` at start; `create_app` turns it on from
`Settings.metrics_multiprocess_dir`); replicas are each scraped.

The per-request families are kept in plain Python in one process (a dict lookup and an add
per update, no lock, no label tuple built by prometheus_client) and turned into samples only
when /metrics is scraped; with several workers they go through prometheus_client's shared files.
Neither mode exports `*_created` series (prometheus_client's multiprocess mode never did).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from app.usage.record import UsageRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LLM_SECONDS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
TTFT_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
OVERHEAD_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
TOKEN_TYPES = ("prompt", "completion", "reasoning", "cached")
Labels = tuple[str, ...]


def _go_float(value: float) -> str:
    """A bucket bound as prometheus_client writes it in `le`."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


class LocalCounter:
    """A counter family summed in this process, exported at scrape time."""

    def __init__(self, name: str, documentation: str, labelnames: Labels) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value)
        return family


class LocalHistogram:
    """A histogram family kept in this process: per label set, a count per bucket and the sum."""

    def __init__(self, name: str, documentation: str, labelnames: Labels, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.bounds = [float(b) for b in buckets]
        self._les = [*map(_go_float, self.bounds), "+Inf"]
        self.values: dict[Labels, list[float]] = {}  # counts per bucket (the last is +Inf), then the sum

    def observe(self, labels: Labels, value: float) -> None:
        row = self.values.get(labels)
        if row is None:
            row = self.values[labels] = [0] * (len(self.bounds) + 2)
        row[bisect_left(self.bounds, value)] += 1  # buckets are upper bounds, inclusive (le)
        row[-1] += value

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, row in list(self.values.items()):
            cumulative, buckets = 0.0, []
            for le, count in zip(self._les, row, strict=False):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(labels, buckets, sum_value=row[-1])
        return family


class SharedCounter:
    """The same interface on a prometheus_client counter (multiprocess mode)."""

    def __init__(self, name: str, documentation: str, labelnames: Labels, registry: CollectorRegistry) -> None:
        self._metric = Counter(name, documentation, labelnames, registry=registry)
        self._children: dict[Labels, Any] = {}

    def inc(self, labels: Labels, amount: float = 1) -> None:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        child.inc(amount)


class SharedHistogram:
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Labels,
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._metric = Histogram(name, documentation, labelnames, buckets=buckets, registry=registry)
        self._children: dict[Labels, Any] = {}

    def observe(self, labels: Labels, value: float) -> None:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        child.observe(value)


class _LocalFamilies(Collector):
    def __init__(self, families: list[LocalCounter | LocalHistogram]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.collect()


UNLISTED_MODEL_LABELS = 100  # model ids OpenRouter's catalogue does not list, labelled as themselves
OTHER_MODEL = "other"


class Metrics:
    def __init__(self, is_listed: Callable[[str], bool | None] | None = None, multiprocess: bool = False) -> None:
        # is_listed(model): the catalogue lists it (True), does not (False), or is not loaded (None);
        # multiprocess: workers share prometheus_client's files (PROMETHEUS_MULTIPROC_DIR is set)
        self._is_listed = is_listed
        self._model_labels: dict[str, str] = {}
        self._unlisted: set[str] = set()
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess
        r = self.registry
        local: list[LocalCounter | LocalHistogram] = []

        def counter(name: str, documentation: str, labelnames: Labels) -> LocalCounter | SharedCounter:
            if self.multiprocess:
                return SharedCounter(name, documentation, labelnames, r)
            family = LocalCounter(name, documentation, labelnames)
            local.append(family)
            return family

        def histogram(
            name: str, documentation: str, labelnames: Labels, buckets: tuple[float, ...]
        ) -> LocalHistogram | SharedHistogram:
            if self.multiprocess:
                return SharedHistogram(name, documentation, labelnames, buckets, r)
            family = LocalHistogram(name, documentation, labelnames, buckets)
            local.append(family)
            return family

        self.requests = counter(
            "gateway_requests", "Requests answered, by outcome.", ("team", "key", "model", "endpoint", "status")
        )
        self.tokens = counter(
            "gateway_tokens",
            "Tokens as OpenRouter counted them (reasoning is part of completion, cached part of prompt).",
            ("team", "key", "model", "token_type"),
        )
        self.cost = counter(
            "gateway_cost_usd", "Spend in USD (OpenRouter's usage.cost first).", ("team", "key", "model")
        )
        self.duration = histogram(
            "gateway_request_duration_seconds",
            "Whole request, as the client saw it.",
            ("model", "endpoint"),
            LLM_SECONDS,
        )
        self.ttft = histogram(
            "gateway_time_to_first_token_seconds", "Streams: until the first data event.", ("model",), TTFT_SECONDS
        )
        self.upstream = histogram(
            "gateway_upstream_duration_seconds", "Time spent waiting on OpenRouter.", ("model",), LLM_SECONDS
        )
        self.overhead = histogram(
            "gateway_overhead_seconds", "Time the gateway itself added.", ("endpoint",), OVERHEAD_SECONDS
        )
        if local:
            r.register(_LocalFamilies(local))
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
        self.ahead = Counter(
            "gateway_admissions_ahead",
            "Reservations made ahead for a key's next request, by outcome: taken by it, or released unused.",
            ("outcome",),
            registry=r,
        )
        self._ahead = {outcome: self.ahead.labels(outcome) for outcome in ("taken", "released")}
        # In one process the gauge reads the live count when scraped; workers count into shared files.
        self.count_in_flight = self.multiprocess

    def admitted_ahead(self, outcome: str) -> None:
        self._ahead[outcome].inc()

    def follow_in_flight(self, read: Callable[[], int]) -> None:
        if not self.multiprocess:
            self.in_flight.set_function(read)

    def model_label(self, model: str | None) -> str:
        """The model as a label value, bounded: every model the catalogue lists, plus the first
        `UNLISTED_MODEL_LABELS` others forwarded (router ids such as `openrouter/…` or `~…`, which
        pass unlisted and a key could vary at will); the rest share "other"."""
        if not model:
            return ""
        label = self._model_labels.get(model)
        if label is not None:
            return label
        listed = self._is_listed(model) if self._is_listed is not None else True
        if listed or model in self._unlisted:
            label = model
        elif len(self._unlisted) < UNLISTED_MODEL_LABELS and len(model) <= 200:
            self._unlisted.add(model)
            label = model
        else:
            label = OTHER_MODEL
        if listed is not None and len(self._model_labels) < 20_000:
            self._model_labels[model] = label  # (judged again once the catalogue is loaded)
        return label

    def observe_request(self, record: UsageRecord) -> None:
        model, endpoint = self.model_label(record.model), record.endpoint
        self.requests.inc((record.team or "", record.key_name, model, endpoint, str(record.status)))
        self.duration.observe((model, endpoint), record.duration_s)
        self.overhead.observe((endpoint,), record.overhead_s)
        if record.upstream_s is not None:
            self.upstream.observe((model,), record.upstream_s)
        if record.ttft_s is not None:
            self.ttft.observe((model,), record.ttft_s)

    def observe_usage(self, record: UsageRecord) -> None:
        team, key, model = record.team or "", record.key_name, self.model_label(record.model)
        for token_type, count in zip(
            TOKEN_TYPES,
            (record.prompt_tokens, record.completion_tokens, record.reasoning_tokens, record.cached_tokens),
            strict=True,
        ):
            if count:
                self.tokens.inc((team, key, model, token_type), count)
        if record.cost_usd:
            self.cost.inc((team, key, model), float(record.cost_usd))

    def exposition(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
