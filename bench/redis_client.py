"""Redis client A/B: the request path's admission on our lean client (app/store/resp.py) against
redis-py's asyncio client, the same calls from one process on uvloop (as the gateway runs), at
c=1 and c=64, in interleaved rounds of one run.

    uv run --locked python -m bench.redis_client           # full: 7 rounds of 2 s per client and point
    uv run --locked python -m bench.redis_client --quick   # 1 round of 0.3 s (CI smoke test)

The call: EVALSHA of the admit script with the keys and arguments RedisStore builds for the main
benchmark's key (RPM, TPM and a daily budget on the key and on its team, global RPM and TPM: 8
checks, 5 keys, 44 arguments); each concurrent caller its own lease member, as long as the
gateway's. Clients:

- `resp`: `RespClient.call` on the bytes `RedisLimits._admit_command` builds (the gateway's way).
- `redis-py`: `Redis.evalsha` with the same keys and arguments as lists (their per-plan part
  built once, as RedisStore does), on a `BlockingConnectionPool` of 64 connections, as
  RedisStore's pool.
- `redis-py pipeline`: the calls asked for in one loop turn sent as one non-transactional
  pipeline, redis-py's way to the lean client's one write per loop turn.

Reported per client and point: the client process's CPU µs per call (`time.process_time`; Redis
runs in its own process, pinned to the other core), calls/s, medians over rounds; ratios are
medians of per-round ratios to `resp`. Writes bench/results/redis_client.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hiredis
import redis.asyncio as aioredis
import uvloop

from app.auth.records import LimitValues
from app.limits.checks import WINDOW_MS, Check, Reserve
from app.limits.plan import Demand, Plan
from app.store import lua
from app.store.redis import RedisStore
from app.store.redis_limits import _verdict
from app.store.resp import RespClient
from bench.run import free_port, pinned

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ("resp", "redis-py", "redis-py pipeline")
POINTS = (("c1", 1), ("c64", 64))
LEASE_MS = 120_000  # limits.lease_s's default
LIMITS = LimitValues(rpm=10**9, tpm=10**12, budget_usd=10**6, budget_period="day")  # bench.run's key and team
GLOBAL = LimitValues(rpm=10**9, tpm=10**12)
Call = Callable[[str], Awaitable[Any]]


def admission_checks() -> list[Check]:
    plan = Plan([("key", uuid.uuid4().hex[:16], LIMITS), ("team", "bench", LIMITS), ("global", "global", GLOBAL)])
    return plan.checks(Demand(tokens=90, cost_nano=21_000))


class RedisPyAdmission:
    """The admit script's keys and arguments as a store on redis-py would pass them to `evalsha`."""

    def __init__(self, store: RedisStore, checks: list[Check]) -> None:
        budgets = [c for c in checks if c.kind == "budget"]
        leased = [c for c in checks if c.kind in ("concurrency", "budget")]
        limits = store._limits
        self.sha: str = limits._scripts["admit"].sha
        self.keys = [limits._limits_key, *map(limits._spend, budgets), *(limits._leases(c.name) for c in leased)]
        self.head = [WINDOW_MS, len(checks), 1, len(budgets), *(c.name for c in checks)]
        self.statics = [(lua.KIND_CODE[c.kind], c.limit) for c in checks]
        self.checks = checks

    def args(self, member: str) -> list[Any]:
        args: list[Any] = [member, LEASE_MS, *self.head]
        for (kind, limit), check in zip(self.statics, self.checks, strict=True):
            args += (kind, limit, check.amount)
        return args


class PipelineBatcher:
    """The evalsha calls asked for in one loop turn, sent as one pipeline (no transaction)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.sending: set[asyncio.Task[None]] = set()

    def evalsha(self, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append((args, reply))
        return reply

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.ensure_future(self._send(batch))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for args, _ in batch:
                    pipe.evalsha(*args)
                results = await pipe.execute()
        except Exception as exc:
            for _, reply in batch:
                reply.set_exception(exc)
            return
        for (_, reply), result in zip(batch, results, strict=True):
            reply.set_result(result)


async def measure_round(call: Call, members: list[str], seconds: float) -> dict[str, float]:
    """`len(members)` callers calling in a loop for `seconds`: calls, CPU µs per call, calls/s."""
    running = True
    counts = [0] * len(members)

    async def caller(index: int) -> None:
        member, done = members[index], 0
        while running:
            await call(member)
            done += 1
        counts[index] = done

    cpu, wall = time.process_time(), time.perf_counter()
    callers = [asyncio.ensure_future(caller(i)) for i in range(len(members))]
    await asyncio.sleep(seconds)
    running = False
    await asyncio.gather(*callers)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    calls = sum(counts)
    return {"calls": calls, "cpu_us_per_call": cpu / calls * 1e6, "calls_per_s": calls / wall}


async def measure(url: str, quick: bool) -> dict[str, Any]:
    seconds, rounds = (0.3, 1) if quick else (2.0, 7)
    store = RedisStore(url, prefix="bench" + secrets.token_hex(4))
    await store.prepare()  # loads the scripts
    checks = admission_checks()
    ours = RespClient(url, timeout_s=5)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=5)
    theirs = aioredis.Redis.from_pool(pool)
    as_lists = RedisPyAdmission(store, checks)
    batcher = PipelineBatcher(theirs)
    calls: dict[str, Call] = {
        "resp": lambda member: ours.call(store._limits._admit_command(Reserve(checks, member, LEASE_MS))),
        "redis-py": lambda member: theirs.evalsha(
            as_lists.sha, len(as_lists.keys), *as_lists.keys, *as_lists.args(member)
        ),
        "redis-py pipeline": lambda member: batcher.evalsha(
            as_lists.sha, len(as_lists.keys), *as_lists.keys, *as_lists.args(member)
        ),
    }
    try:
        sent = same_command(store, checks, as_lists)
        samples: dict[str, dict[str, list[dict[str, float]]]] = {p: {c: [] for c in CLIENTS} for p, _ in POINTS}
        for point, concurrency in POINTS:
            members = [f"{uuid.uuid4().hex}:{secrets.token_hex(4)}{i:x}" for i in range(concurrency)]
            for client in CLIENTS:  # warm-up, off the record: connections, the pool, caches
                assert all(_verdict(r).ok for r in await asyncio.gather(*(calls[client](m) for m in members)))
                await measure_round(calls[client], members, 0.2 if quick else 1.0)
            for round_ in range(rounds):  # interleaved, the order reversed every other round
                order = CLIENTS if round_ % 2 == 0 else tuple(reversed(CLIENTS))
                for client in order:
                    samples[point][client].append(await measure_round(calls[client], members, seconds))
        return {"rounds": rounds, "seconds_per_round": seconds, "command": sent, **summarise(samples)}
    finally:
        ours.close()
        await theirs.aclose()
        await pool.aclose()
        await store.close()


def same_command(store: RedisStore, checks: list[Check], as_lists: RedisPyAdmission) -> dict[str, int]:
    """Both clients send the same command: the lean client's bytes, read back, against redis-py's lists."""
    reader = hiredis.Reader()
    reader.feed(store._limits._admit_command(Reserve(checks, "m", LEASE_MS)))
    ours = reader.gets()
    theirs = [b"EVALSHA", as_lists.sha, len(as_lists.keys), *as_lists.keys, *as_lists.args("m")]
    assert ours == [str(part).encode() if not isinstance(part, bytes) else part for part in theirs], (ours, theirs)
    return {"checks": len(checks), "keys": len(as_lists.keys), "arguments": len(ours) - 3 - len(as_lists.keys)}


def summarise(samples: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    points: dict[str, Any] = {}
    for point, by_client in samples.items():
        points[point] = {
            client: {
                "calls": sum(s["calls"] for s in rounds),
                "cpu_us_per_call": statistics.median(s["cpu_us_per_call"] for s in rounds),
                "calls_per_s": statistics.median(s["calls_per_s"] for s in rounds),
            }
            for client, rounds in by_client.items()
        }
        ours = by_client["resp"]
        for client in CLIENTS[1:]:
            pairs = list(zip(by_client[client], ours, strict=True))
            points[point][client]["cpu_vs_resp"] = statistics.median(
                a["cpu_us_per_call"] / b["cpu_us_per_call"] for a, b in pairs
            )
            points[point][client]["calls_per_s_vs_resp"] = statistics.median(
                a["calls_per_s"] / b["calls_per_s"] for a, b in pairs
            )
    return {"points": points}


def table(results: dict[str, Any]) -> str:
    lines = [
        f"Run {results['run_at']} on {results['machine']} ({results['mode']}; median of {results['rounds']} "
        f"interleaved rounds of {results['seconds_per_round']} s; ratios: medians of per-round ratios to `resp`).",
        "",
        "| point | client | CPU µs/call | calls/s | CPU vs resp | calls/s vs resp |",
        "|---|---|---|---|---|---|",
    ]
    for point, by_client in results["points"].items():
        for client, row in by_client.items():
            cpu_ratio = f"{row['cpu_vs_resp']:.2f}x" if "cpu_vs_resp" in row else "1"
            rate_ratio = f"{row['calls_per_s_vs_resp']:.2f}x" if "calls_per_s_vs_resp" in row else "1"
            lines.append(
                f"| {point} | {client} | {row['cpu_us_per_call']:.1f} | {row['calls_per_s']:.0f} | "
                f"{cpu_ratio} | {rate_ratio} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round per point (CI smoke test)")
    parser.add_argument("--out", default=str(ROOT / "bench/results"), help="where redis_client.{json,md} go")
    args = parser.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is needed (Debian package redis-server)")
    port, data = free_port(), tempfile.mkdtemp(prefix="bench-redis-")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", data]
    redis_process = subprocess.Popen(pinned(command, "1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {0})  # the client on core 0, Redis on core 1
        url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(url)
        results = uvloop.run(measure(url, args.quick))
    finally:
        redis_process.terminate()
        redis_process.wait(10)
        shutil.rmtree(data, ignore_errors=True)
    results = {
        "run_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "mode": "quick" if args.quick else "full",
        **results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "redis_client.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "redis_client.md").write_text(table(results))
    sys.stdout.write(table(results))
    return 0


def wait_for_redis(url: str, timeout: float = 10) -> None:
    import redis

    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(url) as client:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


if __name__ == "__main__":
    raise SystemExit(main())
