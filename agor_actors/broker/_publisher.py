"""The publisher: tells the other daemons about this daemon's commits, and
(from its board rooms) about its users' presence there.

The store writer offers each room's committed events to it (``TrySend``:
the writer never waits for the broker); they gather in its bounded mailbox
while a publish is in flight and go out together in the next one (one
round trip), in commit order.  Overflow policy: a commit offered to a full
mailbox, or one whose publish failed (the broker is unreachable), is not
retried: the receiving daemons find the hole by its seqs, or by their rooms'
periodic head check, and read it from the store.  Presence is not
retried either: the board room's next heartbeat says it all again.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import outcome
import trio

from ..domain.cluster_presence import PresenceOut
from ..runtime import ActorContext, AwaitInline, Behaviour, Effect, Effects
from ..store import Committed
from ._link import BrokerLink
from ._wire import channel_for, encode_events, encode_presence_parts

__all__ = ["PUBLISHER_NAME", "BrokerPublisher", "PublisherState"]

log = logging.getLogger("agor_actors.broker")

PUBLISHER_NAME = "broker:out"


@attrs.define
class PublisherState:
    pending: list[Committed | PresenceOut] = attrs.field(factory=list)
    published: int = 0
    """Broker messages published."""
    failed: int = 0
    """Publishes that failed (their messages are dropped)."""
    failing: bool = False


@attrs.frozen
class _Published:
    count: int
    result: outcome.Outcome[None]


class BrokerPublisher(Behaviour[PublisherState]):
    """``mailbox_size`` commits wait at most; ``max_group`` go in one publish."""

    mailbox_size = 4096
    max_group = 512
    publish_timeout_s = 5.0

    def __init__(self, link: BrokerLink, node: str, *, prefix: str = "agor:") -> None:
        self.link = link
        self.node = node
        self.prefix = prefix

    async def init(self, ctx: ActorContext) -> PublisherState:
        return PublisherState()

    def handle(self, state: PublisherState, msg: Any, now: float) -> Effects:
        if isinstance(msg, Committed | PresenceOut):
            state.pending.append(msg)
            if len(state.pending) >= self.max_group:
                return self._start(state)
            return ()
        if isinstance(msg, _Published):
            return self._done(state, msg)
        raise TypeError(f"broker publisher: unexpected {msg!r}")

    def caught_up(self, state: PublisherState, now: float) -> Effects:
        if state.pending:
            return self._start(state)
        return ()

    def _start(self, state: PublisherState) -> list[Effect]:
        taken, state.pending = state.pending[: self.max_group], state.pending[self.max_group :]
        messages: list[tuple[str, bytes]] = []
        max_bytes = self.link.max_message_bytes
        for item in taken:
            if isinstance(item, PresenceOut):
                channel = channel_for(self.prefix, f"board:{item.board}")
                parts = encode_presence_parts(self.node, item, max_bytes=max_bytes)
                messages += [(channel, payload) for payload in parts]
                continue
            channel = channel_for(self.prefix, item.room)
            payloads = encode_events(self.node, item.events, max_bytes=max_bytes)
            messages += [(channel, payload) for payload in payloads]
        link, timeout_s = self.link, self.publish_timeout_s

        async def publish() -> None:
            with trio.fail_after(timeout_s):
                await link.publish(messages)

        return [AwaitInline(publish, lambda result: _Published(len(messages), result))]

    def _done(self, state: PublisherState, msg: _Published) -> list[Effect]:
        try:
            msg.result.unwrap()
        except Exception as exc:
            state.failed += 1
            if not state.failing:
                log.warning("publishing to the broker failed: %s", exc)
            state.failing = True
            return []
        if state.failing:
            log.info("publishing to the broker works again")
        state.failing = False
        state.published += msg.count
        return []

    def describe(self, state: PublisherState) -> dict[str, Any]:
        return {
            "pending": len(state.pending),
            "published": state.published,
            "failed": state.failed,
        }
