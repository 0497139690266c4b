"""The broker link a URL names: Redis pub/sub or PostgreSQL LISTEN/NOTIFY."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._link import BrokerLink, open_redis_link
from ._pglink import open_pg_link

__all__ = ["BROKER_SCHEMES", "broker_kind", "open_broker_link"]

BROKER_SCHEMES = {
    "redis": "redis",
    "rediss": "redis",
    "unix": "redis",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "postgresql+psycopg": "postgresql",
}


def broker_kind(url: str) -> str:
    """``"redis"`` or ``"postgresql"``, by the URL's scheme; ValueError
    (saying which are known) for anything else."""
    scheme, sep, _ = url.partition("://")
    kind = BROKER_SCHEMES.get(scheme.lower()) if sep else None
    if kind is None:
        known = ", ".join(f"{s}://" for s in BROKER_SCHEMES)
        raise ValueError(f"unknown broker URL {url!r}: give one of {known}")
    return kind


@asynccontextmanager
async def open_broker_link(url: str) -> AsyncIterator[BrokerLink]:
    """The link to the broker at ``url``: Redis pub/sub for ``redis://``
    (``rediss://``, ``unix://``), PostgreSQL LISTEN/NOTIFY for
    ``postgresql://`` (``postgres://``, ``postgresql+psycopg://``).
    Connects lazily."""
    if broker_kind(url) == "redis":
        async with open_redis_link(url) as redis:
            yield redis
    else:
        async with open_pg_link(url) as pg:
            yield pg
