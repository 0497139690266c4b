"""The daemon's core: the hub (every service's calls, joins, presence, the
authorization seam) over the actors of the domain and the store; the names
its callers need with it are re-exported."""

from ..domain import Principal as Principal
from ..domain import ServiceError as ServiceError
from ..outbox import Outbox as Outbox
from ..outbox import OutboxClosed as OutboxClosed
from ..outbox import OutboxOverflow as OutboxOverflow
from ..outbox import join_frame as join_frame
from ._backup import BackupError as BackupError
from ._backup import back_up_data_dir as back_up_data_dir
from ._datadir import DataDirLocked as DataDirLocked
from ._hub import AllowAll as AllowAll
from ._hub import Authorizer as Authorizer
from ._hub import Hub as Hub
from ._hub import NotClusterKeys as NotClusterKeys
from ._hub import NotClusterOwner as NotClusterOwner
from ._hub import open_hub as open_hub
