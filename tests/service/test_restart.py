"""Crash safety: `memento serve` (SQLite, temp data dir) is SIGKILLed mid-life and restarted;
the same session continues with its transcript and memory intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import free_port, write_personas

pytestmark = pytest.mark.slow


def start_server(tmp_path: Path, port: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MEMENTO_DATA_DIR": str(tmp_path / "data"),
        "MEMENTO_PERSONA_DIR": str(write_personas(tmp_path / "personas")),
        "MEMENTO_MEMORY": '{"strategy": "window", "turns": 8}',
        "MEMENTO_DEVICE": "cpu",
        "MEMENTO_MAX_TOKENS": "12",
        **(extra_env or {}),
    }
    env.pop("MEMENTO_STORE_URL", None)
    env.pop("MEMENTO_API_KEYS", None)
    memento = Path(sys.executable).parent / "memento"
    proc = subprocess.Popen(
        [str(memento), "serve", "--port", str(port)], env=env,
        stdout=open(tmp_path / f"serve-{port}.log", "ab"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp_path / f"serve-{port}.log").read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("memento serve did not become ready")


def test_sigkill_and_restart_keeps_the_session(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(tmp_path, port)
    try:
        sid = httpx.post(f"{base}/v1/sessions", json={"persona": "pirate"}).json()["id"]
        for text in ("My name is Ada.", "I live in Busan."):
            r = httpx.post(f"{base}/v1/sessions/{sid}/messages", json={"content": text, "temperature": 0}, timeout=120)
            assert r.status_code == 200, r.text
        before = httpx.get(f"{base}/v1/sessions/{sid}/messages").json()["data"]
        ctx_before = httpx.get(f"{base}/v1/sessions/{sid}/context", params={"message": "Who am I?"}).json()
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown hooks: only what was durable survives
        proc.wait()

    proc = start_server(tmp_path, port)
    try:
        after = httpx.get(f"{base}/v1/sessions/{sid}/messages").json()["data"]
        assert after == before and len(after) == 4
        session = httpx.get(f"{base}/v1/sessions/{sid}").json()
        assert session["persona"] == "pirate" and session["memory"]["strategy"] == "window"
        ctx_after = httpx.get(f"{base}/v1/sessions/{sid}/context", params={"message": "Who am I?"}).json()
        assert ctx_after["messages"] == ctx_before["messages"]  # memory rebuilt from the durable transcript
        r = httpx.post(f"{base}/v1/sessions/{sid}/messages", json={"content": "Who am I?", "temperature": 0}, timeout=120)
        assert r.status_code == 200
        assert len(httpx.get(f"{base}/v1/sessions/{sid}/messages").json()["data"]) == 6
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
