"""Hooks through which a program watches what the client sees.

The simulator checks the daemon through them (events gap-free and in order,
the server's claims, protocol violations) while the real client does the
work; a test or a debugging tool can log through them.  The client calls
them only when an observer was given (``connect(..., observer=...)``), so
they cost nothing otherwise.
"""

from __future__ import annotations

from protocols import ClientEvent

__all__ = ["ClientObserver"]


class ClientObserver:
    """Subclass and override what you need; each default does nothing.

    Each hook is called synchronously in the client's own task (the reader,
    or whichever task notices a connection's loss), so it must not block; an
    exception it raises ends that connection (the client reconnects)."""

    def frame_received(self, frame: bytes | str) -> None:
        """A frame arrived, before the protocol machine reads it."""

    def protocol_event(self, event: ClientEvent) -> None:
        """The protocol machine yielded ``event``, before the client acts on
        it: every kind, in the machine's order, also those of a
        connection's loss (the ``connection_lost`` results of calls in
        flight; the rooms wait to be rejoined)."""
