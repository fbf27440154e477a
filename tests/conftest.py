"""Shared test configuration; real-server fixtures live in tests/fixtures/."""

pytest_plugins = ["tests.fixtures.tansu", "tests.fixtures.redis", "tests.fixtures.redis_cluster"]
