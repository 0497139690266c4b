"""The in-memory database of a run, on one engine kept per process.

Opening a store on a new engine costs every seed the same fixed work: the
schema's ``CREATE`` statements, and SQLAlchemy compiling each statement the
run executes once more (its compiled cache belongs to the engine).  A worker
process runs many seeds one after the other, so it keeps one engine for all
of them: the first run creates the schema and keeps a snapshot of the empty
database (``sqlite3``'s ``serialize``); every run starts from that snapshot
(``deserialize``: the same bytes, so the same database, whatever the runs
before it did), and the engine's compiled statements carry over.  Nothing
a run sees depends on the runs before it: the rows, the rowids and the
triggers come from the snapshot; what is per run (the store fault seam's
listener and SQL function) is added by the run and removed after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from agor_actors.store import SqlStore, open_store

__all__ = ["open_run_store", "release_run_store"]


class _Kept:
    engine: sa.Engine | None = None
    snapshot: bytes = b""
    busy = False


_KEPT = _Kept()


def _driver(engine: sa.Engine) -> tuple[Any, Any]:
    """The pool's one connection (an in-memory database has one) and its
    ``sqlite3`` connection."""
    fairy = engine.raw_connection()
    return fairy, fairy.driver_connection


def open_run_store(new_epoch: Callable[[], str]) -> SqlStore:
    """A store on an empty in-memory database (the schema only)."""
    kept = _KEPT
    if kept.engine is not None and not kept.busy:
        fairy, driver = _driver(kept.engine)
        try:
            if driver.in_transaction:  # a run that died mid-call: start over
                raise RuntimeError("the kept database is in a transaction")
            driver.deserialize(kept.snapshot)
        except Exception:
            fairy.close()
            _drop()
        else:
            fairy.close()
            kept.busy = True
            return SqlStore(kept.engine, new_epoch=new_epoch)
    if kept.busy:  # a run inside a run (none today): a database of its own
        return open_store("sqlite://", new_epoch=new_epoch)
    store = open_store("sqlite://", new_epoch=new_epoch)
    fairy, driver = _driver(store.engine)
    try:
        kept.snapshot = driver.serialize()
    finally:
        fairy.close()
    kept.engine = store.engine
    kept.busy = True
    return store


def release_run_store(store: SqlStore) -> None:
    """The run is over: its store is closed (its engine kept for the next)."""
    kept = _KEPT
    if store.engine is not kept.engine:
        store.close()
        return
    kept.busy = False


def _drop() -> None:
    kept = _KEPT
    if kept.engine is not None:
        kept.engine.dispose()
    kept.engine = None
    kept.snapshot = b""
    kept.busy = False
