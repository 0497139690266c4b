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
* A request refused on its own (``store_request``): a trigger on each
  record table calls back into the simulator, which, for the fault's
  duration, refuses each row written to one table with a chance of one in
  two (``RAISE(ABORT)``: an integrity error, what a constraint the daemon
  did not foresee looks like).  A refused row in a run of plain writes
  makes the store redo the group with every request isolated; a refusal
  there fails that one request alone, and the others of its group commit.
* Several nodes: a commit is a transaction that holds its rows' locks
  against the other nodes' for a while, and a node that dies or is cut
  off mid-transaction commits nothing and keeps them until the store
  notices (``sim/_locks.py``, through :class:`FaultyBlocking`).
* A crash: :class:`SimPoison`, a message no behaviour knows, makes the
  handler of a session, room or the store writer raise; the supervisor
  restarts the actor.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, Literal, TypeVar, cast

import sqlalchemy as sa
import trio
from sqlalchemy import event as sa_event

from agor_actors.store import SqlStore, StoreUnavailable
from agor_actors.world import Blocking

from ._det import sleep
from ._locks import CUT_OFF, PLANNING, CommitAsked, StoreLocks
from ._trace import Trace, now_us

__all__ = ["CUT_OFF", "FaultyBlocking", "SimPoison", "StoreFaults", "poison"]

T = TypeVar("T")

Mode = Literal["before", "after"]


class SimPoison:
    """A message that makes any behaviour's handler raise."""

    def __repr__(self) -> str:
        return "SimPoison()"


REFUSABLE: Final = ("sessions", "tasks", "sessions", "boards")
"""The tables whose rows a ``store_request`` fault can refuse, by its
target (sessions twice: they take the most writes at once), (a
``store_chunk`` fault refuses ``messages`` rows: streamed chunks)."""

REFUSE_CHANCE: Final = 1 / 2
"""The chance that a row is refused while a ``store_request`` fault lasts."""


class StoreFaults:
    """Arms a failure of the next commit, or refusals of the next rows."""

    def __init__(self, store: SqlStore, trace: Trace, *, seed: int = 0) -> None:
        self._trace = trace
        self._rng = random.Random(f"{seed}/store/refusals")
        self._refuse_until_us = 0
        self.armed: Mode | None = None
        self.commits = 0
        self.injected = 0
        self.refused = 0
        self._refuse_table = ""
        self._committed = False
        self._engine = store.engine
        sa_event.listen(store.engine, "commit", self._on_commit)
        with store.engine.begin() as conn:
            dbapi: Any = conn.connection.dbapi_connection  # sqlite3's, in memory
            dbapi.create_function("sim_refuse", 1, self._refuse)
            for table in ("sessions", "tasks", "boards", "messages"):
                for op in ("INSERT", "UPDATE"):
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER sim_refuse_{table}_{op.lower()} BEFORE {op} ON {table} "
                        f"WHEN sim_refuse('{table}') BEGIN "
                        "SELECT RAISE(ABORT, 'simulated: the database refused this row'); END"
                    )

    def detach(self) -> None:
        """The run is over: the engine (kept for the next run) forgets this seam."""
        if sa_event.contains(self._engine, "commit", self._on_commit):
            sa_event.remove(self._engine, "commit", self._on_commit)

    def arm_refusals(self, table: str, until_us: int) -> None:
        """Refuse rows written to ``table`` (one in two) until ``until_us``."""
        self._refuse_table, self._refuse_until_us = table, until_us
        self._trace.emit("fault", f"store: rows of {table} refused until {until_us / 1e6:.3f}s")

    def _refuse(self, table: str) -> int:
        if table != self._refuse_table or now_us() >= self._refuse_until_us:
            return 0
        if self._rng.random() >= REFUSE_CHANCE:
            return 0
        self.refused += 1
        self._trace.emit("fault", f"store: a row of {table} refused")
        return 1

    def arm(self, mode: Mode) -> None:
        self.armed = mode
        self._trace.emit("fault", f"store: the next commit fails {mode} it happens")

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """No fault for the block (what the simulator itself writes, e.g. a
        log reset while the daemon is down); armed ones stay armed."""
        armed, until = self.armed, self._refuse_until_us
        self.armed, self._refuse_until_us = None, 0
        try:
            yield
        finally:
            self.armed, self._refuse_until_us = armed, until

    def disarm(self) -> None:
        self.armed = None
        self._refuse_until_us = 0

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
    done and its answer lost, as with an abandoned worker thread.

    In a multi-node run (``locks`` given) a commit of the node's store (a
    :class:`~sim._locks.SimStore`) is a transaction in virtual time between
    the two halves: it waits for the rows other nodes' transactions hold,
    holds its own, and lands at its COMMIT point (:class:`StoreLocks`);
    reads run at once, as before."""

    def __init__(
        self,
        inner: Blocking,
        faults: StoreFaults,
        *,
        latency_us: int = 0,
        cut: Callable[[], bool] | None = None,
        cut_wait_us: int = 0,
        locks: StoreLocks | None = None,
        who: str = "daemon",
    ) -> None:
        self._inner = inner
        self._faults = faults
        self._half_s = latency_us / 2 / 1_000_000
        self._fenced_at_s: float | None = None
        self._cut = cut
        """True while this node is cut from the store (multi-node runs)."""
        self._cut_wait_s = cut_wait_us / 1_000_000
        """How long a call made during a cut waits before it fails (a
        connection attempt or a query whose packets are dropped, until the
        store's timeouts); 0: refused at once."""
        self._locks = locks
        self._write_lock = trio.Lock()
        self._who = who
        self.refused = 0

    @property
    def who(self) -> str:
        return self._who

    @property
    def fenced_at_s(self) -> float | None:
        """When the process died (:meth:`fence`); None while it lives."""
        return self._fenced_at_s

    @property
    def write_lock(self) -> trio.Lock:
        """Held by this seam's store transaction (a ``SqlStore`` commits one
        group at a time, under its own lock)."""
        return self._write_lock

    def store_cut(self) -> bool:
        return self._cut is not None and self._cut()

    def fence(self) -> None:
        """The process is dead: from now on nothing reaches the store."""
        if self._fenced_at_s is None:
            self._fenced_at_s = trio.current_time()

    async def _alive(self) -> None:
        if self._fenced_at_s is not None:
            await trio.sleep_forever()

    async def run(self, fn: Callable[[], T], *, local: bool = False) -> T:
        faults = self._faults
        await self._alive()

        def call() -> T:
            faults._begin_call()
            result = fn()
            faults._after_call()
            return result

        if self._half_s:
            await sleep(self._half_s)
        await self._alive()
        if self.store_cut():
            if self._cut_wait_s:
                await sleep(self._cut_wait_s)
            self.refused += 1
            raise StoreUnavailable(f"the store cannot be reached ({CUT_OFF})")
        if self._locks is None:
            result = await self._inner.run(call, local=local)
        else:
            asked: list[CommitAsked] = []

            def plan() -> T:
                # a read runs here, at once; a commit stops before writing
                token = PLANNING.set(True)
                try:
                    return call()
                except CommitAsked as commit:
                    asked.append(commit)
                    return cast(T, None)
                finally:
                    PLANNING.reset(token)

            result = await self._inner.run(plan, local=local)
            if asked:
                result = await self._locks.commit(self, asked[0].requests, call)
        if self._half_s:
            await sleep(self._half_s)
        return result


def poison(ref: Any) -> bool:
    """Make the actor behind ``ref`` crash in its handler (if it has room)."""
    try:
        return bool(ref.try_send(SimPoison()))
    except Exception:
        return False
