"""``/metrics`` (and ``/health``) on a listener of their own
(``--metrics-host``/``--metrics-port``), so that a scraper need not reach
the public port and the public port does not serve the metrics (404 there).

A small quart-trio app served by hypercorn's own worker (the metrics port
has no WebSocket, so nothing of :mod:`._front` is needed) over a socket
made by :func:`~._serve.listen_socket` (a port in use is one line at
startup, as for the public port).  Its requests get access lines like the
public port's.  ``/metrics`` asks the same as on the public port: the
``metrics_token`` or the owner's token, as ``Authorization: Bearer``.
"""

from __future__ import annotations

import socket

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..domain import Principal, ServiceError
from ._app import bearer, error_response, health_answer, http_error_response, metrics_answer
from ._logs import install_access_log, note_user
from ._settings import AppState

__all__ = ["create_metrics_app", "serve_metrics"]


def create_metrics_app(state: AppState) -> QuartTrio:
    """The metrics port's app: ``GET /metrics`` and ``GET /health``; any
    other path is 404."""
    app = QuartTrio("agor_actors.server.metrics")
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    install_access_log(app, state.world.clock)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        return http_error_response(exc)

    async def _principal() -> Principal:
        token = bearer(request.headers.get("Authorization"))
        if token is None:
            raise ServiceError("not_authenticated", "Authorization: Bearer <token> required")
        principal = await state.hub.authenticate(token)
        if principal is None:
            raise ServiceError("not_authenticated", "invalid token")
        note_user(request.scope, principal.user_id)
        return principal

    @app.route("/metrics", methods=["GET"])
    async def metrics() -> Response:
        return await metrics_answer(state.hub, state.settings, _principal)

    @app.route("/health", methods=["GET"])
    async def health() -> Response:
        return health_answer(state)

    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def elsewhere(path: str) -> Response:
        return error_response("not_found", "this port serves /metrics and /health only", 404)

    return app


async def serve_metrics(
    state: AppState,
    sock: socket.socket,
    config: Config,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve :func:`create_metrics_app` on the listening ``sock`` until
    ``shutdown`` is set (then hypercorn's graceful end); closes ``sock``."""
    app = wrap_app(create_metrics_app(state), config.wsgi_max_body_size, "asgi")
    try:
        await worker_serve(
            app,
            config,
            sockets=Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]),
            shutdown_trigger=shutdown.wait,
            task_status=task_status,
        )
    finally:
        sock.close()
