"""Which limits a request meets and how much of them it asks for: a principal's `Plan` (its key's,
its team's and, on the shared OpenRouter key, the global limits, built once) turned into the
request's checks by its `Demand` (the tokens and cost it may use at most, known before it runs)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

from app.auth.records import LimitValues
from app.limits import estimate
from app.limits.checks import NANO, Check, budget_period

Scope = tuple[str, str, LimitValues]  # (scope, its id, its limits): ("key", key id, …), ("team", name, …)


@dataclass(slots=True)
class Demand:
    """What the request may use at most, known before it runs."""

    tokens: int = 0
    cost_nano: int = 0


class Plan:
    """The checks of one principal, built once; only the demand changes per request."""

    def __init__(self, scopes: list[Scope]) -> None:
        # Whose reservations ahead these checks take: the same across a key's plans (a principal
        # is rebuilt on every cache refresh and change; a reservation made under other limits
        # than the request's does not fit it and is given back).
        self.owner = "|".join(f"{scope}:{scope_id}" for scope, scope_id, _ in scopes)
        self.needs_demand = any(v.tpm is not None or v.budget_usd is not None for _, _, v in scopes)
        self._fixed: list[Check | tuple[str, str, str, int, str, str]] = []
        for scope, scope_id, values in scopes:
            if values.rpm is not None:
                self._fixed.append(Check(scope, scope_id, "requests", values.rpm))
            if values.tpm is not None:
                stem = Check(scope, scope_id, "tokens", values.tpm).name
                self._fixed.append((scope, scope_id, "tokens", values.tpm, "", stem))
            if values.max_concurrency is not None:
                self._fixed.append(Check(scope, scope_id, "concurrency", values.max_concurrency))
            if values.budget_usd is not None:
                limit = int(Decimal(str(values.budget_usd)) * NANO)
                stem = Check(scope, scope_id, "budget", limit).name
                self._fixed.append((scope, scope_id, "budget", limit, values.budget_period or "month", stem))

    def checks(self, wanted: Demand) -> list[Check]:
        out: list[Check] = []
        for item in self._fixed:
            if isinstance(item, Check):
                out.append(item)
                continue
            scope, scope_id, kind, limit, period, stem = item
            if kind == "tokens":
                out.append(Check(scope, scope_id, kind, limit, wanted.tokens, "", 0, stem))
            else:
                period_id, ttl = budget_period(period)
                out.append(Check(scope, scope_id, kind, limit, wanted.cost_nano, period_id, ttl, f"{stem}:{period_id}"))
        return out


def merged(record: Any, defaults: LimitValues) -> LimitValues:
    """A key's or team's own limits, each missing one taken from the configured defaults."""
    if record is None:
        return defaults
    values = {name: getattr(record, name) for name in LimitValues.model_fields}
    for name in LimitValues.model_fields:
        if values[name] is None:
            values[name] = getattr(defaults, name)
    if record.budget_usd is not None:
        values["budget_period"] = record.budget_period
    return LimitValues.model_construct(**values)


def demand_of(
    payload: dict[str, Any],
    model_entry: dict[str, Any] | None,
    prices: Any,
    embeddings: bool,
    limits: tuple[str, ...] = ("max_completion_tokens", "max_tokens"),
) -> Demand:
    prompt = estimate.prompt_tokens(payload)
    completion = estimate.completion_tokens(payload, model_entry, embeddings, limits)
    cost = estimate.worst_case_cost(prompt, completion, prices)
    return Demand(prompt + completion, int((cost * NANO).to_integral_value(ROUND_CEILING)))
