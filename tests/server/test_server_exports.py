"""The server package's public names (implementation modules are private)."""

from __future__ import annotations

import agor_actors.server as server

PUBLIC = {
    "AppState",
    "Connection",
    "LISTEN_BACKLOG",
    "ListenError",
    "ServerHub",
    "ServerSettings",
    "TCP_USER_TIMEOUT_MS",
    "create_app",
    "listen_socket",
    "origin_allowed",
    "parse_query",
    "run_daemon",
    "run_server",
    "serve",
    "serving",
    "tune_gc",
}


def test_public_names() -> None:
    exported = {name for name in vars(server) if not name.startswith("_")}
    assert exported == PUBLIC


def test_tune_gc_freezes_what_is_loaded_and_collects_young_objects_less_often() -> None:
    import gc

    from agor_actors.server._serve import GC_GEN0

    before = gc.get_threshold()
    try:
        server.tune_gc()
        assert gc.get_threshold() == (GC_GEN0, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_listening_socket_is_made_as_stack_md_says() -> None:
    import socket

    sock = server.listen_socket("127.0.0.1", 0)
    try:
        assert (
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            == server.TCP_USER_TIMEOUT_MS
        )
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert not sock.getblocking()
        assert server.LISTEN_BACKLOG == 2048
    finally:
        sock.close()
