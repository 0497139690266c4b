"""The broker between daemons (a cluster on one PostgreSQL): each daemon
publishes the events it commits, per room, and receives those of the rooms
its clients joined, which its room actors take in seq order (a hole is read
from the store).  Redis pub/sub through ``coredis`` or PostgreSQL
LISTEN/NOTIFY through libpq (``psycopg.pq``), behind a small seam
(:class:`BrokerLink`); :func:`open_broker_link` picks one by the URL."""

from ._feed import FeedStats as FeedStats
from ._feed import RoomFeed as RoomFeed
from ._link import BrokerLink as BrokerLink
from ._link import BrokerSession as BrokerSession
from ._link import RedisLink as RedisLink
from ._link import open_redis_link as open_redis_link
from ._open import broker_kind as broker_kind
from ._open import open_broker_link as open_broker_link
from ._pglink import PgNotifyError as PgNotifyError
from ._pglink import PgNotifyLink as PgNotifyLink
from ._pglink import open_pg_link as open_pg_link
from ._pglink import pg_channel as pg_channel
from ._publisher import PUBLISHER_NAME as PUBLISHER_NAME
from ._publisher import BrokerPublisher as BrokerPublisher
from ._wire import BrokerMessageError as BrokerMessageError
from ._wire import Lost as Lost
from ._wire import Remote as Remote
from ._wire import channel_for as channel_for
from ._wire import decode_events as decode_events
from ._wire import decode_message as decode_message
from ._wire import encode_events as encode_events
from ._wire import encode_lost as encode_lost
from ._wire import encode_presence as encode_presence
from ._wire import encode_presence_parts as encode_presence_parts
