"""A room's resources kept up to date from its events.

:func:`apply_event` is the whole rule set, a plain function over plain dicts
(no I/O), so that a test (or another client) can check it without a server.
:class:`Mirror` wraps it for one room: the resources by service and id, the
room's epoch and last applied seq, optimistic copies awaiting their write,
and the buffering of events while the room's state is reloaded.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, Final

import trio

from protocols import Event

__all__ = ["RESOURCE_SERVICES", "Mirror", "Resources", "apply_event"]

Resources = dict[str, dict[str, dict[str, Any]]]
"""Resources by service (``sessions``, ``tasks``...) and id."""

RESOURCE_SERVICES: Final[Mapping[str, str]] = {
    "board": "boards",
    "session": "sessions",
    "task": "tasks",
    "message": "messages",
    "tool_call": "tool_calls",
    "user": "users",
}
"""The resource an event names (the part before ``:``, or a key of its data
holding a whole resource) and the service it belongs to."""

_DELETED: Final = frozenset({"deleted", "removed"})
_CASCADE: Final[Mapping[str, tuple[str, tuple[str, ...]]]] = {
    # deleting one of these deletes what refers to it (as the store does)
    "sessions": ("session_id", ("tasks", "messages", "tool_calls")),
    "tasks": ("task_id", ("messages", "tool_calls")),
}


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    """A resource as the mirror keeps it: without the server's ``_`` extras
    (``_seq``, ``_lost``)."""
    return {key: value for key, value in row.items() if not key.startswith("_")}


def _merge(resources: Resources, service: str, row: Mapping[str, Any]) -> None:
    table = resources.setdefault(service, {})
    ident = row["id"]
    current = table.get(ident)
    if current is None:
        table[ident] = _public(row)
    else:
        current.update(_public(row))


def _remove(resources: Resources, service: str, ident: str) -> None:
    table = resources.get(service)
    if table is not None:
        table.pop(ident, None)
    cascade = _CASCADE.get(service)
    if cascade is None:
        return
    key, dependents = cascade
    for dependent in dependents:
        rows = resources.get(dependent)
        if not rows:
            continue
        for child in [i for i, r in rows.items() if r.get(key) == ident]:
            _remove(resources, dependent, child)


def _touch(row: dict[str, Any], ts: int | None) -> None:
    if ts is not None and "updated_at" in row:
        row["updated_at"] = ts


def _append_chunk(message: dict[str, Any], chunk: str, offset: Any) -> None:
    """Append a streamed chunk.  With ``offset`` (the content's length before
    the chunk) a chunk already contained is not appended twice."""
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    if isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0:
        if offset + len(chunk) <= len(text):
            return  # already there (a reload included it)
        message["content"] = text[:offset] + chunk
    else:
        message["content"] = text + chunk
    message["streaming"] = True


def apply_event(
    resources: Resources,
    name: str,
    data: Any,
    temp_id: str | None = None,
    ts: int | None = None,
) -> None:
    """Apply one event to ``resources`` in place.

    * a whole resource in the data (``{"task": {...}}``, ``{"session": {...}}``,
      ``{"tool_call": {...}}``...) is merged in by its ``id`` (created or
      updated), replacing the optimistic copy named by ``temp_id``;
    * ``<resource>:deleted`` (or ``:removed``) removes ``<resource>_id`` and
      what refers to it;
    * ``task:message`` with ``message_id``: ``chunk`` appends to the message's
      content, ``deleted`` removes it, other fields are merged;
    * ``git:state_changed`` sets the session's ``git_state``;
    * otherwise the event's ``updates`` (or its other fields) are merged into
      ``<resource>_id`` if the mirror has it (``rev`` too).

    A partial change also sets the resource's ``updated_at`` to the event's
    ``ts`` (the daemon stamps both with the write's time), so that a mirror
    equals what a reload returns.  Unknown events change nothing.
    """
    if not isinstance(data, dict):
        return
    prefix, _, action = name.partition(":")
    whole = False
    for key, service in RESOURCE_SERVICES.items():
        value = data.get(key)
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            if temp_id is not None:
                resources.get(service, {}).pop(temp_id, None)
            _merge(resources, service, value)
            whole = True
    if whole:
        return
    if name == "task:message":
        message_id = data.get("message_id")
        if not isinstance(message_id, str):
            return
        if data.get("deleted") is True:
            _remove(resources, "messages", message_id)
            return
        message = resources.get("messages", {}).get(message_id)
        if message is None:
            return
        _touch(message, ts)
        chunk = data.get("chunk")
        if isinstance(chunk, str):
            _append_chunk(message, chunk, data.get("offset"))
        for key, value in data.items():
            if key not in ("chunk", "offset", "message_id", "task_id"):
                message[key] = value
        return
    if name == "git:state_changed":
        session_id = data.get("session_id")
        session = (
            resources.get("sessions", {}).get(session_id) if isinstance(session_id, str) else None
        )
        if session is not None:
            session["git_state"] = data.get("git_state")
            _touch(session, ts)
        return
    target = RESOURCE_SERVICES.get(prefix)
    ident = data.get(f"{prefix}_id")
    if target is None or not isinstance(ident, str):
        return
    if action in _DELETED:
        _remove(resources, target, ident)
        return
    current = resources.get(target, {}).get(ident)
    if current is None:
        return
    _touch(current, ts)
    updates = data.get("updates")
    if isinstance(updates, dict):
        current.update(updates)
        if isinstance(data.get("rev"), int):
            current["rev"] = data["rev"]
    else:
        for key, value in data.items():
            if key != f"{prefix}_id":
                current[key] = value


class Mirror:
    """The local state of one joined room, kept by the client.

    Read it with :meth:`get`, :meth:`items` or :meth:`snapshot`; wait for a
    condition with :meth:`wait_until`.  The client applies every event of
    the room exactly once, in seq order; after a ``recovered: false`` join it
    reloads the room's resources (events that arrive meanwhile are applied on
    top, once the reload is in).  Optimistic copies (a ``create`` with a
    ``temp_id`` not answered yet) are kept under their ``temp_id`` with
    ``"_pending": True`` and replaced by the real resource.
    """

    def __init__(self, room: str) -> None:
        self.room = room
        self.resources: Resources = {}
        self.epoch: str | None = None
        self.seq = 0
        """The last seq applied."""
        self.reloads = 0
        self.applied = 0
        self.version = 0
        """Bumped on every change."""
        self.ready = trio.Event()
        """Set once the room is joined and its state loaded."""
        self.left_reason: str | None = None
        """Set when the client is no longer in the room (``left`` or an
        error code: the join was refused, access was revoked)."""
        self.left_message: str | None = None
        """Why, in words, when the server said (a refused join)."""
        self._reloading = False
        self._buffer: list[Event] = []
        self._pending: dict[str, tuple[str, dict[str, Any]]] = {}
        self._lot = trio.lowlevel.ParkingLot()

    # ------------------------------------------------------------- reading

    def get(self, service: str, id: str) -> dict[str, Any] | None:
        return self.resources.get(service, {}).get(id)

    def items(self, service: str) -> dict[str, dict[str, Any]]:
        """The resources of ``service`` by id (a shallow copy)."""
        return dict(self.resources.get(service, {}))

    def snapshot(self) -> Resources:
        """A deep copy of the resources, without empty services."""
        return {service: copy.deepcopy(rows) for service, rows in self.resources.items() if rows}

    @property
    def reloading(self) -> bool:
        return self._reloading

    async def wait_until(self, predicate: Callable[[Mirror], bool]) -> None:
        """Wait until ``predicate(self)`` holds (checked after every change).
        A checkpoint; cancel it with a timeout."""
        while not predicate(self):
            await self._lot.park()

    # ------------------------------------------------------------- changes

    def _changed(self) -> None:
        self.version += 1
        self._lot.unpark_all()

    def _apply(self, event: Event) -> None:
        """An event delivered by the protocol machine (once, in order)."""
        self.seq = event.end_seq
        if self._reloading:
            self._buffer.append(event)
            return
        apply_event(self.resources, event.event, event.data, event.temp_id, event.ts)
        if event.temp_id is not None:
            self._pending.pop(event.temp_id, None)
        self.applied += 1
        self._changed()

    def _joined(self, epoch: str, seq: int) -> None:
        self.epoch = epoch
        self.seq = seq
        self._changed()

    def _begin_reload(self, epoch: str, seq: int) -> None:
        self.epoch = epoch
        self.seq = seq
        self._reloading = True
        self._buffer.clear()

    def _finish_reload(self, resources: Resources) -> None:
        """The reloaded state (as of the reload's seq or later), then the
        events that arrived meanwhile, then the optimistic copies."""
        self.resources = {service: dict(rows) for service, rows in resources.items()}
        for event in self._buffer:
            apply_event(self.resources, event.event, event.data, event.temp_id, event.ts)
            if event.temp_id is not None:
                self._pending.pop(event.temp_id, None)
            self.applied += 1
        self._buffer.clear()
        for temp_id, (service, row) in self._pending.items():
            self.resources.setdefault(service, {})[temp_id] = dict(row)
        self._reloading = False
        self.reloads += 1
        self.ready.set()
        self._changed()

    def _left(self, reason: str, message: str | None = None) -> None:
        self.left_reason = reason
        self.left_message = message
        self.ready.set()
        self._changed()

    def _put_optimistic(self, service: str, temp_id: str, data: Mapping[str, Any]) -> None:
        row = {**data, "id": temp_id, "_pending": True}
        self._pending[temp_id] = (service, row)
        self.resources.setdefault(service, {})[temp_id] = dict(row)
        self._changed()

    def _settle(self, service: str, temp_id: str, row: Any) -> None:
        """The create named ``temp_id`` was answered: ``row`` replaces the
        optimistic copy (unless its event came first: the event is newer), or
        None (the create failed) drops it."""
        awaited = self._pending.pop(temp_id, None) is not None
        table = self.resources.setdefault(service, {})
        table.pop(temp_id, None)
        if (
            awaited
            and not self._reloading
            and isinstance(row, dict)
            and isinstance(row.get("id"), str)
            and row["id"] not in table
        ):
            table[row["id"]] = _public(row)
        self._changed()
