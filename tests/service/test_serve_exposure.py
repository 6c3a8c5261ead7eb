"""`memento serve` on a non-loopback address: refused without keys in one line that names the fix
(the real command in a subprocess, before any model loads); `--insecure-no-auth` or keys start it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def serve(tmp_path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMENTO_")}
    clean.update({"MEMENTO_DATA_DIR": str(tmp_path), "PYTHONPATH": str(REPO), "COLUMNS": "400", **env})
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "service.cli", "serve", *args], env=clean, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5"])
def test_public_bind_without_keys_is_refused_in_one_line(tmp_path, host):
    out, seconds = serve(tmp_path, "--host", host, "--port", "1")
    assert out.returncode == 2, out
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert host in lines[0] and "MEMENTO_API_KEYS" in lines[0] and "--insecure-no-auth" in lines[0]
    assert seconds < 60  # refused before any model is loaded


def test_env_host_is_checked_too(tmp_path):
    out, _ = serve(tmp_path, "--port", "1", MEMENTO_HOST="0.0.0.0")  # the Docker image's setting
    assert out.returncode == 2 and "MEMENTO_API_KEYS" in out.stdout + out.stderr


@pytest.mark.parametrize("how", ["insecure", "keys"])
def test_insecure_flag_or_keys_let_it_start(monkeypatch, tmp_path, how):
    import uvicorn
    from typer.testing import CliRunner

    from service.cli import app

    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kw: started.update(kw))
    monkeypatch.setenv("MEMENTO_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MEMENTO_API_KEYS", raising=False)
    args = ["serve", "--host", "0.0.0.0"]
    if how == "insecure":
        args.append("--insecure-no-auth")
    else:
        monkeypatch.setenv("MEMENTO_API_KEYS", "k1:alice")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert started["host"] == "0.0.0.0"
