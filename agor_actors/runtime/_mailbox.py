"""A bounded mailbox with a priority lane for system messages."""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

__all__ = ["EMPTY", "ActorDead", "Mailbox", "MailboxFull"]

EMPTY: Any = object()
"""What :meth:`Mailbox.get_nowait` returns when there is nothing to take."""


class ActorDead(Exception):
    """The actor behind this reference has stopped."""


class MailboxFull(Exception):
    """The system lane reached its bound: an actor started more timers,
    monitors or awaited effects than it may have at once."""


class Mailbox:
    """``user`` messages are bounded by ``bound`` (overflow policy: the sender
    waits, or ``try_put`` says no).  ``system`` messages (timer fires, awaited
    results, ``Down`` notices, stop requests) come first and are bounded by
    ``system_bound``; they never wait, since the actor itself caused each one
    and must not deadlock on its own mailbox."""

    __slots__ = (
        "_closed",
        "_recv_lot",
        "_send_lot",
        "_system",
        "_user",
        "bound",
        "system_bound",
    )

    def __init__(self, bound: int, system_bound: int = 1024) -> None:
        if bound < 1:
            raise ValueError("a mailbox holds at least one message")
        self.bound = bound
        self.system_bound = system_bound
        self._user: deque[Any] = deque()
        self._system: deque[Any] = deque()
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._closed = False

    def __len__(self) -> int:
        return len(self._user)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def system_depth(self) -> int:
        return len(self._system)

    async def put(self, msg: Any) -> None:
        """Wait for room, then enqueue.  A checkpoint.  Raises
        :class:`ActorDead` if the mailbox is (or becomes) closed; if cancelled
        while waiting, nothing was enqueued."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while len(self._user) >= self.bound:
            if self._closed:
                raise ActorDead()
            await self._send_lot.park()
        if self._closed:
            raise ActorDead()
        self._user.append(msg)
        self._recv_lot.unpark()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def push(self, msg: Any) -> None:
        """Enqueue at once if there is room (then not a checkpoint: the actor
        loop's sends), else wait for room as :meth:`put` does."""
        if not self.try_put(msg):
            await self.put(msg)

    def try_put(self, msg: Any) -> bool:
        """Enqueue if there is room; never blocks.  Raises :class:`ActorDead`
        if closed."""
        if self._closed:
            raise ActorDead()
        if len(self._user) >= self.bound:
            return False
        self._user.append(msg)
        self._recv_lot.unpark()
        return True

    def put_system(self, msg: Any) -> None:
        """Enqueue a system message; silently dropped if closed."""
        if self._closed:
            return
        if len(self._system) >= self.system_bound:
            raise MailboxFull(f"system lane over its bound of {self.system_bound}")
        self._system.append(msg)
        self._recv_lot.unpark()

    def get_nowait(self, *, user: bool = True) -> Any:
        """The next message if there is one (system ones first), else
        :data:`EMPTY`.  Not a checkpoint: the actor loop takes a few messages
        this way between checkpoints."""
        if self._system:
            return self._system.popleft()
        if user and self._user:
            msg = self._user.popleft()
            self._send_lot.unpark()
            return msg
        return EMPTY

    async def get(self, *, user: bool = True) -> Any:
        """The next message, system ones first; with ``user=False`` only
        system messages.  A checkpoint; if cancelled nothing was taken."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._system and not (user and self._user):
            await self._recv_lot.park()
        if self._system:
            msg = self._system.popleft()
        else:
            msg = self._user.popleft()
            self._send_lot.unpark()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return msg

    def close(self) -> list[Any]:
        """Close and return what was left (user messages), waking blocked senders."""
        self._closed = True
        left = list(self._user)
        self._user.clear()
        self._system.clear()
        self._send_lot.unpark_all()
        return left
