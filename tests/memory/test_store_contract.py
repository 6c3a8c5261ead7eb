"""The Store contract, run against every implementation (SQLite file and real Redis)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from memory.redis_store import RedisStore
from memory.sqlite_store import SCHEMA_VERSION, SQLiteStore
from memory.store import (
    MessageNotFound,
    SessionExists,
    SessionNotFound,
    StoreError,
    StoreUnavailable,
    open_store,
)

REPO = Path(__file__).resolve().parents[2]
KOREAN = "안녕하세요, 오늘 기분 어때? 🙂🎉 (emoji + 한글)"


def new_session(store, owner="alice", **kw):
    return store.create_session(owner, "assistant", {"strategy": "window", "turns": 8}, **kw)


# -- sessions ------------------------------------------------------------------------------


def test_create_and_get_session_round_trips_every_field(store):
    meta = {"title": KOREAN, "tags": ["a", "비"], "nested": {"n": 1, "f": 0.5, "ok": True, "none": None}}
    s = store.create_session("alice", "tutor", {"strategy": "vector", "k": 3}, metadata=meta)
    got = store.get_session(s.id)
    assert got == s
    assert got.metadata == meta and got.memory == {"strategy": "vector", "k": 3}
    assert store.get_session("sess_missing") is None


def test_given_session_id_is_kept_and_cannot_be_taken_twice(store):
    s = new_session(store, session_id="client-chosen:id/1")
    assert s.id == "client-chosen:id/1"
    assert store.get_session("client-chosen:id/1") == s
    with pytest.raises(SessionExists, match="already exists"):
        new_session(store, owner="bob", session_id="client-chosen:id/1")
    assert store.get_session(s.id).owner == "alice"


def test_other_owner_gets_none_and_does_not_see_it_listed(store):
    a1 = new_session(store, owner="alice")
    a2 = new_session(store, owner="alice")
    b = new_session(store, owner="bob")
    # An owner whose name extends another's must not leak into its index (Redis key escaping).
    new_session(store, owner="alice:sessions")
    assert store.get_session(a1.id, owner="bob") is None
    assert store.get_session(a1.id, owner="alice") == a1
    assert [s.id for s in store.list_sessions("alice")] == [a1.id, a2.id]  # oldest first
    assert [s.id for s in store.list_sessions("bob")] == [b.id]
    assert store.list_sessions("nobody") == []


def test_update_session_changes_only_what_is_given(store):
    s = new_session(store, metadata={"title": "t"})
    u = store.update_session(s.id, persona="pirate")
    assert (u.persona, u.memory, u.metadata) == ("pirate", s.memory, {"title": "t"})
    u = store.update_session(s.id, memory={"strategy": "summary_buffer", "max_tokens": 500})
    u = store.update_session(s.id, metadata={"title": KOREAN})
    assert store.get_session(s.id) == u
    assert (u.persona, u.memory["strategy"], u.metadata["title"]) == ("pirate", "summary_buffer", KOREAN)
    assert u.created_at == s.created_at and u.owner == s.owner
    with pytest.raises(SessionNotFound):
        store.update_session("sess_missing", persona="x")


def test_delete_session_removes_messages_and_state(store):
    s = new_session(store)
    keep = new_session(store)
    store.append_message(s.id, "user", "hello")
    store.append_message(keep.id, "user", "stay")
    store.put_state(s.id, "summary", {"text": "x"})
    assert store.delete_session(s.id) is True
    assert store.get_session(s.id) is None
    assert store.get_state(s.id, "summary") is None
    assert [x.id for x in store.list_sessions("alice")] == [keep.id]
    with pytest.raises(SessionNotFound):
        store.list_messages(s.id)
    assert store.delete_session(s.id) is False
    # The same id starts from an empty transcript: nothing of the old one is left behind.
    again = new_session(store, session_id=s.id)
    assert store.list_messages(again.id) == [] and store.get_state(again.id, "summary") is None
    assert [m.content for m in store.list_messages(keep.id)] == ["stay"]


# -- transcript ----------------------------------------------------------------------------


def test_messages_come_back_in_append_order_with_metadata(store):
    s = new_session(store)
    sent = [
        ("system", "be kind", {}),
        ("user", KOREAN, {"lang": "ko", "emoji": "🙂", "list": [1, "둘", {}], "empty": {}}),
        ("assistant", "반가워! 😄", {"usage": {"prompt_tokens": 12, "completion_tokens": 3}}),
        ("user", "", {}),  # empty content is a valid message
    ]
    acked = [store.append_message(s.id, r, c, m) for r, c, m in sent]
    got = store.list_messages(s.id)
    assert got == acked
    assert [(m.role, m.content, m.metadata) for m in got] == sent
    assert all(m.session_id == s.id for m in got)
    assert len({m.id for m in got}) == len(sent)
    assert [m.created_at for m in got] == sorted(m.created_at for m in got)


def test_append_checks_session_role_and_metadata(store):
    with pytest.raises(SessionNotFound, match="sess_missing"):
        store.append_message("sess_missing", "user", "hi")
    with pytest.raises(SessionNotFound):
        store.list_messages("sess_missing")
    s = new_session(store)
    with pytest.raises(ValueError, match="role 'bot'.*user, assistant, system"):
        store.append_message(s.id, "bot", "hi")
    with pytest.raises(ValueError, match="message metadata is not JSON-serialisable"):
        store.append_message(s.id, "user", "hi", {"when": object()})
    assert store.list_messages(s.id) == []


def test_append_with_same_message_id_stores_it_once(store):
    s = new_session(store)
    first = store.append_message(s.id, "user", "hi", message_id="msg_client_1")
    again = store.append_message(s.id, "user", "hi", message_id="msg_client_1")
    store.append_message(s.id, "assistant", "hello")
    assert again == first
    assert [m.id for m in store.list_messages(s.id)][:1] == ["msg_client_1"]
    assert len(store.list_messages(s.id)) == 2


def test_append_messages_is_one_ordered_write_keeping_given_times(store):
    s = new_session(store)
    store.append_message(s.id, "user", "before")
    items = [
        {"role": "user", "content": KOREAN, "created_at": "2024-01-02T03:04:05.000000+00:00"},
        {"role": "assistant", "content": "응!", "metadata": {"swipes": ["응!", "그래"]}},
    ]
    acked = store.append_messages(s.id, items)
    got = store.list_messages(s.id)
    assert got[1:] == acked
    assert [m.content for m in got] == ["before", KOREAN, "응!"]
    assert got[1].created_at == "2024-01-02T03:04:05.000000+00:00"
    assert got[2].metadata == {"swipes": ["응!", "그래"]}
    with pytest.raises(SessionNotFound):
        store.append_messages("sess_missing", items)
    with pytest.raises(ValueError, match="role 'bot'"):
        store.append_messages(s.id, [{"role": "user", "content": "ok"}, {"role": "bot", "content": "x"}])
    assert len(store.list_messages(s.id)) == 3  # nothing of the refused batch was written


def test_update_message_changes_it_in_place(store):
    s = new_session(store)
    a = store.append_message(s.id, "user", "one")
    b = store.append_message(s.id, "assistant", "two", {"usage": {"prompt_tokens": 1}})
    store.append_message(s.id, "user", "three")
    new = store.update_message(s.id, b.id, content="TWO", metadata={"edits": [{"content": "two"}]})
    assert (new.id, new.role, new.created_at) == (b.id, b.role, b.created_at)
    got = store.list_messages(s.id)
    assert [m.content for m in got] == ["one", "TWO", "three"]
    assert got[1].metadata == {"edits": [{"content": "two"}]}
    assert store.update_message(s.id, a.id, metadata={"x": 1}).content == "one"  # content kept
    with pytest.raises(MessageNotFound):
        store.update_message(s.id, "msg_missing", content="x")
    other = new_session(store)
    with pytest.raises(MessageNotFound):
        store.update_message(other.id, a.id, content="x")  # another session's message


def test_delete_messages_removes_only_those_and_appends_continue(store):
    s = new_session(store)
    ms = [store.append_message(s.id, "user" if i % 2 == 0 else "assistant", f"m{i}") for i in range(6)]
    assert store.delete_messages(s.id, [ms[1].id, ms[4].id, "msg_unknown"]) == 2
    assert [m.content for m in store.list_messages(s.id)] == ["m0", "m2", "m3", "m5"]
    later = store.append_message(s.id, "user", "m6")
    store.update_message(s.id, ms[5].id, content="M5")  # positions stay right after a delete
    assert [m.content for m in store.list_messages(s.id)] == ["m0", "m2", "m3", "M5", "m6"]
    assert store.append_message(s.id, "user", "m6", message_id=later.id) == later  # retry still a no-op
    assert store.delete_messages(s.id, []) == 0
    other = new_session(store)
    assert store.delete_messages(other.id, [ms[0].id]) == 0  # never another session's


def test_strategy_state_round_trips_per_session_and_key(store):
    s, t = new_session(store), new_session(store)
    assert store.get_state(s.id, "summary") is None
    store.put_state(s.id, "summary", {"text": f"요약: {KOREAN}", "upto": 4})
    store.put_state(s.id, "vector", {"indexed_upto": 2})
    store.put_state(s.id, "summary", {"text": "newer", "upto": 6})  # replaces
    assert store.get_state(s.id, "summary") == {"text": "newer", "upto": 6}
    assert store.get_state(s.id, "vector") == {"indexed_upto": 2}
    assert store.get_state(t.id, "summary") is None
    with pytest.raises(SessionNotFound):
        store.put_state("sess_missing", "summary", {"text": ""})


def test_a_second_store_object_sees_committed_data(store, store_spec):
    s = new_session(store)
    m = store.append_message(s.id, "user", KOREAN)
    store.put_state(s.id, "summary", {"text": "x"})
    other = store_spec.open()
    try:
        assert other.get_session(s.id) == s
        assert other.list_messages(s.id) == [m]
        assert other.get_state(s.id, "summary") == {"text": "x"}
    finally:
        other.close()


# -- concurrency ---------------------------------------------------------------------------


def assert_total_order(messages, expected_ids, writers):
    """Every acknowledged id exactly once, and each writer's messages in its own order."""
    ids = [m.id for m in messages]
    assert len(ids) == len(set(ids)), "a message was stored twice"
    assert set(ids) == set(expected_ids), "acknowledged and stored messages differ"
    for tag in writers:
        numbers = [int(m.content.split(":")[1]) for m in messages if m.content.startswith(f"{tag}:")]
        assert numbers == sorted(numbers), f"writer {tag}'s messages are out of order"


def test_concurrent_appends_from_threads_each_stored_once_in_total_order(store):
    s = new_session(store)
    acked: list[str] = []
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            for i in range(25):
                acked.append(store.append_message(s.id, "user", f"{tag}:{i}").id)
        except BaseException as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(f"t{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    first = store.list_messages(s.id)
    assert len(first) == 100
    assert_total_order(first, acked, [f"t{n}" for n in range(4)])
    assert store.list_messages(s.id) == first  # the order is stable, not recomputed


def test_concurrent_appends_from_processes_each_stored_once_in_total_order(store, store_spec):
    s = new_session(store)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "tests.memory.store_writer", store_spec.url, store_spec.prefix, s.id]
    procs = [
        subprocess.Popen(
            [*argv, f"p{n}", "40", "wait"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    for p in procs:  # all connected and waiting: release them together so their appends race
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    acked = []
    for p in procs:
        p.stdin.close()
        assert p.wait(timeout=60) == 0, p.stderr.read()
        acked += p.stdout.read().split()  # the buffered object readline() used, not communicate()
        p.stdout.close()
        p.stderr.close()
    messages = store.list_messages(s.id)
    assert len(acked) == len(messages) == 120
    assert_total_order(messages, acked, ["p0", "p1", "p2"])
    tags = [m.content.split(":")[0] for m in messages]
    switches = sum(tags[i] != tags[i - 1] for i in range(1, len(tags)))
    assert switches > 2, "the writers ran one after another: this run tested no concurrency"


# -- personas, tombstones, leases, compare-and-set (issue 10) -----------------------------


def test_personas_are_kept_per_owner_and_shared_under_the_empty_owner(store):
    store.put_persona("alice", "chef", "---\nname: chef\n---\n" + KOREAN)
    store.put_persona("", "house", "shared")
    store.put_persona("alice:x", "chef", "another owner whose name extends alice's")
    assert store.get_persona("alice", "chef").endswith(KOREAN)
    assert store.get_persona("bob", "chef") is None
    assert store.list_personas("alice") == {"chef": store.get_persona("alice", "chef")}
    assert store.list_personas("") == {"house": "shared"}
    store.put_persona("alice", "chef", "replaced")
    assert store.get_persona("alice", "chef") == "replaced"
    assert store.delete_persona("alice", "chef") is True
    assert store.delete_persona("alice", "chef") is False
    assert store.list_personas("alice") == {} and store.get_persona("alice:x", "chef")


def test_deleting_a_session_leaves_a_tombstone_until_dropped(store):
    s = new_session(store, owner="alice")
    keep = new_session(store, owner="bob")
    assert store.list_tombstones() == []
    assert store.delete_session(s.id) is True
    assert store.delete_session(s.id) is False  # nothing new for an unknown id
    assert store.list_tombstones() == [(s.id, "alice")]
    store.drop_tombstone(s.id)
    assert store.list_tombstones() == [] and store.get_session(keep.id) is not None


def test_a_lease_has_one_holder_and_a_larger_token_after_it_expires(store):
    first = store.acquire_lease("turn:s1", 150)
    assert first is not None and store.acquire_lease("turn:s1", 150) is None
    assert store.acquire_lease("turn:s2", 150) is not None  # names are independent
    assert store.renew_lease("turn:s1", first, 150) is True
    time.sleep(0.3)  # the holder died: no renewal
    second = store.acquire_lease("turn:s1", 10_000)
    assert second is not None and second > first
    assert store.renew_lease("turn:s1", first, 10_000) is False  # the stale holder cannot renew ...
    store.release_lease("turn:s1", first)  # ... nor release the new holder's lease
    assert store.acquire_lease("turn:s1", 10_000) is None
    store.release_lease("turn:s1", second)
    third = store.acquire_lease("turn:s1", 10_000)
    assert third is not None and third > second


def test_lease_is_exclusive_across_processes_contending_at_once(store_spec):
    code = (
        "import sys; from memory.store import open_store; "
        "s = open_store(sys.argv[1], prefix=sys.argv[2]); print(s.acquire_lease('fold:x', 60000) is not None)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, store_spec.url, store_spec.prefix], cwd=REPO,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    won = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(won) == ["False", "False", "False", "True"], won


def test_cas_state_writes_only_over_the_expected_value(store):
    s = new_session(store)
    assert store.cas_state(s.id, "summary", None, {"count": 2, "text": "a"}) is True
    assert store.cas_state(s.id, "summary", None, {"count": 2, "text": "b"}) is False  # someone folded first
    assert store.cas_state(s.id, "summary", {"text": "a", "count": 2}, {"count": 4, "text": "ab"}) is True
    assert store.get_state(s.id, "summary") == {"count": 4, "text": "ab"}
    with pytest.raises(SessionNotFound):
        store.cas_state("sess_missing", "summary", None, {"count": 1})


def test_lease_helper_renews_while_held_and_frees_on_release(store):
    from memory.leases import Lease

    lease = Lease.acquire(store, "turn:held", ttl_ms=300)
    assert lease is not None
    time.sleep(0.8)  # well past one TTL: only renewal keeps it
    assert Lease.acquire(store, "turn:held", ttl_ms=300) is None and not lease.lost
    lease.release()
    lease.release()  # idempotent: routes release on every exit path
    again = Lease.acquire(store, "turn:held", ttl_ms=300)
    assert again is not None
    again.release()


# -- failures ------------------------------------------------------------------------------


def test_dead_redis_fails_fast_with_store_unavailable():
    store = RedisStore("redis://127.0.0.1:1/0")
    for call in (store.ping, lambda: store.append_message("s", "user", "hi"), lambda: store.get_session("s")):
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            call()
        assert time.monotonic() - t0 < 2.0
    store.close()


def test_redis_url_password_is_not_echoed_in_errors():
    store = RedisStore("redis://user:s3cret@127.0.0.1:1/0")
    with pytest.raises(StoreUnavailable) as info:
        store.ping()
    assert "s3cret" not in str(info.value) and "***" in str(info.value)


def test_sqlite_locked_beyond_timeout_is_unavailable_then_recovers(tmp_path):
    path = tmp_path / "locked.db"
    store = SQLiteStore(path, busy_timeout_s=0.2)
    s = new_session(store)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="locked"):
        store.append_message(s.id, "user", "waits")
    assert time.monotonic() - t0 < 2.0
    blocker.execute("ROLLBACK")
    blocker.close()
    store.append_message(s.id, "user", "after")  # no poisoned transaction left behind
    assert [m.content for m in store.list_messages(s.id)] == ["after"]
    store.close()


def test_sqlite_open_waits_while_another_opener_holds_a_new_file(tmp_path):
    """Switching a new file to WAL fails at once, past the busy timeout, while another connection
    holds its write lock (replicas opening one new file together: CI saw an open fail so); the
    open retries within the timeout instead."""
    path = tmp_path / "new.db"
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("CREATE TABLE t (x)")  # a new file, still in rollback-journal mode
    blocker.execute("BEGIN IMMEDIATE")  # another process part-way through its own open
    threading.Timer(0.3, blocker.execute, ["ROLLBACK"]).start()
    t0 = time.monotonic()
    store = SQLiteStore(path, busy_timeout_s=5.0)
    assert 0.25 < time.monotonic() - t0 < 4.0  # it waited for the lock, then opened
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    blocker.close()


def test_sqlite_creates_parent_dirs_and_refuses_newer_schema(tmp_path):
    path = tmp_path / "deep" / "er" / "memento.db"
    store = open_store(f"sqlite:///{path}")
    store.ping()
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsync on every commit
    store.close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError, match="newer than this Memento"):
        SQLiteStore(path)


def test_sqlite_schema_1_file_is_migrated_in_place(tmp_path):
    from memory.sqlite_store import MIGRATIONS

    path = tmp_path / "v1.db"
    raw = sqlite3.connect(path)
    for sql in MIGRATIONS[0]:
        raw.execute(sql)
    raw.execute("INSERT INTO sessions VALUES ('s1', 'alice', 'assistant', '{}', '{}', '2026-01-01T00:00:00+00:00')")
    raw.execute("PRAGMA user_version=1")
    raw.commit()
    raw.close()
    store = SQLiteStore(path)  # a file from before personas, tombstones and leases
    assert store.get_session("s1").owner == "alice"
    store.put_persona("alice", "chef", "x")
    assert store.delete_session("s1") and store.list_tombstones() == [("s1", "alice")]
    assert store.acquire_lease("turn:s1", 1000) == 1
    store.close()


def test_sqlite_unusable_path_and_closed_store_are_unavailable(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="cannot create the directory"):
        SQLiteStore(tmp_path / "file" / "memento.db")
    store = SQLiteStore(tmp_path / "ok.db")
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.ping()


def test_open_store_rejects_unknown_urls():
    with pytest.raises(ValueError, match="MEMENTO_STORE_URL"):
        open_store("postgres://localhost/db")


def test_sqlite_disk_full_is_a_clear_error_and_leaves_no_open_transaction(tmp_path):
    store = SQLiteStore(tmp_path / "full.db")
    s = new_session(store)
    page_count = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {page_count}")  # the file may not grow: "disk full"
    with pytest.raises(StoreError, match="disk full"):
        store.append_message(s.id, "user", "x" * 100_000)
    store._conn.execute("PRAGMA max_page_count = 1073741823")
    store.append_message(s.id, "user", "fits now")
    assert [m.content for m in store.list_messages(s.id)] == ["fits now"]
    assert store.integrity_check() == "ok"
    store.close()


def test_unreachable_test_redis_skips_locally_and_fails_in_ci(monkeypatch):
    from tests.store_fixtures import require_redis

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="unreachable"):
        require_redis("redis://127.0.0.1:1/0")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_redis("redis://127.0.0.1:1/0")


def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(StoreError, match="notes.db.*file is not a database"):
        SQLiteStore(path)


def test_redis_timeouts_can_be_tuned_in_the_url():
    store = open_store("redis://127.0.0.1:6379/15?socket_timeout=7&socket_connect_timeout=3", prefix="x")
    kwargs = store._r.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (7.0, 3.0)
    store.close()
