"""The daemon's core: the hub, outboxes, the store writer."""

from ._api import Principal as Principal
from ._api import ServiceError as ServiceError
from ._hub import AllowAll as AllowAll
from ._hub import Authorizer as Authorizer
from ._hub import Hub as Hub
from ._hub import open_hub as open_hub
from ._outbox import Outbox as Outbox
from ._outbox import OutboxClosed as OutboxClosed
from ._outbox import OutboxOverflow as OutboxOverflow
from ._outbox import join_frame as join_frame
