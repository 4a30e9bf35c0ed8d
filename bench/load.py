"""Load generation for the benchmark: wrk when it is installed, else a bundled aiohttp loop
(slower, so its absolute figures are lower; the ratios of one run stay comparable). Also the
measurements wrk cannot make: stream first-byte time, and many slow streams held open."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

WRK = shutil.which("wrk")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def run_load(
    url: str, body: dict[str, Any], headers: dict[str, str], concurrency: int, seconds: float, cpu: str | None = None
) -> LoadResult:
    if WRK:
        return _wrk(url, body, headers, concurrency, seconds, cpu)
    return asyncio.run(_aiohttp_load(url, body, headers, concurrency, seconds))


def _wrk(
    url: str, body: dict[str, Any], headers: dict[str, str], concurrency: int, seconds: float, cpu: str | None
) -> LoadResult:
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}"]
    lines += [
        f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}"
        for k, v in {"Content-Type": "application/json", **headers}.items()
    ]
    lines.append("""
done = function(summary, latency, requests)
  io.write(string.format("ERRORS %d %d %d %d %d\\n", summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout))
end""")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines))
    command = [
        WRK,
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "30s",
        "-s",
        script.name,
        url,
    ]
    if cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", cpu, *command]
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120).stdout
    return LoadResult(
        requests=int(re.search(r"(\d+) requests in", output).group(1)),  # type: ignore[union-attr]
        seconds=round(seconds),
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        p50_ms=_duration(re.search(r"50%\s+([\d.]+\w+)", output).group(1)) * 1000,  # type: ignore[union-attr]
        p99_ms=_duration(re.search(r"99%\s+([\d.]+\w+)", output).group(1)) * 1000,  # type: ignore[union-attr]
        errors=sum(int(n) for n in re.search(r"ERRORS ([\d ]+)", output).group(1).split()),  # type: ignore[union-attr]
        tool="wrk",
    )


def _duration(text: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


async def _aiohttp_load(
    url: str, body: dict[str, Any], headers: dict[str, str], concurrency: int, seconds: float
) -> LoadResult:
    payload = json.dumps(body).encode()
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json", **headers}) as s:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with s.post(url, data=payload) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult(
        len(latencies),
        round(elapsed, 2),
        len(latencies) / elapsed,
        percentile(latencies, 50) * 1000,
        percentile(latencies, 99) * 1000,
        errors,
        "aiohttp",
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * q / 100))]


async def first_byte_ms(url: str, body: dict[str, Any], headers: dict[str, str], count: int) -> dict[str, Any]:
    """Time from sending a streaming request to its first `data:` byte, one request at a time
    (`times_ms`: every sample, so rounds can be pooled)."""
    payload = json.dumps(body).encode()
    times: list[float] = []
    async with aiohttp.ClientSession(headers={"Content-Type": "application/json", **headers}) as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(url, data=payload) as response:
                while True:
                    chunk = await response.content.readany()
                    if not chunk or b"data:" in chunk:
                        break
                times.append(time.perf_counter() - started)
                await response.read()
    times.sort()
    return {
        "p50_ms": statistics.median(times) * 1000,
        "p99_ms": percentile(times, 99) * 1000,
        "times_ms": [t * 1000 for t in times],
    }


async def hold_streams(url: str, body: dict[str, Any], headers: dict[str, str], count: int, while_open: Any) -> Any:
    """Open `count` streams, wait for each one's first byte, call `while_open()`, then finish them."""
    payload = json.dumps(body).encode()
    connector = aiohttp.TCPConnector(limit=count + 10)
    opened = 0
    all_open = asyncio.Event()
    release = asyncio.Event()
    async with aiohttp.ClientSession(
        connector=connector,
        headers={"Content-Type": "application/json", **headers},
        timeout=aiohttp.ClientTimeout(total=600),
    ) as session:

        async def one() -> bool:
            nonlocal opened
            async with session.post(url, data=payload) as response:
                first = await response.content.readany()
                opened += 1
                if opened == count:
                    all_open.set()
                await release.wait()
                await response.read()
                return response.status == 200 and bool(first)

        tasks = [asyncio.ensure_future(one()) for _ in range(count)]
        await asyncio.wait_for(all_open.wait(), 120)
        result = while_open()
        release.set()
        ok = await asyncio.gather(*tasks)
    return result, sum(ok)


async def events_per_stream(url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
    """How many SSE events (frames with a `data:` line, chat's `[DONE]` included) one streamed
    answer carries: chat sends one per delta, Responses and Messages several more around them."""
    session = aiohttp.ClientSession(headers={"Content-Type": "application/json", **headers})
    async with session, session.post(url, data=json.dumps(body).encode()) as response:
        text = (await response.read()).decode()
    return sum(1 for frame in text.replace("\r\n", "\n").split("\n\n") if "data:" in frame)
