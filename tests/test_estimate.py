"""The estimates admission reserves (app/limits/estimate.py): the completion tokens a request may
write and its worst-case cost in the catalogue's prices, and, through a gateway, TPM reserving
exactly that estimate and a budget reserving exactly that worst case."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from app.limits import estimate
from app.simulator import SimulatorThread
from app.simulator.catalogue import BY_ID
from tests.admission_support import (
    HELLO,
    MINI,
    catalogue_prices,
    chat,
    held_stream,
    make_key,
    make_team,
    nano_ceil,
    redis_gateway,
)
from tests.redis_server import RedisServer
from tests.support import GatewayServer, request_id


def test_completion_estimate_and_worst_case_cost_units() -> None:
    deepseek, mini = BY_ID["deepseek/deepseek-v3.2"], BY_ID[MINI]
    body: dict[str, Any] = {"model": MINI, "messages": HELLO}
    assert estimate.completion_tokens({**body, "max_completion_tokens": 300, "max_tokens": 5000}, mini, False) == 300
    assert estimate.completion_tokens({**body, "max_tokens": 700}, mini, False) == 700
    assert estimate.completion_tokens(body, deepseek, False) == deepseek["top_provider"]["max_completion_tokens"]
    no_top = {k: v for k, v in deepseek.items() if k != "top_provider"}
    assert estimate.completion_tokens(body, no_top, False) == deepseek["context_length"]
    assert estimate.completion_tokens(body, None, False) == estimate.DEFAULT_MAX_OUTPUT
    assert estimate.completion_tokens({**body, "max_tokens": True}, mini, False) == 16_384  # a bool is no count
    assert estimate.completion_tokens({**body, "max_tokens": 700}, mini, True) == 0  # embeddings write nothing

    prices = catalogue_prices("anthropic/claude-sonnet-4.5")
    assert estimate.worst_case_cost(10, 300, prices) == Decimal("0.000003") * 10 + Decimal("0.000015") * 300
    assert estimate.worst_case_cost(10, 300, None) == 0


@pytest.fixture(scope="module")
def shared(simulator: SimulatorThread, redis_server: RedisServer) -> Iterator[GatewayServer]:
    """A gateway on the session's Redis (its own prefix), for tests that make their own keys."""
    with redis_gateway(simulator, redis_server) as gateway:
        yield gateway


@pytest.mark.parametrize(
    ("model", "limits", "expected_completion"),
    [
        (MINI, {"max_completion_tokens": 300, "max_tokens": 5000}, 300),
        (MINI, {"max_tokens": 700}, 700),
        ("deepseek/deepseek-v3.2", {}, BY_ID["deepseek/deepseek-v3.2"]["top_provider"]["max_completion_tokens"]),
    ],
    ids=["max_completion_tokens-wins", "max_tokens", "catalogue-max-output"],
)
def test_tpm_reserves_the_completion_estimate(
    shared: GatewayServer, model: str, limits: dict[str, int], expected_completion: int
) -> None:
    assert expected_completion != estimate.DEFAULT_MAX_OUTPUT  # the catalogue's figure, not the fallback
    key = make_key(shared, make_team(shared), tpm=100_000)
    body = {"model": model, "messages": HELLO, **limits, "simulator": {"words": 5, "chunk_delay_ms": 100}}
    with held_stream(shared, key["key"], body) as response:
        assert response.status_code == 200
        remaining = int(response.headers["x-ratelimit-remaining-tokens"])
    # A fresh bucket is full: the header is the limit minus exactly this request's reservation.
    assert remaining == 100_000 - estimate.prompt_tokens(body) - expected_completion


@pytest.mark.parametrize("slack_nano", [0, -1], ids=["budget-equals-worst-case", "one-nano-usd-short"])
def test_budget_reserves_the_catalogue_worst_case(
    shared: GatewayServer, simulator: SimulatorThread, slack_nano: int
) -> None:
    body = {"model": MINI, "messages": HELLO, "max_completion_tokens": 300, "max_tokens": 5000}
    worst = estimate.worst_case_cost(estimate.prompt_tokens(body), 300, catalogue_prices(MINI))
    budget = (nano_ceil(worst) + slack_nano) / 10**9
    key = make_key(shared, make_team(shared), budget_usd=budget, budget_period="total")
    rid = request_id()
    response = chat(shared, key["key"], body, rid)
    if slack_nano == 0:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 429 and response.json()["error"]["code"] == "insufficient_quota"
        assert simulator.find(rid) == []  # refused at admission: the worst case did not fit
