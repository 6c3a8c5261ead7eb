"""Store fixtures for persona tests (real SQLite and Redis, tests/store_fixtures.py)."""

from tests.store_fixtures import redis_url, store, store_spec  # noqa: F401
