"""The client package's public names (implementation modules are private)."""

from __future__ import annotations

import agor_actors.client as client

PUBLIC = {
    "Activity",
    "ActivityEntry",
    "ActivityFeed",
    "ActivityPage",
    "BoardPresence",
    "CursorSender",
    "Highlight",
    "PresenceSender",
    "PresenceUser",
    "Throttle",
    "CallError",
    "Client",
    "ClientClosed",
    "ClientObserver",
    "ClientStatistics",
    "ConnectionLost",
    "REJOIN_CODES",
    "EventStream",
    "Loader",
    "MessageWriter",
    "Mirror",
    "Resources",
    "RoomEvent",
    "Service",
    "StreamBroken",
    "apply_event",
    "connect",
    "Credentials",
    "sign_in",
    "load_room",
    "open_websocket",
    "WebSocketDialer",
    "WebSocketTransport",
}


def test_public_names() -> None:
    exported = {name for name in vars(client) if not name.startswith("_")}
    assert exported == PUBLIC
