"""The broker seam on PostgreSQL's LISTEN/NOTIFY, for a cluster that would
rather not run a Redis beside its database.

libpq's non-blocking API (``psycopg.pq``) driven from trio: a connection's
socket is waited on with ``trio.lowlevel.wait_readable``/``wait_writable``
and libpq is asked to parse what arrived (``consume_input``), so nothing
polls and no worker thread holds a connection (psycopg's own async
connection runs on asyncio only).  Each session is one listening connection
with one reader task (the only task that reads its socket); its commands
(LISTEN, UNLISTEN, the idle ping) go one at a time and their results are
collected by that reader.  Publishing has a connection of its own.

Channels: one per room, as on Redis, under PostgreSQL's identifier limit
(63 bytes): a longer name is hashed (:func:`pg_channel`, the same on every
daemon).  Payloads: NOTIFY takes text shorter than 8,000 bytes, so a
message goes as base64 and :attr:`PgNotifyLink.max_message_bytes` tells the
publisher to cut longer ones (``_wire``).  A group of messages goes as one
multi-statement query: one round trip, one transaction, delivered in order.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final

import trio
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._link import Handler

__all__ = ["PgNotifyError", "PgNotifyLink", "open_pg_link", "pg_channel", "pg_conninfo"]

log = logging.getLogger("agor_actors.broker")

NAME_BYTES_MAX: Final = 63
"""PostgreSQL's identifier limit (NAMEDATALEN - 1): a longer channel name
would be cut by LISTEN (and refused by NOTIFY)."""
PAYLOAD_BYTES_MAX: Final = 7999
"""A NOTIFY payload must be shorter than 8,000 bytes."""
MESSAGE_BYTES_MAX: Final = PAYLOAD_BYTES_MAX // 4 * 3
"""The longest message whose base64 fits in a payload (5,997 bytes)."""

_BAD = pq.ConnStatus.BAD
_FATAL = pq.ExecStatus.FATAL_ERROR


class PgNotifyError(Exception):
    """The server refused a command, or the connection is lost."""


def pg_channel(channel: str) -> str:
    """``channel`` as a PostgreSQL channel name: itself if it fits in an
    identifier, else its first characters and a hash of all of it."""
    if len(channel.encode()) <= NAME_BYTES_MAX:
        return channel
    digest = hashlib.sha256(channel.encode()).hexdigest()[:40]
    head = channel[:22].encode()[:22].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def pg_conninfo(url: str) -> str:
    """A libpq connection string from a broker URL: ``postgresql://...``,
    ``postgres://...`` or SQLAlchemy's ``postgresql+psycopg://...``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    return make_conninfo(f"postgresql://{rest}")


class _Conn:
    """A libpq connection in non-blocking mode, waited on through trio."""

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self.pgconn = pgconn
        self.fd = pgconn.socket

    @classmethod
    async def open(cls, conninfo: str) -> _Conn:
        """Checkpoint; cancelled, nothing is left open."""
        conninfo = await _resolved(conninfo)
        pgconn = pq.PGconn.connect_start(conninfo.encode())
        try:
            while True:
                if pgconn.status == _BAD:
                    raise PgNotifyError(f"connection failed: {_message(pgconn)}")
                status = pgconn.connect_poll()
                if status == pq.PollingStatus.OK:
                    break
                if status == pq.PollingStatus.READING:
                    await trio.lowlevel.wait_readable(pgconn.socket)
                elif status == pq.PollingStatus.WRITING:
                    await trio.lowlevel.wait_writable(pgconn.socket)
                else:
                    raise PgNotifyError(f"connection failed: {_message(pgconn)}")
            pgconn.nonblocking = 1
        except BaseException:
            pgconn.finish()
            raise
        return cls(pgconn)

    async def send(self, sql: bytes) -> None:
        """Send one query (checkpoint).  Cancelled, the connection is in an
        unknown state: the caller closes it."""
        self.pgconn.send_query(sql)
        while self.pgconn.flush() != 0:
            await trio.lowlevel.wait_writable(self.fd)

    def take_results(self) -> tuple[bool, str | None]:
        """The results of the query in flight that have arrived (never
        waits): ``(finished, first error)``."""
        error: str | None = None
        while not self.pgconn.is_busy():
            result = self.pgconn.get_result()
            if result is None:
                return True, error
            if result.status == _FATAL and error is None:
                error = result.get_error_message()
        return False, error

    def close(self) -> None:
        """Close it (if libpq has not already: a lost connection's socket
        is closed by libpq, and its number may be another socket's now)."""
        if self.pgconn.status != _BAD:
            trio.lowlevel.notify_closing(self.fd)
        self.pgconn.finish()


async def _resolved(conninfo: str) -> str:
    """``conninfo`` with its host name resolved by trio (libpq would
    resolve it in ``connect_start``, blocking the loop)."""
    params = conninfo_to_dict(conninfo)
    host = str(params.get("host") or "")
    if not host or params.get("hostaddr") or host.startswith("/") or "," in host:
        return conninfo
    try:
        ipaddress.ip_address(host)
        return conninfo
    except ValueError:
        pass
    port = int(str(params.get("port") or 5432))
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise PgNotifyError(f"cannot resolve {host!r}")
    return make_conninfo(conninfo, hostaddr=str(infos[0][4][0]))


def _message(pgconn: pq.abc.PGconn) -> str:
    return pgconn.get_error_message().strip() or "unknown error"


def _decode(payload: bytes) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        return payload  # not ours: the feed refuses it (and has the room read its log)


class _PgSession:
    """A listening connection; :meth:`closed` raises once it is lost.

    Its reader task alone waits on the socket: it parses what arrived,
    hands each notification to its channel's handler (which only queues)
    and collects the results of the command in flight.  Commands go one
    at a time (``_lock``); one that times out or is cancelled loses the
    session (its connection is then in an unknown state)."""

    def __init__(self, conn: _Conn, *, command_timeout_s: float) -> None:
        self._conn = conn
        self._escaping = pq.Escaping(conn.pgconn)
        self._command_timeout_s = command_timeout_s
        self._handlers: dict[str, tuple[str, Handler]] = {}
        """PostgreSQL channel -> (the feed's channel, its handler)."""
        self._lock = trio.Lock()
        self._finished: trio.Event | None = None
        self._error: str | None = None
        self._lost = trio.Event()
        self._lost_because = "the connection is lost"

    async def subscribe(self, handlers: Mapping[str, Handler]) -> None:
        if not handlers:
            return
        named = {pg_channel(c): (c, h) for c, h in handlers.items()}
        async with self._lock:
            # LISTEN is confirmed by the time it returns; a notification
            # can come only after it, so the handlers are in place first
            self._handlers.update(named)
            await self._command(b";".join(b"LISTEN " + self._ident(n) for n in named))

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        if not channels:
            return
        names = [pg_channel(c) for c in channels]
        async with self._lock:
            await self._command(b";".join(b"UNLISTEN " + self._ident(n) for n in names))
            for name in names:
                self._handlers.pop(name, None)

    async def closed(self) -> None:
        await self._lost.wait()
        raise PgNotifyError(self._lost_because)

    async def ping(self) -> None:
        """A round trip (checkpoint): raises if the server does not answer
        within the command timeout (then the session is lost)."""
        async with self._lock:
            await self._command(b"SELECT 1")

    def _ident(self, name: str) -> bytes:
        return self._escaping.escape_identifier(name.encode())

    async def _command(self, sql: bytes) -> None:
        if self._lost.is_set():
            raise PgNotifyError(self._lost_because)
        self._finished, self._error = trio.Event(), None
        try:
            with trio.fail_after(self._command_timeout_s):
                await self._conn.send(sql)
                self._collect()  # libpq may have read the answer while sending
                await self._finished.wait()
        except trio.TooSlowError:
            self._lose(f"no answer within {self._command_timeout_s} s")
            raise PgNotifyError(self._lost_because) from None
        except BaseException:
            self._lose("a command was interrupted")
            raise
        if self._lost.is_set():
            raise PgNotifyError(self._lost_because)
        if self._error is not None:
            raise PgNotifyError(self._error)

    def end(self) -> None:
        """The session is over (its connection about to close)."""
        self._lose("the session ended")

    def _lose(self, because: str) -> None:
        if not self._lost.is_set():
            self._lost_because = because
            self._lost.set()
        if self._finished is not None:
            self._finished.set()

    def _collect(self) -> None:
        """What libpq has parsed: the command's results, the notifications
        (each to its handler, which only queues).  Never waits."""
        pgconn = self._conn.pgconn
        if self._finished is not None and not self._finished.is_set():
            finished, error = self._conn.take_results()
            self._error = self._error or error
            if finished:
                self._finished.set()
        while (notify := pgconn.notifies()) is not None:
            named = self._handlers.get(notify.relname.decode("utf-8", "replace"))
            if named is not None:
                named[1](named[0], _decode(notify.extra))
        if pgconn.status == _BAD:
            raise PgNotifyError(_message(pgconn))

    async def read(self) -> None:
        """The reader task: until the connection is lost (then it returns)."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self._conn.fd)
                self._conn.pgconn.consume_input()
                self._collect()
        except Exception as exc:
            self._lose(f"the listening connection is lost: {exc}")


class PgNotifyLink:
    """:class:`~agor_actors.broker.BrokerLink` on PostgreSQL LISTEN/NOTIFY.

    ``conninfo`` (libpq's; :func:`pg_conninfo` makes one from a URL) names
    the database: the channels are the database's, whatever ``search_path``
    says, so clusters sharing a database share them."""

    max_message_bytes: int | None = MESSAGE_BYTES_MAX

    def __init__(
        self,
        conninfo: str,
        *,
        idle_ping_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        command_timeout_s: float = 5.0,
    ) -> None:
        name = str(conninfo_to_dict(conninfo).get("application_name") or "agor-broker")
        self._listen_info = make_conninfo(conninfo, application_name=f"{name}:listen")
        self._notify_info = make_conninfo(conninfo, application_name=f"{name}:notify")
        self._idle_ping_s = idle_ping_s
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._publishing: _Conn | None = None
        self._publish_lock = trio.Lock()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[_PgSession]:
        """A listening connection (one per session: a lost one is not made
        again here; the feed makes a new session)."""
        conn = await self._connect(self._listen_info)
        try:
            session = _PgSession(conn, command_timeout_s=self._command_timeout_s)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.read)
                nursery.start_soon(self._keep_alive, session)
                try:
                    yield session
                finally:
                    session.end()  # a command still waiting (a join's LISTEN) fails now
                    nursery.cancel_scope.cancel()
        finally:
            conn.close()

    async def _connect(self, conninfo: str) -> _Conn:
        try:
            with trio.fail_after(self._connect_timeout_s):
                return await _Conn.open(conninfo)
        except trio.TooSlowError:
            raise PgNotifyError(f"no connection within {self._connect_timeout_s} s") from None

    async def _keep_alive(self, session: _PgSession) -> None:
        """A ping every ``idle_ping_s``: a server that went away without a
        word (no FIN, no RST) ends the session within a ping's timeout."""
        while True:
            await trio.sleep(self._idle_ping_s)
            try:
                await session.ping()
            except Exception:
                return  # the session is lost: closed() says so

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """One multi-statement query of NOTIFYs (one round trip, one
        transaction: delivered together, in order).  A message longer than
        :attr:`max_message_bytes` raises ValueError (the publisher cuts
        them first).  Raises :class:`PgNotifyError` if the server cannot be
        reached; the connection is made again at the next publish."""
        if not messages:
            return
        statements = []
        for channel, message in messages:
            payload = base64.b64encode(message)
            if len(payload) > PAYLOAD_BYTES_MAX:
                raise ValueError(f"a broker message of {len(message)} bytes on {channel!r}")
            statements.append((pg_channel(channel), payload))
        async with self._publish_lock:
            conn = self._publishing
            try:
                if conn is None:
                    conn = self._publishing = await self._connect(self._notify_info)
                escaping = pq.Escaping(conn.pgconn)
                # base64 needs no quoting in a literal
                sql = b";".join(
                    b"NOTIFY %s, '%s'" % (escaping.escape_identifier(name.encode()), payload)
                    for name, payload in statements
                )
                await conn.send(sql)
                while True:
                    finished, error = conn.take_results()
                    if error is not None:
                        raise PgNotifyError(error)
                    if finished:
                        break
                    await trio.lowlevel.wait_readable(conn.fd)
                    conn.pgconn.consume_input()
                    if conn.pgconn.status == _BAD:
                        raise PgNotifyError(_message(conn.pgconn))
            except BaseException:
                # unknown state (cancelled mid-query, or lost): a new one next time
                if self._publishing is not None:
                    self._publishing.close()
                    self._publishing = None
                raise

    def close(self) -> None:
        if self._publishing is not None:
            self._publishing.close()
            self._publishing = None


@asynccontextmanager
async def open_pg_link(url: str, **kwargs: float) -> AsyncIterator[PgNotifyLink]:
    """A :class:`PgNotifyLink` to the database at ``url``.  Connects lazily:
    an unreachable server makes publishing and subscribing fail, not this."""
    link = PgNotifyLink(pg_conninfo(url), **kwargs)
    try:
        yield link
    finally:
        link.close()
