"""Faults that reach into the daemon: store writes that fail (before or
after the commit), and actors whose handler raises.

* A commit refused *before* it happens: a SQLAlchemy ``commit`` event
  listener on the store's engine raises an ``OperationalError`` (what a full
  disk looks like), so the store's own error path runs and nothing is
  written.
* A commit whose answer is lost *after* it happened: the :class:`Blocking`
  seam wrapper raises once the call that committed has returned (the worker
  thread died on the way back), so the writer does not know its group is
  durable.
* A crash: :class:`SimPoison`, a message no behaviour knows, makes the
  handler of a session, room or the store writer raise; the supervisor
  restarts the actor.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
import trio
from sqlalchemy import event as sa_event

from agor_actors.store import SqlStore, StoreUnavailable
from agor_actors.world import Blocking

from ._trace import Trace

__all__ = ["FaultyBlocking", "SimPoison", "StoreFaults", "poison"]

T = TypeVar("T")

Mode = Literal["before", "after"]


class SimPoison:
    """A message that makes any behaviour's handler raise."""

    def __repr__(self) -> str:
        return "SimPoison()"


class StoreFaults:
    """Arms a failure of the next commit."""

    def __init__(self, store: SqlStore, trace: Trace) -> None:
        self._trace = trace
        self.armed: Mode | None = None
        self.commits = 0
        self.injected = 0
        self._committed = False
        sa_event.listen(store.engine, "commit", self._on_commit)

    def arm(self, mode: Mode) -> None:
        self.armed = mode
        self._trace.emit("fault", f"store: the next commit fails {mode} it happens")

    def disarm(self) -> None:
        self.armed = None

    def _on_commit(self, conn: sa.Connection) -> None:
        if self.armed == "before":
            self.armed = None
            self.injected += 1
            self._trace.emit("fault", "store: commit refused")
            raise sa.exc.OperationalError(
                "COMMIT", {}, sqlite3.OperationalError("disk I/O error (simulated)")
            )
        self.commits += 1
        self._committed = True

    def _begin_call(self) -> None:
        self._committed = False

    def _after_call(self) -> None:
        if self.armed == "after" and self._committed:
            self.armed = None
            self.injected += 1
            self._trace.emit("fault", "store: the answer of a commit is lost")
            raise StoreUnavailable("the worker died after the commit (simulated)")


class FaultyBlocking:
    """The store seam of a simulated daemon: blocking work runs inline (no
    threads), with the failures :class:`StoreFaults` arms, and takes
    ``latency_us`` of virtual time split around the call, as the hop to and
    from a worker thread does.  Cancelled after the call ran, the work is
    done and its answer lost, as with an abandoned worker thread."""

    def __init__(self, inner: Blocking, faults: StoreFaults, *, latency_us: int = 0) -> None:
        self._inner = inner
        self._faults = faults
        self._half_s = latency_us / 2 / 1_000_000
        self._fenced = False

    def fence(self) -> None:
        """The process is dead: from now on nothing reaches the store."""
        self._fenced = True

    async def _alive(self) -> None:
        if self._fenced:
            await trio.sleep_forever()

    async def run(self, fn: Callable[[], T]) -> T:
        faults = self._faults
        await self._alive()

        def call() -> T:
            faults._begin_call()
            result = fn()
            faults._after_call()
            return result

        if self._half_s:
            await trio.sleep(self._half_s)
        await self._alive()
        result = await self._inner.run(call)
        if self._half_s:
            await trio.sleep(self._half_s)
        return result


def poison(ref: Any) -> bool:
    """Make the actor behind ``ref`` crash in its handler (if it has room)."""
    try:
        return bool(ref.try_send(SimPoison()))
    except Exception:
        return False
