"""`memento bench --engine-url URL`: what Memento adds to each turn in front of a remote engine.

    result = run_engine_bench("http://127.0.0.1:8080/v1", strategies=["window", "token_buffer"], turns=20)
    print_engine_table(result)

Per strategy, one Memento (this process, uvicorn on a loopback port, SQLite in a temp dir) talks
to the engine and a client holds a session of `turns` turns over HTTP. Each turn's time through
Memento is split in two: the engine's part (from opening its stream to its last byte, timed
inside Memento's backend) and the rest: request parsing, the store, the memory strategy, the
persona, the chat-template count, the register check, storing the reply. "added" is that rest,
the figure the acceptance targets name (p95 <= 25 ms window/token_buffer, <= 60 ms vector).
The same request is then sent to the engine directly, for the "direct" column.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from service.loadgen import percentiles
from service.loopback import LoopbackServer, free_port

TARGET_MS = {"window": 25.0, "token_buffer": 25.0, "vector": 60.0}
LINES = ["My name is Ada and I live in Lisbon.", "I have a cat called Pickles.", "I work as a baker.",
         "My sister is visiting next week.", "I like reading about old ships.", "What should I cook tonight?"]


def run_engine_bench(engine_url: str, *, strategies: list[str], turns: int = 20, max_tokens: int = 16,
                     model: str | None = None, engine_key: str | None = None) -> dict[str, Any]:
    return {"engine_url": engine_url, "turns": turns, "max_tokens": max_tokens,
            "strategies": {s: bench_strategy(engine_url, s, turns, max_tokens, model, engine_key) for s in strategies}}


def bench_strategy(engine_url: str, strategy: str, turns: int, max_tokens: int, model: str | None,
                   engine_key: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="memento-engine-bench-") as tmp, \
            served(engine_url, strategy, Path(tmp), model, engine_key) as (url, rt):
        timings = EngineTimer(rt.backend.http)
        client = httpx.Client(base_url=url, timeout=120)
        sid = client.post("/v1/sessions", json={"memory": {"strategy": strategy}}).json()["id"]
        through, engine, direct = [], [], []
        for i in range(turns):
            timings.reset()
            t0 = time.perf_counter()
            r = client.post(f"/v1/sessions/{sid}/messages",
                            json={"content": LINES[i % len(LINES)], "max_tokens": max_tokens, "temperature": 0})
            through.append(time.perf_counter() - t0)
            r.raise_for_status()
            engine.append(timings.seconds)
            direct.append(timings.replay_last())
            rt.background.wait_idle(30)  # after_turn (indexing) off the clock, as a quiet server would have it
        client.close()
    added = [(t - e) * 1000 for t, e in zip(through, engine, strict=True)]
    return {"added_ms": percentiles(added), "through_ms": percentiles([t * 1000 for t in through]),
            "engine_ms": percentiles([e * 1000 for e in engine]), "direct_ms": percentiles([d * 1000 for d in direct]),
            "target_p95_ms": TARGET_MS.get(strategy)}


class EngineTimer:
    """Wraps the backend's HTTP stream: the engine's time in a turn (every call: the reply, and any
    regeneration the reply check asks for) and the reply's request, to replay it directly."""

    def __init__(self, http: Any):
        self.http = http
        self.original = http.stream
        self.seconds = 0.0
        self.calls = 0
        self.first: tuple[str, dict[str, Any]] | None = None
        http.stream = self.stream

    def reset(self) -> None:
        self.seconds, self.calls, self.first = 0.0, 0, None

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.first = self.first or (path, body)
        self.calls += 1
        t0 = time.perf_counter()
        try:
            yield from self.original(path, body)
        finally:
            self.seconds += time.perf_counter() - t0

    def replay_last(self) -> float:
        """The turn's reply request straight to the engine (same pooled client), fully read."""
        assert self.first is not None
        path, body = self.first
        t0 = time.perf_counter()
        for _ in self.original(path, body):
            pass
        return time.perf_counter() - t0


class served:
    """A Memento on a loopback port with the remote engine; yields (base url, runtime)."""

    def __init__(self, engine_url: str, strategy: str, tmp: Path, model: str | None, engine_key: str | None):
        from service.main import create_app
        from service.settings import load_settings

        settings = load_settings(data_dir=tmp / "data", engine_url=engine_url, engine_key=engine_key,
                                 memory={"strategy": strategy}, model=model, port=free_port())
        self.live = LoopbackServer(create_app(settings), settings.port, start_timeout=120)

    def __enter__(self) -> tuple[str, Any]:
        self.live.__enter__()
        return self.live.url, self.live.app.state.rt

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)


def print_engine_table(result: dict[str, Any]) -> None:
    print(f"engine {result['engine_url']}: {result['turns']} turns per strategy, max_tokens {result['max_tokens']}")
    print(f"{'strategy':<14}{'added p50':>11}{'added p95':>11}{'target':>8}{'engine p50':>12}{'direct p50':>12}")
    for name, r in result["strategies"].items():
        target = r["target_p95_ms"]
        ok = "" if target is None else ("  ok" if r["added_ms"]["p95"] <= target else "  OVER")
        print(f"{name:<14}{r['added_ms']['p50']:>9.1f}ms{r['added_ms']['p95']:>9.1f}ms"
              f"{(f'{target:.0f}ms' if target else '-'):>8}{r['engine_ms']['p50']:>10.1f}ms"
              f"{r['direct_ms']['p50']:>10.1f}ms{ok}")
