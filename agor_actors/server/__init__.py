"""The daemon's server, on one port: ``/ws`` (the protocol over WebSocket:
wsproto on the connection's own socket), the REST services, ``/health`` and
``/debug/actors`` (quart-trio on hypercorn).  :class:`Connection` serves the
protocol over any :class:`~agor_actors.world.PeerTransport` (the simulator
drives it over its links)."""

from ._app import create_app as create_app
from ._app import parse_query as parse_query
from ._connection import Connection as Connection
from ._serve import LISTEN_BACKLOG as LISTEN_BACKLOG
from ._serve import TCP_USER_TIMEOUT_MS as TCP_USER_TIMEOUT_MS
from ._serve import ListenError as ListenError
from ._serve import listen_socket as listen_socket
from ._serve import run_daemon as run_daemon
from ._serve import run_server as run_server
from ._serve import serve as serve
from ._serve import serving as serving
from ._serve import tune_gc as tune_gc
from ._settings import AppState as AppState
from ._settings import ServerHub as ServerHub
from ._settings import ServerSettings as ServerSettings
from ._settings import origin_allowed as origin_allowed
