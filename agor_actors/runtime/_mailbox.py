"""A bounded mailbox with a priority lane for system messages."""

from __future__ import annotations

from collections import deque
from typing import Any

import outcome
import trio

__all__ = ["EMPTY", "ActorDead", "Mailbox", "MailboxFull"]

EMPTY: Any = object()
"""What :meth:`Mailbox.get_nowait` returns when there is nothing to take."""


class ActorDead(Exception):
    """The actor behind this reference has stopped."""


class MailboxFull(Exception):
    """The system lane reached its bound: an actor started more timers,
    monitors or awaited effects than it may have at once."""


class _Waiter:
    __slots__ = ("msg", "task")

    def __init__(self, msg: Any, task: trio.lowlevel.Task) -> None:
        self.msg = msg
        self.task = task


class Mailbox:
    """``user`` messages are bounded by ``bound`` (overflow policy: the sender
    waits, or ``try_put`` says no).  ``system`` messages (timer fires, awaited
    results, ``Down`` notices, stop requests) come first and are bounded by
    ``system_bound``; they never wait, since the actor itself caused each one
    and must not deadlock on its own mailbox.

    User messages keep the order in which their senders arrived, also under
    backpressure: a sender that finds senders waiting queues behind them
    (``try_put`` says no), and a freed place goes to the first waiting
    sender, whose message is enqueued for it (no sender can take a place
    another was woken for).  The waiting senders are bounded by the tasks
    that send: each waits for its own message."""

    __slots__ = (
        "_closed",
        "_recv_lot",
        "_system",
        "_user",
        "_waiters",
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
        self._waiters: deque[_Waiter] = deque()
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
        """Wait for room (behind the senders already waiting), then enqueue.
        A checkpoint.  Raises :class:`ActorDead` if the mailbox is (or
        becomes) closed; if cancelled while waiting, nothing was enqueued."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.try_put(msg):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(msg, trio.lowlevel.current_task())
        self._waiters.append(waiter)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiters.remove(waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def push(self, msg: Any) -> None:
        """Enqueue at once if there is room (then not a checkpoint: the actor
        loop's sends), else wait for room as :meth:`put` does."""
        if not self.try_put(msg):
            await self.put(msg)

    def try_put(self, msg: Any) -> bool:
        """Enqueue if there is room and no sender waits; never blocks.
        Raises :class:`ActorDead` if closed."""
        if self._closed:
            raise ActorDead()
        if len(self._user) >= self.bound or self._waiters:
            return False
        self._user.append(msg)
        self._recv_lot.unpark()
        return True

    def _admit(self) -> None:
        """A place was freed: it goes to the first waiting sender."""
        if self._waiters and len(self._user) < self.bound:
            waiter = self._waiters.popleft()
            self._user.append(waiter.msg)
            trio.lowlevel.reschedule(waiter.task)

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
            self._admit()
            return msg
        return EMPTY

    async def get(self, *, user: bool = True) -> Any:
        """The next message, system ones first; with ``user=False`` only
        system messages.  A checkpoint; if cancelled nothing was taken."""
        await trio.lowlevel.checkpoint_if_cancelled()
        parked = False
        while not self._system and not (user and self._user):
            await self._recv_lot.park()
            parked = True
        if self._system:
            msg = self._system.popleft()
        else:
            msg = self._user.popleft()
            self._admit()
        if not parked:  # parking was the schedule point; else yield once here
            await trio.lowlevel.cancel_shielded_checkpoint()
        return msg

    def close(self) -> list[Any]:
        """Close and return what was left (user messages), waking blocked senders."""
        self._closed = True
        left = list(self._user)
        self._user.clear()
        self._system.clear()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            trio.lowlevel.reschedule(waiter.task, outcome.Error(ActorDead()))
        return left
