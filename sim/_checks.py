"""The invariants checked once the quiet phase is over (the ones checked as
the run goes live in the client, the monitor and the network).

* ``mirror``: every client's mirror of every room it is in equals the
  room as the store has it;
* ``liveness``: every client is connected and live in its rooms, at the
  room's head, within the quiet phase's bound;
* ``log``: every event a client applied is in the server's log, same seq,
  same epoch, same content (so nothing a crash took back was ever shown);
* ``ack``: every acknowledged write is in the store: its event at the seq
  the answer named, its row for creates, its chunk in the message;
* ``stream``: each streamed message holds its acknowledged chunks, in the
  order they were sent, none twice, none that definitely failed;
* ``lww``: for conflicting renames, the session's title stamp is at least
  the stamp of every acknowledged rename (a later stamp never loses);
* ``presence``: on every board, every client in the board's room shows the
  same facepile, holding exactly the users with a connected window that
  looks at the board (offline users gone, statuses equal everywhere);
* ``merge``: a merged chunk event covering ``seq..last_seq`` holds exactly
  that many chunks, and every chunk whose write was answered with its seq;
* ``once``: no write ran twice: its events (which carry its ``temp_id``)
  are in each room's log once, also for a write sent again under its
  idempotency key after its connection dropped.

And the server's claims, checked as the frames arrive (:class:`ServerClaims`,
fed by the simulated client before its protocol machine sees a frame; the
machine would hide a wrong claim: it resumes from ``min(last, resume_from -
1)`` and turns a recovery it does not believe into a reload):

* ``claim``: ``lagged.resume_from`` is exactly the first seq of the room the
  connection did not deliver (the last seq it delivered, plus one);
  ``joined.seq`` is the room's head at the join: not below a seq the
  room already delivered to this client in that epoch, not above what the
  store has committed; ``recovered: true`` answers a join that asked for
  ``since`` in that very epoch, at or past it (the events after ``since``
  must then follow with no gap: the client's order check).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
import sqlalchemy as sa

from agor_actors.domain.room import to_event
from agor_actors.store import SqlStore, StoredEvent
from protocols import (
    ClientConnection,
    Event,
    Joined,
    Lagged,
    ProtocolError,
    RoomStatus,
    decode_server_frame,
)
from protocols._codec import Frame

from ._client import SimClient
from ._model import View, log_room, server_view
from ._record import Recorder, WriteRecord, event_digest

__all__ = [
    "Reset",
    "Resets",
    "ServerClaims",
    "check_acknowledged",
    "check_log",
    "check_merged",
    "check_mirrors",
    "check_once",
    "check_presence",
    "check_renames",
    "check_seqs",
    "check_streams",
    "presence_problems",
    "room_log",
]

EVENT_SERVICES = ("sessions", "tasks", "messages")


def room_log(store: SqlStore, room: str) -> dict[int, StoredEvent]:
    out: dict[int, StoredEvent] = {}
    after = 0
    while True:
        page = store.events_since(room, after, 1000)
        if not page:
            return out
        for event in page:
            out[event.seq] = event
        after = page[-1].end_seq


def _diff(a: Any, b: Any, path: str = "") -> str:
    """The first difference between two views, for the report."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a:
                return f"{path}/{key}: missing in the mirror (store: {b[key]!r:.120})"
            if key not in b:
                return f"{path}/{key}: not in the store (mirror: {a[key]!r:.120})"
            if a[key] != b[key]:
                return _diff(a[key], b[key], f"{path}/{key}")
        return f"{path}: equal"
    return f"{path}: mirror {a!r:.160} != store {b!r:.160}"


def check_mirrors(
    store: SqlStore, clients: Iterable[SimClient], recorder: Recorder, views: dict[str, View]
) -> None:
    for client in clients:
        for room in client.wanted:
            mirror = client.mirrors.get(room)
            if mirror is None or mirror.view is None or mirror.reloading:
                continue  # reported by the liveness check
            if room not in views:
                views[room] = server_view(store, room)
            if mirror.view != views[room]:
                recorder.violate(
                    "mirror",
                    client.name,
                    f"{room} differs from the store: {_diff(mirror.view, views[room])}",
                )


@attrs.frozen
class Reset:
    """A room's log reset by an ``epoch_reset`` fault: when, and the log
    of the epoch it ended (kept for the checks)."""

    at_us: int
    room: str
    epoch: str
    log: dict[int, StoredEvent]


Resets = dict[str, list[Reset]]
"""Per room, its resets in time order."""


def _logs_since(
    store: SqlStore,
    logs: dict[str, dict[int, StoredEvent]],
    resets: Resets | None,
    room: str,
    sent_us: int,
) -> list[dict[int, StoredEvent]]:
    """The logs a write sent at ``sent_us`` may have gone into: that of the
    epoch the room was in then, first, and those of the epochs after it (a
    write under an idempotency key is sent again after its connection
    dropped, maybe after the room's log was reset)."""
    later = [reset.log for reset in (resets or {}).get(room, ()) if reset.at_us > sent_us]
    return [*later, _current_log(store, logs, room)]


def _current_log(
    store: SqlStore, logs: dict[str, dict[int, StoredEvent]], room: str
) -> dict[int, StoredEvent]:
    """``room``'s log as the store has it now (read once per run)."""
    log = logs.get(room)
    if log is None:
        log = logs[room] = room_log(store, room)
    return log


def check_log(
    store: SqlStore,
    recorder: Recorder,
    logs: dict[str, dict[int, StoredEvent]],
    resets: Resets | None = None,
) -> None:
    for (client, room), applied in recorder.applied.items():
        shown = log_room(room)  # an activity stream shows its board's log
        log = _current_log(store, logs, shown)
        head = store.room_head(shown)
        epoch = head[0] if head is not None else ""
        ended = {r.epoch: r.log for r in (resets or {}).get(shown, ())}
        for item in applied:
            # an event applied before the log was reset is in the log it had
            stored = ended.get(item.epoch, log).get(item.seq)
            if stored is None:
                recorder.violate(
                    "log", client, f"{room}: applied seq {item.seq} is not in the server's log"
                )
                break
            event = to_event(stored, room)  # an activity entry for an activity stream
            if stored.end_seq != item.end or event_digest(event) != item.digest:
                recorder.violate(
                    "log",
                    client,
                    f"{room}: applied seq {item.seq}..{item.end} differs from the log's "
                    f"{stored.seq}..{stored.end_seq} {stored.event}",
                )
                break
            if item.epoch and item.epoch != epoch and item.epoch not in ended:
                recorder.violate(
                    "log", client, f"{room}: applied seq {item.seq} of epoch {item.epoch}"
                )
                break


def check_seqs(store: SqlStore, recorder: Recorder) -> None:
    """No seq assigned twice (the multi-node runs' check), in two places:

    - the store's log: in every room, the events' seq ranges (a merged
      event covers ``seq..last_seq``) follow one another from 1 to the
      room's head, each seq covered once, all of the room's epoch;
    - what the clients saw: two clients (or one, twice) that applied
      different events, or one event with different ranges, at one
      ``(room, epoch, seq)``."""
    with store.engine.connect() as conn:
        heads = conn.execute(sa.text("SELECT room, epoch, head_seq FROM rooms ORDER BY room")).all()
        for room, epoch, head in heads:
            rows = conn.execute(
                sa.text("SELECT seq, last_seq, epoch FROM events WHERE room = :room ORDER BY seq"),
                {"room": room},
            ).all()
            expected = 1
            for seq, last_seq, row_epoch in rows:
                end = last_seq if last_seq is not None else seq
                if seq != expected or end < seq or row_epoch != epoch:
                    what = "taken twice" if seq < expected else "not where the last ended"
                    recorder.violate(
                        "seq",
                        "store",
                        f"{room}: event {seq}..{end} (epoch {row_epoch}) {what}: "
                        f"expected seq {expected} of epoch {epoch}",
                    )
                    break
                expected = end + 1
            else:
                if expected - 1 != head:
                    recorder.violate(
                        "seq",
                        "store",
                        f"{room}: the log ends at {expected - 1}, the head is {head}",
                    )
    seen: dict[tuple[str, str, int], tuple[bytes, int, str]] = {}
    reported: set[tuple[str, str, int]] = set()
    for (client, room), applied in sorted(recorder.applied.items()):
        for item in applied:
            key = (room, item.epoch, item.seq)
            first = seen.setdefault(key, (item.digest, item.end, client))
            if first[:2] != (item.digest, item.end) and key not in reported:
                reported.add(key)
                recorder.violate(
                    "seq",
                    client,
                    f"{room}: seq {item.seq} of epoch {item.epoch} was another event for "
                    f"{first[2]} (seq assigned twice)",
                )


def _event_for(log: dict[int, StoredEvent], seq: int) -> StoredEvent | None:
    event = log.get(seq)
    if event is not None:
        return event
    for candidate in log.values():  # a merged event covering seq
        if candidate.seq <= seq <= candidate.end_seq:
            return candidate
    return None


def check_acknowledged(
    store: SqlStore,
    recorder: Recorder,
    logs: dict[str, dict[int, StoredEvent]],
    resets: Resets | None = None,
) -> None:
    for record in recorder.writes.values():
        if record.outcome != "ok":
            continue
        result = record.result if isinstance(record.result, dict) else {}
        if record.service in ("tasks", "messages", "sessions") and record.method == "create":
            table = record.service
            ident = result.get("id")
            if not isinstance(ident, str) or store.get(table, ident) is None:
                recorder.violate(
                    "ack", record.client, f"{record.wid} {table}.create acknowledged, row missing"
                )
                continue
        if record.service not in EVENT_SERVICES:
            if record.service == "boards" and store.get("boards", str(record.target)) is None:
                recorder.violate("ack", record.client, f"{record.wid}: the board is gone")
            continue
        seq = result.get("_seq")
        if seq is None:
            if "_lost" not in result:
                recorder.violate(
                    "ack",
                    record.client,
                    f"{record.wid} {record.service}.{record.method} acknowledged without the "
                    "seq of a durable event",
                )
            continue
        room = f"session:{record.session_id}"
        found = [
            _event_for(log, seq) for log in _logs_since(store, logs, resets, room, record.sent_us)
        ]
        event = next((e for e in found if e is not None and e.temp_id == record.wid), found[0])
        merged = event is not None and event.last_seq is not None
        if event is None or (event.temp_id != record.wid and not merged):
            recorder.violate(
                "ack",
                record.client,
                f"{record.wid} {record.service}.{record.method} acknowledged at {room} seq {seq}, "
                f"but the log has {'nothing' if event is None else event.temp_id} there",
            )


def check_once(store: SqlStore, recorder: Recorder) -> None:
    """No write ran twice: no event of a write (named by its ``temp_id``)
    is twice in its room's log."""
    rooms = sorted(
        {
            f"session:{record.session_id}"
            for record in recorder.writes.values()
            if record.session_id is not None
        }
    )
    for room in rooms:
        seen: dict[tuple[str, str], int] = {}
        for seq, event in room_log(store, room).items():
            record = recorder.writes.get(event.temp_id or "")
            if record is None:
                continue
            first = seen.setdefault((event.event, record.wid), seq)
            if first != seq:
                recorder.violate(
                    "once",
                    record.client,
                    f"{record.wid} {record.service}.{record.method} ran twice: {event.event} "
                    f"at {room} seq {first} and {seq}",
                )


def check_streams(store: SqlStore, recorder: Recorder) -> None:
    chunks: dict[str, list[WriteRecord]] = {}
    for record in recorder.writes.values():
        if record.service == "messages" and record.method == "stream" and record.target:
            chunks.setdefault(record.target, []).append(record)
    for mid, records in chunks.items():
        row = store.get("messages", mid)
        if row is None:
            recorder.violate("stream", records[0].client, f"message {mid} is gone")
            continue
        tokens = [t for t in str(row["content"]).split(";") if t]
        sends: dict[str, list[WriteRecord]] = {}  # a chunk sent again (``at``): each send
        for record in records:
            sends.setdefault(str(record.data["chunk"]).rstrip(";"), []).append(record)
        order = {token: i for i, token in enumerate(sends)}  # in the order first sent
        seen: list[int] = []
        for token in tokens:
            index = order.get(token)
            if index is None:
                recorder.violate("stream", records[0].client, f"{mid}: unknown chunk {token!r}")
                break
            seen.append(index)
        if seen != sorted(set(seen)):
            recorder.violate(
                "stream", records[0].client, f"{mid}: chunks out of order or twice: {tokens}"
            )
            continue
        present = set(tokens)
        for token, sent in sends.items():
            acknowledged = next((r for r in sent if r.outcome == "ok"), None)
            if acknowledged is not None and token not in present:
                recorder.violate(
                    "stream",
                    acknowledged.client,
                    f"{acknowledged.wid}: acknowledged chunk missing in {mid}",
                )
                break
            if token in present and all(r.outcome == "failed" for r in sent):
                # every send refused (a resend refused as ``conflict`` too:
                # it wrote nothing), yet the chunk is there
                recorder.violate(
                    "stream", sent[-1].client, f"{sent[-1].wid}: a refused chunk is in {mid}"
                )
                break
        exact = recorder.exact_streams.get(mid)
        if exact is not None:
            streamed, landed = exact
            wanted = [c.rstrip(";") for c in streamed]
            if tokens != wanted[: len(tokens)] or len(tokens) < landed:
                recorder.violate(
                    "stream",
                    records[0].client,
                    f"{mid}: streamed with offsets, {landed} landed: {tokens} is not a"
                    f" gap-free prefix of {wanted}",
                )


def _stamp(text: str) -> tuple[int, int, str]:
    wall, counter, writer = text.split(":", 2)
    return int(wall), int(counter), writer


def check_renames(store: SqlStore, recorder: Recorder) -> None:
    best: dict[str, WriteRecord] = {}
    for record in recorder.writes.values():
        if record.stamp is None or record.outcome != "ok" or record.session_id is None:
            continue
        if "title" not in (record.data or {}):
            continue
        current = best.get(record.session_id)
        if current is None or (current.stamp is not None and record.stamp > current.stamp):
            best[record.session_id] = record
    for sid, record in best.items():
        row = store.get("sessions", sid)
        if row is None:
            continue
        clocks = row.get("clocks") or {}
        text = clocks.get("title")
        assert record.stamp is not None
        if text is None or _stamp(text) < record.stamp:
            recorder.violate(
                "lww",
                record.client,
                f"session {sid}: acknowledged rename {record.wid} stamped {record.stamp} "
                f"lost to the older stamp {text} (title now {row.get('title')!r})",
            )


def presence_problems(clients: list[SimClient]) -> list[tuple[str, str]]:
    """Presence converges: on each board, every client in the board's room
    shows the same facepile, and it holds exactly the users that have a
    connected client announcing that board (offline users are gone)."""
    problems: list[tuple[str, str]] = []
    expected: dict[str, set[str]] = {}
    for client in clients:
        if client.presence_board is not None and client.is_open:
            expected.setdefault(client.presence_board, set()).add(client.user_id)
    shown: dict[str, tuple[str, dict[str, Any]]] = {}
    for client in clients:
        for room in client.wanted:
            kind, board = room.split(":", 1)
            if kind != "board":
                continue
            pile = client.facepiles.get(board, {})
            want = expected.get(board, set())
            if set(pile) != want:
                problems.append(
                    (
                        client.name,
                        f"board {board}: facepile {sorted(pile)} but connected users {sorted(want)}",
                    )
                )
                continue
            first = shown.setdefault(board, (client.name, pile))
            if first[1] != pile:
                problems.append(
                    (
                        client.name,
                        f"board {board}: facepile differs from {first[0]}'s: {_diff(pile, first[1])}",
                    )
                )
    return problems


def check_presence(clients: list[SimClient], recorder: Recorder) -> None:
    for who, problem in presence_problems(clients):
        recorder.violate("presence", who, problem)
    for client in clients:
        recorder.count("presence_frames", client.presence_frames)


def check_merged(
    store: SqlStore,
    recorder: Recorder,
    logs: dict[str, dict[int, StoredEvent]],
    resets: Resets | None = None,
) -> None:
    """A merged chunk event covers ``seq..last_seq``: it holds exactly that
    many chunks (each streamed chunk is one ``;``-terminated token and takes
    one seq), and each chunk write answered with that ``seq`` is one of
    them, in the order they were sent."""
    answered: dict[tuple[str, int], list[WriteRecord]] = {}
    for record in recorder.writes.values():
        if record.service != "messages" or record.method != "stream" or record.outcome != "ok":
            continue
        seq = record.result.get("_seq") if isinstance(record.result, dict) else None
        room = f"session:{record.session_id}"
        if any(r.at_us > record.sent_us for r in (resets or {}).get(room, ())):
            continue  # its log was reset since (merged events are checked in the current log)
        if isinstance(seq, int) and record.session_id is not None:
            answered.setdefault((f"session:{record.session_id}", seq), []).append(record)
    rooms = {room for room, _ in answered}
    rooms.update(room for room in logs if room.startswith("session:"))
    for room in sorted(rooms):
        log = _current_log(store, logs, room)
        for event in log.values():
            if event.last_seq is None or not isinstance(event.data, dict):
                continue
            chunk = event.data.get("chunk")
            if not isinstance(chunk, str):
                continue
            recorder.count("claims:merged")
            tokens = [t for t in chunk.split(";") if t]
            span = event.last_seq - event.seq + 1
            if len(tokens) != span:
                recorder.violate(
                    "merge",
                    "store",
                    f"{room}: merged event {event.seq}..{event.last_seq} covers {span} seqs "
                    f"but holds {len(tokens)} chunks",
                )
                continue
            writes = answered.get((room, event.seq), [])
            mine = [str(w.data["chunk"]).rstrip(";") for w in writes]
            positions = [tokens.index(t) if t in tokens else -1 for t in mine]
            if -1 in positions or positions != sorted(positions):
                recorder.violate(
                    "merge",
                    writes[0].client if writes else "store",
                    f"{room}: merged event {event.seq}..{event.last_seq} holds {tokens}, "
                    f"not the chunks answered with its seq in order: {mine}",
                )


def _mentions(frame: Frame) -> bool:
    if isinstance(frame, str):
        return "joined" in frame or "lagged" in frame
    return b"joined" in frame or b"lagged" in frame


class ServerClaims:
    """Checks ``joined`` and ``lagged`` against what the connection
    delivered, frame by frame, before the client's machine sees the frame.
    Only frames that mention either are decoded (a substring test costs
    next to nothing).  ``head_of(room)`` is the store's committed
    ``(epoch, head)`` as the daemon's store object remembers it (no I/O;
    None when it does not know)."""

    def __init__(
        self, recorder: Recorder, head_of: Callable[[str], tuple[str, int] | None]
    ) -> None:
        self._recorder = recorder
        self._head_of = head_of
        self.checked = 0

    def frame(self, client: str, machine: ClientConnection, frame: Frame) -> None:
        if not _mentions(frame):
            return
        try:
            messages = decode_server_frame(machine.codec, frame, machine.limits)
        except ProtocolError:
            return  # the machine reports it
        # the rooms as the machine will see them while it goes through the frame
        live: dict[str, int | None] = {}  # room -> last delivered seq while live, else None

        def last(room: str) -> int | None:
            if room not in live:
                track = machine.rooms.get(room)
                live[room] = (
                    track.seq if track is not None and track.status is RoomStatus.LIVE else None
                )
            return live[room]

        for message in messages:
            if isinstance(message, Event):
                seen = last(message.room)
                if seen is None or message.end_seq <= seen:
                    continue
                live[message.room] = message.end_seq if message.seq == seen + 1 else None
            elif isinstance(message, Lagged):
                seen = last(message.room)
                if seen is not None:
                    self._lagged(client, message, seen)
                live[message.room] = None
            elif isinstance(message, Joined):
                self._joined(client, machine, message)
                live[message.room] = machine.seq_after_joined(message)

    def _lagged(self, client: str, lagged: Lagged, delivered: int) -> None:
        self.checked += 1
        self._recorder.count("claims:lagged")
        if lagged.resume_from != delivered + 1:
            self._recorder.violate(
                "claim",
                client,
                f"{lagged.room}: lagged resume_from {lagged.resume_from}, but the first seq "
                f"not delivered is {delivered + 1}",
            )

    def _joined(self, client: str, machine: ClientConnection, joined: Joined) -> None:
        self.checked += 1
        self._recorder.count("claims:joined")
        room = joined.room
        track = machine.rooms.get(room)
        if track is None or track.status is RoomStatus.LEAVING:
            return  # the answer to a join the client no longer wants
        if track.epoch == joined.epoch and track.seq is not None and joined.seq < track.seq:
            self._recorder.violate(
                "claim",
                client,
                f"{room}: joined at seq {joined.seq}, but the room delivered up to {track.seq} "
                f"in epoch {joined.epoch} before",
            )
        head = self._head_of(room)
        if head is not None and head[0] == joined.epoch and joined.seq > head[1]:
            self._recorder.violate(
                "claim",
                client,
                f"{room}: joined at seq {joined.seq}, past the store's head {head[1]}",
            )
        if joined.recovered:
            asked = track.requested_since
            if asked is None and track.status is RoomStatus.JOINING and track.seq is None:
                self._recorder.violate(
                    "claim", client, f"{room}: recovered: true for a join without since"
                )
            elif asked is not None and (asked.epoch != joined.epoch or joined.seq < asked.seq):
                self._recorder.violate(
                    "claim",
                    client,
                    f"{room}: recovered: true at {joined.epoch}/{joined.seq} for a join since "
                    f"{asked.epoch}/{asked.seq}",
                )
