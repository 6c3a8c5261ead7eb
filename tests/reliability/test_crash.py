"""Crash safety: the server is SIGKILLed at random points while conversations run over HTTP
(mid-prefill, mid-stream, mid-summary, anywhere), restarted on the same store, and checked:
every acknowledged user message and every completed reply is there exactly once, the store is
not corrupt, an interrupted reply is absent or marked interrupted, and the next turn works.

CI runs MEMENTO_CRASH_KILLS (default 20) kills, split between SQLite and Redis; the full run:

    MEMENTO_CRASH_KILLS=50 .venv/bin/python -m pytest tests/reliability/test_crash.py -q
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import env_int
from tests.reliability.harness import PrivateRedis, ServerProcess

pytestmark = pytest.mark.slow

KILLS = env_int("MEMENTO_CRASH_KILLS", 20)
POINTS = ("prefill", "stream", "summary", "anywhere")
LONG_PROMPT_WORDS = 500  # ~600 tokens of prompt: prefill takes a visible moment even on the tiny model
MEMORIES = [
    {"strategy": "window", "turns": 4},
    {"strategy": "summary_buffer", "max_tokens": 64},  # folds a summary after most turns
    {"strategy": "summary"},
]


@dataclass
class Ledger:
    """What clients were told: acknowledged user texts, completed replies, texts sent but unconfirmed."""

    acked_users: dict[str, set[str]] = field(default_factory=dict)  # session -> user texts
    replies: dict[str, dict[str, str]] = field(default_factory=dict)  # session -> {message id: text}
    unconfirmed: dict[str, set[str]] = field(default_factory=dict)
    interrupted: dict[str, int] = field(default_factory=dict)  # session -> replies stored as interrupted
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_session(self, sid: str) -> None:
        self.acked_users[sid], self.replies[sid], self.unconfirmed[sid] = set(), {}, set()

    def sent(self, sid: str, text: str) -> None:
        with self.lock:
            self.unconfirmed[sid].add(text)

    def acked(self, sid: str, text: str, reply: dict) -> None:
        with self.lock:
            self.unconfirmed[sid].discard(text)
            self.acked_users[sid].add(text)
            self.replies[sid][reply["id"]] = reply["content"]


class Triggers:
    """Events the drivers raise so the killer can aim at a phase."""

    def __init__(self) -> None:
        self.prefill = threading.Event()  # a long prompt was just sent
        self.stream = threading.Event()  # a streamed reply is half way
        self.summary = threading.Event()  # a summarising session just got its reply (summary runs now)


def one_turn(
    client: httpx.Client, sid: str, rng: random.Random, ledger: Ledger, trig: Triggers, summ: bool
) -> None:
    long = rng.random() < 0.3
    words = (
        " ".join(rng.choice(("tide", "anchor", "gull", "rope")) for _ in range(LONG_PROMPT_WORDS))
        if long
        else ""
    )
    text = f"m-{uuid.uuid4().hex[:10]} {words}".strip()
    body = {"content": text, "max_tokens": rng.choice((8, 48, 120)), "temperature": 0.8}
    ledger.sent(sid, text)
    url = f"/v1/sessions/{sid}/messages"
    if long:
        trig.prefill.set()
    mode = rng.random()
    if mode < 0.45:
        r = send(client, url, body, stream=False)
        assert r.status_code == 200, r.text
        ledger.acked(sid, text, r.json()["message"])
    else:
        abandon = mode > 0.9  # the client walks away mid-reply: the server stores it marked interrupted
        if abandon:
            body["max_tokens"] = 200
        r = send(client, url, {**body, "stream": True}, stream=True)
        try:
            assert r.status_code == 200
            deltas = 0
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                assert "error" not in event, event
                if "delta" in event:
                    deltas += 1
                    if deltas == 3:
                        trig.stream.set()
                        if abandon:
                            break
                elif "message" in event:
                    ledger.acked(sid, text, event["message"])
        finally:
            r.close()
    if summ:
        trig.summary.set()


def send(client: httpx.Client, url: str, body: dict, stream: bool) -> httpx.Response:
    """POST, waiting out 409: a session still finishing an abandoned reply is busy for a moment, and
    one whose turn died with a killed server until that turn's lease expires (memory/leases.py)."""
    for _ in range(200):
        r = client.send(client.build_request("POST", url, json=body), stream=stream)
        if r.status_code != 409:
            return r
        r.close()
        time.sleep(0.05)
    raise AssertionError(f"{url} stayed busy (409) for 10 s")


def drive(
    base: str, sid: str, seed: int, ledger: Ledger, trig: Triggers, stop: threading.Event, summ: bool
) -> None:
    """Turns on one session until the server dies (or `stop`): the first transport error ends it."""
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=30) as client:
        while not stop.is_set():
            try:
                one_turn(client, sid, rng, ledger, trig, summ)
            except (httpx.HTTPError, OSError):
                return  # the kill: this turn stays unconfirmed


def kill_at(srv: ServerProcess, point: str, trig: Triggers, rng: random.Random) -> None:
    event = {"prefill": trig.prefill, "stream": trig.stream, "summary": trig.summary}.get(point)
    if event is None or not event.wait(timeout=15):
        time.sleep(rng.uniform(0.05, 0.8))
    elif point in ("prefill", "summary"):
        time.sleep(rng.uniform(0.0, 0.04))
    srv.kill()


def check_store(srv: ServerProcess, sqlite_path: Path | None, ledger: Ledger) -> None:
    if sqlite_path is not None:
        with sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        for sid in ledger.acked_users:
            r = client.get(f"/v1/sessions/{sid}/messages")
            assert r.status_code == 200, r.text  # every message parses: nothing half-written
            check_transcript(sid, r.json()["data"], ledger)
            r = client.get(f"/v1/sessions/{sid}/context", params={"message": "and now?"})
            assert r.status_code == 200, r.text  # the memory state (summary, watermark) still loads


def check_transcript(sid: str, messages: list[dict], ledger: Ledger) -> None:
    users = [m["content"] for m in messages if m["role"] == "user"]
    for text in ledger.acked_users[sid]:
        assert users.count(text) == 1, f"{sid}: acknowledged user message {text[:14]!r} x{users.count(text)}"
    for text in ledger.unconfirmed[sid]:
        assert users.count(text) <= 1, f"{sid}: unconfirmed message {text[:14]!r} stored twice"
    by_id = {m["id"]: m for m in messages}
    assert len(by_id) == len(messages), f"{sid}: duplicate message ids"
    for mid, content in ledger.replies[sid].items():
        assert mid in by_id and by_id[mid]["content"] == content, (
            f"{sid}: completed reply {mid} missing or changed"
        )
    for prev, m in zip(messages, messages[1:], strict=False):
        # a reply always answers a stored user turn; an interrupted one is marked, never half-stored silently
        assert not (prev["role"] == m["role"] == "assistant"), f"{sid}: two replies in a row"
    for m in messages:
        if m["role"] == "assistant" and m["metadata"].get("finish_reason") == "cancelled":
            assert m["metadata"].get("interrupted") is True
            assert m["id"] not in ledger.replies[sid]  # never reported to a client as complete
    ledger.interrupted[sid] = sum(1 for m in messages if m["metadata"].get("interrupted"))


def crash_round(srv: ServerProcess, ledger: Ledger, point: str, seed: int) -> None:
    trig, stop = Triggers(), threading.Event()
    sids = list(ledger.acked_users)  # one per MEMORIES entry; index 0 (window) never summarises
    drivers = [(i, sid) for i, sid in enumerate(sids)]
    if (
        point == "summary"
    ):  # one summarising session alone: its summary job starts as soon as the reply is out
        drivers = [drivers[1 + seed % (len(sids) - 1)]]
    threads = [
        threading.Thread(
            target=drive, args=(srv.url, sid, seed * 10 + i, ledger, trig, stop, i != 0), daemon=True
        )
        for i, sid in drivers
    ]
    for t in threads:
        t.start()
    kill_at(srv, point, trig, random.Random(seed))
    stop.set()
    for t in threads:
        t.join(timeout=35)
        assert not t.is_alive(), "a client hung after the server died"


def next_turn_works(srv: ServerProcess, ledger: Ledger) -> None:
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        for sid in ledger.acked_users:
            text = f"after-restart-{uuid.uuid4().hex[:8]}"
            ledger.sent(sid, text)
            # a turn the kill interrupted holds its session's lease until it expires (3 s): send waits that out
            r = send(client, f"/v1/sessions/{sid}/messages", {"content": text, "max_tokens": 4}, stream=False)
            assert r.status_code == 200, r.text
            ledger.acked(sid, text, r.json()["message"])


def crash_loop(srv: ServerProcess, kills: int, sqlite_path: Path | None) -> int:
    ledger = Ledger()
    srv.start()
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        for memory in MEMORIES:
            r = client.post("/v1/sessions", json={"memory": memory})
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            ledger.add_session(sid)
    rng = random.Random(1234)
    survived = 0
    try:
        for n in range(kills):
            crash_round(srv, ledger, POINTS[n % len(POINTS)], rng.randrange(1 << 30))
            srv.start()
            check_store(srv, sqlite_path, ledger)
            next_turn_works(srv, ledger)
            survived += 1
        check_store(srv, sqlite_path, ledger)
    finally:
        srv.stop()
    assert sum(len(v) for v in ledger.replies.values()) >= kills  # the rounds really did traffic
    acked, interrupted = sum(len(v) for v in ledger.acked_users.values()), sum(ledger.interrupted.values())
    print(
        f"\n{survived} kills survived; {acked} acknowledged turns; {interrupted} replies stored as interrupted"
    )
    return survived


def test_sigkill_loop_sqlite(tmp_path, tiny_model_dir):
    db = tmp_path / "data" / "memento.db"
    srv = ServerProcess(tmp_path, tiny_model_dir, store_url=f"sqlite:///{db}")
    assert crash_loop(srv, KILLS - KILLS // 2, db) == KILLS - KILLS // 2


def test_sigkill_loop_redis(tmp_path, tiny_model_dir, private_redis: PrivateRedis):
    srv = ServerProcess(tmp_path, tiny_model_dir, store_url=private_redis.url)
    assert crash_loop(srv, KILLS // 2, None) == KILLS // 2
