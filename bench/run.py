"""The benchmark: direct-to-simulator vs a bare pass-through vs the gateway with every feature on,
measured in one run on loopback.

    python -m bench.run            # full run (several minutes); writes bench/results/latest.{json,md}
    python -m bench.run --quick    # a few seconds: every point measured briefly (CI smoke)

Points: chat at c=1 and c=64, plain and streamed; streams of the agents' APIs (Responses,
Messages) at c=64; stream first bytes of all three; memory with slow streams and over a soak.

Layout on a 2-core machine: the proxy under test (bare, then gateway; one worker) pinned to
core 0; the simulator (fastest mode: no log, no keep-alives) and the load generator on core 1.
The gateway runs with virtual-key auth, RPM/TPM/concurrency/budget admission for key, team and
global on a Redis store, metering, the ledger and metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.load import WRK, events_per_stream, first_byte_ms, hold_streams, percentile, run_load

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = str(Path(sys.executable).with_name("gateway"))
UPSTREAM_KEY = "sk-or-bench-upstream-key"
ADMIN_KEY = "sk-gw-bench-admin-key-0123456789"
MESSAGES = [{"role": "user", "content": "Hello there, how are you today?"}]
PLAIN = {"model": "openai/gpt-4o-mini", "messages": MESSAGES, "max_tokens": 64}
STREAM = {**PLAIN, "stream": True, "simulator": {"words": 20}}
SLOW = {**PLAIN, "stream": True, "simulator": {"words": 40, "chunk_delay_ms": 100}}
# The same 20 words streamed by the agents' APIs, each delta its own event among many more.
RESPONSES_STREAM = {"model": "openai/gpt-4o-mini", "input": MESSAGES[0]["content"], "stream": True}
RESPONSES_STREAM["simulator"] = {"words": 20}
MESSAGES_STREAM = {"model": "anthropic/claude-sonnet-4.5", "max_tokens": 64, "messages": MESSAGES, "stream": True}
MESSAGES_STREAM["simulator"] = {"words": 20}
CHAT, RESPONSES, ANTHROPIC = "/chat/completions", "/responses", "/messages"
# Throughput points: (name, API path, body, concurrency), chat's first and measured as before.
POINTS = (
    ("c1", CHAT, PLAIN, 1),
    ("c64", CHAT, PLAIN, 64),
    ("c64_stream", CHAT, STREAM, 64),
    ("c64_responses_stream", RESPONSES, RESPONSES_STREAM, 64),
    ("c64_messages_stream", ANTHROPIC, MESSAGES_STREAM, 64),
)
# A streamed Messages answer carries no cost: the gateway asks OpenRouter's /generation for it
# 0.5 s after the stream and again 0.5 s later (the simulator, like OpenRouter, has not got it at
# first), then corrects the ledger and the budget. Waiting this long after the gateway's rounds
# on the agents' APIs counts that work in its CPU per stream; chat has none and is measured as before.
RECONCILED_S = 1.5
AGENT_STREAMS = (
    ("Responses", "c64_responses_stream", "first_byte_responses"),
    ("Messages", "c64_messages_stream", "first_byte_messages"),
)
# First-byte probes: (result key, API path, body).
FIRST_BYTES = (
    ("first_byte", CHAT, STREAM),
    ("first_byte_responses", RESPONSES, RESPONSES_STREAM),
    ("first_byte_messages", ANTHROPIC, MESSAGES_STREAM),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(command: list[str], cpu: str) -> list[str]:
    return (
        ["taskset", "-c", cpu, *command]
        if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1
        else command
    )


def on_load_core() -> None:
    """This process generates load too (first-byte probes, the 1,000 slow streams): keep it on the
    load core like wrk, off the proxy's core. Only where the proxies are pinned with taskset, since
    the processes it starts inherit this."""
    if pinned(["true"], "1")[0] == "taskset" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def gateway_env(sim: str, store: str, port: int) -> dict[str, str]:
    """The gateway as measured: the simulator upstream, `store`, raised global limits, log level warning."""
    return {
        "OPENROUTER_BASE_URL": sim,
        "OPENROUTER_API_KEY": UPSTREAM_KEY,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_STORE": store,
        "GATEWAY_CONFIG": "/dev/null",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_LIMITS__GLOBAL__RPM": str(10**9),
        "GATEWAY_LIMITS__GLOBAL__TPM": str(10**12),
    }


def make_key(port: int) -> str:
    """The bench key of the gateway on `port`: RPM, TPM and a day's budget on it and its team."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    base = f"http://127.0.0.1:{port}/admin"
    limits = {"rpm": 10**9, "tpm": 10**12, "budget_usd": 10**6, "budget_period": "day"}
    httpx.post(base + "/teams", json={"name": "bench", **limits}, headers=admin).raise_for_status()
    created = httpx.post(base + "/keys", json={"name": "bench", "team": "bench", **limits}, headers=admin)
    created.raise_for_status()
    key: str = created.json()["key"]
    return key


class Stack:
    """Redis, the simulator, the bare pass-through and the gateway, as real processes."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, preexec_fn=raise_fd_limit
        )
        self.processes.append(process)
        return process

    def start(self) -> Stack:
        redis_port, self.sim_port, self.bare_port, self.gw_port = (free_port() for _ in range(4))
        self.redis_port = redis_port
        redis = shutil.which("redis-server")
        if redis is None:
            raise SystemExit("redis-server is needed (Debian package redis-server)")
        self.redis_process = self.spawn(
            "redis",
            pinned(
                [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                os.environ.get("BENCH_REDIS_CPU", "1"),
            ),
        )
        self.spawn(
            "simulator",
            pinned(
                [
                    GATEWAY,
                    "simulate",
                    "--port",
                    str(self.sim_port),
                    "--no-log",
                    "--keepalives",
                    "0",
                    "--api-key",
                    UPSTREAM_KEY,
                ],
                "1",
            ),
        )
        self.sim = f"http://127.0.0.1:{self.sim_port}/api/v1"
        wait_http(self.sim + "/models")
        self.bare_process = self.spawn(
            "bare",
            pinned(
                [
                    sys.executable,
                    str(ROOT / "bench/bare.py"),
                    "--port",
                    str(self.bare_port),
                    "--upstream",
                    self.sim,
                    "--key",
                    UPSTREAM_KEY,
                ],
                "0",
            ),
        )
        store = os.environ.get("BENCH_GATEWAY_STORE", f"redis://127.0.0.1:{redis_port}/0")
        env = gateway_env(self.sim, store, self.gw_port)
        self.gateway_process = self.spawn("gateway", pinned([GATEWAY, "serve"], "0"), env)
        wait_http(f"http://127.0.0.1:{self.bare_port}/docs")
        wait_http(f"http://127.0.0.1:{self.gw_port}/readyz")
        self.key = make_key(self.gw_port)
        return self

    def targets(self, path: str = CHAT) -> dict[str, tuple[str, dict[str, str]]]:
        """Each target's URL and headers for one API (`/chat/completions`, `/responses`, `/messages`)."""
        return {
            "direct": (self.sim + path, {"Authorization": f"Bearer {UPSTREAM_KEY}"}),
            "bare": (f"http://127.0.0.1:{self.bare_port}/v1{path}", {}),
            "gateway": (f"http://127.0.0.1:{self.gw_port}/v1{path}", {"Authorization": f"Bearer {self.key}"}),
        }

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def measure(stack: Stack, quick: bool) -> dict[str, Any]:
    """Every point for every target. Throughput points are measured in short interleaved rounds
    (direct, bare, gateway, then gateway, bare, direct, ...) and reported as medians, so a noisy
    neighbour on the machine hits all three alike; ratios are medians of per-round ratios."""
    seconds, rounds = (1.0, 1) if quick else (3.0, 7)
    pid = stack.gateway_process.pid
    targets = stack.targets()
    results: dict[str, Any] = {"targets": {name: {} for name in targets}, "rounds": rounds}
    results["rss_mb"] = {"gateway_idle": rss_mb(pid), "bare_idle": rss_mb(stack.bare_process.pid)}
    for url, headers in targets.values():
        run_load(url, PLAIN, headers, 64, 2.0 if quick else 5.0, cpu="1")  # warm-up: connection pools, caches
    for point, path, body, concurrency in POINTS:
        targets = stack.targets(path)
        if path != CHAT:  # the agents' APIs' first calls, off the record (chat's warm-up is above)
            for url, headers in targets.values():
                run_load(url, body, headers, concurrency, 1.0, cpu="1")
            time.sleep(RECONCILED_S)
        if body.get("stream"):
            results.setdefault("events_per_stream", {})[point] = {
                name: asyncio.run(events_per_stream(url, body, headers)) for name, (url, headers) in targets.items()
            }
        settle = RECONCILED_S if path != CHAT else 0.0
        _measure_point(stack, results, point, targets, body, concurrency, seconds, rounds, settle)
    # First bytes in interleaved rounds too: one long run per target let drift between the
    # targets' runs (±0.5 ms here) decide the overhead.
    for key, path, body in FIRST_BYTES:
        _measure_first_byte(stack.targets(path), results, key, body, 50 if quick else 100, rounds)

    url, headers = stack.targets()["gateway"]
    streams = 100 if quick else 1000
    (during, opened) = asyncio.run(hold_streams(url, SLOW, headers, streams, lambda: rss_mb(pid)))
    results["rss_mb"]["gateway_slow_streams"] = during
    results["slow_streams"] = {"count": streams, "completed": opened}

    soak_target = 3_000 if quick else 100_000
    before = rss_mb(pid)
    soaked = 0
    while soaked < soak_target:  # wrk runs for a duration: repeat until the count is reached
        rps = results["targets"]["gateway"]["c64"]["rps"] or 1
        soaked += run_load(url, PLAIN, headers, 64, max(1.0, (soak_target - soaked) / rps), cpu="1").requests
    after = rss_mb(pid)
    results["soak"] = {
        "requests": soaked,
        "rss_before_mb": before,
        "rss_after_mb": after,
        "growth_pct": (after - before) / before * 100,
    }
    results["rss_mb"]["gateway_peak"] = rss_mb(pid, "VmHWM")
    return results


def _measure_point(
    stack: Stack,
    results: dict[str, Any],
    point: str,
    targets: dict[str, tuple[str, dict[str, str]]],
    body: dict[str, Any],
    concurrency: int,
    seconds: float,
    rounds: int,
    settle: float,
) -> None:
    # CPU time per request of each proxy process: steadier than req/s on a noisy machine.
    pids = {"bare": stack.bare_process.pid, "gateway": stack.gateway_process.pid}
    redis_pid = stack.redis_process.pid  # the gateway's Redis work, done on the load core
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    used = dict.fromkeys([*pids, "redis"], 0.0)
    for round_ in range(rounds):
        order = list(targets) if round_ % 2 == 0 else list(reversed(targets))  # drift hits all alike
        for name in order:
            url, headers = targets[name]
            before = cpu_seconds(pids[name]) if name in pids else 0.0
            redis_before = cpu_seconds(redis_pid)
            samples[name].append(run_load(url, body, headers, concurrency, seconds, cpu="1").as_dict())
            if name == "gateway":
                time.sleep(settle)  # work the gateway does after its answers, counted as theirs
            if name in pids:
                used[name] += cpu_seconds(pids[name]) - before
            if name == "gateway":
                used["redis"] += cpu_seconds(redis_pid) - redis_before
    served = {name: max(1, sum(r["requests"] for r in samples[name])) for name in pids}
    served["redis"] = served["gateway"]  # Redis works for the gateway's requests
    results.setdefault("cpu_us_per_request", {})[point] = {name: used[name] / served[name] * 1e6 for name in used}
    for name, runs in samples.items():
        results["targets"][name][point] = _median_run(runs)
    results.setdefault("ratios", {})[point] = {
        "gateway_over_bare": statistics.median(
            g["rps"] / b["rps"] for g, b in zip(samples["gateway"], samples["bare"], strict=True)
        ),
        "gateway_over_direct": statistics.median(
            g["rps"] / d["rps"] for g, d in zip(samples["gateway"], samples["direct"], strict=True)
        ),
    }
    print(f"{point}: " + json.dumps({n: results["targets"][n][point]["rps"] for n in targets}), flush=True)


def _measure_first_byte(
    targets: dict[str, tuple[str, dict[str, str]]],
    results: dict[str, Any],
    key: str,
    body: dict[str, Any],
    count: int,
    rounds: int,
) -> None:
    probes: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for round_ in range(rounds):
        for name in list(targets) if round_ % 2 == 0 else list(reversed(targets)):
            url, headers = targets[name]
            probes[name].append(asyncio.run(first_byte_ms(url, body, headers, count)))
    for name, runs in probes.items():
        pooled = sorted(t for run in runs for t in run.pop("times_ms"))
        results["targets"][name][key] = {
            "p50_ms": statistics.median(run["p50_ms"] for run in runs),  # the median round
            "p99_ms": percentile(pooled, 99),
            "p50_all": [round(run["p50_ms"], 3) for run in runs],
            "samples": len(pooled),
        }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    middle = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
    return {**middle, "rps_all": [round(r["rps"]) for r in runs]}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    t = results["targets"]
    g, b, d = t["gateway"], t["bare"], t["direct"]
    ratios = results["ratios"]
    return {
        "c64_rps_gateway_over_bare": ratios["c64"]["gateway_over_bare"],
        "c64_rps_gateway_over_direct": ratios["c64"]["gateway_over_direct"],
        "c64_stream_rps_gateway_over_bare": ratios["c64_stream"]["gateway_over_bare"],
        "c64_stream_rps_gateway_over_direct": ratios["c64_stream"]["gateway_over_direct"],
        "c1_p50_overhead_ms_vs_direct": g["c1"]["p50_ms"] - d["c1"]["p50_ms"],
        "c1_p50_overhead_ms_vs_bare": g["c1"]["p50_ms"] - b["c1"]["p50_ms"],
        "first_byte_overhead_ms_vs_direct": g["first_byte"]["p50_ms"] - d["first_byte"]["p50_ms"],
        "c64_cpu_per_request_gateway_over_bare": _cpu_ratio(results, "c64"),
        "c64_stream_cpu_per_request_gateway_over_bare": _cpu_ratio(results, "c64_stream"),
        **{
            key: value
            for _, point, first_byte in AGENT_STREAMS
            for key, value in (
                (f"{point}_rps_gateway_over_bare", ratios[point]["gateway_over_bare"]),
                (f"{point}_rps_gateway_over_direct", ratios[point]["gateway_over_direct"]),
                (f"{point}_cpu_per_stream_gateway_over_bare", _cpu_ratio(results, point)),
                (f"{first_byte}_overhead_ms_vs_direct", g[first_byte]["p50_ms"] - d[first_byte]["p50_ms"]),
            )
        },
    }


def _cpu_ratio(results: dict[str, Any], point: str) -> float:
    cpu = results["cpu_us_per_request"][point]
    return float(cpu["gateway"] / cpu["bare"]) if cpu["bare"] else float("nan")


def markdown(results: dict[str, Any]) -> str:
    t, s, rss = results["targets"], results["summary"], results["rss_mb"]
    rows = [
        ("req/s, c=64", "c64", "rps", "{:.0f}"),
        ("p99 ms, c=64", "c64", "p99_ms", "{:.2f}"),
        ("stream req/s, c=64 (20 chunks)", "c64_stream", "rps", "{:.0f}"),
        ("stream p99 ms, c=64", "c64_stream", "p99_ms", "{:.2f}"),
        ("p50 ms, c=1", "c1", "p50_ms", "{:.3f}"),
        ("p99 ms, c=1", "c1", "p99_ms", "{:.3f}"),
        ("stream first byte p50 ms, c=1", "first_byte", "p50_ms", "{:.3f}"),
    ]
    events = results["events_per_stream"]
    for api, point, first_byte in AGENT_STREAMS:
        rows += [
            (f"{api} streams/s, c=64 (20 words, {events[point]['gateway']} events)", point, "rps", "{:.0f}"),
            (f"{api} stream p99 ms, c=64", point, "p99_ms", "{:.2f}"),
            (f"{api} stream first byte p50 ms, c=1", first_byte, "p50_ms", "{:.3f}"),
        ]
    lines = [
        f"Run {results['when']} on {results['machine']} (load: {results['load_tool']}; "
        f"{'quick smoke' if results['quick'] else 'full run'}; throughput, c=1 and first byte: median of "
        f"{results['rounds']} interleaved rounds, ratios are medians of per-round ratios).",
        "",
        "| point | direct | bare | gateway | gateway / bare | gateway / direct |",
        "|---|---|---|---|---|---|",
    ]
    for label, point, field, fmt in rows:
        d, b, g = (t[n][point][field] for n in ("direct", "bare", "gateway"))
        lines.append(f"| {label} | {fmt.format(d)} | {fmt.format(b)} | {fmt.format(g)} | {g / b:.2f}x | {g / d:.2f}x |")
    cpu = results["cpu_us_per_request"]
    for label, point in (
        ("c=64", "c64"),
        ("stream c=64", "c64_stream"),
        *((f"{api} stream c=64", point) for api, point, _ in AGENT_STREAMS),
    ):
        b, g = cpu[point]["bare"], cpu[point]["gateway"]
        lines.append(f"| CPU µs per request, {label} | | {b:.0f} | {g:.0f} | {g / b:.2f}x | |")
        if point in events:  # streams of each API carry their own number of events
            nb, ng = events[point]["bare"], events[point]["gateway"]
            lines.append(
                f"| … per event ({nb} / {ng} a stream) | | {b / nb:.1f} | {g / ng:.1f} | {g / ng / (b / nb):.2f}x | |"
            )
        lines.append(f"| Redis CPU µs per gateway request, {label} (load core) | | | {cpu[point]['redis']:.0f} | | |")
    lines += [
        "",
        "| gateway | value | target |",
        "|---|---|---|",
        f"| c=64 req/s vs bare | {s['c64_rps_gateway_over_bare']:.2f}x | ≥ 0.8x (aim ≥ 1.0x) |",
        f"| c=64 stream req/s vs bare | {s['c64_stream_rps_gateway_over_bare']:.2f}x | ≥ 0.8x |",
        f"| p50 overhead at c=1 vs direct | {s['c1_p50_overhead_ms_vs_direct']:.3f} ms | ≤ 0.8 ms |",
        f"| stream first-byte overhead vs direct | {s['first_byte_overhead_ms_vs_direct']:.3f} ms | ≤ 1.0 ms |",
        f"| RSS idle | {rss['gateway_idle']:.1f} MB | ≤ 80 MB |",
        f"| RSS with {results['slow_streams']['count']} concurrent slow streams | "
        f"{rss['gateway_slow_streams']:.1f} MB | ≤ 150 MB (1,000 streams) |",
        f"| RSS peak | {rss['gateway_peak']:.1f} MB | |",
        f"| RSS growth over {results['soak']['requests']} requests after warm-up | "
        f"{results['soak']['growth_pct']:.1f}% | < 10% (100k requests) |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per point (CI smoke)")
    parser.add_argument("--out", default=str(ROOT / "bench/results"), help="where latest.json and latest.md go")
    args = parser.parse_args(argv)
    raise_fd_limit()
    on_load_core()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as logs, ExitStack() as stack_scope:
        stack = Stack(Path(logs))
        stack_scope.callback(stack.stop)
        stack.start()
        results = measure(stack, args.quick)
    results.update(
        when=datetime.now(UTC).isoformat(timespec="seconds"),
        quick=args.quick,
        machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        load_tool="wrk" if WRK else "aiohttp loop",
    )
    results["summary"] = summarise(results)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "latest.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
