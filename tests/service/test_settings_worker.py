"""Settings (env, config files, validation) and the worker (queue bound, cancellation, priorities)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from pydantic import ValidationError

from service.settings import load_settings, parse_api_keys
from service.worker import KEEPALIVE, EngineWorker, JobCancelled, QueueFull, SerialExecutor, open_stream


def test_defaults(monkeypatch, tmp_path):
    for key in ("MEMENTO_MODEL", "MEMENTO_MEMORY", "MEMENTO_DATA_DIR", "MEMENTO_STORE_URL", "MEMENTO_API_KEYS"):
        monkeypatch.delenv(key, raising=False)
    s = load_settings()
    assert s.model == "smollm2-135m-instruct" and s.device == "auto" and s.dtype == "auto"
    assert s.memory == {"strategy": "summary_buffer", "max_tokens": 1024}  # completed by memory.config
    assert s.persona == "assistant" and s.embeddings == "use-multilingual-v3"
    assert s.store_url == "sqlite:///data/memento.db"
    assert s.host == "127.0.0.1" and not s.auth_enabled


def test_env_and_memory_json(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMENTO_MEMORY", '{"strategy":"window","turns":8}')
    monkeypatch.setenv("MEMENTO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MEMENTO_API_KEYS", "k1:alice, k2:bob")
    s = load_settings()
    assert s.memory == {"strategy": "window", "turns": 8}
    assert s.store_url == f"sqlite:///{tmp_path}/memento.db"
    assert s.key_owners == {"k1": "alice", "k2": "bob"}
    assert "k1" not in repr(s)
    monkeypatch.setenv("MEMENTO_MEMORY", "vector")
    assert load_settings().memory == {"strategy": "vector", "k": 4, "turns": 4, "scope": "session"}
    monkeypatch.setenv("MEMENTO_MEMORY", '{"strategy":"window","turns":9999}')  # the bound is memory.config's
    with pytest.raises(ValidationError, match="MEMENTO_MEMORY.turns: Input should be less than or equal to 256"):
        load_settings()


@pytest.mark.parametrize("value", ["forgetful", '{"strategy": 1}', "{oops"])
def test_bad_memory_names_the_key(monkeypatch, value):
    monkeypatch.setenv("MEMENTO_MEMORY", value)
    with pytest.raises(ValidationError, match="MEMENTO_MEMORY"):
        load_settings()


def test_bad_api_keys_do_not_echo_keys():
    with pytest.raises(ValueError, match="entry #2") as e:
        parse_api_keys("secret1:alice,secret2")
    assert "secret" not in str(e.value)


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_config_file_below_env(monkeypatch, tmp_path, suffix):
    data = {"MEMENTO_MODEL": "gemma-3-270m", "port": 9001, "queue_size": 3}
    path = tmp_path / f"memento{suffix}"
    if suffix == ".toml":
        path.write_text('MEMENTO_MODEL = "gemma-3-270m"\nport = 9001\nqueue_size = 3\n')
    else:
        path.write_text(json.dumps(data))  # JSON is valid YAML too
    monkeypatch.setenv("MEMENTO_QUEUE_SIZE", "5")
    s = load_settings(path)
    assert s.model == "gemma-3-270m" and s.port == 9001
    assert s.queue_size == 5  # env beats the file
    assert load_settings(path, port=7000).port == 7000  # CLI flags beat both


def test_config_file_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("colour: blue\n")
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        load_settings(bad)
    with pytest.raises(ValueError, match="no such file"):
        load_settings(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- worker


@pytest.fixture
def worker():
    w = EngineWorker(queue_size=2)
    w.start()
    yield w
    w.stop()


def test_queue_bound(worker):
    release = threading.Event()
    running = worker.submit(lambda job: release.wait(10))
    time.sleep(0.05)
    a = worker.submit(lambda job: "a")
    b = worker.submit(lambda job: "b")
    with pytest.raises(QueueFull) as e:
        worker.submit(lambda job: "c")
    assert e.value.retry_after >= 1 and worker.depth == 2
    release.set()
    assert running.future.result(5) is True and a.future.result(5) == "a" and b.future.result(5) == "b"


def test_a_full_queue_still_admits_an_owner_with_nothing_waiting(worker):
    release = threading.Event()
    worker.submit(lambda job: release.wait(10), owner="bob")
    time.sleep(0.05)
    flood = [worker.submit(lambda job: "bob", owner="bob") for _ in range(2)]  # bob fills the queue
    with pytest.raises(QueueFull) as e:
        worker.submit(lambda job: "bob", owner="bob")
    assert e.value.limit == "queue_size"
    alice = worker.submit(lambda job: "alice", owner="alice")  # her first request is not refused
    with pytest.raises(QueueFull):
        worker.submit(lambda job: "alice", owner="alice")  # her second waits behind the full queue
    release.set()
    assert alice.future.result(5) == "alice" and [j.future.result(5) for j in flood] == ["bob", "bob"]


def test_cancelled_before_start_is_skipped(worker):
    release = threading.Event()
    worker.submit(lambda job: release.wait(10))
    ran = []
    job = worker.submit(lambda job: ran.append(1))
    job.cancel()
    release.set()
    with pytest.raises(JobCancelled):
        job.future.result(5)
    assert ran == []


def test_deadline_stops_a_running_job(worker):
    def spin(job):
        while not job.should_stop():
            time.sleep(0.01)
        return "stopped"

    assert worker.submit(spin, timeout=0.2).future.result(5) == "stopped"


def test_requests_go_before_background_work(worker):
    order = []
    release = threading.Event()
    worker.submit(lambda job: release.wait(10))
    time.sleep(0.05)
    bg = worker.submit(lambda job: order.append("background"), background=True)
    fg = worker.submit(lambda job: order.append("request"))
    release.set()
    bg.future.result(5), fg.future.result(5)
    assert order == ["request", "background"]


def test_stream_relays_and_cancels_on_close(worker):
    stopped = threading.Event()

    def produce(job):
        for i in range(1000):
            if job.should_stop():
                stopped.set()
                return "cancelled"
            job.emit(i)
            time.sleep(0.005)
        return "done"

    async def consume():
        items = open_stream(worker, produce, keepalive=5)
        got = []
        async for item in items:
            got.append(item)
            if len(got) == 3:
                break
        await items.aclose()
        return got

    assert asyncio.run(consume()) == [0, 1, 2]
    assert stopped.wait(5)


def test_stream_keepalive_while_waiting(worker):
    release = threading.Event()
    worker.submit(lambda job: release.wait(10))

    async def consume():
        items = open_stream(worker, lambda job: "result", keepalive=0.05)
        first = await items.__anext__()
        release.set()
        rest = [x async for x in items]
        return first, rest

    first, rest = asyncio.run(consume())
    assert first is KEEPALIVE and rest[-1] == "result"


def test_serial_executor_coalesces_by_key():
    ex = SerialExecutor()
    ran = []
    gate = threading.Event()
    ex.submit("block", lambda: gate.wait(5))
    ex.start()
    time.sleep(0.05)
    ex.submit("s1", lambda: ran.append(1))
    ex.submit("s1", lambda: ran.append(2))  # same key still waiting: dropped
    ex.submit("s2", lambda: ran.append(3))
    gate.set()
    assert ex.wait_idle(5)
    ex.stop()
    assert ran == [1, 3]
