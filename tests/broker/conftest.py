"""Fixtures of the cluster tests: a fresh PostgreSQL schema per test and,
parametrised, the broker of each kind on it (helpers in cluster_support)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster_support import BROKERS, broker_url_for, fresh_schema


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_schema() as url:
        yield url


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest, pg_url: str) -> str:
    return broker_url_for(request.param, pg_url)
