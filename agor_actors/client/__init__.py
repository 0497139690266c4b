"""The Python client of the daemon (trio): calls, joined rooms kept as local
mirrors, event streams, reconnect and resume; board presence (facepile,
cursors, follow mode, highlights), the throttled cursor sender and the
activity log; a message streamed exactly once across reconnects (``MessageWriter``)."""

from ._client import REJOIN_CODES as REJOIN_CODES
from ._client import CallError as CallError
from ._client import Client as Client
from ._client import ClientClosed as ClientClosed
from ._client import ClientStatistics as ClientStatistics
from ._client import ConnectionLost as ConnectionLost
from ._client import EventStream as EventStream
from ._client import Loader as Loader
from ._client import RoomEvent as RoomEvent
from ._client import Service as Service
from ._client import connect as connect
from ._client import load_room as load_room
from ._credentials import Credentials as Credentials
from ._credentials import sign_in as sign_in
from ._mirror import Mirror as Mirror
from ._mirror import Resources as Resources
from ._mirror import apply_event as apply_event
from ._observer import ClientObserver as ClientObserver
from ._presence import Activity as Activity
from ._presence import ActivityEntry as ActivityEntry
from ._presence import ActivityFeed as ActivityFeed
from ._presence import ActivityPage as ActivityPage
from ._presence import BoardPresence as BoardPresence
from ._presence import CursorSender as CursorSender
from ._presence import Highlight as Highlight
from ._presence import PresenceSender as PresenceSender
from ._presence import PresenceUser as PresenceUser
from ._presence import Throttle as Throttle
from ._stream import MessageWriter as MessageWriter
from ._stream import StreamBroken as StreamBroken
from ._transport import WebSocketDialer as WebSocketDialer
from ._transport import WebSocketTransport as WebSocketTransport
from ._transport import open_websocket as open_websocket
