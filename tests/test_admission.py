"""Admission through a gateway (app/limits/admission.py): a failed request gives its tokens and
budget hold back, two keys share their team's budget, the headers show the tightest limit, a
released concurrency slot is free before the client's next request, and a reused request id
never shares a concurrency slot (on the memory store and on Redis)."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from app.limits import estimate
from app.simulator import SimulatorThread
from tests.admission_support import (
    HELLO,
    MINI,
    billed,
    budget_of,
    catalogue_prices,
    chat,
    make_key,
    make_team,
    redis_gateway,
)
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, GatewayServer, gateway_settings, request_id, wait_until
from tests.test_limits import new_key

# the hot path's greeting and model, which the concurrency-slot tests below were written with
GREETING = [{"role": "user", "content": "Hello there, how are you today?"}]
MODEL = "openai/gpt-4o-mini"


@pytest.fixture(scope="module")
def shared(simulator: SimulatorThread, redis_server: RedisServer) -> Iterator[GatewayServer]:
    """A gateway on the session's Redis (its own prefix), for tests that make their own keys."""
    with redis_gateway(simulator, redis_server) as gateway:
        yield gateway


@pytest.mark.parametrize("status", [400, 500])
def test_failed_request_gives_back_its_tokens_and_budget_hold(
    shared: GatewayServer, simulator: SimulatorThread, status: int
) -> None:
    body = {"model": MINI, "messages": HELLO, "max_tokens": 16_000}
    tokens = estimate.prompt_tokens(body) + 16_000
    worst = estimate.worst_case_cost(estimate.prompt_tokens(body), 16_000, catalogue_prices(MINI))
    # Room for one reservation, not two: the next request fits only if the first gave its own back.
    key = make_key(shared, make_team(shared), tpm=20_000, budget_usd=float(worst * 3 / 2), budget_period="day")
    failed_id = request_id()
    failed = chat(shared, key["key"], {**body, "simulator": {"status": status}}, failed_id)
    assert failed.status_code >= 400
    assert [e["status"] for e in simulator.find(failed_id)] == [status]  # one try, nothing billed
    assert billed(simulator, failed_id) == 0

    probe_id = request_id()

    def admitted() -> httpx.Response | None:
        response = chat(shared, key["key"], body, probe_id)  # refused until the failure is settled
        return response if response.status_code == 200 else None

    probe = wait_until(admitted, 5, "the failed request's reservation given back")
    # The bucket was full again (nothing billed): only the probe's own estimate is taken.
    assert int(probe.headers["x-ratelimit-remaining-tokens"]) == 20_000 - tokens
    cost = billed(simulator, probe_id)
    assert cost > 0
    wait_until(lambda: budget_of(shared, f"/keys/{key['id']}")["spent_usd"] > 0, 5, "probe settled")
    assert abs(budget_of(shared, f"/keys/{key['id']}")["spent_usd"] - cost) < 1e-12  # the failure cost nothing


def test_two_keys_share_their_team_budget(shared: GatewayServer, simulator: SimulatorThread) -> None:
    body = {"model": MINI, "messages": HELLO, "max_tokens": 40}
    worst = float(estimate.worst_case_cost(estimate.prompt_tokens(body), 40, catalogue_prices(MINI)))
    limit = worst * 4
    team = make_team(shared, budget_usd=limit, budget_period="day")
    first, second = make_key(shared, team), make_key(shared, team)
    spent, served, refusal = 0.0, Counter[str](), None
    for turn in range(40):
        key = (first, second)[turn % 2]
        rid = request_id()
        response = chat(shared, key["key"], body, rid)
        if response.status_code != 200:
            refusal = response
            break
        served[key["id"]] += 1
        spent += billed(simulator, rid)
        wait_until(  # settle before the next: the refusal then depends on spend alone
            lambda expected=spent: abs(budget_of(shared, f"/teams/{team}")["spent_usd"] - expected) < 1e-12,
            5,
            "team spend settled",
        )
    assert refusal is not None and served[first["id"]] >= 1 and served[second["id"]] >= 1
    assert refusal.status_code == 429 and refusal.headers["x-should-retry"] == "false"
    error = refusal.json()["error"]
    assert error["code"] == "insufficient_quota" and error["metadata"]["scope"] == "team"
    assert spent <= limit < spent + worst  # refused exactly when the worst case no longer fit
    for key in (first, second):  # the team is out for both of its keys
        again = chat(shared, key["key"], body)
        assert again.status_code == 429 and again.json()["error"]["code"] == "insufficient_quota"
        assert budget_of(shared, f"/keys/{key['id']}") is None  # keys have no budget of their own


def test_headers_show_the_tightest_limit(shared: GatewayServer) -> None:
    team = make_team(shared, rpm=3, tpm=50_000)
    first, second = make_key(shared, team, rpm=10, tpm=100_000), make_key(shared, team, rpm=10, tpm=100_000)
    body = {"model": MINI, "messages": HELLO, "max_tokens": 10}
    seen = []
    for key in (first, second, first):
        response = chat(shared, key["key"], body)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"  # the team's 3, not the key's 10
        assert response.headers["x-ratelimit-limit-tokens"] == "50000"
        seen.append(response.headers["x-ratelimit-remaining-requests"])
    assert seen == ["2", "1", "0"]  # counted across both keys
    refused = chat(shared, second["key"], body)
    assert refused.status_code == 429 and refused.json()["error"]["metadata"]["scope"] == "team"
    assert refused.headers["x-ratelimit-limit-requests"] == "3"


def test_a_sequential_client_gets_its_concurrency_slot_back_at_once(keyed: GatewayServer) -> None:
    """Metering (and so settlement) runs after the response is sent; the slot must still be free
    when the client's next request comes: one after another at max_concurrency 1, never refused."""
    key = new_key(keyed, max_concurrency=1)["key"]
    with httpx.Client(base_url=keyed.url, headers={"Authorization": f"Bearer {key}"}, timeout=20) as http:
        statuses = [
            http.post("/v1/chat/completions", json={"model": MODEL, "messages": GREETING, "max_tokens": 5}).status_code
            for _ in range(40)
        ]
    assert statuses == [200] * 40


def test_a_sequential_client_gets_its_concurrency_slot_back_at_once_on_redis(
    simulator: SimulatorThread, redis_server: RedisServer
) -> None:
    """On Redis too, from a fresh Redis (no scripts loaded yet): the gateway loads its scripts
    when it starts, before its first request, so no admission or settlement meets NOSCRIPT."""
    import redis

    from app.store import lua

    shas = [hashlib.sha1(src.encode()).hexdigest() for src in (lua.ADMIT, lua.SETTLE, lua.LEDGER_APPLY)]
    settings = gateway_settings(
        simulator.base_url, admin_key=ADMIN_KEY, store=redis_server.url, store_prefix="t" + uuid.uuid4().hex[:10]
    )
    with redis.Redis(port=redis_server.port) as plain:
        plain.script_flush()
        assert plain.script_exists(*shas) == [False, False, False]
        with GatewayServer(settings) as gateway:
            assert plain.script_exists(*shas) == [True, True, True]  # loaded at start, before any request
            test_a_sequential_client_gets_its_concurrency_slot_back_at_once(gateway)


def test_a_reused_request_id_does_not_share_a_concurrency_slot(keyed: GatewayServer) -> None:
    """The request id is the client's to choose, so it cannot name a request's hold in the
    store: three requests sent with one id at max_concurrency 2 hold three slots, and the third
    is refused; once they end, the slots are free again."""
    key = new_key(keyed, max_concurrency=2)["key"]
    stalled = {"model": MODEL, "messages": GREETING, "stream": True, "simulator": {"words": 30, "stall_after": 1}}
    headers = {"Authorization": f"Bearer {key}", "x-request-id": "same-id-" + uuid.uuid4().hex[:6]}
    with httpx.Client(base_url=keyed.url, headers=headers, timeout=20) as http:
        with http.stream("POST", "/v1/chat/completions", json=stalled) as first:
            assert first.status_code == 200
            with http.stream("POST", "/v1/chat/completions", json=stalled) as second:
                assert second.status_code == 200
                third = http.post("/v1/chat/completions", json={"model": MODEL, "messages": GREETING})
                assert third.status_code == 429, third.text
                assert third.json()["error"]["code"] == "rate_limit_exceeded"
        after = wait_until(
            lambda: (
                (r := http.post("/v1/chat/completions", json={"model": MODEL, "messages": GREETING})).status_code == 200
                and r
            ),
            10,
            "the slots released",
        )
        assert after.headers["x-request-id"] == headers["x-request-id"]


def test_a_reused_request_id_does_not_share_a_concurrency_slot_on_redis(
    simulator: SimulatorThread, redis_server: RedisServer
) -> None:
    settings = gateway_settings(
        simulator.base_url, admin_key=ADMIN_KEY, store=redis_server.url, store_prefix="t" + uuid.uuid4().hex[:10]
    )
    with GatewayServer(settings) as gateway:
        test_a_reused_request_id_does_not_share_a_concurrency_slot(gateway)
