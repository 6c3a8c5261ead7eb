"""A bounded async load generator for a Memento server on loopback.

    from service.loadgen import run_load, format_table
    result = run_load("http://127.0.0.1:8000", sessions=16, duration_s=20, concurrency=8)
    print(format_table(result))

`concurrency` clients send streamed turns to `sessions` sessions (one turn per session at a
time, as a real user would) until `duration_s` or `max_requests` is reached; after a 429 a
client waits Retry-After (capped at `backoff_cap_s`), as a polite client would. Reported:
counts by HTTP status, whether every 429 carried Retry-After, client-side time to first token
(request sent -> first text delta) and queue wait (submitted -> picked by the model worker, read
from the server's `memento_queue_wait_seconds` histogram), each as p50/p95/p99 in seconds.

Only loopback servers are accepted: this is a test tool, not a way to flood someone else.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from typing import Any
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_DURATION_S = 600.0
MAX_REQUESTS = 100_000


def _check_target(base_url: str, duration_s: float, concurrency: int, sessions: int) -> None:
    host = urlparse(base_url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"base_url {base_url!r}: run_load only targets loopback (127.0.0.1, localhost, ::1)")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ValueError(f"duration_s must be in (0, {MAX_DURATION_S:g}] (got {duration_s})")
    if concurrency < 1 or sessions < 1:
        raise ValueError("concurrency and sessions must be at least 1")


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 by nearest rank; None when there are no samples."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    s = sorted(values)
    return {f"p{q}": s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))] for q in (50, 95, 99)}


def histogram_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, float | None]:
    """p50/p95/p99 of the observations between two scrapes of a Prometheus histogram
    (cumulative bucket counts by upper bound), interpolated inside buckets like histogram_quantile."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return {"p50": None, "p95": None, "p99": None}
    out: dict[str, float | None] = {}
    for q in (50, 95, 99):
        rank = q / 100 * total
        i = next(i for i, c in enumerate(counts) if c >= rank)
        lo, lo_count = (bounds[i - 1], counts[i - 1]) if i else (0.0, 0.0)
        hi = bounds[i] if math.isfinite(bounds[i]) else lo  # +Inf bucket: report its lower edge
        width = counts[i] - lo_count
        out[f"p{q}"] = lo + (hi - lo) * ((rank - lo_count) / width if width else 1.0)
    return out


def parse_histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram `name` from a /metrics page."""
    buckets: dict[float, float] = {}
    prefix = f"{name}_bucket{{"
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, _, value = line.rpartition(" ")
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = float(value)
    return buckets


async def _scrape(client: Any, name: str) -> dict[float, float]:
    try:
        r = await client.get("/metrics")
        return parse_histogram(r.text, name) if r.status_code == 200 else {}
    except Exception:  # metrics are a bonus: the load numbers stand without them
        return {}


async def _one_turn(client: Any, sid: str, max_tokens: int, stats: dict[str, Any]) -> float:
    """One streamed turn; returns how long to back off (Retry-After, capped) or 0."""
    body = {
        "content": f"load test turn at {time.time():.3f}: tell me something",
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.8,
    }
    sent = time.monotonic()
    async with client.stream("POST", f"/v1/sessions/{sid}/messages", json=body) as r:
        stats["status"][r.status_code] += 1
        if r.status_code != 200:
            await r.aread()
            if r.status_code != 429:
                return 0.0
            stats["retry_after_missing"] += "retry-after" not in r.headers
            return min(float(r.headers.get("retry-after", 1)), stats["backoff_cap_s"])
        first = None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                stats["stream_errors"][event["error"].get("code") or "error"] += 1
            elif "delta" in event and first is None:
                first = time.monotonic()
                stats["ttft"].append(first - sent)
            elif "message" in event:
                stats["completed"] += 1
        return 0.0


async def _client_loop(
    client: Any, free: asyncio.Queue, end: float, budget: list[int], max_tokens: int, stats: dict[str, Any]
) -> None:
    import httpx

    while time.monotonic() < end and budget[0] > 0:
        budget[0] -= 1
        sid = await free.get()  # a session with no turn in flight
        backoff = 0.0
        try:
            backoff = await _one_turn(client, sid, max_tokens, stats)
        except httpx.HTTPError as exc:
            stats["transport_errors"][type(exc).__name__] += 1
        finally:
            free.put_nowait(sid)
        if backoff:  # a polite client honours Retry-After (capped, so the pressure stays on)
            await asyncio.sleep(backoff)


async def run_load_async(
    base_url: str,
    sessions: int,
    duration_s: float,
    concurrency: int,
    *,
    max_requests: int | None = None,
    max_tokens: int = 16,
    api_key: str | None = None,
    timeout_s: float = 60.0,
    backoff_cap_s: float = 1.0,
) -> dict[str, Any]:
    import httpx

    _check_target(base_url, duration_s, concurrency, sessions)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2)
    stats: dict[str, Any] = {
        "status": Counter(),
        "ttft": [],
        "completed": 0,
        "retry_after_missing": 0,
        "stream_errors": Counter(),
        "transport_errors": Counter(),
        "backoff_cap_s": backoff_cap_s,
    }
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout_s, limits=limits
    ) as client:
        free: asyncio.Queue[str] = asyncio.Queue()
        for _ in range(sessions):
            r = await client.post("/v1/sessions", json={"metadata": {"loadgen": True}})
            r.raise_for_status()
            free.put_nowait(r.json()["id"])
        queue_before = await _scrape(client, "memento_queue_wait_seconds")
        started = time.monotonic()
        budget = [min(max_requests or MAX_REQUESTS, MAX_REQUESTS)]
        end = started + duration_s
        await asyncio.gather(
            *(_client_loop(client, free, end, budget, max_tokens, stats) for _ in range(concurrency))
        )
        elapsed = time.monotonic() - started
        queue_after = await _scrape(client, "memento_queue_wait_seconds")
    status = dict(sorted(stats["status"].items()))
    return {
        "sessions": sessions,
        "concurrency": concurrency,
        "duration_s": round(elapsed, 2),
        "requests": sum(status.values()),
        "completed": stats["completed"],
        "status": status,
        "server_errors": sum(n for code, n in status.items() if code >= 500)
        + sum(stats["stream_errors"].values()),
        "stream_errors": dict(stats["stream_errors"]),
        "transport_errors": dict(stats["transport_errors"]),
        "rejected_429": status.get(429, 0),
        "retry_after_missing": stats["retry_after_missing"],
        "turns_per_s": round(stats["completed"] / elapsed, 2) if elapsed else 0.0,
        "ttft_s": percentiles(stats["ttft"]),
        "queue_wait_s": histogram_quantiles(queue_before, queue_after) if queue_after else percentiles([]),
    }


def run_load(
    base_url: str, sessions: int, duration_s: float, concurrency: int, **kwargs: Any
) -> dict[str, Any]:
    """Blocking wrapper of `run_load_async` (see the module docstring)."""
    return asyncio.run(run_load_async(base_url, sessions, duration_s, concurrency, **kwargs))


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of one run (for the README)."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f} ms"

    rows = [
        "| metric | p50 | p95 | p99 |",
        "|---|---|---|---|",
        *(
            f"| {label} | {ms(q['p50'])} | {ms(q['p95'])} | {ms(q['p99'])} |"
            for label, q in (
                ("time to first token", result["ttft_s"]),
                ("queue wait", result["queue_wait_s"]),
            )
        ),
    ]
    summary = (
        f"{result['sessions']} sessions, {result['concurrency']} concurrent clients, "
        f"{result['duration_s']} s: {result['requests']} requests, {result['completed']} completed "
        f"({result['turns_per_s']}/s), statuses {result['status']}, server errors {result['server_errors']}"
    )
    return summary + "\n\n" + "\n".join(rows)
