"""Store fixtures for tests/memory: `store` runs a test once on SQLite and once on Redis."""

from tests.store_fixtures import redis_url, store, store_spec  # noqa: F401
