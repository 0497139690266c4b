"""The row locks of a shared store's commits, across the nodes of a
multi-node run.

On PostgreSQL a shared store's commit (``SqlStore.commit`` with
``shared=True``) is a transaction of several round trips: its first
statements lock the head rows of the rooms it writes (``SELECT ... FOR
UPDATE`` in room order), then the rows it appends to, updates or checks,
and it holds them until COMMIT.  Another daemon's commit to one of those
rows waits.  A daemon that dies, or is cut off, mid-transaction keeps its
locks until PostgreSQL notices the dead connection, and then the
transaction is rolled back: nothing of it is written.

The simulator runs every store call inline at one virtual instant, so
without this model two nodes' commits never contend.  :class:`StoreLocks`,
one per run and shared by every node's store seam
(:class:`~sim._faults.FaultyBlocking`), makes a commit a transaction in
virtual time:

1. The seam learns that a call is a commit, and what it writes, from the
   node's store itself: :class:`SimStore` raises :class:`CommitAsked` with
   the requests when its ``commit`` is called while the seam plans the call
   (:data:`PLANNING`); nothing has been written then.  Any other call (a
   read: PostgreSQL's MVCC reads take no row locks) runs at once, waiting
   for nobody.
2. The transaction takes its node's store write lock (a ``SqlStore`` commits
   one group at a time), then the locks of the rows it writes
   (:func:`lock_names`), one at a time in one global order, each granted in
   arrival order (FIFO).
3. It holds them for ``hold_us`` (the transaction's remaining round trips),
   then, at the COMMIT point, the commit runs: its effects land at that
   instant, all at once, and the locks are released.
4. A transaction whose node was fenced (the process died) or is cut from
   the store by then never commits (the commit is not run: nothing is
   written); its locks stay held until the store notices the dead
   connection (``detect_us``: from the crash for a dead node, from the
   COMMIT point for a cut one), then are released.  A cut node's call
   then fails as unavailable (its client gave up about as long as the
   server took to notice); a dead node's never returns.

The transaction runs shielded from cancellation, as a worker thread blocked
in the database cannot be interrupted either: a node whose commit's task is
cancelled (its writer restarted, the run ending) still commits, or, dead or
cut, still holds its locks for the detection time.

Locks per row, not one store-wide lock: the rows are read cheaply and
honestly from the requests the store was given (the rooms of their
events, the rows of their mutations and preconditions), and a store-wide
lock would make commits to different rooms wait for each other, which
PostgreSQL does not.  Two simplifications: every lock is taken up front,
in one order (rooms first), where PostgreSQL takes the room heads first
and the other rows as its statements reach them (so no deadlock is ever
modelled: two groups with rows in opposite orders would be one for
PostgreSQL, which aborts one of them after ``deadlock_timeout``); and the
transaction's length is one per seed, whatever the group's size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Final, Protocol, TypeVar

import attrs
import trio

from agor_actors.store import SqlStore, StoreError, StoreUnavailable, WriteRequest, WriteResult

from ._det import sleep, sleep_until
from ._record import Recorder
from ._trace import Trace

__all__ = [
    "CUT_OFF",
    "PLANNING",
    "CommitAsked",
    "Holder",
    "SimStore",
    "StoreLocks",
    "lock_names",
]

T = TypeVar("T")

CUT_OFF: Final = "simulated: node cut off"
"""In the error of a store call of a node cut from the store."""

PLANNING: ContextVar[bool] = ContextVar("sim_store_planning", default=False)
"""True while a store seam plans a call: a :class:`SimStore`'s ``commit``
then raises :class:`CommitAsked` instead of writing."""


class CommitAsked(Exception):
    """Raised by :meth:`SimStore.commit` while the seam plans a call: the
    call is a commit of ``requests`` (nothing was written)."""

    def __init__(self, requests: tuple[WriteRequest, ...]) -> None:
        super().__init__(f"a commit of {len(requests)} requests")
        self.requests = requests


class SimStore(SqlStore):
    """A node's shared store in a multi-node run: a ``SqlStore`` that tells
    its seam what a commit would write before it writes it (see
    :data:`PLANNING`); otherwise the product's store, unchanged."""

    def commit(self, requests: Sequence[WriteRequest]) -> list[WriteResult | StoreError]:
        if PLANNING.get():
            raise CommitAsked(tuple(requests))
        return super().commit(requests)


def lock_names(requests: Sequence[WriteRequest]) -> tuple[str, ...]:
    """The rows a shared store's commit of ``requests`` locks, in the order
    this model takes them: the head rows of the rooms of its events (room order, as
    ``SqlStore._lock_heads``), then every row it inserts, updates, deletes
    or checks (a precondition's ``SELECT ... FOR UPDATE``), by table and
    key (an insert of a new key waits, on PostgreSQL, for another
    transaction inserting the same key)."""
    rooms = {f"room {draft.room}" for request in requests for draft in request.events}
    rows = {
        f"row {table} {sorted(key.items())!r}"
        for request in requests
        for table, key in [
            *((m.table, m.key) for m in request.mutations),
            *((e.table, e.key) for e in request.expect),
        ]
    }
    return (*sorted(rooms), *sorted(rows))


class Holder(Protocol):
    """The store seam a transaction runs for: its node, alive or not."""

    @property
    def who(self) -> str:
        """The node and incarnation, for the trace."""
        ...

    @property
    def fenced_at_s(self) -> float | None:
        """When the node's process died (None: alive)."""
        ...

    def store_cut(self) -> bool:
        """Whether the node is cut from the store now."""
        ...

    @property
    def write_lock(self) -> trio.Lock:
        """The node's store's own write lock (one group at a time)."""
        ...


@attrs.define(eq=False)
class _Transaction:
    holder: Holder
    granted: trio.Event = attrs.field(factory=trio.Event)
    """Set when the lock it waits for is handed to it."""
    waited: bool = False
    """It waited for a lock another node's transaction held."""
    behind_dead: bool = False
    """It waited for a lock that a dead or cut node's transaction held."""
    dead: bool = False


class StoreLocks:
    """The row locks of one multi-node run's store (see the module).

    Bounded: a row's queue holds at most one transaction per node
    incarnation that is committing (each seam commits one group at a time),
    and a row is forgotten once nobody holds or waits for it.  Counts, in
    the recorder's counters: ``locks:waited`` (a commit waited for another
    node's locks), ``locks:waited_dead`` (... for the locks of a dead or cut
    node's transaction), ``locks:held_crashed`` and ``locks:held_cut`` (a
    transaction of a dead, or cut, node held its locks until the store
    noticed)."""

    def __init__(self, *, hold_us: int, detect_us: int, recorder: Recorder, trace: Trace) -> None:
        self._hold_s = hold_us / 1_000_000
        """How long a transaction holds its locks before its COMMIT."""
        self._detect_s = detect_us / 1_000_000
        """How long the store takes to notice a dead or cut connection."""
        self._recorder = recorder
        self._trace = trace
        self._rows: dict[str, deque[_Transaction]] = {}
        """Per locked row: the transaction holding it first, then those
        waiting for it, in arrival order."""

    def locked(self, name: str) -> bool:
        """Whether a transaction holds the lock ``name`` (see :func:`lock_names`)."""
        return name in self._rows

    async def commit(
        self, holder: Holder, requests: Sequence[WriteRequest], run: Callable[[], T]
    ) -> T:
        """The transaction of ``holder``'s commit of ``requests``: ``run``
        (the commit itself) runs at its COMMIT point, with every lock held.
        Shielded from cancellation (see the module).  Raises what ``run``
        raises, or ``StoreUnavailable`` for a node cut from the store by
        the COMMIT; a dead node's call never returns (it waits, cancelled,
        at its next checkpoint)."""
        txn = _Transaction(holder)
        names = lock_names(requests)
        held: list[str] = []
        with trio.CancelScope(shield=True):
            async with holder.write_lock:
                try:
                    for name in names:
                        await self._acquire(name, txn)
                        held.append(name)
                        if holder.fenced_at_s is not None:
                            break  # a dead client's backend is sent nothing more
                    if holder.fenced_at_s is None:
                        await sleep(self._hold_s)
                    if holder.fenced_at_s is None and not holder.store_cut():
                        return run()  # the COMMIT point
                    await self._lost(txn, held)
                finally:
                    for name in reversed(held):
                        self._release(name, txn)
                    if txn.waited:
                        self._recorder.count("locks:waited")
                    if txn.behind_dead:
                        self._recorder.count("locks:waited_dead")
        if holder.fenced_at_s is None:
            raise StoreUnavailable(f"the store cannot be reached ({CUT_OFF}, mid-transaction)")
        await trio.sleep_forever()  # the process is dead: cancelled here
        raise AssertionError("unreachable")

    async def _lost(self, txn: _Transaction, held: list[str]) -> None:
        """A dead or cut node's transaction: nothing commits; its locks are
        held until the store notices the connection is gone (from the
        crash, or, for a cut, from now: when its COMMIT went unanswered)."""
        txn.dead = True
        crashed_s = txn.holder.fenced_at_s
        noticed_from = trio.current_time() if crashed_s is None else crashed_s
        until = max(trio.current_time(), noticed_from + self._detect_s)
        if held:
            self._recorder.count("locks:held_cut" if crashed_s is None else "locks:held_crashed")
            why = "cut from the store" if crashed_s is None else "crashed"
            self._trace.emit(
                "store",
                f"{txn.holder.who} {why} mid-transaction: nothing committed, "
                f"{len(held)} rows locked until {until:.6f}s",
            )
        await sleep_until(until)

    async def _acquire(self, name: str, txn: _Transaction) -> None:
        """Take the lock ``name``, after those who asked for it first.  A
        checkpoint only when it waits."""
        queue = self._rows.setdefault(name, deque())
        queue.append(txn)
        if queue[0] is txn:
            return
        txn.waited = True
        txn.granted = trio.Event()
        await txn.granted.wait()

    def _release(self, name: str, txn: _Transaction) -> None:
        """Hand the lock ``name`` to the next in line, or forget it."""
        queue = self._rows[name]
        assert queue[0] is txn, f"{name} released by a transaction that does not hold it"
        queue.popleft()
        if not queue:
            del self._rows[name]
            return
        after = queue[0]
        after.behind_dead = after.behind_dead or txn.dead
        after.granted.set()
