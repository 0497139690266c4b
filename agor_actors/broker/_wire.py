"""What daemons tell each other through the broker, as CBOR: a room's
events just made durable, and a board's presence.

An events message is ``[1, node, epoch, [event, ...]]``: the version, the
daemon that committed the events (so that it skips its own), the room's
epoch, and the events as the wire protocol's ``event`` maps
(``protocols.to_wire``; decoded with the protocol's strict converter).

A presence message, on the board room's channel, is ``["presence", 1, node,
full, {user_id: entry or None}, [[user_id, x, y], ...]]``: the daemon's users
on the board (all of them when ``full``: its heartbeat; else what changed,
None for a user who left) and their latest cursors; then, only if some
moved (so a message without is the first version's shape), their latest
viewports ``[[user_id, x, y, w, h, zoom], ...]``, for followers on other
daemons; then, only when the daemon asks the others for their users (its
board room just started), ``true`` (the viewports before it, empty if
none moved).

A link whose messages are bounded (PostgreSQL's NOTIFY) passes
``max_bytes``: a run of events or a presence message longer than that goes
as several messages, in order (a heartbeat as one ``full`` part and the
rest as changes; users before cursors before viewports, so a part's cursor
or viewport never comes before its user's entry); what cannot be cut to
fit (one event alone) goes as a *lost* marker ``["lost", 1, node]``, which
has the receiving room read its log from its head, as for a hole in the
seqs.  Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import cbor2

from protocols import Event, ProtocolError, Viewport, from_wire, to_wire

from ..domain.cluster_presence import PresenceOut, RemotePresence
from ..domain.room import to_event
from ..store import StoredEvent

__all__ = [
    "BrokerMessageError",
    "Lost",
    "Remote",
    "channel_for",
    "decode_events",
    "decode_message",
    "encode_events",
    "encode_lost",
    "encode_presence",
    "encode_presence_parts",
]

WIRE_VERSION: Final = 1
PRESENCE: Final = "presence"
LOST: Final = "lost"
STATUSES: Final = frozenset({"active", "idle", "away"})


class BrokerMessageError(ValueError):
    """A broker message that is not one of ours (or not of this version)."""


@attrs.frozen
class Remote:
    """A room's events committed by daemon ``node``, in seq order."""

    node: str
    events: tuple[StoredEvent, ...]


@attrs.frozen
class Lost:
    """Daemon ``node`` committed events of the room that did not fit in a
    broker message: the room reads its log."""

    node: str


def channel_for(prefix: str, room: str) -> str:
    """The broker channel of ``room``'s events."""
    return f"{prefix}room:{room}"


def encode_events(
    node: str, events: Sequence[StoredEvent], *, max_bytes: int | None = None
) -> list[bytes]:
    """``events`` (one room's, in seq order) as broker messages: one per
    run of one epoch (a log reset starts another), cut into several in seq
    order where a run is longer than ``max_bytes`` (an event longer than
    that alone: a :func:`encode_lost` marker in its place)."""
    payloads: list[bytes] = []
    run: list[dict[str, Any]] = []
    epoch: str | None = None
    for stored in events:
        if epoch is not None and stored.epoch != epoch and run:
            payloads += _fitted(node, epoch, run, max_bytes)
            run = []
        epoch = stored.epoch
        run.append(to_wire(to_event(stored)))
    if run and epoch is not None:
        payloads += _fitted(node, epoch, run, max_bytes)
    return payloads


def _fitted(node: str, epoch: str, run: list[dict[str, Any]], max_bytes: int | None) -> list[bytes]:
    payload = cbor2.dumps([WIRE_VERSION, node, epoch, run])
    if max_bytes is None or len(payload) <= max_bytes:
        return [payload]
    if len(run) == 1:
        return [encode_lost(node)]
    half = len(run) // 2
    return _fitted(node, epoch, run[:half], max_bytes) + _fitted(node, epoch, run[half:], max_bytes)


def encode_lost(node: str) -> bytes:
    """The marker of events ``node`` committed that no message could hold."""
    return cbor2.dumps([LOST, WIRE_VERSION, node])


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


def encode_presence(node: str, out: PresenceOut) -> bytes:
    """``out`` as a broker message on its board room's channel."""
    cursors = [[uid, x, y] for uid, (x, y) in sorted(out.cursors.items())]
    value: list[Any] = [PRESENCE, WIRE_VERSION, node, out.full, dict(out.users), cursors]
    if out.viewports or out.ask:
        value.append(
            [[uid, v.x, v.y, v.w, v.h, v.zoom] for uid, v in sorted(out.viewports.items())]
        )
    if out.ask:
        value.append(True)
    return cbor2.dumps(value)


def encode_presence_parts(node: str, out: PresenceOut, *, max_bytes: int | None) -> list[bytes]:
    """``out`` as broker messages of at most ``max_bytes``: one if it fits,
    else its users, cursors and viewports cut in that order (a heartbeat's
    first part ``full``, the others changes, which add up to the same
    facepile when taken in order); a part that cannot be cut to fit is a
    lost marker."""
    payload = encode_presence(node, out)
    if max_bytes is None or len(payload) <= max_bytes:
        return [payload]
    items: list[tuple[int, str, Any]] = [
        *((0, uid, e) for uid, e in out.users.items()),
        *((1, uid, xy) for uid, xy in out.cursors.items()),
        *((2, uid, v) for uid, v in out.viewports.items()),
    ]
    if len(items) <= 1:
        return [encode_lost(node)]
    half = len(items) // 2
    first = _presence_part(out, out.full, items[:half], ask=out.ask)
    rest = _presence_part(out, False, items[half:])
    return encode_presence_parts(node, first, max_bytes=max_bytes) + encode_presence_parts(
        node, rest, max_bytes=max_bytes
    )


def _presence_part(
    out: PresenceOut, full: bool, items: list[tuple[int, str, Any]], *, ask: bool = False
) -> PresenceOut:
    users = {uid: value for kind, uid, value in items if kind == 0}
    cursors = {uid: value for kind, uid, value in items if kind == 1}
    viewports = {uid: value for kind, uid, value in items if kind == 2}
    return PresenceOut(out.board, full, users, cursors, viewports, ask)


def decode_message(room: str, payload: bytes) -> Remote | RemotePresence | Lost:
    """A broker message on ``room``'s channel: its events, (a board's)
    presence, or a lost marker.  Raises :class:`BrokerMessageError` for
    anything else."""
    try:
        value = cbor2.loads(payload)
    except Exception as exc:
        raise BrokerMessageError(f"not CBOR: {exc}") from None
    if isinstance(value, list) and value[:1] == [PRESENCE]:
        return _presence(room, value)
    if isinstance(value, list) and value[:1] == [LOST]:
        if len(value) != 3 or value[1] != WIRE_VERSION or not isinstance(value[2], str):
            raise BrokerMessageError("not a version 1 lost marker")
        return Lost(value[2])
    return decode_events(room, payload)


def _presence(room: str, value: list[Any]) -> RemotePresence:
    if not room.startswith("board:"):
        raise BrokerMessageError(f"presence on {room!r}, not a board")
    if len(value) not in (6, 7, 8) or value[1] != WIRE_VERSION:
        raise BrokerMessageError("not a version 1 presence message")
    _, _, node, full, users, cursors = value[:6]
    ask = value[7] if len(value) == 8 else False
    if not isinstance(node, str) or not isinstance(full, bool) or not isinstance(ask, bool):
        raise BrokerMessageError("malformed presence message")
    if not isinstance(users, dict) or not isinstance(cursors, list):
        raise BrokerMessageError("malformed presence message")
    entries: dict[str, dict[str, Any] | None] = {}
    for uid, entry in users.items():
        if not isinstance(uid, str) or not (entry is None or _is_entry(uid, entry)):
            raise BrokerMessageError(f"a bad presence entry for {uid!r}")
        entries[uid] = entry
    moved: dict[str, tuple[float, float]] = {}
    for item in cursors:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise BrokerMessageError("a bad cursor")
        x, y = item[1], item[2]
        if not all(_finite(v) for v in (x, y)):
            raise BrokerMessageError("a cursor that is not two finite numbers")
        moved[item[0]] = (float(x), float(y))
    viewports: dict[str, Viewport] = {}
    looked = value[6] if len(value) >= 7 else []
    if not isinstance(looked, list):
        raise BrokerMessageError("malformed presence message")
    for item in looked:
        if not (isinstance(item, list) and len(item) == 6 and isinstance(item[0], str)):
            raise BrokerMessageError("a bad viewport")
        if not all(_finite(v) for v in item[1:]):
            raise BrokerMessageError("a viewport that is not five finite numbers")
        x, y, w, h, zoom = (float(v) for v in item[1:])
        viewports[item[0]] = Viewport(x, y, w, h, zoom)
    board = room.removeprefix("board:")
    return RemotePresence(node, board, full, entries, moved, viewports, ask)


def _is_entry(uid: str, entry: Any) -> bool:
    """A facepile entry as ``domain.presence`` makes them."""
    if not isinstance(entry, Mapping):
        return False
    return (
        set(entry) == {"user_id", "name", "color", "status", "view", "typing"}
        and entry["user_id"] == uid
        and isinstance(entry["name"], str)
        and isinstance(entry["color"], str)
        and entry["status"] in STATUSES
        and (entry["view"] is None or isinstance(entry["view"], str))
        and isinstance(entry["typing"], bool)
    )


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
