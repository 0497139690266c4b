"""The seams through which every source of nondeterminism enters.

Nothing in ``agor_actors``, ``supervisors``, ``protocols`` or ``sim`` reads the
clock, randomness, threads or the network except through the objects defined
here.  The daemon passes :func:`real_world`; the simulator passes
:func:`simulated_world`, which draws everything from one seed and runs the
store inline on trio's (mock) clock.
"""

from __future__ import annotations

import os
import random
import secrets
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Literal, Protocol, TypeVar, runtime_checkable

import attrs
import trio

T = TypeVar("T")

__all__ = [
    "Blocking",
    "Clock",
    "DialFailed",
    "Dialer",
    "Entropy",
    "InlineBlocking",
    "MessageTransport",
    "OutFrame",
    "PeerTransport",
    "SecureEntropy",
    "SeededEntropy",
    "SystemWallClock",
    "ThreadBlocking",
    "TransportClosed",
    "TrioClock",
    "VirtualWallClock",
    "WallClock",
    "World",
    "real_world",
    "simulated_world",
]


# --------------------------------------------------------------------------- time


@runtime_checkable
class Clock(Protocol):
    """Monotonic time in seconds.  Sleeps and timeouts use trio directly,
    whose clock the simulator replaces with ``MockClock``."""

    def now_s(self) -> float: ...


@runtime_checkable
class WallClock(Protocol):
    """Wall-clock timestamps (milliseconds since the Unix epoch) for events,
    activity entries and hybrid logical clocks."""

    def now_ms(self) -> int: ...


class TrioClock:
    """The monotonic clock of the running trio loop (real or mock)."""

    def now_s(self) -> float:
        return trio.current_time()


class SystemWallClock:
    """The operating system's wall clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


@attrs.define
class VirtualWallClock:
    """A wall clock derived from trio's (mock) clock: ``epoch_ms`` plus the
    virtual seconds elapsed, plus a per-client ``skew_ms`` for simulating
    clients whose clocks disagree."""

    epoch_ms: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    skew_ms: int = 0

    def now_ms(self) -> int:
        return self.epoch_ms + self.skew_ms + int(trio.current_time() * 1000)


# --------------------------------------------------------------------------- entropy


@runtime_checkable
class Entropy(Protocol):
    """Ids, tokens, jitter and sampling."""

    def new_id(self, now_ms: int) -> str:
        """A time-ordered unique id (UUIDv7 layout) as a string."""
        ...

    def token(self, nbytes: int = 32) -> str:
        """A URL-safe secret of ``nbytes`` random bytes."""
        ...

    def random(self) -> float:
        """A float in [0, 1)."""
        ...

    def randrange(self, stop: int) -> int: ...

    def fork(self, name: str) -> Entropy:
        """An independent stream for one component, named so that the
        simulator's streams do not depend on the order components draw."""
        ...


def _uuid7(now_ms: int, rand_a: int, rand_b: int) -> str:
    """The UUIDv7 string of ``now_ms`` with 12 + 62 random bits (RFC 9562:
    48-bit milliseconds, version 7, variant 0b10), formatted directly
    (``str(uuid.UUID(int=...))`` costs three times as much)."""
    value = (now_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (rand_a & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand_b & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_POOL_BYTES = 4096
"""Bytes of operating-system randomness :class:`SecureEntropy` reads at a
time for ids (one ``getrandom`` call per ~400 ids instead of two per id)."""


_LIVE_SECURE: weakref.WeakSet[SecureEntropy] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for entropy in list(_LIVE_SECURE):
        entropy._forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SecureEntropy:
    """Real entropy from the operating system.  Tokens and draws come from
    ``secrets`` each time; ids (unique, not secret) are cut from a pool of
    ``os.urandom`` bytes, refilled when spent and emptied in a forked
    child (so parent and child never hand out the same bits)."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        _LIVE_SECURE.add(self)

    def _forget(self) -> None:
        self._pool = b""
        self._at = 0

    def new_id(self, now_ms: int) -> str:
        at = self._at
        if at + 10 > len(self._pool):
            self._pool = os.urandom(_POOL_BYTES)
            at = 0
        self._at = at + 10
        bits = int.from_bytes(self._pool[at : at + 10], "big")
        return _uuid7(now_ms, bits >> 68, bits)

    def token(self, nbytes: int = 32) -> str:
        return secrets.token_urlsafe(nbytes)

    def random(self) -> float:
        return secrets.randbits(53) / (1 << 53)

    def randrange(self, stop: int) -> int:
        return secrets.randbelow(stop)

    def fork(self, name: str) -> Entropy:
        return self


class SeededEntropy:
    """Deterministic entropy from one seed; :meth:`fork` derives named
    sub-streams so components draw independently of each other."""

    def __init__(self, seed: int | str) -> None:
        self._seed = str(seed)
        self._rng = random.Random(self._seed)

    @property
    def rng(self) -> random.Random:
        return self._rng

    def new_id(self, now_ms: int) -> str:
        return _uuid7(now_ms, self._rng.getrandbits(12), self._rng.getrandbits(62))

    def token(self, nbytes: int = 32) -> str:
        return self._rng.getrandbits(nbytes * 8).to_bytes(nbytes, "big").hex()

    def random(self) -> float:
        return self._rng.random()

    def randrange(self, stop: int) -> int:
        return self._rng.randrange(stop)

    def fork(self, name: str) -> SeededEntropy:
        return SeededEntropy(f"{self._seed}/{name}")


# --------------------------------------------------------------------------- blocking work


@runtime_checkable
class Blocking(Protocol):
    """Runs blocking work (database calls).  Real: a worker thread, or the
    loop's own thread for short local work.  Simulated: inline, so thread
    timing cannot leak into virtual time."""

    async def run(self, fn: Callable[[], T], *, local: bool = False) -> T:
        """Run ``fn`` and return its result.  A checkpoint.  If cancelled
        while a worker thread runs ``fn``, the thread is abandoned and its
        result discarded: callers must make ``fn`` idempotent or transactional.

        ``local``: ``fn`` is short work on this machine's own files (a
        SQLite commit: an append to its log, synced only at checkpoints),
        which an implementation may run on the loop's thread: no thread
        round trip and no GIL handed back and forth with the loop, for a
        loop that waits while ``fn`` runs.  Then the call checks for
        cancellation first but does not yield.  Work that waits on the
        network (a PostgreSQL commit) is never ``local``."""
        ...


class _EagerLimiter:
    """A ``CapacityLimiter`` that takes a free token without a schedule
    point (trio's yields once even when a token is free; waiting for the
    thread is the schedule point here): one task step less per call."""

    def __init__(self, total: int) -> None:
        self._inner = trio.CapacityLimiter(total)

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        try:
            self._inner.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await self._inner.acquire_on_behalf_of(borrower)

    def release_on_behalf_of(self, borrower: object) -> None:
        self._inner.release_on_behalf_of(borrower)


class ThreadBlocking:
    """Blocking work in trio worker threads, at most ``max_threads`` at once;
    ``local`` work on the loop's own thread unless ``local_on_loop`` is
    False (``serve --sqlite-commit thread``)."""

    def __init__(self, max_threads: int = 4, *, local_on_loop: bool = True) -> None:
        self._limiter = _EagerLimiter(max_threads)
        self.local_on_loop = local_on_loop

    async def run(self, fn: Callable[[], T], *, local: bool = False) -> T:
        if local and self.local_on_loop:
            await trio.lowlevel.checkpoint_if_cancelled()
            return fn()
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)  # type: ignore[arg-type]


class InlineBlocking:
    """Blocking work called inline on the trio thread (simulator, tests)."""

    async def run(self, fn: Callable[[], T], *, local: bool = False) -> T:
        await trio.lowlevel.checkpoint()
        return fn()


# --------------------------------------------------------------------------- transport


class TransportClosed(Exception):
    """The peer or the network closed the connection."""

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@runtime_checkable
class MessageTransport(Protocol):
    """One message-oriented connection (a WebSocket or a simulated link).
    ``receive`` and ``send`` raise :class:`TransportClosed` once it is gone."""

    @property
    def subprotocol(self) -> str | None: ...

    async def receive(self) -> bytes | str: ...

    async def send(self, data: bytes | str) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class DialFailed(Exception):
    """A connection could not be opened.

    ``kind`` says whether trying again may help: ``"refused"`` (the peer
    answered and said no: an HTTP status, a subprotocol it does not speak),
    ``"timeout"`` (no answer in time) or ``"unreachable"`` (nothing
    answered: no route, nothing listening).  ``reason`` says why in words
    (``"connection refused"``); ``status`` and ``body`` are those of a
    refusal over HTTP (0 and empty otherwise)."""

    def __init__(
        self,
        kind: Literal["refused", "timeout", "unreachable"],
        reason: str,
        *,
        status: int = 0,
        body: bytes = b"",
    ) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason
        self.status = status
        self.body = body


@runtime_checkable
class Dialer(Protocol):
    """The client's way to the server: opens one message connection.  The
    Python client's WebSocket opener (:mod:`agor_actors.client`) and the
    simulator's network implement it, so the same client runs over both."""

    def dial(
        self,
        url: str,
        *,
        subprotocols: Sequence[str],
        headers: Sequence[tuple[str, str]] = (),
        connect_timeout_s: float = 10.0,
    ) -> AbstractAsyncContextManager[MessageTransport]:
        """``async with dialer.dial(url, subprotocols=[...]) as transport``:
        the connection, open (the handshake is done; ``transport.subprotocol``
        is the one the server chose among ``subprotocols``).  Entering raises
        :class:`DialFailed` (within ``connect_timeout_s``); leaving closes the
        connection (1000, bounded in time; at once when cancelled).  An
        exception raised in the block passes through unchanged."""
        ...


class OutFrame:
    """One message to send, prepared once for every connection that sends
    it.  ``payload`` is the encoded message (JSON text or CBOR bytes);
    ``wire`` caches what a server transport puts on the wire for it (for a
    WebSocket: the unmasked frame, the same bytes for every connection), so
    that a room's batch is framed once and written to every subscriber.
    A transport that needs no framing (the simulator's links) ignores it.

    ``committed_s`` (on the world's clock) is when the earliest event in it
    was made durable, for the delivery latency measured where the frame is
    written (0: not a fresh room delivery, not measured); ``measured`` says
    that a write of this shared frame was measured already."""

    __slots__ = ("committed_s", "measured", "payload", "wire")

    def __init__(self, payload: bytes | str, committed_s: float = 0.0) -> None:
        self.payload = payload
        self.wire: bytes | None = None
        self.committed_s = committed_s
        self.measured = False

    def __len__(self) -> int:
        return len(self.payload)


@runtime_checkable
class PeerTransport(Protocol):
    """The server's end of one message connection: the seam that the real
    WebSocket (:mod:`agor_actors.server`) and the simulator's links both
    implement, and that a connection's reader and outbox drive.

    Writes never wait in the caller: :meth:`try_send` either takes the whole
    frame (written at once, or its unwritten tail kept by the transport, at
    most one frame) or says the transport is busy; the connection's writer
    then waits in :meth:`wait_writable`.  Once the peer is gone,
    :meth:`try_send` takes and drops frames (the receive side reports the
    loss) and :meth:`receive` raises :class:`TransportClosed`."""

    async def receive(self) -> bytes | str:
        """The next message.  A checkpoint; raises :class:`TransportClosed`."""
        ...

    def try_send(self, frame: OutFrame) -> bool:
        """Take ``frame`` if nothing is pending (True), else False.  Never blocks."""
        ...

    @property
    def pending(self) -> bool:
        """Whether a frame taken is not all written yet (then
        :meth:`wait_writable` must run for it to go out)."""
        ...

    async def wait_writable(self) -> None:
        """Write what is pending as the peer takes it; return once
        :meth:`try_send` may take a frame.  A checkpoint."""
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake, bounded in time by the transport."""
        ...

    def peer_gone(self) -> bool:
        """Whether the peer is seen gone now (closed, reset), without
        waiting: what has arrived may be read ahead, bounded, into what
        :meth:`receive` returns next.  False when it cannot tell."""
        ...


# --------------------------------------------------------------------------- the world


@attrs.frozen
class World:
    """Everything an actor may learn from outside, injected."""

    clock: Clock
    wall: WallClock
    entropy: Entropy
    blocking: Blocking


def real_world(*, max_threads: int = 4, local_on_loop: bool = True) -> World:
    """The real seams: trio's clock, the system's wall clock and
    randomness, worker threads (``local`` work on the loop unless
    ``local_on_loop`` is False; see :class:`Blocking`)."""
    return World(
        clock=TrioClock(),
        wall=SystemWallClock(),
        entropy=SecureEntropy(),
        blocking=ThreadBlocking(max_threads, local_on_loop=local_on_loop),
    )


def simulated_world(seed: int | str, *, skew_ms: int = 0) -> World:
    return World(
        clock=TrioClock(),
        wall=VirtualWallClock(skew_ms=skew_ms),
        entropy=SeededEntropy(seed),
        blocking=InlineBlocking(),
    )
