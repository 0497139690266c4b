"""The store: SQLAlchemy Core tables, the single writer's group commit with
gap-free per-room sequences, and the reads of the services and rooms.

:class:`SqlStore` is plain synchronous code: call it through
``World.blocking.run(fn)``.  :class:`StoreWriter` is the actor that owns it
for writes: group commits, and the durable events sent to their rooms.
"""

from ._backend import Append as Append
from ._backend import Compact as Compact
from ._backend import EventDraft as EventDraft
from ._backend import EventPage as EventPage
from ._backend import Expect as Expect
from ._backend import History as History
from ._backend import Mutation as Mutation
from ._backend import Once as Once
from ._backend import SqlStore as SqlStore
from ._backend import StoredEvent as StoredEvent
from ._backend import WriteRequest as WriteRequest
from ._backend import WriteResult as WriteResult
from ._backend import hash_token as hash_token
from ._backend import open_store as open_store
from ._query import DEFAULT_LIMIT as DEFAULT_LIMIT
from ._query import MAX_LIMIT as MAX_LIMIT
from ._query import Page as Page
from ._schema import SCHEMA_VERSION as SCHEMA_VERSION
from ._schema import StoreConflict as StoreConflict
from ._schema import StoreError as StoreError
from ._schema import StoreFindError as StoreFindError
from ._schema import StoreFull as StoreFull
from ._schema import StoreIntegrityError as StoreIntegrityError
from ._schema import StoreNotFound as StoreNotFound
from ._schema import StoreQueryError as StoreQueryError
from ._schema import StoreRepeated as StoreRepeated
from ._schema import StoreSchemaError as StoreSchemaError
from ._schema import StoreUnavailable as StoreUnavailable
from ._schema import metadata as metadata
from ._writer import WRITER_NAME as WRITER_NAME
from ._writer import Committed as Committed
from ._writer import Flush as Flush
from ._writer import Resync as Resync
from ._writer import StoreWriter as StoreWriter
from ._writer import Write as Write
