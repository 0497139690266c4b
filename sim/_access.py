"""The ``access`` workload: users other than the owner, with permissions
that the owner takes away mid-stream (issue 11, PROTOCOL.md "Permissions").

The owner (in-process, through the hub) creates two guests, a viewer and a
collaborator, shares a session with them (its ``permissions``) and a board
(as ``viewer`` / ``editor`` members).  The guests connect over the
simulated network like any client and join both rooms; the owner keeps
writing to both; the viewer keeps trying to write; at a drawn time the owner
revokes both guests (the session's permissions emptied, the members
removed).

Invariants, checked as the frames arrive:

* a viewer's write never succeeds (and is refused with ``forbidden``);
* a join to a made-up room and a join to a room the guest may not see are
  both answered ``left`` ``forbidden``: the answer does not tell which;
* once a revocation's write is acknowledged, nothing of the room reaches a
  revoked guest but events at or below the room's head at the
  acknowledgement (already on their way) and one ``left`` ``forbidden``;
  nothing at all after that ``left``, and no ``joined`` again;
* at the end, no revoked guest stands live in a revoked room.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from agor_actors.client import CallError
from agor_actors.daemon import Hub, Principal, ServiceError
from agor_actors.runtime import ActorExited, CallTimeout
from protocols import ClientConnection, Event, Joined, Left, ProtocolError, RoomStatus
from protocols._codec import Frame, decode_server_frame

from ._client import NotConnected, SimClient
from ._det import sleep
from ._record import Recorder
from ._trace import Trace

__all__ = ["GUESTS", "AccessWatch", "access"]

OWNER = Principal("owner", "owner", True)
GUESTS: Final = ("gv", "gc")
"""The guests' client names: a viewer and a collaborator."""
WRITE_PERIOD_S: Final = 0.3
TRANSIENT: Final = frozenset({"connection_lost", "timeout", "unavailable", "rate_limited"})
"""Call outcomes that say nothing about permissions."""


class AccessWatch:
    """What the guests may still receive, room by room, checked frame by
    frame before the client's machine sees the frame (the machine ignores
    events of a room it is not in, so only the wire shows them)."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self.revoked: dict[tuple[str, str], int] = {}
        """(guest, room) -> the room's head when the revocation was acknowledged."""
        self.left_seen: set[tuple[str, str]] = set()
        self.frames_checked = 0

    def revoke(self, guest: str, room: str, head: int) -> None:
        self.revoked[(guest, room)] = head

    def frame(self, guest: str, machine: ClientConnection, frame: Frame) -> None:
        if not any(g == guest for g, _ in self.revoked):
            return
        try:
            messages = decode_server_frame(machine.codec, frame, machine.limits)
        except ProtocolError:
            return  # the machine reports it
        self.frames_checked += 1
        for message in messages:
            room = getattr(message, "room", None)
            if not isinstance(room, str) or (guest, room) not in self.revoked:
                continue
            key = (guest, room)
            head = self.revoked[key]
            if isinstance(message, Left):
                # ``unavailable``: a node cut from the store could not check
                # the join; it refused it all the same (nothing is sent)
                if message.reason not in ("forbidden", "unavailable"):
                    self._violate(guest, f"{room}: left {message.reason!r} after revocation")
                elif message.reason == "unavailable":
                    self._recorder.count("access:left_unavailable")
                elif key not in self.left_seen:
                    self._recorder.count("access:left_revoked")
                self.left_seen.add(key)
            elif isinstance(message, Joined):
                # a join the server answered before the revocation took
                # effect may arrive after the owner heard of it (the frames
                # were on their way); after ``left``, or at a head past the
                # revocation's, it is a join the server let through
                if key in self.left_seen or message.seq > head:
                    self._violate(guest, f"{room}: joined again after revocation")
            elif isinstance(message, Event):
                if key in self.left_seen:
                    self._violate(guest, f"{room}: event seq {message.seq} after left forbidden")
                elif message.end_seq > head:
                    self._violate(
                        guest,
                        f"{room}: event seq {message.seq}..{message.end_seq} delivered "
                        f"after the revocation was acknowledged at head {head}",
                    )

    def still_live(self, guests: list[SimClient]) -> list[tuple[str, str]]:
        """The revoked (guest, room) pairs in which the guest still stands
        live.  The quiet phase waits for none to be left (a node that
        could not check a revocation, cut from the store until the faults
        stopped, checks it again a second later), as it waits for
        facepiles."""
        live: list[tuple[str, str]] = []
        for client in guests:
            rooms = {} if client.client is None else client.machine.rooms
            for (guest, room), _head in sorted(self.revoked.items()):
                track = rooms.get(room)
                if guest == client.name and track is not None and track.status is RoomStatus.LIVE:
                    live.append((guest, room))
        return live

    def final(self, guests: list[SimClient]) -> None:
        """No revoked guest stands live in a revoked room."""
        for guest, room in self.still_live(guests):
            self._violate(guest, f"{room}: still live after revocation")

    def _violate(self, guest: str, detail: str) -> None:
        self._recorder.violate("access", guest, detail)


async def _owner(
    wait_up: Callable[[], Awaitable[Hub]],
    service: str,
    method: str,
    *,
    removal: bool = False,
    **kw: Any,
) -> Any:
    """An owner's call, again after a crash or a store request refused by
    a fault (``invalid_data``), until it is answered.  A ``removal`` whose
    answer was lost after its commit (``unavailable``) finds, when tried
    again, the row already gone (``not_found``): that is its answer; a
    removal refused ``not_found`` before any such loss is not."""
    lost = False
    for _attempt in range(200):
        hub = await wait_up()
        try:
            return await hub.call(OWNER, connection_id=None, service=service, method=method, **kw)
        except ServiceError as exc:
            if removal and lost and exc.code == "not_found":
                return None
            if exc.code not in ("unavailable", "internal", "not_found", "invalid_data"):
                raise
            lost = lost or exc.code in ("unavailable", "internal")
        except (ActorExited, CallTimeout):
            lost = True  # a crash fault took the actor that was answering: again
        await sleep(0.05)
    raise RuntimeError(f"the owner's {service}.{method} was never answered")


async def _permissions(
    wait_up: Callable[[], Awaitable[Hub]], sid: str, permissions: dict[str, Any]
) -> None:
    """Set a session's permissions (a strict field: written with the
    revision just read, again on a conflict)."""
    for _attempt in range(100):
        record = await _owner(wait_up, "sessions", "get", id=sid)
        try:
            await _owner(
                wait_up,
                "sessions",
                "patch",
                id=sid,
                data={"permissions": permissions},
                base_rev=int(record["rev"]),
            )
            return
        except ServiceError as exc:
            if exc.code != "conflict":
                raise
    raise RuntimeError(f"the permissions of {sid} were never set")


async def access(
    *,
    wait_up: Callable[[], Awaitable[Hub]],
    make_guest: Callable[[str, str, str], Awaitable[SimClient]],
    watch: AccessWatch,
    head_of: Callable[[str], tuple[str, int] | None],
    fault_s: float,
    rng_seed: int,
    trace: Trace,
    recorder: Recorder,
) -> None:
    """Run the workload until cancelled (see the module's text)."""
    rng = random.Random(f"{rng_seed}/access")
    made = [await _owner(wait_up, "users", "create", data={"name": g}) for g in GUESTS]
    (v_token, viewer), (c_token, collab) = ((m["token"], m["id"]) for m in made)
    board = await _owner(wait_up, "boards", "create", data={"name": "shared"})
    bid = board["id"]
    await _owner(
        wait_up, "boards", "add_member", id=bid, data={"user_id": viewer, "role": "viewer"}
    )
    await _owner(
        wait_up, "boards", "add_member", id=bid, data={"user_id": collab, "role": "editor"}
    )
    other = await _owner(wait_up, "boards", "create", data={"name": "private"})
    session = await _owner(wait_up, "sessions", "create", data={"title": "shared"})
    sid = session["id"]
    await _permissions(wait_up, sid, {"collaborators": [collab], "viewers": [viewer]})
    rooms = (f"session:{sid}", f"board:{bid}")
    gv = await make_guest(GUESTS[0], v_token, viewer)
    gc = await make_guest(GUESTS[1], c_token, collab)
    for guest in (gv, gc):
        for room in rooms:
            guest.want(room)
    trace.emit("access", f"guests {viewer} (viewer) {collab} (collaborator) in {rooms}")
    revoke_at = fault_s * (0.3 + 0.4 * rng.random())
    revoked = False
    probes = 0
    n = 0
    while True:
        await sleep(round(WRITE_PERIOD_S * (0.5 + rng.random()), 6))
        n += 1
        with contextlib.suppress(ServiceError, ActorExited, CallTimeout):
            hub = await wait_up()
            await hub.call(
                OWNER,
                connection_id=None,
                service="tasks",
                method="create",
                data={"session_id": sid, "prompt": f"owner {n}"},
            )
            await hub.call(
                OWNER,
                connection_id=None,
                service="boards",
                method="patch",
                id=bid,
                data={"description": f"owner {n}"},
            )
        with contextlib.suppress(NotConnected):
            await _viewer_writes(gv, sid, bid, n, recorder)
            if not revoked:
                await gc.call("tasks", "create", data={"session_id": sid, "prompt": f"gc {n}"})
            if probes < 4 and gv.is_open:
                probes += 1
                await _probe(gv, f"session:s-made-up-{n}", recorder)
                await _probe(gv, f"board:{other['id']}", recorder)
        if not revoked and trio.current_time() >= revoke_at:
            revoked = True
            await _permissions(wait_up, sid, {"collaborators": [], "viewers": []})
            _mark(watch, head_of, rooms[0], trace)
            for user in (viewer, collab):
                await _owner(
                    wait_up,
                    "boards",
                    "remove_member",
                    removal=True,
                    id=bid,
                    data={"user_id": user},
                )
            _mark(watch, head_of, rooms[1], trace)
            recorder.count("access:revoked")
        if revoked and n % 5 == 0:
            for guest in (gv, gc):  # try again: must be refused
                for room in rooms:
                    guest.want(room)


def _mark(
    watch: AccessWatch,
    head_of: Callable[[str], tuple[str, int] | None],
    room: str,
    trace: Trace,
) -> None:
    known = head_of(room)
    head = 0 if known is None else known[1]
    for guest in GUESTS:
        watch.revoke(guest, room, head)
    trace.emit("access", f"revoked {room} at head {head}")


async def _viewer_writes(gv: SimClient, sid: str, bid: str, n: int, recorder: Recorder) -> None:
    for service, ident, data in (
        ("sessions", sid, {"title": f"viewer {n}"}),
        ("boards", bid, {"description": f"viewer {n}"}),
    ):
        result = await gv.call(service, "patch", id=ident, data=data)
        code = None if result.error is None else result.error.code
        if result.ok:
            recorder.violate("access", gv.name, f"a viewer's {service}.patch succeeded")
        elif code == "forbidden":
            recorder.count("access:viewer_refused")
        elif code not in TRANSIENT:
            recorder.violate("access", gv.name, f"a viewer's {service}.patch failed as {code}")


async def _probe(guest: SimClient, room: str, recorder: Recorder) -> None:
    """A join that must be refused with ``forbidden``, whether or not the
    room exists."""
    assert guest.client is not None
    try:
        await guest.client.join(room)
    except trio.TooSlowError:
        return
    except CallError as exc:  # the real client's refusal: the code of its ``left``
        code = exc.code
        if code == "forbidden":
            recorder.count("access:join_refused")
        elif code not in TRANSIENT:
            recorder.violate("access", guest.name, f"join {room} refused as {code!r}: {exc}")
        return
    recorder.violate("access", guest.name, f"join {room} was accepted")
