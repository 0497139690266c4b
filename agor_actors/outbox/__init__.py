"""One connection's outbox: bounded, the connection's one write path, into
any :class:`~agor_actors.world.PeerTransport` (see :mod:`._outbox`)."""

from ._outbox import Frame as Frame
from ._outbox import Outbox as Outbox
from ._outbox import OutboxClosed as OutboxClosed
from ._outbox import OutboxOverflow as OutboxOverflow
from ._outbox import OutboxStats as OutboxStats
from ._outbox import join_frame as join_frame
