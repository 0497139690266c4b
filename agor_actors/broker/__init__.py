"""The broker between daemons (a cluster on one PostgreSQL): each daemon
publishes the events it commits, per room, and receives those of the rooms
its clients joined, which its room actors take in seq order (a hole is read
from the store).  Redis pub/sub through ``coredis``, behind a small seam
(:class:`BrokerLink`)."""

from ._feed import FeedStats as FeedStats
from ._feed import RoomFeed as RoomFeed
from ._link import BrokerLink as BrokerLink
from ._link import BrokerSession as BrokerSession
from ._link import RedisLink as RedisLink
from ._link import open_redis_link as open_redis_link
from ._publisher import PUBLISHER_NAME as PUBLISHER_NAME
from ._publisher import BrokerPublisher as BrokerPublisher
from ._wire import BrokerMessageError as BrokerMessageError
from ._wire import Remote as Remote
from ._wire import channel_for as channel_for
from ._wire import decode_events as decode_events
from ._wire import decode_message as decode_message
from ._wire import encode_events as encode_events
from ._wire import encode_presence as encode_presence
