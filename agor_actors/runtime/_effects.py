"""What a behaviour returns: effects, performed by the mailbox loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import attrs
import outcome

if TYPE_CHECKING:
    from ._actor import ActorRef, ReplyTo

__all__ = [
    "Ask",
    "Await",
    "AwaitInline",
    "CancelTimer",
    "Down",
    "Effect",
    "Effects",
    "ExitReason",
    "Monitor",
    "Reply",
    "Request",
    "Send",
    "StartTimer",
    "Stop",
    "TrySend",
]


@attrs.frozen
class ExitReason:
    """Why an actor stopped: ``normal`` (it returned :class:`Stop`),
    ``idle`` (passivated), ``shutdown`` (its supervisor stopped it), ``crash``
    (its handler raised) or ``noproc`` (it was already gone when monitored)."""

    kind: Literal["normal", "idle", "shutdown", "crash", "noproc"]
    error: BaseException | None = attrs.field(default=None, eq=False)

    @property
    def abnormal(self) -> bool:
        return self.kind == "crash"

    def describe(self) -> str:
        if self.error is None:
            return self.kind
        return f"{self.kind}: {type(self.error).__name__}: {self.error}"


@attrs.frozen
class Request:
    """What a behaviour receives for ``ref.call(body)``; answer it with :class:`Reply`."""

    body: Any
    reply_to: ReplyTo


@attrs.frozen
class Down:
    """Delivered to a monitoring actor when the monitored one stops."""

    ref: ActorRef
    reason: ExitReason
    monitor_id: int


@attrs.frozen
class Reply:
    """Answer a :class:`Request`: ``value``, or raise ``error`` in the caller."""

    to: ReplyTo
    value: Any = None
    error: Exception | None = None


@attrs.frozen
class Send:
    """Send ``msg`` to an actor (a ref, or a registry name that is spawned on
    first use).  The loop waits for room in the target's mailbox
    (backpressure); a message to a stopped actor is dropped and counted."""

    to: ActorRef | str
    msg: Any


@attrs.frozen
class TrySend:
    """Send without waiting: dropped and counted if the target's mailbox is full."""

    to: ActorRef | str
    msg: Any


@attrs.frozen
class StartTimer:
    """Deliver ``msg`` to this actor after ``delay_s``; a timer with the same
    ``key`` is replaced.  With ``repeat`` it fires every ``delay_s``.  With
    ``at_s`` (the clock's time) it fires then instead, once: timers of
    several actors set to one instant fire together."""

    key: str
    delay_s: float
    msg: Any
    repeat: bool = False
    at_s: float | None = None


@attrs.frozen
class CancelTimer:
    key: str


@attrs.frozen
class Stop:
    """Stop after the other effects of this step."""

    kind: Literal["normal", "idle"] = "normal"


@attrs.frozen
class Await:
    """Run ``fn()`` in the actor's nursery; its outcome comes back as the
    message ``then(outcome)``.  The actor keeps handling messages meanwhile;
    at most ``max_inflight`` awaited effects run at once (beyond that the loop
    handles only system messages until one finishes)."""

    fn: Callable[[], Awaitable[Any]]
    then: Callable[[outcome.Outcome[Any]], Any]


@attrs.frozen
class AwaitInline:
    """Await ``fn()`` in the mailbox loop itself: the actor handles nothing
    else until it ends, and ``then(outcome)`` is the next message it
    handles, before anything waiting in its mailbox.  The effects after it
    in the same step are performed after it ends.  For an actor with nothing
    else to do meanwhile (the store writer while a group commits): one task
    switch fewer than :class:`Await`, and what arrives meanwhile waits in
    the bounded mailbox (its senders feel the backpressure)."""

    fn: Callable[[], Awaitable[Any]]
    then: Callable[[outcome.Outcome[Any]], Any]


@attrs.frozen
class Ask:
    """Request/reply between actors without blocking the asker: ``body`` is
    sent as a :class:`Request` from the loop (so asks to one target keep
    their order, and the loop waits for room: backpressure), and the reply
    comes back as the message ``then(outcome)`` (an error outcome holds the
    replied error, :class:`ActorExited`, ``ActorDead`` or ``CallTimeout``).
    Counts against ``max_inflight``."""

    to: ActorRef | str
    body: Any
    then: Callable[[outcome.Outcome[Any]], Any]
    timeout_s: float = 30.0


@attrs.frozen
class Monitor:
    """Watch another actor: a :class:`Down` arrives when it stops."""

    target: ActorRef


Effect = (
    Reply | Send | TrySend | StartTimer | CancelTimer | Stop | Await | AwaitInline | Ask | Monitor
)
Effects = Iterable[Effect]
