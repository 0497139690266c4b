"""The daemon's one port: ``/ws``, the REST services, ``/health`` and
``/debug/actors``.  The REST routes are a quart-trio app (served by hypercorn
through :mod:`._front`); ``/ws`` is served by trio-websocket
(:func:`serve_websocket`), which costs about half of hypercorn's CPU per frame
and memory per connection (``STACK.md``).

One WebSocket is one :class:`_Connection`: one reader task pumps frames into
the protocol's :class:`~protocols.ServerConnection` machine and dispatches
what it reports through a table; one writer task drains the connection's
bounded :class:`~agor_actors.daemon.Outbox` into the socket.  Nothing else
writes to the socket: results, notices and room events all go through the
outbox, so a slow client costs a room nothing (rooms offer, never await).

The WebSocket's sharp edges and what this module does:

* the codec is negotiated from the client's offer and a WebSocket without a
  known subprotocol is refused with HTTP 400 (the body says what to offer)
  before ``accept``; a foreign ``Origin`` gets 403, a draining server 503;
* a send to a stalled peer blocks only that connection's writer task (the
  outbox decouples everyone else); trio-websocket's sends are not shielded,
  so the flush on close is bounded (``flush_timeout_s``) and so is the close
  handshake (``close_timeout_s``), after which the TCP connection is cut;
* once the peer is gone, ``get_message`` raises ``ConnectionClosed``: the
  adapter cancels the connection's handler, as quart-trio did (and as the
  simulator's harness does), and the hub is told;
* nobody checks WebSocket pongs: the protocol's own ``ping``/``pong`` is the
  heartbeat, and a connection silent for ``dead_after_s`` is closed (4000);
* on drain, :meth:`AppState.drain` closes every WebSocket with 1001 after
  its in-flight calls were answered and its outbox flushed;
* an empty binary frame reaches the machine as ``b""`` (it refuses it as an
  empty frame); frames up to :func:`ws_max_message_bytes` reach the machine,
  which closes with 1009 and an error frame above the protocol's limit;
* no permessage-deflate (trio-websocket offers no extensions).

The REST routes call the same hub methods as ``call`` over the WebSocket,
with ``Authorization: Bearer <token>`` and JSON bodies:

=====================================  ==========================================
``GET /<service>?<query>``             ``find`` (query string: :func:`parse_query`)
``POST /<service>``                    ``create`` (201)
``GET /<service>/<id>``                ``get``
``PATCH /<service>/<id>``              ``patch`` (``If-Match: <rev>`` = ``base_rev``)
``PUT /<service>/<id>``                ``update`` (same)
``DELETE /<service>/<id>``             ``remove``
``POST /<service>/<id>/<method>``      a custom method (``tasks/<id>/start``...)
``GET /health``                        no token; 503 while draining
``GET /debug/actors``                  the supervision tree, owner only
=====================================  ==========================================

Errors are ``{"code", "message", "data"}`` with ``ServiceError.http_status``;
a body that is not JSON is 400 ``bad_json``, a missing or wrong token 401
``not_authenticated``, a foreign ``Origin`` 403 ``forbidden``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import attrs
import orjson
import trio
import trio_websocket
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from protocols import (
    SERVER_MESSAGE_TYPES,
    Call,
    CallReceived,
    Codec,
    ErrorCode,
    Heartbeat,
    HeartbeatAction,
    HelloReceived,
    Join,
    JoinRequested,
    LeaveRequested,
    Limits,
    LocalProtocolError,
    Message,
    PingReceived,
    PresenceReceived,
    PresenceUpdate,
    ProtocolViolation,
    ServerConnection,
    ServerEvent,
    ServerMessage,
    ServerState,
    Since,
    SubscriptionDropped,
    negotiate,
)
from protocols import Frame as WireFrame

from ..daemon._api import Principal, ServiceError
from ..daemon._outbox import Outbox, OutboxClosed, OutboxOverflow
from ..world import World
from ._logs import install_access_log, note_user

__all__ = [
    "AppState",
    "ServerHub",
    "ServerSettings",
    "create_app",
    "origin_allowed",
    "parse_query",
    "serve_websocket",
    "ws_max_message_bytes",
]

log = logging.getLogger("agor_actors.server")


class ServerHub(Protocol):
    """What the server needs of the daemon's hub (``agor_actors.daemon.Hub``)."""

    async def authenticate(self, token: str | None) -> Principal | None: ...

    async def call(
        self,
        principal: Principal,
        *,
        connection_id: str | None,
        service: str,
        method: str,
        id: str | None = None,
        data: Any = None,
        query: dict[str, Any] | None = None,
        temp_id: str | None = None,
        base_rev: int | None = None,
    ) -> Any: ...

    async def join(
        self,
        principal: Principal,
        connection_id: str,
        outbox: Outbox,
        room: str,
        since: Since | None,
    ) -> None: ...

    async def leave(self, connection_id: str, room: str) -> None: ...

    async def presence(
        self, principal: Principal, connection_id: str, update: PresenceUpdate
    ) -> None: ...

    async def disconnect(self, connection_id: str) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...


@attrs.frozen(kw_only=True)
class ServerSettings:
    """Tunables of the server.  Times in seconds unless named otherwise."""

    limits: Limits = attrs.field(factory=Limits)
    heartbeat_ms: int = 15_000
    """Announced in ``welcome``: the client pings at least this often."""
    dead_after_s: float = 37.5
    """A connection that sent nothing for this long is closed (4000): two
    and a half heartbeats, as ``Heartbeat.from_heartbeat_ms`` says."""
    hello_timeout_s: float = 10.0
    """A connection that has not completed ``hello`` by then is closed (4001)."""
    outbox_messages_max: int = 2000
    outbox_bytes_max: int = 4 * 1024 * 1024
    outbox_control_max: int = 1024
    call_grace_s: float = 5.0
    """On drain: how long in-flight calls may take to be answered."""
    flush_timeout_s: float = 2.0
    """On close: how long the writer may take to flush the outbox."""
    drain_timeout_s: float = 10.0
    """On drain: how long to wait for every connection to be closed."""
    max_body_bytes: int = 1 << 20
    """Largest HTTP request body (413 beyond)."""
    disconnect_timeout_s: float = 5.0
    head_timeout_s: float = 10.0
    """A new connection must send its request head (and, on ``/ws``, get
    through the WebSocket handshake) within this, or it is closed."""
    head_max_bytes: int = 16 * 1024
    """Largest request line and headers (431 beyond)."""
    close_timeout_s: float = 2.0
    """On close: how long the WebSocket closing handshake may take before the
    TCP connection is cut (a stalled peer never answers it)."""


def ws_max_message_bytes(settings: ServerSettings) -> int:
    """trio-websocket's message size bound: well above the protocol's frame
    limit, so that a frame over that limit reaches the machine, which closes
    with 1009 and an error frame saying why."""
    return max(16 << 20, 4 * settings.limits.max_frame_bytes)


# ---------------------------------------------------------------------- origins

_LOCAL_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})


def origin_allowed(origin: str | None) -> bool:
    """The ``Origin`` check for browser connections: no ``Origin`` (not a
    browser) or ``http(s)://127.0.0.1|localhost|[::1][:port]``."""
    if origin is None or origin == "":
        return True
    try:
        parts = urlsplit(origin)
        port = parts.port  # raises ValueError for a malformed port
    except ValueError:
        return False
    del port
    if parts.scheme not in ("http", "https"):
        return False
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return False
    return parts.hostname in _LOCAL_HOSTS


# ---------------------------------------------------------------- query strings

_INT_RE: Final = re.compile(r"-?(0|[1-9][0-9]*)")
_FLOAT_RE: Final = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_KEY_RE: Final = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_LIST_OPS: Final = frozenset({"$in", "$nin"})
_SCALAR_OPS: Final = frozenset({"$ne", "$gt", "$gte", "$lt", "$lte"})


def _bad_query(message: str) -> ServiceError:
    return ServiceError("bad_request", f"query string: {message}")


def _scalar(text: str) -> Any:
    """A query-string value: ``null``, ``true``, ``false`` and numbers are
    converted; ``"..."`` (JSON-quoted) is the string inside; anything else is
    the string as is."""
    if text == "null":
        return None
    if text == "true":
        return True
    if text == "false":
        return False
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        value = float(text)
        if math.isfinite(value):
            return value
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            decoded = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise _bad_query(f"bad quoted string {text!r:.60}") from None
        if isinstance(decoded, str):
            return decoded
    return text


def _items(text: str) -> list[str]:
    return [part for part in text.split(",") if part != ""]


def _int_param(name: str, text: str) -> int:
    if not _INT_RE.fullmatch(text):
        raise _bad_query(f"{name} must be an integer, got {text!r:.60}")
    return int(text)


def parse_query(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """A ``find`` query from a query string's ``(key, value)`` pairs.

    ``col=value`` (equality; repeated: ``$in``), ``col[$op]=value`` with
    ``$ne $gt $gte $lt $lte``, ``col[$in]=a,b`` (or repeated ``col[$in][]=``),
    ``$limit=10``, ``$cursor=...``, ``$total=true``, ``$select=a,b``,
    ``$sort[col]=-1`` or ``$sort=-created_at,id``; ``$query=<JSON object>``
    for anything the short forms cannot say (merged under the others).
    Values: see :func:`_scalar`."""
    query: dict[str, Any] = {}
    equal: dict[str, list[Any]] = {}
    for key, value in pairs:
        match = _KEY_RE.match(key)
        if match is None:
            raise _bad_query(f"bad key {key!r:.60}")
        name = match.group(1)
        path = re.findall(r"\[([^\[\]]*)\]", match.group(2))
        if name == "$query" and not path:
            try:
                extra = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise _bad_query(f"$query is not JSON: {exc}") from None
            if not isinstance(extra, dict):
                raise _bad_query("$query must be a JSON object")
            for extra_key, extra_value in extra.items():
                query.setdefault(extra_key, extra_value)
        elif name == "$limit" and not path:
            query["$limit"] = _int_param("$limit", value)
        elif name == "$cursor" and not path:
            query["$cursor"] = value
        elif name == "$total" and not path:
            if value not in ("", "true", "false", "1", "0"):
                raise _bad_query("$total must be true or false")
            query["$total"] = value in ("", "true", "1")
        elif name == "$select" and path in ([], [""]):
            query.setdefault("$select", []).extend(_items(value))
        elif name == "$sort":
            sort = query.setdefault("$sort", {})
            if not path:
                for item in _items(value):
                    column = item.lstrip("+-")
                    sort[column] = -1 if item.startswith("-") else 1
            elif len(path) == 1 and path[0]:
                direction = _int_param(f"$sort[{path[0]}]", value)
                if direction not in (1, -1):
                    raise _bad_query(f"$sort[{path[0]}] must be 1 or -1")
                sort[path[0]] = direction
            else:
                raise _bad_query(f"bad key {key!r:.60}")
        elif name.startswith("$"):
            raise _bad_query(f"unknown parameter {name!r:.60}")
        elif not path:
            equal.setdefault(name, []).append(_scalar(value))
        elif path[0] in _LIST_OPS and path[1:] in ([], [""]):
            operators = query.setdefault(name, {})
            if not isinstance(operators, dict):
                raise _bad_query(f"{name} has both a value and operators")
            operators.setdefault(path[0], []).extend(_scalar(v) for v in _items(value))
        elif path[0] in _SCALAR_OPS and len(path) == 1:
            operators = query.setdefault(name, {})
            if not isinstance(operators, dict):
                raise _bad_query(f"{name} has both a value and operators")
            operators[path[0]] = _scalar(value)
        else:
            raise _bad_query(f"bad key {key!r:.60}")
    for name, values in equal.items():
        if name in query:
            raise _bad_query(f"{name} has both a value and operators")
        query[name] = values[0] if len(values) == 1 else {"$in": values}
    return query


# ---------------------------------------------------------------- connections


class _TrackedOutbox(Outbox):
    """The connection's outbox: control messages queued by the hub (``joined``,
    notices) and by the outbox itself (``lagged``) pass through the protocol
    machine, so that it knows which rooms the connection is in.  An overflow
    of control messages never reaches the hub or a room: it closes the
    connection (1008)."""

    def __init__(self, connection: _Connection, codec: Codec, settings: ServerSettings) -> None:
        super().__init__(
            codec,
            max_messages=settings.outbox_messages_max,
            max_bytes=settings.outbox_bytes_max,
            max_control=settings.outbox_control_max,
        )
        self._connection = connection

    def offer_control(self, message: Message | WireFrame) -> None:
        if self.closed:
            return
        frame: WireFrame
        if isinstance(message, bytes | str):
            frame = message
        elif SERVER_MESSAGE_TYPES.get(message.TYPE) is type(message):
            try:
                frame = self._connection.machine.send(_as_server_message(message))
            except LocalProtocolError:
                # The connection is closing (or the message makes no sense
                # now): nothing more goes out.
                return
        else:
            raise TypeError(f"not a server message: {type(message).__name__}")
        try:
            super().offer_control(frame)
        except OutboxOverflow:
            self._connection.overflowed()
        except OutboxClosed:
            pass


def _as_server_message(message: Message) -> ServerMessage:
    return message  # type: ignore[return-value]  # checked against SERVER_MESSAGE_TYPES


_Close = tuple[int, str]


class _Connection:
    """One WebSocket: handshake, reader, writer, calls, subscriptions."""

    def __init__(
        self,
        state: AppState,
        ws: Any,
        codec: Codec,
    ) -> None:
        self.state = state
        self.ws = ws
        self.codec = codec
        self.settings = state.settings
        self.world = state.world
        self.hub = state.hub
        self.machine = ServerConnection(codec=codec, limits=self.settings.limits)
        self.outbox = _TrackedOutbox(self, codec, self.settings)
        self.connection_id: str | None = None
        self.principal: Principal | None = None
        self.started_s = self.world.clock.now_s()
        self._close: _Close | None = None
        self._going_away = False
        self._read_scope = trio.CancelScope()
        self._calls: trio.Nursery | None = None
        self._subscribe_send, self._subscribe_receive = trio.open_memory_channel[
            JoinRequested | LeaveRequested | SubscriptionDropped
        ](64)
        self.finished = trio.Event()
        self._welcomed = trio.Event()

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        """Serve the connection until it closes.  Cancelled when the peer
        disconnects (by :class:`_TrioWebSocket`, or the simulator's harness);
        the hub is told in any case."""
        try:
            await self._run()
        finally:
            self.outbox.close()
            if self.machine.state is not ServerState.CLOSED:
                self.machine.connection_closed()
            if self.connection_id is not None:
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(self.settings.disconnect_timeout_s),
                ):
                    try:
                        await self.hub.disconnect(self.connection_id)
                    except Exception:
                        log.exception("hub.disconnect(%s) failed", self.connection_id)
            self.finished.set()

    async def _run(self) -> None:
        writer_done = trio.Event()
        async with trio.open_nursery() as outer:
            outer.start_soon(self._writer, writer_done)
            async with trio.open_nursery() as calls:
                self._calls = calls
                with self._read_scope:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(self._watchdog)
                        inner.start_soon(self._subscriber)
                        await self._read_loop()
                        inner.cancel_scope.cancel()
                # Reading has stopped.  In-flight calls get a grace period to
                # be answered (a drain) or none (a protocol violation).
                grace = self.settings.call_grace_s if self._going_away else 0.0
                calls.cancel_scope.deadline = self.world.clock.now_s() + grace
            if self._going_away and self._close is None:
                frame = self.machine.close(ErrorCode.GOING_AWAY, "the server is shutting down")
                self._queue_raw(frame)
                self._close = (self.machine.close_code or 1001, self.machine.close_reason)
            self.outbox.close()
            with trio.move_on_after(self.settings.flush_timeout_s):
                await writer_done.wait()
            outer.cancel_scope.cancel()
        code, reason = self._close or (1000, "")
        try:
            await self.ws.close(code, reason)
        except Exception:  # already closed by the peer
            log.debug("close of %s failed", self.connection_id, exc_info=True)

    async def _writer(self, done: trio.Event) -> None:
        """The one write path: the outbox, frame by frame, into the socket."""
        try:
            while True:
                frame = await self.outbox.next_frame()
                await self.ws.send(frame)
        except OutboxClosed:
            pass
        except Exception:
            # trio-websocket refuses a send once the connection is closing:
            # the peer is gone, and the receive side will tell.
            log.debug("writer of %s stopped", self.connection_id, exc_info=True)
            self._stop_reading()
        finally:
            done.set()

    async def _read_loop(self) -> None:
        while not self.closing():
            data = await self.ws.receive()
            events = self.machine.receive_data(data, self.world.clock.now_s())
            for event in events:
                await self._dispatch(event)
                if self.closing():
                    return

    async def _watchdog(self) -> None:
        """Close a connection that never completes ``hello`` (4001) or that
        stays silent longer than the heartbeat allows (4000).  The client
        pings every ``heartbeat_ms``; any frame counts as a sign of life."""
        settings = self.settings
        with trio.move_on_after(settings.hello_timeout_s):
            await self._welcomed.wait()
        if not self._welcomed.is_set():
            self._close_with(ErrorCode.NOT_AUTHENTICATED, "no hello in time")
            return
        heartbeat = Heartbeat(
            interval_s=settings.heartbeat_ms / 1000, timeout_s=settings.dead_after_s
        )
        while True:
            now = self.world.clock.now_s()
            last = self.machine.last_received_s or self.started_s
            if heartbeat.decide(now, last_received_s=last) is HeartbeatAction.DEAD:
                self._close_with(
                    ErrorCode.HEARTBEAT_TIMEOUT, f"nothing received for {now - last:.1f} s"
                )
                return
            await trio.sleep(max(0.0, heartbeat.next_check_s(last_received_s=last) - now))

    # -------------------------------------------------------------- closing

    def closing(self) -> bool:
        """Whether the connection decided to close (reading has stopped)."""
        return self._close is not None

    def _queue_raw(self, frame: WireFrame | None) -> None:
        if frame is None:
            return
        with contextlib.suppress(OutboxOverflow, OutboxClosed):
            Outbox.offer_control(self.outbox, frame)

    def _stop_reading(self) -> None:
        self._read_scope.cancel()

    def _close_with(self, code: ErrorCode, message: str) -> None:
        """Close the connection with ``code`` (one that closes): an error
        frame, then the close frame with the code's WebSocket close code."""
        if self._close is not None:
            return
        try:
            frame = self.machine.close(code, message)
        except LocalProtocolError:
            frame = None
        self._queue_raw(frame)
        self._close = (self.machine.close_code or 1011, self.machine.close_reason)
        self._stop_reading()

    def overflowed(self) -> None:
        """The client does not read: close at once (1008), nothing more to send."""
        if self._close is None:
            with contextlib.suppress(LocalProtocolError):
                self.machine.close(ErrorCode.FLOOD, "not reading")
            self._close = (1008, "flood: not reading its messages")
            self._stop_reading()

    def go_away(self) -> None:
        """Drain: stop reading, answer what is in flight, close with 1001."""
        self._going_away = True
        self._stop_reading()

    # ------------------------------------------------------------- dispatch

    async def _dispatch(self, event: ServerEvent) -> None:
        if isinstance(event, ProtocolViolation):
            await self._on_violation(event)
        elif isinstance(event, HelloReceived):
            await self._on_hello(event)
        elif isinstance(event, CallReceived):
            self._on_call(event)
        elif isinstance(event, JoinRequested | LeaveRequested | SubscriptionDropped):
            await self._subscribe_send.send(event)
        elif isinstance(event, PingReceived):
            self.outbox.offer_control(self.machine.pong(event.ping.t))
        else:
            assert isinstance(event, PresenceReceived)
            await self._on_presence(event)

    async def _on_violation(self, event: ProtocolViolation) -> None:
        if event.close_code is not None:
            self._queue_raw(event.reply)
            self._close = (int(event.close_code), self.machine.close_reason)
            self._stop_reading()
            return
        if event.reply is not None:
            self.outbox.offer_control(event.reply)

    async def _on_presence(self, event: PresenceReceived) -> None:
        """Lossy and cheap: handled in order, in the reader."""
        assert self.principal is not None and self.connection_id is not None
        try:
            await self.hub.presence(self.principal, self.connection_id, event.update)
        except ServiceError as exc:
            self._error_frame(exc.code, exc.message)

    def _error_frame(self, code: str, message: str) -> None:
        """An error frame that leaves the connection open.  A service's
        ``unauthorized`` (a closing code on the wire) is sent as ``forbidden``."""
        try:
            frame = self.machine.error(code, message)
        except LocalProtocolError:
            if self.machine.state is not ServerState.OPEN:
                return
            fallback = ErrorCode.FORBIDDEN if code == ErrorCode.UNAUTHORIZED else ErrorCode.INTERNAL
            frame = self.machine.error(fallback.value, message)
        self.outbox.offer_control(frame)

    async def _on_hello(self, event: HelloReceived) -> None:
        token = event.hello.token
        try:
            principal = await self.hub.authenticate(token) if token else None
        except Exception:
            log.exception("authenticate failed")
            self._close_with(ErrorCode.SERVER_ERROR, "authentication failed")
            return
        if principal is None:
            if token:
                self._close_with(ErrorCode.UNAUTHORIZED, "invalid token")
            else:
                self._close_with(ErrorCode.NOT_AUTHENTICATED, "hello without a token")
            return
        self.principal = principal
        self.connection_id = self.world.entropy.new_id(self.world.wall.now_ms())
        self.outbox.offer_control(
            self.machine.welcome(
                connection_id=self.connection_id,
                user_id=principal.user_id,
                heartbeat_ms=self.settings.heartbeat_ms,
            )
        )
        self._welcomed.set()

    def _on_call(self, event: CallReceived) -> None:
        assert self._calls is not None
        self._calls.start_soon(self._run_call, event.call)

    async def _run_call(self, call: Call) -> None:
        """One call, concurrent with the others (the machine bounds how many
        are pending).  Cancelled (on close) before its result: no result."""
        assert self.principal is not None
        try:
            data = await self.hub.call(
                self.principal,
                connection_id=self.connection_id,
                service=call.service,
                method=call.method,
                id=call.id,
                data=call.data,
                query=call.query,
                temp_id=call.temp_id,
                base_rev=call.base_rev,
            )
        except ServiceError as exc:
            self._answer_error(call.ref, exc.code, exc.message, exc.data)
            return
        except Exception:
            log.exception("call %s.%s failed", call.service, call.method)
            self._answer_error(call.ref, ErrorCode.INTERNAL.value, "internal error")
            return
        try:
            frame = self.machine.result(call.ref, data=data)
        except LocalProtocolError as exc:
            if self.machine.state is not ServerState.OPEN:
                return
            log.error("result of %s.%s cannot be encoded: %s", call.service, call.method, exc)
            self._answer_error(call.ref, ErrorCode.INTERNAL.value, "result cannot be encoded")
            return
        self.outbox.offer_control(frame)

    def _answer_error(self, ref: int, code: str, message: str, data: Any = None) -> None:
        try:
            frame = self.machine.result_error(ref, code, message, data)
        except LocalProtocolError:
            if self.machine.state is not ServerState.OPEN:
                return
            frame = self.machine.result_error(ref, code, message)
        self.outbox.offer_control(frame)

    async def _subscriber(self) -> None:
        """Joins and leaves, one at a time in the order they were received."""
        async for event in self._subscribe_receive:
            try:
                if isinstance(event, JoinRequested):
                    await self._join(event.join, event.rejoin)
                elif isinstance(event, LeaveRequested):
                    await self._leave(event.room)
                else:
                    await self._drop(event.room)
            except Exception:
                log.exception("subscription change %r failed", event)
                self._close_with(ErrorCode.SERVER_ERROR, "subscription failed")
                return

    async def _join(self, join: Join, rejoin: bool) -> None:
        assert self.principal is not None and self.connection_id is not None
        try:
            await self.hub.join(
                self.principal, self.connection_id, self.outbox, join.room, join.since
            )
        except ServiceError as exc:
            if rejoin:
                await self.hub.leave(self.connection_id, join.room)
                self.outbox.drop_room(join.room)
            self.outbox.offer_control(self.machine.left(join.room, exc.code))

    async def _leave(self, room: str) -> None:
        assert self.connection_id is not None
        await self.hub.leave(self.connection_id, room)
        self.outbox.drop_room(room)
        self.outbox.offer_control(self.machine.left(room))

    async def _drop(self, room: str) -> None:
        assert self.connection_id is not None
        await self.hub.leave(self.connection_id, room)
        self.outbox.drop_room(room)


# ----------------------------------------------------------------- the state


@attrs.define(eq=False)
class AppState:
    """What the app shares between its handlers: the hub, the world, the
    settings, the open connections, and whether it is draining."""

    hub: ServerHub
    world: World
    settings: ServerSettings
    connections: set[_Connection] = attrs.field(factory=set)
    draining: bool = False

    def is_draining(self) -> bool:
        return self.draining

    async def drain(self) -> None:
        """Refuse new work (503), answer in-flight calls, flush every outbox
        and close every WebSocket with 1001; returns when all are closed or
        after ``drain_timeout_s``."""
        self.draining = True
        connections = list(self.connections)
        for connection in connections:
            connection.go_away()
        with trio.move_on_after(self.settings.drain_timeout_s):
            for connection in connections:
                await connection.finished.wait()


# ------------------------------------------------------------- the WebSocket


class _TrioWebSocket:
    """What :class:`_Connection` drives (``receive``, ``send``, ``close``)
    over a trio-websocket connection."""

    __slots__ = ("_close_timeout_s", "_gone", "_ws")

    def __init__(
        self, ws: trio_websocket.WebSocketConnection, gone: trio.CancelScope, close_timeout_s: float
    ) -> None:
        self._ws = ws
        self._gone = gone
        self._close_timeout_s = close_timeout_s

    async def receive(self) -> str | bytes:
        """The next frame.  Once the peer is gone (or the connection broke),
        the connection's handler is cancelled, as quart-trio did: no flush,
        no close, in-flight calls dropped, the hub told."""
        try:
            return await self._ws.get_message()
        except trio_websocket.ConnectionClosed:
            self._gone.cancel()
            await trio.sleep_forever()

    async def send(self, frame: str | bytes) -> None:
        """Raises ``ConnectionClosed`` once the connection is closing (the
        writer then stops).  Blocks while the peer does not read: only the
        connection's writer waits, and the flush on close is bounded."""
        await self._ws.send_message(frame)

    async def close(self, code: int, reason: str) -> None:
        """The closing handshake, at most ``close_timeout_s``: a peer that
        does not answer (or does not read) has its TCP connection cut."""
        with trio.move_on_after(self._close_timeout_s):
            await self._ws.aclose(code, reason or None)
        # On a timeout ``aclose`` has closed the stream on its way out.


def _refusal(code: str, message: str) -> bytes:
    return orjson.dumps({"code": code, "message": message, "data": None})


async def _handshake(
    state: AppState, request: trio_websocket.WebSocketRequest
) -> tuple[trio_websocket.WebSocketConnection, Codec] | None:
    """Accept the WebSocket with a negotiated codec, or refuse it (None)."""
    origin: str | None = None
    for name, value in request.headers:
        if name.lower() == b"origin":
            origin = value.decode("latin-1")
            break
    refusal: tuple[int, bytes] | None = None
    codec = negotiate(request.proposed_subprotocols)
    if not origin_allowed(origin):
        refusal = (403, _refusal("forbidden", "origin not allowed"))
    elif state.draining:
        refusal = (503, _refusal("unavailable", "the server is shutting down"))
    elif codec is None:
        offered = ", ".join(request.proposed_subprotocols) or "none"
        message = f"offer a subprotocol of {', '.join(c.value for c in Codec)}; offered: {offered}"
        refusal = (400, _refusal("unsupported_protocol", message))
    if refusal is not None:
        status, body = refusal
        await request.reject(status, extra_headers=[_JSON_CONTENT], body=body)
        return None
    assert codec is not None
    return await request.accept(subprotocol=codec.subprotocol), codec


_JSON_CONTENT: Final = (b"content-type", b"application/json")


async def serve_websocket(
    state: AppState, request: trio_websocket.WebSocketRequest, *, deadline: float
) -> None:
    """``/ws``: check and answer the handshake (refusals are JSON errors:
    403 ``forbidden``, 503 ``unavailable``, 400 ``unsupported_protocol``),
    all before ``deadline``; then serve the connection until it closes."""
    accepted = None
    with trio.CancelScope(deadline=deadline):
        accepted = await _handshake(state, request)
    if accepted is None:
        return
    ws, codec = accepted
    gone = trio.CancelScope()
    connection = _Connection(state, _TrioWebSocket(ws, gone, state.settings.close_timeout_s), codec)
    state.connections.add(connection)
    if state.is_draining():  # the drain began while this one was accepted
        connection.go_away()
    try:
        with gone:
            await connection.run()
    finally:
        state.connections.discard(connection)


# ------------------------------------------------------------------- the app


def _json(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)
    response = Response(body, status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _error(code: str, message: str, status: int, data: Any = None) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return _json({"code": code, "message": message, "data": data}, status, headers)


def _service_error(exc: ServiceError) -> Response:
    return _error(exc.code, exc.message, exc.http_status, exc.data)


_HTTP_CODES: Final = {404: "not_found", 405: "unknown_method", 413: "too_large"}


def _http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    return _error(_HTTP_CODES.get(status, "bad_request"), exc.description or exc.name, status)


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


_HTTP_METHODS: Final = {
    ("GET", False): "find",
    ("POST", False): "create",
    ("GET", True): "get",
    ("PATCH", True): "patch",
    ("PUT", True): "update",
    ("DELETE", True): "remove",
}


def create_app(hub: ServerHub, world: World, settings: ServerSettings | None = None) -> QuartTrio:
    """The quart-trio app serving ``hub``.  ``app.extensions["agor"]`` holds
    its :class:`AppState` (for :meth:`AppState.drain`)."""
    settings = settings or ServerSettings()
    app = QuartTrio("agor_actors.server")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    state = AppState(hub=hub, world=world, settings=settings)
    app.extensions["agor"] = state
    install_access_log(app, world.clock)  # first: its clock starts before other hooks

    @app.before_request
    async def _check_origin() -> Response | None:
        if not origin_allowed(request.headers.get("Origin")):
            return _error("forbidden", "origin not allowed", 403)
        if state.draining and request.path != "/health":
            return _error("unavailable", "the server is shutting down", 503)
        return None

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        return _http_exception(exc)

    async def _principal() -> Principal:
        token = _bearer(request.headers.get("Authorization"))
        if token is None:
            raise ServiceError("not_authenticated", "Authorization: Bearer <token> required")
        principal = await hub.authenticate(token)
        if principal is None:
            raise ServiceError("not_authenticated", "invalid token")
        note_user(request.scope, principal.user_id)  # for the access log
        return principal

    async def _body() -> Any:
        raw = await request.get_data(cache=False, as_text=False)
        if not raw:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ServiceError("bad_json", f"the body is not JSON: {exc}") from None

    def _base_rev() -> int | None:
        header = request.headers.get("If-Match")
        if header is None:
            return None
        text = header.strip().removeprefix("W/").strip('"')
        if not _INT_RE.fullmatch(text):
            raise ServiceError("bad_request", "If-Match must be a revision number")
        return int(text)

    async def _service(service: str, id: str | None = None, method: str | None = None) -> Response:
        try:
            principal = await _principal()
            verb = request.method
            data: Any = None
            query: dict[str, Any] | None = None
            base_rev: int | None = None
            if method is None:
                method = _HTTP_METHODS.get((verb, id is not None))
                if method is None:
                    raise ServiceError("unknown_method", f"{verb} is not allowed here")
            if verb == "GET" and id is None:
                query = parse_query(request.args.items(multi=True))
            elif verb in ("POST", "PATCH", "PUT"):
                data = await _body()
            if verb in ("PATCH", "PUT", "DELETE"):
                base_rev = _base_rev()
            result = await hub.call(
                principal,
                connection_id=None,
                service=service,
                method=method,
                id=id,
                data=data,
                query=query,
                base_rev=base_rev,
            )
        except ServiceError as exc:
            return _service_error(exc)
        except HTTPException as exc:  # the body was too large, the client went away...
            return _http_exception(exc)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return _error("internal", "internal error", 500)
        headers: dict[str, str] = {}
        if isinstance(result, dict) and type(result.get("rev")) is int:
            headers["ETag"] = f'"{result["rev"]}"'
        status = 201 if method == "create" and request.method == "POST" and id is None else 200
        return _json(result, status, headers)

    @app.route("/health", methods=["GET"])
    async def health() -> Response:
        if state.draining:
            return _json({"status": "draining"}, 503)
        return _json({"status": "ok", "connections": len(state.connections)})

    @app.route("/debug/actors", methods=["GET"])
    async def debug_actors() -> Response:
        try:
            principal = await _principal()
            if not principal.is_owner:
                raise ServiceError("unauthorized", "only the owner may see the actors")
        except ServiceError as exc:
            return _service_error(exc)
        return _json(hub.snapshot())

    @app.route("/<service>", methods=["GET", "POST"])
    async def collection(service: str) -> Response:
        return await _service(service)

    @app.route("/<service>/<id>", methods=["GET", "PATCH", "PUT", "DELETE"])
    async def resource(service: str, id: str) -> Response:
        return await _service(service, id)

    @app.route("/<service>/<id>/<method>", methods=["POST"])
    async def custom(service: str, id: str, method: str) -> Response:
        return await _service(service, id, method)

    return app
