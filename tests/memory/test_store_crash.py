"""Crash safety: SIGKILL a writer (and, for Redis, the server) mid-append; acknowledged messages survive.

An id is acknowledged once the writer printed it, which it does only after append_message returned.
After every kill the store must hold each acknowledged message exactly once, in order, plus at
most the one message whose append returned but whose id was not printed yet.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memory.redis_store import RedisStore
from memory.store import StoreUnavailable

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 4


def start_writer(url: str, prefix: str, session_id: str, tag: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.memory.store_writer", url, prefix, session_id, tag, "0"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_at_random_point(proc: subprocess.Popen, rng: random.Random) -> list[str]:
    """Let the writer acknowledge a random number of appends, SIGKILL it, return its acked ids."""
    acked = []
    for _ in range(rng.randint(1, 40)):
        line = proc.stdout.readline()
        assert line.endswith("\n"), f"writer died early: {proc.stderr.read()}"
        acked.append(line.strip())
    time.sleep(rng.random() * 0.005)  # land the kill anywhere inside the next append
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    # Read through the same buffered pipe object: communicate() reads the raw fd and would miss
    # lines readline() already pulled into the buffer.
    rest = proc.stdout.read()
    proc.stdout.close()
    proc.stderr.close()
    # Lines printed before the kill were acknowledged too; a cut-off last line was not.
    acked += [x for x in rest.split("\n")[:-1] if x]
    assert proc.returncode == -signal.SIGKILL
    return acked


def check_transcript(messages, acked_by_round: list[list[str]]) -> None:
    ids = [m.id for m in messages]
    assert len(ids) == len(set(ids)), "a message is stored twice"
    for r, acked in enumerate(acked_by_round):
        stored = [m for m in messages if m.content.startswith(f"r{r}:")]
        assert [m.content for m in stored] == [f"r{r}:{i}" for i in range(len(stored))], "gap or reorder"
        assert [m.id for m in stored[: len(acked)]] == acked, f"round {r}: an acknowledged message is missing"
        assert len(stored) - len(acked) in (0, 1), f"round {r}: more unacknowledged messages than one append"
    rounds = [int(m.content.split(":")[0][1:]) for m in messages]
    assert rounds == sorted(rounds), "rounds interleaved: total order broken"


def test_killed_writer_loses_no_acknowledged_message(store_spec):
    rng = random.Random()
    store = store_spec.open()
    session = store.create_session("alice", "assistant", {"strategy": "buffer"})
    store.close()
    acked_by_round = []
    for r in range(ROUNDS):
        proc = start_writer(store_spec.url, store_spec.prefix, session.id, f"r{r}")
        acked_by_round.append(kill_at_random_point(proc, rng))
        reopened = store_spec.open()  # a fresh process's view, after recovery
        try:
            check_transcript(reopened.list_messages(session.id), acked_by_round)
            if store_spec.kind == "sqlite":
                assert reopened.integrity_check() == "ok"
        finally:
            reopened.close()
    if store_spec.kind == "sqlite":
        raw = sqlite3.connect(store_spec.url[len("sqlite:///") :])
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        raw.close()


# -- Redis server crash ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int, data_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probe = RedisStore(f"redis://127.0.0.1:{port}/0")
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()  # LOADING (replaying the AOF) also counts as not ready yet
            return proc
        except StoreUnavailable:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
        finally:
            probe.close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_redis_server_killed_keeps_acked_appends_and_store_recovers(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port, tmp_path)
    store = RedisStore(url, prefix="crash")
    try:
        session = store.create_session("alice", "assistant", {"strategy": "buffer"})
        writer = start_writer(url, "crash", session.id, "r0")
        acked = []
        for _ in range(random.randint(5, 40)):
            acked.append(writer.stdout.readline().strip())
        server.send_signal(signal.SIGKILL)
        server.wait()
        writer.wait(timeout=10)  # it dies on StoreUnavailable
        acked += [x for x in writer.stdout.read().split("\n")[:-1] if x]
        writer.stdout.close()
        writer.stderr.close()
        assert writer.returncode != 0

        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.ping()
        assert time.monotonic() - t0 < 2.0

        server = start_redis(port, tmp_path)
        # The same store object works again: no restart of the service is needed.
        check_transcript(store.list_messages(session.id), [acked])
        store.append_message(session.id, "user", "r0:after-restart")  # not r0:<n>: outside the check
        assert store.list_messages(session.id)[-1].content == "r0:after-restart"
    finally:
        store.close()
        server.kill()
        server.wait()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_redis_timeout_is_unavailable_and_a_retried_append_lands_once(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port, tmp_path)
    store = RedisStore(url, prefix="pause", socket_timeout=0.3)
    admin = RedisStore(url, prefix="pause")
    try:
        session = store.create_session("alice", "assistant", {"strategy": "buffer"})
        admin._r.execute_command("CLIENT", "PAUSE", "1200", "WRITE")  # server alive but not answering writes
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.append_message(session.id, "user", "during pause", message_id="msg_retry_1")
        assert time.monotonic() - t0 < 1.0  # socket_timeout 0.3 s, one retry
        time.sleep(1.3)
        # The caller saw an error, so it retries with the same id: whatever happened to the first
        # attempt, the message is stored exactly once.
        store.append_message(session.id, "user", "during pause", message_id="msg_retry_1")
        assert [m.id for m in store.list_messages(session.id)] == ["msg_retry_1"]
    finally:
        store.close()
        admin.close()
        server.kill()
        server.wait()
