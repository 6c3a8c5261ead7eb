"""Real engines for the remote-backend tests: llama-cpp-python's OpenAI-compatible server on the
SmolLM2 GGUF, and a second Memento (`memento serve`) used statelessly as an engine.

The llama server lives in its own venv (`.ci/llama-server-env` builds it once, into
~/.cache/memento); MEMENTO_LLAMA_SERVER_PYTHON names its python. Without it these tests skip
locally and FAIL under CI=true, so CI can never pass them vacuously.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import (  # noqa: F401 - fixtures re-used here
    SMOLLM2_GGUF,
    free_port,
    make_settings,
    smol_tokenizer,
    start_app,
    tiny_lm,
    write_personas,
)

REPO = Path(__file__).resolve().parents[2]
N_CTX = 4096
DEFAULT_PYTHON = Path.home() / ".cache" / "memento" / "llama-server-venv" / "bin" / "python"


def llama_server_python() -> str:
    path = os.environ.get("MEMENTO_LLAMA_SERVER_PYTHON") or str(DEFAULT_PYTHON)
    ok = Path(path).exists() and subprocess.run([path, "-c", "import llama_cpp.server"],
                                                capture_output=True).returncode == 0
    if not ok:
        message = f"llama-cpp-python's server is not installed at {path}: run .ci/llama-server-env"
        if os.environ.get("CI") == "true":
            pytest.fail(message)  # CI must run these, never skip them
        pytest.skip(message)
    return path


class Engine:
    """A server subprocess on a fixed port that can be killed and started again (outage tests)."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str] | None = None, log: Path | None = None):
        self.argv, self.port, self.env, self.log = argv, port, env, log
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> Engine:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/models", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"engine on port {self.port} did not answer within {timeout}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def llama_engine(tmp: Path) -> Engine:
    port = free_port()
    argv = [llama_server_python(), "-m", "llama_cpp.server", "--model", str(SMOLLM2_GGUF), "--n_ctx", str(N_CTX),
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2"]
    return Engine(argv, port, log=tmp / f"llama-server-{port}.log")


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory) -> Iterator[Engine]:
    """One llama-cpp-python server for the module's read-mostly tests."""
    engine = llama_engine(tmp_path_factory.mktemp("llama")).start()
    yield engine
    engine.kill()


@pytest.fixture
def own_llama_server(tmp_path) -> Iterator[Engine]:
    """A server this test may kill and restart."""
    engine = llama_engine(tmp_path).start()
    yield engine
    engine.kill()


@pytest.fixture(scope="session")
def memento_engine(tmp_path_factory) -> Iterator[Engine]:
    """`memento serve` on the real SmolLM2 weights, reached statelessly as an OpenAI engine."""
    tmp = tmp_path_factory.mktemp("memento-engine")
    port = free_port()
    env = {**os.environ, "MEMENTO_DATA_DIR": str(tmp / "data"), "MEMENTO_PORT": str(port),
           "MEMENTO_DEVICE": "cpu", "MEMENTO_DTYPE": "float32", "HF_HUB_OFFLINE": "1"}
    env.pop("MEMENTO_ENGINE_URL", None)
    argv = [sys.executable, "-m", "service.cli", "serve"]
    engine = Engine(argv, port, env=env, log=tmp / "memento-engine.log").start(timeout=180)
    yield engine
    engine.kill()


def remote_settings(tmp_path: Path, engine: Engine, **overrides):
    values = {"engine_url": engine.url, "model": "smollm2-135m-instruct", "max_tokens": 16,
              "engine_timeout": 20.0, **overrides}
    return make_settings(tmp_path, **values)


@pytest.fixture
def remote_app(tmp_path, llama_server):
    """Memento in front of the llama server: no local weights, SmolLM2's tokenizer for counting."""
    yield from start_app(remote_settings(tmp_path, llama_server), None)
