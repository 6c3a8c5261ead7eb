"""Real transcript stores for tests: SQLite files under tmp_path and Redis under a unique prefix.

Use the pytest fixtures from any test package by importing them into its conftest.py:

    from tests.store_fixtures import redis_url, store, store_spec  # noqa: F401

or the plain context managers `open_test_store(kind, tmp_path)` / `make_store_spec(kind, tmp_path)`.

Redis comes from $MEMENTO_TEST_REDIS_URL (default redis://127.0.0.1:6379/15). When it cannot be
reached the test is skipped locally but FAILS under CI (env CI=true): a store test silently
skipped in CI is a store test that does not exist.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from memory.store import Store, open_store

REDIS_URL_ENV = "MEMENTO_TEST_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
STORE_KINDS = ("sqlite", "redis")


def redis_test_url() -> str:
    return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def redis_problem(url: str) -> str | None:
    """None when Redis answers PING at `url`, else why not."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        client.ping()
        return None
    except redis.RedisError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        client.close()


def require_redis(url: str | None = None) -> str:
    """The Redis URL for tests; skips (locally) or fails (CI) the calling test when unreachable."""
    url = url or redis_test_url()
    problem = redis_problem(url)
    if problem is not None:
        msg = f"Redis at {url} unreachable ({problem}); start redis-server or set {REDIS_URL_ENV}"
        if in_ci():
            pytest.fail(msg + " [CI is set, so this fails instead of skipping]")
        pytest.skip(msg)
    return url


def unique_prefix() -> str:
    return f"memento-test-{uuid.uuid4().hex[:12]}"


def drop_prefix(url: str, prefix: str) -> int:
    """Delete every key under `prefix`; returns how many went."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=5.0)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        return len(keys)
    finally:
        client.close()


@dataclass(frozen=True)
class StoreSpec:
    """What a service needs to open the same store: MEMENTO_STORE_URL and the Redis key prefix."""

    kind: str  # "sqlite" | "redis"
    url: str
    prefix: str

    def open(self) -> Store:
        return open_store(self.url, prefix=self.prefix)


@contextmanager
def make_store_spec(kind: str, tmp_path: Path) -> Iterator[StoreSpec]:
    """A fresh, empty store location; Redis keys under it are removed afterwards."""
    if kind == "sqlite":
        yield StoreSpec("sqlite", f"sqlite:///{tmp_path / 'store' / 'memento.db'}", "memento")
        return
    if kind != "redis":
        raise ValueError(f"store kind {kind!r} is unknown: use one of {STORE_KINDS}")
    spec = StoreSpec("redis", require_redis(), unique_prefix())
    try:
        yield spec
    finally:
        drop_prefix(spec.url, spec.prefix)


@contextmanager
def open_test_store(kind: str, tmp_path: Path) -> Iterator[Store]:
    with make_store_spec(kind, tmp_path) as spec:
        store = spec.open()
        try:
            yield store
        finally:
            store.close()


# -- pytest fixtures (import these names into a conftest.py) -----------------------------


@pytest.fixture
def redis_url() -> str:
    """A reachable Redis URL (skip locally / fail in CI otherwise)."""
    return require_redis()


@pytest.fixture(params=STORE_KINDS)
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    with make_store_spec(request.param, tmp_path) as spec:
        yield spec


@pytest.fixture
def store(store_spec: StoreSpec) -> Iterator[Store]:
    s = store_spec.open()
    try:
        yield s
    finally:
        s.close()
