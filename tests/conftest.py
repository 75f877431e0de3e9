"""Session fixtures: a real redis-server on a free port, the simulator, and gateways as real processes."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import RedisServer


def pytest_configure(config: pytest.Config) -> None:
    # The providers run (scripts/test, in .venv-providers) must not skip its tests for want of litellm.
    if config.option.markexpr == "providers" and importlib.util.find_spec("litellm") is None:
        raise pytest.UsageError("-m providers needs litellm: run it in .venv-providers (scripts/test does)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")
