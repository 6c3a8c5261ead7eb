"""Two API processes on one real Redis and one real Chroma server (issue 10, item 8).

Sessions are driven alternately through both `memento serve` processes; a turn streaming on one
makes the same session's turn through the other a 409; that process is SIGKILLed mid-stream and
the sessions continue on the survivor (the dead process's turn lease expires). Checked: nothing
acknowledged is lost, every reply directly follows its own user turn (no interleaving), no
messages were folded into a summary twice (the fold lines both processes logged), and the
store's summary covers what was folded.

    MEMENTO_REPLICA_ROUNDS=10 .venv/bin/python -m pytest tests/reliability/test_replicas.py -q -s
"""

from __future__ import annotations

import json
import re
import time
import uuid

import httpx
import pytest

from memory.redis_store import RedisStore
from tests.reliability.conftest import env_int
from tests.reliability.harness import PrivateRedis, ServerProcess, free_port, write_tiny_model
from tests.reliability.test_crash import Ledger, check_transcript, send
from tests.reliability.test_faults import start_chroma

pytestmark = pytest.mark.slow

ROUNDS = env_int("MEMENTO_REPLICA_ROUNDS", 3)
MEMORIES = [
    {"strategy": "summary_buffer", "max_tokens": 48},  # folds after most turns
    {"strategy": "summary_buffer", "max_tokens": 48},
    {"strategy": "summary"},
    {"strategy": "vector", "k": 2, "turns": 1},  # indexes into the shared Chroma server
]
LEASE_EXPIRY_S = 20.0  # the dead process's 3 s turn lease, with ample slack for a busy CI box
FOLD = re.compile(r"summary (\S+) of (\S+) folded \[(\d+):(\d+)\]")


def turn(srv: ServerProcess, sid: str, ledger: Ledger, pairs: list[tuple[str, str, str]]) -> None:
    text = f"m-{uuid.uuid4().hex[:10]} the tide is high"
    ledger.sent(sid, text)
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        r = send(client, f"/v1/sessions/{sid}/messages", {"content": text, "max_tokens": 16}, stream=False)
    assert r.status_code == 200, r.text
    reply = r.json()["message"]
    ledger.acked(sid, text, reply)
    pairs.append((sid, text, reply["id"]))


def busy_elsewhere_then_kill(victim: ServerProcess, other: ServerProcess, sid: str, ledger: Ledger) -> None:
    """Stream a long reply on `victim`; meanwhile the same session through `other` is 409; SIGKILL.
    A random-weight model may end its reply early (an end token): then the stream really was over
    before the second request, and the attempt is repeated (a reply that was still streaming fails)."""
    for _ in range(3):
        if stream_while_other_is_refused(victim, other, sid, ledger):
            victim.kill()  # mid-stream: the turn never completes, its lease is never released
            return
    raise AssertionError("the victim's replies kept ending early; no mid-stream kill happened")


def stream_while_other_is_refused(victim: ServerProcess, other: ServerProcess, sid: str, ledger: Ledger) -> bool:
    text = f"m-{uuid.uuid4().hex[:10]} tell me a very long story"
    ledger.sent(sid, text)
    body = {"content": text, "max_tokens": 800, "temperature": 1.0, "stream": True}
    with httpx.Client(base_url=victim.url, timeout=60) as client, client.stream(
        "POST", f"/v1/sessions/{sid}/messages", json=body
    ) as r:
        assert r.status_code == 200
        events = (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
        seen = []
        for event in events:
            seen.append(event)
            if sum("delta" in e for e in seen) == 2:
                break
        again = f"m-{uuid.uuid4().hex[:10]} me too"
        second = httpx.post(f"{other.url}/v1/sessions/{sid}/messages", json={"content": again}, timeout=30)
        if second.status_code == 409:
            assert second.json()["error"]["code"] == "session_busy", second.text
            return True
        assert second.status_code == 200, second.text
        seen += list(events)  # the first reply must have been complete already, and short
        final = [e["message"] for e in seen if "message" in e]
        assert final and final[0]["metadata"]["finish_reason"] == "stop", "two turns of one session ran at once"
        ledger.acked(sid, text, final[0])
        ledger.acked(sid, again, second.json()["message"])
        return False


def folds_in(*servers: ServerProcess) -> dict[tuple[str, str], list[tuple[int, int]]]:
    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for srv in servers:
        for key, sid, start, end in FOLD.findall(srv.log()):
            out.setdefault((key, sid), []).append((int(start), int(end)))
    return out


def check_no_interleaving(messages: list[dict], pairs: list[tuple[str, str, str]], sid: str) -> None:
    position = {m["id"]: i for i, m in enumerate(messages)}
    for s, text, reply_id in pairs:
        if s == sid:
            before = messages[position[reply_id] - 1]
            assert before["role"] == "user" and before["content"] == text, f"{sid}: a reply does not follow its turn"


def check_folded_once(servers: tuple[ServerProcess, ...], store: RedisStore) -> int:
    folds = folds_in(*servers)
    for (key, sid), ranges in folds.items():
        ranges.sort()
        for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
            assert start >= end, f"{sid}: messages folded into the {key} summary twice: {ranges}"
        assert store.get_state(sid, key)["count"] >= ranges[-1][1]
    return sum(len(r) for r in folds.values())


def test_two_processes_one_redis_one_chroma_kill_one_mid_stream(tmp_path, private_redis: PrivateRedis):
    # wider and deeper than the usual tiny model, so a long reply streams for seconds, not milliseconds
    model_dir = write_tiny_model(tmp_path / "model", dim=256, layers=8)
    chroma_port = free_port()
    chroma = start_chroma(tmp_path / "chroma", chroma_port)
    env = {"chroma_url": f"http://127.0.0.1:{chroma_port}"}
    a = ServerProcess(tmp_path / "a", model_dir, store_url=private_redis.url, **env)
    b = ServerProcess(tmp_path / "b", model_dir, store_url=private_redis.url, **env)
    ledger, pairs = Ledger(), []
    store = RedisStore(private_redis.url)
    t0 = time.monotonic()
    try:
        a.start()
        b.start()
        servers = (a, b)
        sids = []
        for i, memory in enumerate(MEMORIES):
            r = httpx.post(f"{servers[i % 2].url}/v1/sessions", json={"memory": memory}, timeout=30)
            assert r.status_code == 201, r.text
            sids.append(r.json()["id"])
            ledger.add_session(sids[-1])
        for rnd in range(ROUNDS):  # each session alternates between the processes
            for i, sid in enumerate(sids):
                turn(servers[(i + rnd) % 2], sid, ledger, pairs)

        busy_elsewhere_then_kill(a, b, sids[0], ledger)
        for sid in sids:  # the survivor takes over every session (sids[0] once the dead lease expires)
            deadline = time.monotonic() + LEASE_EXPIRY_S
            while True:
                try:
                    turn(b, sid, ledger, pairs)
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
        time.sleep(1.0)  # let the survivor's last folds land

        for sid in sids:
            messages = httpx.get(f"{b.url}/v1/sessions/{sid}/messages", timeout=30).json()["data"]
            check_transcript(sid, messages, ledger)
            check_no_interleaving(messages, pairs, sid)
        folds = check_folded_once(servers, store)
        assert folds >= len(MEMORIES) - 1, "the summarising sessions never folded"
        print(f"\n{len(pairs)} acknowledged turns over 2 processes, {folds} folds, {time.monotonic() - t0:.1f} s")
    finally:
        a.stop()
        b.stop()
        store.close()
        chroma.terminate()
        chroma.wait(timeout=20)
