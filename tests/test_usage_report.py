"""The usage report keeps keys apart by identity: two teams may each have a key named `alice`,
and `group_by=key`, the `key` filter, the CSV and `gateway usage` never merge them; `group_by=day` gives
UTC days and a from/to window holds exactly the days inside it."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from app.simulator import SimulatorThread
from tests.metering_support import NANO_USD, Served, chat, cost_of, served, team_and_key, usage
from tests.support import ADMIN_KEY, GatewayServer, wait_until

GATEWAY = Path(sys.executable).with_name("gateway")


def test_keys_of_the_same_name_in_two_teams_are_reported_apart(keyed: GatewayServer) -> None:
    suffix = uuid.uuid4().hex[:8]
    ml, ops = f"ml-{suffix}", f"ops-{suffix}"
    with httpx.Client(base_url=keyed.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=20) as admin:
        keys = {}
        for team, count in ((ml, 1), (ops, 2)):
            assert admin.post("/admin/teams", json={"name": team}).status_code == 201
            keys[team] = admin.post("/admin/keys", json={"name": "alice", "team": team}).json()
            for _ in range(count):  # ml's alice sends one request, ops's alice two
                reply = httpx.post(
                    keyed.url + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {keys[team]['key']}"},
                    json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    timeout=20,
                )
                assert reply.status_code == 200, reply.text

        def usage(**params: str) -> httpx.Response:
            return admin.get("/admin/usage", params={"group_by": "key", **params})

        def rows() -> list[dict[str, Any]]:
            return [r for r in usage().json()["data"] if r["team"] in (ml, ops)]

        wait_until(lambda: sum(r["requests"] for r in rows()) == 3, 10, "the ledger")
        by_team = {r["team"]: r for r in rows()}
        assert set(by_team) == {ml, ops}  # two rows, not one `alice`
        for team, requests in ((ml, 1), (ops, 2)):
            row = by_team[team]
            assert (row["key"], row["key_id"], row["requests"]) == ("alice", keys[team]["id"], requests)

        for key in (f"{ops}/alice", keys[ops]["id"]):  # a key named by team/name or by id
            assert usage(key=key).json()["total"]["requests"] == 2
        assert usage(key="alice", team=ml).json()["total"]["requests"] == 1  # a name within one team
        ambiguous = usage(key="alice")
        assert ambiguous.status_code == 400
        error = ambiguous.json()["error"]
        assert error["param"] == "key" and f"{ml}/alice" in error["message"] and f"{ops}/alice" in error["message"]

        text = admin.get("/admin/usage", params={"group_by": "key"}, headers={"Accept": "text/csv"}).text
        table = list(csv.DictReader(io.StringIO(text)))
        assert list(table[0])[:3] == ["team", "key", "key_id"]
        mine = {(r["team"], r["key"], r["key_id"]): r["requests"] for r in table if r["team"] in (ml, ops)}
        assert mine == {(ml, "alice", keys[ml]["id"]): "1", (ops, "alice", keys[ops]["id"]): "2"}
        costs = [r["cost_usd"] for r in table]  # plain decimals a spreadsheet reads, never 7.56e-05
        assert all(re.fullmatch(r"\d+\.\d+", cost) for cost in costs), costs
        json_costs = {r["key_id"]: r["cost_usd"] for r in rows()}
        assert all(
            Decimal(r["cost_usd"]) == Decimal(repr(json_costs[r["key_id"]]))
            for r in table[:-1]
            if r["team"] in (ml, ops)
        )

    env = {**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_URL": keyed.url}
    result = subprocess.run(
        [str(GATEWAY), "usage", "--group-by", "key", "--key", f"{ml}/alice"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["TEAM", "KEY", "KEY_ID"]
    assert any(line.split()[:4] == [ml, "alice", keys[ml]["id"], "1"] for line in lines)


def test_usage_by_utc_day_and_date_windows(served_gateway: Served, simulator: SimulatorThread) -> None:
    """Point 7: group_by=day gives the UTC day as YYYY-MM-DD; a from/to window that includes
    today has the run's sums, one that ends yesterday has none."""
    url = served_gateway.url
    team, key = team_and_key(url)
    first_day = datetime.now(UTC).date()
    rid = "days-" + uuid.uuid4().hex
    for n in range(3):
        assert chat(url, key["key"], f"{rid}-{n}", model="openai/gpt-4o-mini", stream=n == 1).status_code == 200
    entries = [served(simulator, f"{rid}-{n}") for n in range(3)]
    last_day = datetime.now(UTC).date()
    cost = sum(cost_of(e) for e in entries)
    prompt = sum(e["usage"]["prompt_tokens"] for e in entries)
    completion = sum(e["usage"]["completion_tokens"] for e in entries)

    by_day = wait_until(
        lambda: (r := usage(url, team=team, group_by="day"))["total"]["requests"] == 3 and r, 10, "the ledger"
    )
    assert len(by_day["data"]) == 1
    row = by_day["data"][0]
    assert set(row) == {
        "day",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "cached_tokens",
        "cost_usd",
    }
    assert row["day"] in {first_day.isoformat(), last_day.isoformat()}
    assert date.fromisoformat(row["day"]).isoformat() == row["day"]  # YYYY-MM-DD
    assert row["requests"] == 3 and row["prompt_tokens"] == prompt and row["completion_tokens"] == completion
    assert abs(Decimal(repr(row["cost_usd"])) - cost) < NANO_USD

    around = usage(
        url,
        team=team,
        group_by="day,key",
        **{"from": (first_day - timedelta(days=1)).isoformat(), "to": (last_day + timedelta(days=1)).isoformat()},
    )
    assert around["total"] == by_day["total"]
    assert [(r["day"], r["key"]) for r in around["data"]] == [(row["day"], f"{team}-key")]

    ending_yesterday = usage(
        url,
        team=team,
        **{"from": (first_day - timedelta(days=7)).isoformat(), "to": (first_day - timedelta(days=1)).isoformat()},
    )
    assert ending_yesterday["data"] == []
    assert ending_yesterday["total"]["requests"] == 0 and ending_yesterday["total"]["cost_usd"] == 0
