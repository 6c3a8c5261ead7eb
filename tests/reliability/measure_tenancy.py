"""The README's tenancy figures, measured on the real `memento serve` (tiny random Llama, CPU, keys on):

    .venv/bin/python -m tests.reliability.measure_tenancy

1. refused, and how fast: a declared 200 MB body (413), `Host: evil.example` (400), a text/plain
   body on a JSON route (415), an unknown key (401), a flood's excess (429 `owner_waiting`);
2. the server's RSS (/proc) while a 200 MB chunked body is refused;
3. fairness: a second user's time to first token while another user floods the server.
Bounded: one server, a few seconds of flood; loopback only.
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.reliability.harness import ServerProcess, write_tiny_model
from tests.reliability.test_body_limits import MB, rss_mb

KEYS = {"alice": "sk-alice-measure", "bob": "sk-bob-measure"}
FLOOD = 24  # Bob's concurrent long requests (8 may run, 4 per user; 16 may wait per user)


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[user]}"}


def timed(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    status = fn()
    return status, (time.perf_counter() - t0) * 1000


def refusals(srv: ServerProcess) -> list[tuple[str, int, float]]:
    def declared() -> int:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 209715200\r\n\r\n")
            return int(s.recv(4096).split()[1])

    chat = f"{srv.url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    c = httpx.Client(timeout=30)  # one client: its set-up (TLS context) is not the server's time
    cases = {
        "declared 200 MB body": declared,
        "Host: evil.example": lambda: c.get(f"{srv.url}/v1/sessions", headers={"Host": "evil.example"}).status_code,
        "text/plain body on a JSON route": lambda: c.post(
            chat, content=b"{}", headers={**auth("alice"), "Content-Type": "text/plain"}).status_code,
        "unknown API key": lambda: c.post(chat, json=body, headers={"Authorization": "Bearer nope"}).status_code,
    }
    out = []
    for name, fn in cases.items():
        runs = [timed(fn) for _ in range(5)]
        out.append((name, runs[0][0], statistics.median(ms for _, ms in runs)))
    c.close()
    return out


def rss_during_200mb(srv: ServerProcess) -> tuple[float, float]:
    assert srv.proc is not None
    base = peak = rss_mb(srv.proc.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(srv.proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        httpx.post(f"{srv.url}/v1/chat/completions", content=(b"a" * MB for _ in range(200)),
                   headers={**auth("alice"), "Content-Type": "application/json"}, timeout=60)
    except httpx.HTTPError:
        pass  # 413 and the connection closed while we were still sending
    done.set()
    sampler.join()
    return base, peak


def ttft_ms(srv: ServerProcess, user: str) -> float:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, headers=auth(user), timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if '"content"' in line:
                return (time.perf_counter() - t0) * 1000
    raise AssertionError("no token")


def flood(srv: ServerProcess, statuses: list[tuple[int, float]], stop: threading.Event) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400, "temperature": 0.8}
    client = httpx.Client(timeout=120)
    while not stop.is_set():
        t0 = time.perf_counter()
        r = client.post(f"{srv.url}/v1/chat/completions", json=body, headers=auth("bob"))
        statuses.append((r.status_code, (time.perf_counter() - t0) * 1000))
        if r.status_code == 429:
            time.sleep(0.2)


def fairness(srv: ServerProcess) -> dict[str, float]:
    quiet = [ttft_ms(srv, "alice") for _ in range(5)]
    statuses: list[tuple[int, float]] = []
    stop = threading.Event()
    bobs = [threading.Thread(target=flood, args=(srv, statuses, stop), daemon=True) for _ in range(FLOOD)]
    for t in bobs:
        t.start()
    time.sleep(2.0)  # the flood fills Bob's running and waiting slots
    busy = [ttft_ms(srv, "alice") for _ in range(5)]
    stop.set()
    for t in bobs:
        t.join(120)
    refused = [ms for code, ms in statuses if code == 429]
    return {
        "quiet_p50": statistics.median(quiet), "flood_p50": statistics.median(busy), "flood_max": max(busy),
        "bob_200": sum(code == 200 for code, _ in statuses), "bob_429": len(refused),
        "bob_429_ms": statistics.median(refused) if refused else float("nan"),
    }


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="memento-tenancy-"))
    model = write_tiny_model(root / "model")
    keys = f"{KEYS['alice']}:alice,{KEYS['bob']}:bob"
    with ServerProcess(root / "srv", model, api_keys=keys, max_tokens="400") as srv:
        for name, status, ms in refusals(srv):
            print(f"{name}: {status} in {ms:.1f} ms (median of 5)")
        base, peak = rss_during_200mb(srv)
        print(f"200 MB chunked body: server RSS {base:.0f} MB -> peak {peak:.0f} MB (+{peak - base:.1f} MB)")
        f = fairness(srv)
        print(f"alice TTFT alone p50 {f['quiet_p50']:.0f} ms; during bob's flood of {FLOOD}: p50 "
              f"{f['flood_p50']:.0f} ms, max {f['flood_max']:.0f} ms; bob: {f['bob_200']} answered, "
              f"{f['bob_429']} refused with 429 (median {f['bob_429_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
