"""What daemons tell each other through the broker: a room's events just
made durable, as CBOR.

A message is ``[1, node, epoch, [event, ...]]``: the version, the daemon
that committed the events (so that it skips its own), the room's epoch, and
the events as the wire protocol's ``event`` maps (``protocols.to_wire``;
decoded with the protocol's strict converter).  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import attrs
import cbor2

from protocols import Event, ProtocolError, from_wire, to_wire

from ..store import StoredEvent

__all__ = ["BrokerMessageError", "Remote", "channel_for", "decode_events", "encode_events"]

WIRE_VERSION: Final = 1


class BrokerMessageError(ValueError):
    """A broker message that is not one of ours (or not of this version)."""


@attrs.frozen
class Remote:
    """A room's events committed by daemon ``node``, in seq order."""

    node: str
    events: tuple[StoredEvent, ...]


def channel_for(prefix: str, room: str) -> str:
    """The broker channel of ``room``'s events."""
    return f"{prefix}room:{room}"


def encode_events(node: str, events: Sequence[StoredEvent]) -> list[bytes]:
    """``events`` (one room's, in seq order) as broker messages: one per
    run of one epoch (a log reset starts another)."""
    payloads: list[bytes] = []
    run: list[dict[str, Any]] = []
    epoch: str | None = None
    for stored in events:
        if epoch is not None and stored.epoch != epoch and run:
            payloads.append(cbor2.dumps([WIRE_VERSION, node, epoch, run]))
            run = []
        epoch = stored.epoch
        run.append(
            to_wire(
                Event(
                    room=stored.room,
                    seq=stored.seq,
                    event=stored.event,
                    data=stored.data,
                    ts=stored.ts,
                    user_id=stored.user_id,
                    origin=stored.origin,
                    temp_id=stored.temp_id,
                    last_seq=stored.last_seq,
                )
            )
        )
    if run and epoch is not None:
        payloads.append(cbor2.dumps([WIRE_VERSION, node, epoch, run]))
    return payloads


def decode_events(room: str, payload: bytes) -> Remote:
    """The events of a broker message on ``room``'s channel.  Raises
    :class:`BrokerMessageError` for anything else."""
    try:
        value = cbor2.loads(payload)
    except Exception as exc:
        raise BrokerMessageError(f"not CBOR: {exc}") from None
    if not (isinstance(value, list) and len(value) == 4 and value[0] == WIRE_VERSION):
        raise BrokerMessageError("not a version 1 broker message")
    _, node, epoch, items = value
    if not isinstance(node, str) or not isinstance(epoch, str) or not isinstance(items, list):
        raise BrokerMessageError("malformed broker message")
    events: list[StoredEvent] = []
    for item in items:
        if not isinstance(item, dict):
            raise BrokerMessageError("an event is not a map")
        try:
            event = from_wire(item, server=True)
        except ProtocolError as exc:
            raise BrokerMessageError(f"bad event: {exc}") from None
        if not isinstance(event, Event) or event.room != room or event.ts is None:
            raise BrokerMessageError(f"not an event of {room!r}")
        if events and event.seq <= events[-1].end_seq:
            raise BrokerMessageError("events out of seq order")
        events.append(
            StoredEvent(
                room=room,
                epoch=epoch,
                seq=event.seq,
                last_seq=event.last_seq,
                event=event.event,
                data=event.data,
                ts=event.ts,
                user_id=event.user_id,
                origin=event.origin,
                temp_id=event.temp_id,
            )
        )
    return Remote(node, tuple(events))
