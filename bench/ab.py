"""Two versions of the gateway, measured against each other in one run: before and after a change.

    python -m bench.ab --before 7d8c532                  # that commit against the working tree
    python -m bench.ab --before main --after HEAD        # any two commits (or two source folders)
    python -m bench.ab --before HEAD --after HEAD        # A/A: what this machine's noise alone moves
    python -m bench.ab --before HEAD --quick             # a few seconds (CI smoke)

Whole runs of `bench.run` differ by more on these shared machines than most changes do (see
docs/benchmarks.md), so a change to the request path is judged here instead: both gateways run at
once, on the same core (0), the same Redis (each its own database) and the same simulator, and
take turns under the same load, one short round each, the order swapped every round, so a noisy
neighbour hits both alike. Each is the full product as `bench.run` measures it (a virtual key with
RPM, TPM and a budget on the key and its team, global limits, metering, the ledger, metrics).

Reported per point: requests a second and the gateway process's CPU per request (from /proc), as
medians over the rounds, and after / before as the median of the per-round ratios. A ref is
checked out with `git archive` into a temporary folder and run on this environment's packages, so
the two versions must share their dependencies (uv.lock); a folder is run as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import ExitStack
from io import BytesIO
from pathlib import Path
from typing import Any

from bench.load import WRK, run_load
from bench.run import (
    ANTHROPIC,
    CHAT,
    MESSAGES_STREAM,
    PLAIN,
    RECONCILED_S,
    RESPONSES,
    RESPONSES_STREAM,
    ROOT,
    STREAM,
    Stack,
    cpu_seconds,
    free_port,
    gateway_env,
    make_key,
    on_load_core,
    pinned,
    raise_fd_limit,
    wait_http,
)

# (name, API path, body, concurrency, seconds the gateway may still work after a round)
POINTS = (
    ("c64", CHAT, PLAIN, 64, 0.0),
    ("c64_stream", CHAT, STREAM, 64, 0.0),
    ("c64_responses_stream", RESPONSES, RESPONSES_STREAM, 64, RECONCILED_S),
    ("c64_messages_stream", ANTHROPIC, MESSAGES_STREAM, 64, RECONCILED_S),
)


def source(ref: str, into: Path) -> Path:
    """A folder holding the gateway's code: `ref` itself when it is one, else that commit's tree."""
    folder = Path(ref)
    if (folder / "app").is_dir():
        return folder.resolve()
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


class Gateway:
    """One version of the gateway as a process on core 0, with its own bench key."""

    def __init__(self, stack: Stack, name: str, code: Path, db: int) -> None:
        self.name, self.port = name, free_port()
        store = f"redis://127.0.0.1:{stack.redis_port}/{db}"
        env = {"PYTHONPATH": str(code), **gateway_env(stack.sim, store, self.port)}
        command = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())", "serve"]
        self.process = stack.spawn(f"gateway-{name}", pinned(command, "0"), env)
        wait_http(f"http://127.0.0.1:{self.port}/readyz")
        self.headers = {"Authorization": f"Bearer {make_key(self.port)}"}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/v1{path}"


def measure(gateways: list[Gateway], seconds: float, rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for gateway in gateways:  # warm-up, off the record: pools, caches, each API's first calls
        for _, path, body, concurrency, _ in POINTS:
            run_load(gateway.url(path), body, gateway.headers, concurrency, 1.0, cpu="1")
    time.sleep(RECONCILED_S)
    for point, path, body, concurrency, settle in POINTS:
        samples: dict[str, list[dict[str, float]]] = {g.name: [] for g in gateways}
        for round_ in range(rounds):
            for gateway in gateways if round_ % 2 == 0 else list(reversed(gateways)):
                before = cpu_seconds(gateway.process.pid)
                load = run_load(gateway.url(path), body, gateway.headers, concurrency, seconds, cpu="1")
                time.sleep(settle)  # work the gateway does after its answers, counted as theirs
                used = cpu_seconds(gateway.process.pid) - before
                if load.errors:
                    raise RuntimeError(f"{gateway.name} {point}: {load.errors} errors")
                samples[gateway.name].append({"rps": load.rps, "cpu_us": used / max(1, load.requests) * 1e6})
        first, second = (samples[g.name] for g in gateways)
        results[point] = {
            **{
                name: {
                    "rps": statistics.median(s["rps"] for s in runs),
                    "cpu_us": statistics.median(s["cpu_us"] for s in runs),
                    "rps_all": [round(s["rps"]) for s in runs],
                    "cpu_us_all": [round(s["cpu_us"]) for s in runs],
                }
                for name, runs in samples.items()
            },
            "rps_after_over_before": statistics.median(a["rps"] / b["rps"] for b, a in zip(first, second, strict=True)),
            "cpu_after_over_before": statistics.median(
                a["cpu_us"] / b["cpu_us"] for b, a in zip(first, second, strict=True)
            ),
        }
        print(f"{point}: " + json.dumps({k: v for k, v in results[point].items() if "over" in k}), flush=True)
    return results


def markdown(results: dict[str, Any], before: str, after: str, rounds: int) -> str:
    lines = [
        f"`{before}` (before) against `{after}` (after), {rounds} alternating rounds per point "
        f"(load: {'wrk' if WRK else 'aiohttp loop'}); medians, ratios are medians of per-round ratios.",
        "",
        "| point | req/s before | req/s after | after / before | CPU µs a request before | after | after / before |",
        "|---|---|---|---|---|---|---|",
    ]
    for point, r in results["points"].items():
        b, a = r["before"], r["after"]
        lines.append(
            f"| {point} | {b['rps']:.0f} | {a['rps']:.0f} | {r['rps_after_over_before']:.3f}x "
            f"| {b['cpu_us']:.0f} | {a['cpu_us']:.0f} | {r['cpu_after_over_before']:.3f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="a commit (or a folder holding app/)")
    parser.add_argument("--after", default=str(ROOT), help="a commit or a folder (default: this working tree)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="each round's length")
    parser.add_argument("--quick", action="store_true", help="two 1-second rounds per point (CI smoke)")
    parser.add_argument("--out", default=str(ROOT / "bench/results"), help="where ab.json and ab.md go")
    args = parser.parse_args(argv)
    rounds, seconds = (2, 1.0) if args.quick else (args.rounds, args.seconds)
    raise_fd_limit()
    on_load_core()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as scope:
        logs = Path(scratch, "logs")
        logs.mkdir()
        stack = Stack(logs)
        scope.callback(stack.stop)
        stack.start()  # Redis, the simulator (and bench.run's own two proxies, idle here)
        gateways = [
            Gateway(stack, "before", source(args.before, Path(scratch, "before")), 1),
            Gateway(stack, "after", source(args.after, Path(scratch, "after")), 2),
        ]
        results = {"before": args.before, "after": args.after, "rounds": rounds, "seconds": seconds}
        results["points"] = measure(gateways, seconds, rounds)
    (out / "ab.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, args.before, args.after, rounds)
    (out / "ab.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
