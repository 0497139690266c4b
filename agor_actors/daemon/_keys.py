"""Writes sent under an idempotency key that this daemon has in flight.

A client that lost its connection before a write's result came sends the
write again under the same key.  The store makes that safe everywhere (the
key is taken in the write's own transaction: a second write under it is
refused and answered with the first's answer, see ``store.Once``); this
table covers the case the store cannot see yet: a write sent again while
the first is still on its way waits for the first's outcome instead of
being written beside it.  Once answered, a write leaves the table (its
answer may be large: the store keeps it), so the table is bounded by the
writes in flight, which the hub's pending calls bound.
"""

from __future__ import annotations

from typing import Any

import attrs
import outcome
import trio

from ..domain.session import key_reused

__all__ = ["KeyedWrite", "WriteKeys", "replayed"]


@attrs.define(eq=False)
class KeyedWrite:
    """One key's write: in flight until ``done`` is set, then answered
    ``result`` (an error: nothing was written, and its twins run the write
    themselves)."""

    user_id: str
    key: str
    call: str
    digest: str
    done: trio.Event = attrs.field(factory=trio.Event)
    result: outcome.Outcome[Any] | None = None


def replayed(value: Any) -> Any:
    """A write's answer as a write sent again under its key gets it."""
    return {**value, "_replayed": True} if isinstance(value, dict) else value


class WriteKeys:
    def __init__(self) -> None:
        self._writes: dict[tuple[str, str], KeyedWrite] = {}
        self.replays = 0
        """Writes answered here with the outcome of the same write in flight."""

    def __len__(self) -> int:
        return len(self._writes)

    def claim(self, user_id: str, key: str, call: str, digest: str) -> tuple[KeyedWrite, bool]:
        """The write of ``user_id``'s ``key``, and whether this caller runs
        it (True: it must :meth:`settle` it) or is its twin (False: wait for
        :meth:`outcome_of`).  Raises ``invalid_field`` if the key names
        another call."""
        found = self._writes.get((user_id, key))
        if found is not None:
            if (found.call, found.digest) != (call, digest):
                raise key_reused(key, found.call)
            return found, False
        write = KeyedWrite(user_id, key, call, digest)
        self._writes[(user_id, key)] = write
        return write, True

    def settle(self, write: KeyedWrite, result: outcome.Outcome[Any]) -> None:
        """``write`` was answered ``result`` (once; later calls do nothing):
        its twins wake with it, and it leaves the table."""
        if write.done.is_set():
            return
        write.result = result
        write.done.set()
        ident = (write.user_id, write.key)
        if self._writes.get(ident) is write:
            del self._writes[ident]

    async def outcome_of(self, write: KeyedWrite) -> outcome.Value[Any] | None:
        """The first write's answer once it has one, marked replayed; None
        if it failed (nothing written: the twin runs the write itself)."""
        await write.done.wait()
        result = write.result
        if isinstance(result, outcome.Value):
            self.replays += 1
            return outcome.Value(replayed(result.value))
        return None
