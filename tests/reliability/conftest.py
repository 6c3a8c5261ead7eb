"""Reliability fixtures: one tiny random-weight model directory per test session (loads like a
real checkpoint through MEMENTO_MODEL), servers as subprocesses, a private redis-server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.harness import PrivateRedis, write_tiny_model
from tests.service.conftest import (  # noqa: F401 (fixtures shared with the service tests)
    app,
    app_any_store,
    live_server,
    smol_tokenizer,
    store_kind,
    tiny_lm,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def env_int(name: str, default: int) -> int:
    """Counts for the long runs: CI uses the defaults, `MEMENTO_CRASH_KILLS=50 pytest ...` the full ones."""
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    import shutil

    if shutil.which("redis-server") is None:
        from tests.store_fixtures import in_ci

        (pytest.fail if in_ci() else pytest.skip)(
            "redis-server is not installed (apt-get install redis-server)"
        )
    with PrivateRedis(tmp_path / "redis") as server:
        yield server
