"""Writes sent under an idempotency key that this daemon has in hand.

A client that lost its connection before a write's result came sends the
write again under the same key.  The store makes that safe everywhere (the
key is taken in the write's own transaction: a second write under it is
refused and answered with the first's answer, see ``store.Once``); this
table makes the common cases cheap and keeps the session's actor out of
them: a write sent again while the first is still on its way waits for the
first's outcome, and one sent again after it was answered is answered from
here.  Bounded: at most ``max_answered`` answered writes are kept (the
oldest go first; the store still holds them), and writes in flight are
bounded by the hub's pending calls.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

import attrs
import outcome
import trio

from ..domain.session import key_reused

__all__ = ["KeyedWrite", "WriteKeys", "replayed"]

MAX_ANSWERED: Final = 10_000


@attrs.define(eq=False)
class KeyedWrite:
    """One key's write: in flight until ``done`` is set, then answered
    (``result`` a value: kept; an error: nothing was written, the key is
    free again)."""

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
    def __init__(self, max_answered: int = MAX_ANSWERED) -> None:
        self.max_answered = max_answered
        self._writes: OrderedDict[tuple[str, str], KeyedWrite] = OrderedDict()
        self._answered = 0
        self.replays = 0
        """Writes answered here with an earlier write's outcome."""

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
            self._writes.move_to_end((user_id, key))
            return found, False
        write = KeyedWrite(user_id, key, call, digest)
        self._writes[(user_id, key)] = write
        return write, True

    def settle(self, write: KeyedWrite, result: outcome.Outcome[Any]) -> None:
        """``write`` was answered ``result`` (once; later calls do nothing)."""
        if write.done.is_set():
            return
        write.result = result
        write.done.set()
        ident = (write.user_id, write.key)
        if self._writes.get(ident) is not write:
            return
        if isinstance(result, outcome.Error):
            del self._writes[ident]  # nothing was written: the key is free
            return
        self._answered += 1
        # the oldest answered go first; one in flight is passed over (moved
        # to the end: at most one look at each per call)
        for _ in range(len(self._writes)):
            if self._answered <= self.max_answered:
                break
            oldest, first = next(iter(self._writes.items()))
            if first.done.is_set():
                del self._writes[oldest]
                self._answered -= 1
            else:
                self._writes.move_to_end(oldest)

    async def outcome_of(self, write: KeyedWrite) -> outcome.Value[Any] | None:
        """The first write's answer once it has one, marked replayed; None
        if it failed (nothing written: the twin runs the write itself)."""
        await write.done.wait()
        result = write.result
        if isinstance(result, outcome.Value):
            self.replays += 1
            return outcome.Value(replayed(result.value))
        return None
