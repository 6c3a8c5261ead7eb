"""Batched serving over HTTP: the KV cache is scoped to its owner, one owner's flood does not
starve another, concurrent turns share forwards, and /metrics reports the paged cache."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.service.conftest import LiveServer, free_port, make_settings

KEYS = {"alice": "key-alice-1", "bob": "key-bob-2", "carol": "key-carol-3"}
SECRET = "My locker code is 4417 and my dog is called Biscuit, please remember both of these."
GUESS = "My locker code is 9032 and my cat is called Pickles, please remember both of these."


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[user]}"}


@pytest.fixture
def server(tmp_path, tiny_lm):
    from service.main import create_app

    keys = ",".join(f"{k}:{u}" for u, k in KEYS.items())
    settings = make_settings(tmp_path, api_keys=keys, max_tokens=400, queue_size=32, max_running=4,
                             owner_waiting=8)
    with LiveServer(create_app(settings, lm=tiny_lm), free_port()) as srv:
        yield srv


def turn(srv, user: str, content: str, max_tokens: int = 4) -> dict:
    sid = httpx.post(f"{srv.url}/v1/sessions", json={}, headers=auth(user)).json()["id"]
    r = httpx.post(f"{srv.url}/v1/sessions/{sid}/messages", json={"content": content, "max_tokens": max_tokens},
                   headers=auth(user), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def test_another_users_right_guess_gets_no_more_cache_than_a_wrong_guess(server):
    first = turn(server, "alice", SECRET)
    right = turn(server, "bob", SECRET)  # bob knows (or guesses) alice's exact words
    wrong = turn(server, "carol", GUESS)
    assert right["cached_tokens"] == wrong["cached_tokens"] > 0  # the shared persona prefix only
    again = turn(server, "alice", SECRET)  # alice's own blocks are hers to reuse
    assert again["cached_tokens"] > right["cached_tokens"]
    assert again["cached_tokens"] >= first["prompt_tokens"] - 16  # all but the last partial block


def test_one_owners_flood_neither_starves_nor_blocks_another(server):
    """Bob floods with 12 long requests (2 may run, 8 wait, the rest get 429 naming the limit);
    Alice's one-token request is admitted at once and answers while Bob's are still running."""
    statuses: list[tuple[int, dict]] = []
    bob_done = threading.Event()

    def bob(i: int) -> None:
        body = {"messages": [{"role": "user", "content": f"Tell me a long story number {i}."}], "max_tokens": 300,
                "temperature": 0.8}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=auth("bob"), timeout=120)
        statuses.append((r.status_code, r.json() if r.status_code != 200 else {}))

    threads = [threading.Thread(target=bob, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the flood is queued
    t0 = time.monotonic()
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=auth("alice"), timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    alice_s = time.monotonic() - t0
    still_running = sum(t.is_alive() for t in threads)
    for t in threads:
        t.join(120)
    bob_done.set()
    assert r.status_code == 200 and still_running > 0, (r.status_code, still_running)
    refused = [body for code, body in statuses if code == 429]
    assert refused and all("owner_waiting" in b["error"]["message"] for b in refused)
    assert sum(code == 200 for code, _ in statuses) >= 10
    assert alice_s < 10


def test_concurrent_turns_share_forwards_and_metrics_show_the_cache(server):
    engine = server.app.state.rt.engine
    steps0 = engine.scheduler.steps
    usages: list[dict] = []

    def one(i: int) -> None:
        usages.append(turn(server, ("alice", "bob", "carol")[i % 3], f"Say something nice, number {i}.", 24))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    tokens = sum(u["completion_tokens"] for u in usages)
    assert len(usages) == 4 and engine.scheduler.steps - steps0 < tokens  # rows shared forwards
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("memento:prefix_cache_queries_total", "memento:prefix_cache_hits_total",
                 "memento:kv_cache_usage_perc", "memento:kv_blocks_free", "memento:num_requests_running",
                 "memento:kv_bytes_per_token"):
        assert name in text, name


def test_serving_bench_measures_a_live_server(live_server):
    import asyncio

    from service.serving_bench import _kv_bytes_per_token, _level

    a = live_server.app.state.rt.lm.args
    assert _kv_bytes_per_token(live_server.url) == 2 * a.n_layers * a.n_kv_heads * a.head_dim * 4  # float32
    row = asyncio.run(_level(live_server.url, 3, 8, "tiny"))
    assert row["concurrency"] == 3 and row["completion_tokens"] > 0
    assert row["ttft_p95_s"] is not None and row["ttft_p50_s"] <= row["ttft_p95_s"]


def test_bench_concurrency_option_is_checked():
    from typer.testing import CliRunner

    from service.cli import app

    r = CliRunner().invoke(app, ["bench", "--concurrency", "1,x"])
    assert r.exit_code != 0 and "comma-separated integers" in r.output
    r = CliRunner().invoke(app, ["bench", "--concurrency", "1", "--llama-server", "/nonexistent/llama-server"])
    assert r.exit_code != 0 and "no such file" in r.output


@pytest.mark.slow
def test_sixty_four_idle_sessions_stay_cached_within_the_default_budget(tmp_path, smol_lm):
    """The real SmolLM2 (packed int4 weights, the default), the default 1 GiB KV budget: 64 sessions
    each take a turn and go idle; every one's second turn still finds its first turn's blocks, and
    the pool never grows past its budget."""
    from concurrent.futures import ThreadPoolExecutor

    from service.main import create_app

    settings = make_settings(tmp_path, max_tokens=8, queue_size=64)
    assert settings.kv_budget is None  # the engine's default
    with LiveServer(create_app(settings, lm=smol_lm), free_port()) as srv, httpx.Client(timeout=120) as http:
        ids = [http.post(f"{srv.url}/v1/sessions", json={}).json()["id"] for _ in range(64)]

        def say(i: int, sid: str, n: int) -> dict:
            body = {"content": f"Session {i}, message {n}: my favourite number is {i * 7 + n}.", "max_tokens": 2}
            r = http.post(f"{srv.url}/v1/sessions/{sid}/messages", json=body)
            assert r.status_code == 200, r.text
            return r.json()["usage"]

        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(lambda a: say(*a, 1), enumerate(ids)))
            second = list(pool.map(lambda a: say(*a, 2), enumerate(ids)))
        stats = srv.app.state.rt.engine.stats()
    for a, b in zip(first, second, strict=True):
        assert b["cached_tokens"] >= a["prompt_tokens"] + a["completion_tokens"] - 2 * 16  # but partial blocks
    assert stats["kv_blocks_used"] <= stats["kv_blocks_total"]
    assert stats["kv_pool_bytes"] <= 1 << 30 and stats["kv_cache_bytes"] <= stats["kv_pool_bytes"]


def test_llama_cpp_single_stream_runs_in_the_interpreter_that_has_it(monkeypatch, tmp_path):
    """The peer's single-stream rate comes from whichever interpreter has llama_cpp; none -> None."""
    import importlib.util

    from service import serving_bench
    from tests.model.conftest import SMOLLM2_GGUF

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # not in our venv (as in CI)
    monkeypatch.setenv("MEMENTO_LLAMA_SERVER_PYTHON", str(tmp_path / "missing-python"))
    assert serving_bench.llama_cpp_single_stream(str(SMOLLM2_GGUF), 2, 8) is None
    monkeypatch.delenv("MEMENTO_LLAMA_SERVER_PYTHON")
    python = serving_bench._llama_cpp_python()  # the venv .ci/run builds, when it is there
    if python is None:
        pytest.skip("no interpreter with llama_cpp (.ci/run installs one)")
    rate = serving_bench.llama_cpp_single_stream(str(SMOLLM2_GGUF), 2, 16)
    assert rate is not None and rate > 0
