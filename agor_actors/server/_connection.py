"""One client connection of the protocol, over any
:class:`~agor_actors.world.PeerTransport` (the daemon's WebSocket, the
simulator's link): one reader pumps messages into the protocol's
:class:`~protocols.ServerConnection` machine and dispatches what it reports
through a table; the connection's bounded :class:`~agor_actors.daemon.Outbox`
is its one write path (results, notices and room events): an offer to an
idle connection is written at once, and its writer task sends what queues
while the peer reads slower than we write.  A slow client costs a room
nothing (rooms offer, never await).

* once the peer is gone, the transport's ``receive`` raises
  :class:`~agor_actors.world.TransportClosed`: the connection stops at once
  (no flush, no close, in-flight calls dropped) and the hub is told;
* nobody checks WebSocket pongs: the protocol's own ``ping``/``pong`` is the
  heartbeat, and a connection silent for ``dead_after_s`` is closed (4000);
* on drain, :meth:`AppState.drain` closes every connection with 1001 after
  its in-flight calls were answered and its outbox flushed (bounded by
  ``flush_timeout_s``), then the closing handshake (bounded by the transport).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import outcome
import trio

from protocols import (
    SERVER_MESSAGE_TYPES,
    AuthReceived,
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
    LocalProtocolError,
    Message,
    PingReceived,
    PresenceReceived,
    ProtocolViolation,
    ServerConnection,
    ServerEvent,
    ServerMessage,
    ServerState,
    SubscriptionDropped,
)
from protocols import Frame as WireFrame

from ..domain import Principal, ServiceError
from ..outbox import Outbox, OutboxClosed, OutboxOverflow
from ..world import PeerTransport, TransportClosed
from ._settings import AppState, ServerSettings

__all__ = ["Connection"]

log = logging.getLogger("agor_actors.server")
security_log = logging.getLogger("agor_actors.security")

_SERVICES = frozenset(
    {"boards", "sessions", "tasks", "messages", "users", "tool_calls", "activity"}
)
"""Services a call latency is recorded for (label values stay bounded)."""

SERVER_FAILURES = frozenset({"unavailable", "invalid_data", "internal"})
"""Error codes of a call that say the server failed, not the caller: logged."""


def call_room(call: Call) -> str | None:
    """The room a call is about, for its error lines: the session or board
    it names by id, or the session its data names (None: no one room)."""
    if call.id is not None and call.service == "sessions":
        return f"session:{call.id}"
    if call.id is not None and call.service == "boards":
        return f"board:{call.id}"
    data = call.data
    if isinstance(data, dict) and isinstance(data.get("session_id"), str):
        return f"session:{data['session_id']}"
    return None


SUBSCRIPTIONS_QUEUED_MAX = 64
"""Joins and leaves of one connection waiting to be made."""


class _TrackedOutbox(Outbox):
    """The connection's outbox: control messages queued by the hub (``joined``,
    notices) and by the outbox itself (``lagged``) pass through the protocol
    machine, so that it knows which rooms the connection is in.  An overflow
    of control messages never reaches the hub or a room: it closes the
    connection (1008)."""

    def __init__(self, connection: Connection, codec: Codec, settings: ServerSettings) -> None:
        super().__init__(
            codec,
            max_messages=settings.outbox_messages_max,
            max_bytes=settings.outbox_bytes_max,
            max_control=settings.outbox_control_max,
            on_delivered=connection.delivered,
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


class Connection:
    """One client connection: hello, reader, writer, calls, subscriptions."""

    def __init__(
        self,
        state: AppState,
        transport: PeerTransport,
        codec: Codec,
        cookie_principal: Principal | None = None,
    ) -> None:
        self.state = state
        self.cookie_principal = cookie_principal
        self.ws = transport
        self.codec = codec
        self.settings = state.settings
        self.world = state.world
        self.hub = state.hub
        self.machine = ServerConnection(codec=codec, limits=self.settings.limits)
        self._delivery = self.hub.metrics.delivery_seconds
        self.outbox = _TrackedOutbox(self, codec, self.settings)
        self.connection_id: str | None = None
        self.principal: Principal | None = None
        self.started_s = self.world.clock.now_s()
        self.bytes_received = 0
        self._close: _Close | None = None
        self._going_away = False
        self._read_scope = trio.CancelScope()
        self._calls: trio.Nursery | None = None
        # joins and leaves waiting for the subscriber task, which runs only
        # while there are some (an idle connection has no task for them)
        self._subscriptions: deque[JoinRequested | LeaveRequested | SubscriptionDropped] = deque()
        self._subscriptions_room = trio.lowlevel.ParkingLot()
        self._subscribing = False
        self._inner: trio.Nursery | None = None
        self.finished = trio.Event()
        self._welcomed = trio.Event()
        self._gone = trio.CancelScope()
        self._inflight = 0  # session writes submitted and not answered yet
        self._settled = trio.lowlevel.ParkingLot()
        self._farewell = (ErrorCode.GOING_AWAY, "the server is shutting down")
        self._renewed = trio.lowlevel.ParkingLot()  # the principal's expiry moved
        self._expiry_watched = False

    def log_fields(self, call: Call | None = None, room: str | None = None) -> dict[str, Any]:
        """The ids an error line of this connection carries: the connection,
        its user, the room (given, or the one ``call`` is about) and the call."""
        fields: dict[str, Any] = {
            "connection_id": self.connection_id,
            "user_id": None if self.principal is None else self.principal.user_id,
        }
        if call is not None:
            room = room or call_room(call)
            fields.update(service=call.service, method=call.method, ref=call.ref)
            if call.id is not None:
                fields["id"] = call.id
        if room is not None:
            fields["room"] = room
        return fields

    def statistics(self) -> dict[str, Any]:
        """What ``/debug/connections`` (and ``agor-actors top``) shows of it."""
        stats = self.machine.statistics()
        outbox = self.outbox.statistics()
        return {
            "connection_id": self.connection_id,
            "user_id": None if self.principal is None else self.principal.user_id,
            "codec": self.codec.value,
            "age_s": round(self.world.clock.now_s() - self.started_s, 3),
            "rooms": sorted(self.machine.subscriptions),
            "frames_received": stats.frames_received,
            "messages_received": stats.messages_received,
            "bytes_received": self.bytes_received,
            "frames_sent": outbox.sent_frames,
            "messages_sent": outbox.sent_messages,
            "bytes_sent": outbox.sent_bytes,
            "outbox_messages": outbox.queued_messages,
            "outbox_bytes": outbox.queued_bytes,
            "pending_calls": stats.pending_calls,
            "lagged": outbox.lagged,
            "rate_limited": stats.rate_limited,
        }

    def delivered(self, committed_s: float) -> None:
        """A frame of room events committed at ``committed_s`` was written
        (see :meth:`Outbox._written`): its commit-to-socket latency."""
        self._delivery.observe(max(0.0, self.world.clock.now_s() - committed_s))

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        """Serve the connection until it closes, or until the peer is gone
        (then everything stops at once); the hub is told in any case."""
        gauge = self.hub.metrics.connections.labels(self.codec.value)
        gauge.inc()
        self.hub.metrics.connections_opened.labels(self.codec.value).inc()
        try:
            with self._gone:
                await self._run()
        finally:
            gauge.dec()
            self._log_closed()
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
                        log.exception("hub.disconnect failed", extra=self.log_fields())
            self.finished.set()

    def _log_closed(self) -> None:
        """One line per connection that got through ``hello``: who, codec,
        duration, and how it ended (the close code and reason, or the peer
        gone)."""
        if self.connection_id is None:
            return
        if self._close is not None:
            code, reason = self._close
        elif self._gone.cancel_called:
            code, reason = 1006, "the peer went away"
        else:
            code, reason = 1000, ""
        log.info(
            "connection closed",
            extra={
                "connection_id": self.connection_id,
                "user_id": self.principal.user_id if self.principal else None,
                "codec": self.codec.value,
                "duration_s": round(self.world.clock.now_s() - self.started_s, 3),
                "close_code": code,
                "reason": reason,
                "frames_sent": self.outbox.sent_frames,
            },
        )

    async def _run(self) -> None:
        writer_done = trio.Event()
        async with trio.open_nursery() as outer:
            outer.start_soon(self._writer, writer_done)
            async with trio.open_nursery() as calls:
                self._calls = calls
                with self._read_scope:
                    async with trio.open_nursery() as inner:
                        self._inner = inner
                        inner.start_soon(self._watchdog)
                        await self._read_loop()
                        inner.cancel_scope.cancel()
                # Reading has stopped.  In-flight calls get a grace period to
                # be answered (a drain) or none (a protocol violation).
                grace = self.settings.call_grace_s if self._going_away else 0.0
                if grace:
                    calls.start_soon(self._settle)
                calls.cancel_scope.deadline = self.world.clock.now_s() + grace
            if self._going_away and self._close is None:
                frame = self.machine.close(*self._farewell)
                self._queue_raw(frame)
                self._close = (self.machine.close_code or 1001, self.machine.close_reason)
            self.outbox.close()
            with trio.move_on_after(self.settings.flush_timeout_s):
                await writer_done.wait()
            outer.cancel_scope.cancel()
        code, reason = self._close or (1000, "")
        with contextlib.suppress(TransportClosed):  # already closed by the peer
            await self.ws.close(code, reason)

    async def _writer(self, done: trio.Event) -> None:
        """The one write path: the outbox into the transport (at once while
        it is idle; this task sends what queues while it is busy)."""
        try:
            await self.outbox.run(self.ws)
        finally:
            done.set()

    async def _read_loop(self) -> None:
        while not self.closing():
            try:
                data = await self.ws.receive()
            except TransportClosed:
                self.peer_gone()
                return
            self.bytes_received += len(data)
            events = self.machine.receive_data(data, self.world.clock.now_s())
            if self.machine.state is ServerState.CLOSING:
                # a message of this frame closes the connection: the frame
                # is refused whole (the messages before it in its batch are
                # not run: no pong, result, left or welcome could answer
                # them after the close), with the one error that says why
                events = [e for e in events if isinstance(e, ProtocolViolation) and e.close_code]
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

    def _watch_expiry(self) -> None:
        """Watch the principal's expiry, if it has one (a task only then:
        local tokens never expire and cost no task)."""
        principal = self.principal
        if principal is None or principal.expires_ms is None:
            return
        self._renewed.unpark_all()
        if not self._expiry_watched and self._inner is not None:
            self._expiry_watched = True
            self._inner.start_soon(self._expiry)

    async def _expiry(self) -> None:
        """Close the connection (``token_expired``, 4002) once its token
        expires without an ``auth`` that renewed it: like a drain, calls in
        flight are answered first, so that the client refreshes its token
        and resumes with nothing lost."""
        while True:
            principal = self.principal
            if principal is None or principal.expires_ms is None:
                self._expiry_watched = False
                return
            left_s = (principal.expires_ms - self.world.wall.now_ms()) / 1000
            if left_s <= 0:
                break
            with trio.move_on_after(left_s):
                await self._renewed.park()
        security_log.info(
            "token expired",
            extra={"connection_id": self.connection_id, "user_id": principal.user_id},
        )
        self.go_away(ErrorCode.TOKEN_EXPIRED, "the token expired: refresh it and reconnect")

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

    def _log_flood(self, why: str) -> None:
        stats = self.machine.statistics()
        security_log.warning(
            "flood close",
            extra={
                "connection_id": self.connection_id,
                "user_id": None if self.principal is None else self.principal.user_id,
                "reason": why,
                "rate_limited": stats.rate_limited,
            },
        )

    def overflowed(self) -> None:
        """The client does not read: close at once (1008), nothing more to send."""
        if self._close is None:
            self._log_flood("not reading its messages")
            with contextlib.suppress(LocalProtocolError):
                self.machine.close(ErrorCode.FLOOD, "not reading")
            self._close = (1008, "flood: not reading its messages")
            self._stop_reading()

    def peer_gone(self) -> None:
        """The peer is gone: stop everything now (no flush, no close)."""
        self._gone.cancel()

    def go_away(
        self,
        code: ErrorCode = ErrorCode.GOING_AWAY,
        message: str = "the server is shutting down",
    ) -> None:
        """Drain: stop reading, answer what is in flight, close with 1001
        (or ``code``'s close code)."""
        if not self._going_away:
            self._farewell = (code, message)
        self._going_away = True
        self._stop_reading()

    # ------------------------------------------------------------- dispatch

    async def _dispatch(self, event: ServerEvent) -> None:
        if isinstance(event, ProtocolViolation):
            await self._on_violation(event)
        elif isinstance(event, HelloReceived):
            await self._on_hello(event)
        elif isinstance(event, CallReceived):
            await self._on_call(event)
        elif isinstance(event, AuthReceived):
            await self._on_auth(event)
        elif isinstance(event, JoinRequested | LeaveRequested | SubscriptionDropped):
            await self._subscribe(event)
        elif isinstance(event, PingReceived):
            self.outbox.offer_control(self.machine.pong(event.ping.t))
        else:
            assert isinstance(event, PresenceReceived)
            await self._on_presence(event)

    async def _on_violation(self, event: ProtocolViolation) -> None:
        self.hub.metrics.refused.labels(event.error.code.value).inc()
        if event.close_code is not None:
            if event.error.code is ErrorCode.FLOOD:
                self._log_flood("kept sending while rate limited")
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
            if token:
                principal = await self.hub.authenticate(token)
            elif self.cookie_principal is not None:
                principal = await self.hub.confirm(self.cookie_principal)
            else:
                principal = None
        except Exception:
            log.exception("authenticate failed", extra=self.log_fields())
            self._close_with(ErrorCode.SERVER_ERROR, "authentication failed")
            return
        if principal is None:
            if token:
                security_log.info("token refused", extra={"transport": "websocket"})
                self._close_with(ErrorCode.UNAUTHORIZED, "invalid token")
            elif self.cookie_principal is not None:
                self._close_with(ErrorCode.UNAUTHORIZED, "this sign-in is no longer valid")
            else:
                self._close_with(ErrorCode.NOT_AUTHENTICATED, "hello without a token")
            return
        connection_id = self.world.entropy.new_id(self.world.wall.now_ms())
        try:
            self.hub.connect(principal, connection_id)
        except ServiceError as exc:
            security_log.warning(
                "connection refused",
                extra={"user_id": principal.user_id, "reason": exc.message},
            )
            self._close_with(ErrorCode.TOO_MANY_CONNECTIONS, exc.message)
            return
        self.principal = principal
        self.connection_id = connection_id
        self.outbox.offer_control(
            self.machine.welcome(
                connection_id=self.connection_id,
                user_id=principal.user_id,
                heartbeat_ms=self.settings.heartbeat_ms,
                expires_at=principal.expires_ms,
            )
        )
        self._welcomed.set()
        self._watch_expiry()
        log.info(
            "connection opened",
            extra={
                "connection_id": self.connection_id,
                "user_id": principal.user_id,
                "codec": self.codec.value,
            },
        )

    async def _on_auth(self, event: AuthReceived) -> None:
        """In-band re-authentication: a new token of the same user replaces
        the connection's principal (and its expiry).  A refused one is
        answered with an error and changes nothing."""
        assert self.principal is not None
        ref, current = event.auth.ref, self.principal
        try:
            principal = await self.hub.authenticate(event.auth.token)
        except Exception:
            log.exception("authenticate failed")
            self._answer_error(ref, ErrorCode.INTERNAL.value, "authentication failed")
            return
        if principal is None:
            security_log.info(
                "token refused",
                extra={
                    "transport": "websocket",
                    "connection_id": self.connection_id,
                    "user_id": current.user_id,
                    "in_band": True,
                },
            )
            self._answer_error(ref, ErrorCode.NOT_AUTHENTICATED.value, "invalid token")
            return
        if principal.user_id != current.user_id:
            security_log.warning(
                "auth for another user refused",
                extra={"connection_id": self.connection_id, "user_id": current.user_id},
            )
            self._answer_error(
                ref, ErrorCode.FORBIDDEN.value, "the token is another user's: reconnect to switch"
            )
            return
        self.principal = principal
        self._renewed.unpark_all()
        self._watch_expiry()
        try:
            frame = self.machine.result(
                ref, data={"user_id": principal.user_id, "expires_at": principal.expires_ms}
            )
        except LocalProtocolError:
            return  # closing
        self.outbox.offer_control(frame)

    async def _on_call(self, event: CallReceived) -> None:
        """Start a call, in the reader: a session's write is in the session's
        mailbox before the next message is read (a connection's writes keep
        its order; a busy session slows this reader), and its result is sent
        from the answering actor's task once durable.  Anything else runs as
        a task of its own, concurrent with the others (the machine bounds how
        many are pending)."""
        assert self.principal is not None and self._calls is not None
        call = event.call
        started_s = self.world.clock.now_s()
        try:
            run = await self.hub.submit(
                self.principal,
                self.connection_id,
                call,
                partial(self._answered, call, started_s),
                caller_gone=self.ws.peer_gone,
            )
        except Exception as exc:
            self._answer_exception(call, exc)
            return
        if run is None:
            self._inflight += 1
        else:
            self._calls.start_soon(self._run_call, call, run, started_s)

    def _answered(self, call: Call, started_s: float, result: outcome.Outcome[Any]) -> None:
        """A session's answer to a write (in the session actor's task)."""
        if isinstance(result, outcome.Value):
            self._observe(call, started_s)
        self._inflight -= 1
        if self._inflight == 0:
            self._settled.unpark_all()
        if self._close is not None and not self._going_away:
            return  # closing without answers (a violation, the peer gone)
        if isinstance(result, outcome.Value):
            self._answer(call, result.value)
        else:
            assert isinstance(result, outcome.Error)
            self._answer_exception(call, result.error)

    async def _run_call(
        self, call: Call, run: Callable[[], Awaitable[Any]], started_s: float
    ) -> None:
        """One call that is not a session's write.  Cancelled (on close)
        before its result: no result."""
        try:
            data = await run()
        except Exception as exc:
            self._answer_exception(call, exc)
            return
        self._observe(call, started_s)
        self._answer(call, data)

    def _observe(self, call: Call, started_s: float) -> None:
        """The latency of a call that succeeded (so its service and method
        exist: the label values stay bounded)."""
        if call.service in _SERVICES:
            self.hub.metrics.call_seconds(call.service, call.method).observe(
                self.world.clock.now_s() - started_s
            )

    def _answer_exception(self, call: Call, exc: BaseException) -> None:
        """Answer a call that failed.  The server's own failures (the store
        unavailable, data it refused, a bug) are logged with the
        connection's, the user's and the room's ids; the caller's mistakes
        (``not_found``, ``conflict``, ``forbidden``...) only answered."""
        if isinstance(exc, ServiceError):
            if exc.code in SERVER_FAILURES:
                log.warning(
                    "call failed: %s",
                    exc.message,
                    extra={**self.log_fields(call), "code": exc.code},
                )
            self._answer_error(call.ref, exc.code, exc.message, exc.data)
            return
        log.error(
            "call failed",
            exc_info=exc,
            extra={**self.log_fields(call), "code": ErrorCode.INTERNAL.value},
        )
        self._answer_error(call.ref, ErrorCode.INTERNAL.value, "internal error")

    def _answer(self, call: Call, data: Any) -> None:
        try:
            frame = self.machine.result(call.ref, data=data)
        except LocalProtocolError as exc:
            if self.machine.state is not ServerState.OPEN:
                return
            log.error("result cannot be encoded: %s", exc, extra=self.log_fields(call))
            self._answer_error(call.ref, ErrorCode.INTERNAL.value, "result cannot be encoded")
            return
        self.outbox.offer_control(frame)

    async def _settle(self) -> None:
        """Wait until every session write in flight was answered."""
        while self._inflight:
            await self._settled.park()

    def _answer_error(self, ref: int, code: str, message: str, data: Any = None) -> None:
        try:
            frame = self.machine.result_error(ref, code, message, data)
        except LocalProtocolError:
            if self.machine.state is not ServerState.OPEN:
                return
            frame = self.machine.result_error(ref, code, message)
        self.outbox.offer_control(frame)

    async def _subscribe(self, event: JoinRequested | LeaveRequested | SubscriptionDropped) -> None:
        """Queue a join or leave for the subscriber task (started if it is
        not running).  Bound: ``SUBSCRIPTIONS_QUEUED_MAX``; beyond it the
        reader waits (the client is slowed, nothing is dropped)."""
        while len(self._subscriptions) >= SUBSCRIPTIONS_QUEUED_MAX:
            await self._subscriptions_room.park()
        self._subscriptions.append(event)
        if not self._subscribing:
            assert self._inner is not None
            self._subscribing = True
            self._inner.start_soon(self._subscriber)

    async def _subscriber(self) -> None:
        """Joins and leaves, one at a time in the order they were received;
        returns once none is left."""
        try:
            while self._subscriptions:
                event = self._subscriptions.popleft()
                self._subscriptions_room.unpark()
                if not await self._change(event):
                    return
        finally:
            self._subscribing = False

    async def _change(self, event: JoinRequested | LeaveRequested | SubscriptionDropped) -> bool:
        """One join or leave; False if it failed (the connection closes)."""
        try:
            if isinstance(event, JoinRequested):
                await self._join(event.join, event.rejoin)
            elif isinstance(event, LeaveRequested):
                await self._leave(event.room)
            else:
                await self._drop(event.room)
        except Exception:
            room = event.join.room if isinstance(event, JoinRequested) else event.room
            log.exception(
                "subscription change failed: %s",
                type(event).__name__,
                extra=self.log_fields(room=room),
            )
            self._close_with(ErrorCode.SERVER_ERROR, "subscription failed")
            return False
        return True

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
            self._left(join.room, exc.code, exc.message)

    async def _leave(self, room: str) -> None:
        assert self.connection_id is not None
        await self.hub.leave(self.connection_id, room)
        self.outbox.drop_room(room)
        self._left(room)

    def _left(self, room: str, reason: str = "left", message: str | None = None) -> None:
        """Answer a join or leave with ``left``; nothing once the connection
        is closing (a bad frame came while the hub was asked: the close
        says why, and the client gets no more messages)."""
        if self.machine.state is not ServerState.OPEN:
            return
        self.outbox.offer_control(self.machine.left(room, reason, message))

    async def _drop(self, room: str) -> None:
        assert self.connection_id is not None
        await self.hub.leave(self.connection_id, room)
        self.outbox.drop_room(room)
