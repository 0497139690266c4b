"""A schema of its own on the machine's PostgreSQL for one test (no tests
here): the tests of the store, the daemon and the cluster share it
(``pythonpath = ["."]`` in pyproject makes it ``tests.pg_schema``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.pool import NullPool


@contextmanager
def fresh_schema(pg_url: str, prefix: str) -> Iterator[tuple[str, str]]:
    """``(url, schema)``: a URL of ``pg_url``'s server whose tables live in
    a schema made here (``<prefix>_<random>``) and dropped afterwards, so
    tests never see each other's rows."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_url, poolclass=NullPool)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = sa.make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"})
        try:
            yield url.render_as_string(hide_password=False), schema
        finally:
            with admin.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        admin.dispose()
