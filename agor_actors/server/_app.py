"""The daemon's REST routes, ``/health`` and ``/debug/actors``: a quart-trio
app, served by hypercorn through :mod:`._front` (``/ws`` is not hypercorn's:
see :mod:`._websocket`).

The REST routes call the same hub methods as ``call`` over the WebSocket,
with ``Authorization: Bearer <token>`` and JSON bodies:

=====================================  ==========================================
``GET /<service>?<query>``             ``find`` (query string: :func:`parse_query`)
``POST /<service>``                    ``create`` (201)
``GET /<service>/<id>``                ``get``
``PATCH /<service>/<id>``              ``patch`` (``If-Match: <rev>`` = ``base_rev``, whole)
``PUT /<service>/<id>``                ``update`` (same)
``DELETE /<service>/<id>``             ``remove``
``POST /<service>/<id>/<method>``      a custom method (``tasks/<id>/start``...)
``POST /authentication``               sign in (``{strategy: "local", name,
                                       password}``) or refresh (``{strategy:
                                       "refresh", refreshToken}``); no token
``DELETE /authentication``             sign out (``{refreshToken}``)
``GET /health``                        no token; 503 while draining
``GET /debug/actors``                  the supervision tree, owner only
``GET /debug/connections?limit=100``   the busiest connections (frames and bytes
                                       sent and received, outbox depth, user,
                                       codec, rooms), owner only
``GET /metrics``                       Prometheus text format: owner, or the
                                       ``metrics_token`` as a Bearer token (404
                                       with ``metrics_port`` set: it is served
                                       there, see :mod:`._metrics_port`)
=====================================  ==========================================

Errors are ``{"code", "message", "data"}`` with ``ServiceError.http_status``;
a body that is not JSON is 400 ``bad_json``, a missing or wrong token 401
``not_authenticated``, a foreign ``Origin`` 403 ``forbidden``.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Quart, Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..domain import Principal, ServiceError
from ..services import SERVICES
from ..world import World
from ._logs import SCOPE_USER_ID, install_access_log, note_user
from ._settings import AppState, ServerHub, ServerSettings, origin_allowed
from ._web import COOKIE_PREFIX, WebAuth, install_web_routes

__all__ = [
    "bearer",
    "create_app",
    "error_response",
    "health_answer",
    "http_error_response",
    "metrics_answer",
    "parse_query",
]

log = logging.getLogger("agor_actors.server")
security_log = logging.getLogger("agor_actors.security")


# ---------------------------------------------------------------- query strings

_INT_RE: Final = re.compile(r"-?(0|[1-9][0-9]*)")
_FLOAT_RE: Final = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_KEY_RE: Final = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_LIST_OPS: Final = frozenset({"$in", "$nin"})
_SCALAR_OPS: Final = frozenset({"$ne", "$gt", "$gte", "$lt", "$lte"})


_TEXT_GUESSED: Final = ": expected str, got "
_QUOTE_HINT: Final = (
    " (a query-string value that reads as a number, true, false or null is taken as"
    ' one; put it in double quotes for the text: name="1")'
)


def _bad_query(message: str) -> ServiceError:
    return ServiceError("bad_request", f"query string: {message}")


def _scalar(text: str) -> Any:
    """A query-string value: ``null``, ``true``, ``false`` and numbers are
    converted; ``"..."`` (JSON-quoted) is the string inside; anything else is
    the string as is."""
    if text == "null":
        return None
    if text == "true":
        return True
    if text == "false":
        return False
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        value = float(text)
        if math.isfinite(value):
            return value
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            decoded = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise _bad_query(f"bad quoted string {text!r:.60}") from None
        if isinstance(decoded, str):
            return decoded
    return text


def _items(text: str) -> list[str]:
    return [part for part in text.split(",") if part != ""]


def _int_param(name: str, text: str) -> int:
    if not _INT_RE.fullmatch(text):
        raise _bad_query(f"{name} must be an integer, got {text!r:.60}")
    return int(text)


def parse_query(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """A ``find`` query from a query string's ``(key, value)`` pairs.

    ``col=value`` (equality; repeated: ``$in``), ``col[$op]=value`` with
    ``$ne $gt $gte $lt $lte``, ``col[$in]=a,b`` (or repeated ``col[$in][]=``),
    ``$limit=10``, ``$cursor=...``, ``$total=true``, ``$select=a,b``,
    ``$sort[col]=-1`` or ``$sort=-created_at,id``; ``$query=<JSON object>``
    for anything the short forms cannot say (merged under the others).
    Values: see :func:`_scalar`."""
    query: dict[str, Any] = {}
    equal: dict[str, list[Any]] = {}
    for key, value in pairs:
        match = _KEY_RE.match(key)
        if match is None:
            raise _bad_query(f"bad key {key!r:.60}")
        name = match.group(1)
        path = re.findall(r"\[([^\[\]]*)\]", match.group(2))
        if name == "$query" and not path:
            try:
                extra = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise _bad_query(f"$query is not JSON: {exc}") from None
            if not isinstance(extra, dict):
                raise _bad_query("$query must be a JSON object")
            for extra_key, extra_value in extra.items():
                query.setdefault(extra_key, extra_value)
        elif name == "$limit" and not path:
            query["$limit"] = _int_param("$limit", value)
        elif name == "$cursor" and not path:
            query["$cursor"] = value
        elif name == "$total" and not path:
            if value not in ("", "true", "false", "1", "0"):
                raise _bad_query("$total must be true or false")
            query["$total"] = value in ("", "true", "1")
        elif name == "$select" and path in ([], [""]):
            query.setdefault("$select", []).extend(_items(value))
        elif name == "$sort":
            sort = query.setdefault("$sort", {})
            if not path:
                for item in _items(value):
                    column = item.lstrip("+-")
                    sort[column] = -1 if item.startswith("-") else 1
            elif len(path) == 1 and path[0]:
                direction = _int_param(f"$sort[{path[0]}]", value)
                if direction not in (1, -1):
                    raise _bad_query(f"$sort[{path[0]}] must be 1 or -1")
                sort[path[0]] = direction
            else:
                raise _bad_query(f"bad key {key!r:.60}")
        elif name.startswith("$"):
            raise _bad_query(f"unknown parameter {name!r:.60}")
        elif not path:
            equal.setdefault(name, []).append(_scalar(value))
        elif path[0] in _LIST_OPS and path[1:] in ([], [""]):
            operators = query.setdefault(name, {})
            if not isinstance(operators, dict):
                raise _bad_query(f"{name} has both a value and operators")
            operators.setdefault(path[0], []).extend(_scalar(v) for v in _items(value))
        elif path[0] in _SCALAR_OPS and len(path) == 1:
            operators = query.setdefault(name, {})
            if not isinstance(operators, dict):
                raise _bad_query(f"{name} has both a value and operators")
            operators[path[0]] = _scalar(value)
        else:
            raise _bad_query(f"bad key {key!r:.60}")
    for name, values in equal.items():
        if name in query:
            raise _bad_query(f"{name} has both a value and operators")
        query[name] = values[0] if len(values) == 1 else {"$in": values}
    return query


# ------------------------------------------------------------------- the app


def _json(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)
    response = Response(body, status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def error_response(code: str, message: str, status: int, data: Any = None) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return _json({"code": code, "message": message, "data": data}, status, headers)


def _service_error(exc: ServiceError) -> Response:
    return error_response(exc.code, exc.message, exc.http_status, exc.data)


def _own_routes(app: Quart) -> dict[str, list[str]]:
    """The app's paths of its own (``/health``, ``/auth/me``...: the rules
    without a variable part, beside the services' ``/<service>...``) and
    their methods, read once from its routes."""
    own: dict[str, list[str]] | None = app.extensions.get("agor_own_routes")
    if own is None:
        methods: dict[str, set[str]] = {}
        for rule in app.url_map.iter_rules():
            if not rule.arguments:
                methods.setdefault(rule.rule, set()).update(rule.methods or ())
        own = {path: sorted(m - {"HEAD", "OPTIONS"}) for path, m in methods.items()}
        app.extensions["agor_own_routes"] = own
    return own


_HTTP_CODES: Final = {
    404: "not_found",
    405: "unknown_method",
    408: "timeout",
    413: "too_large",
}


def _own_methods(app: Quart) -> list[str] | None:
    """The methods of the request's path if it is one of the app's own."""
    return _own_routes(app).get(request.path.rstrip("/") or "/")


def _not_own(app: Quart) -> None:
    """A service route matched one of the app's own paths (``POST /health``,
    ``GET /auth/logout``): a wrong method there, not a call of a service."""
    own = _own_methods(app)
    if own is not None:
        raise MethodNotAllowed(valid_methods=own)


def http_error_response(exc: HTTPException) -> Response:
    status = exc.code or 500
    own = _own_methods(current_app)
    if isinstance(exc, MethodNotAllowed) and own is None:
        first = request.path.strip("/").partition("/")[0]
        if first not in SERVICES:
            # the shape of /<service>/<id>/<method>, but no service: a 405
            # naming the methods of that shape would mislead
            message = f"no such path: services are at /<service>: {', '.join(SERVICES)}"
            return error_response(_HTTP_CODES[404], message, 404)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        # what is allowed instead, in words and in ``Allow`` (RFC 9110);
        # on the daemon's own paths, theirs (not the services' alike shape)
        allowed = own or sorted(m for m in exc.valid_methods if m != "HEAD")
        message = (
            f"{request.method} is not allowed on {request.path}; allowed: {', '.join(allowed)}"
        )
        if own is None and request.method == "DELETE" and allowed == ["GET", "POST"]:
            message += " (a record is removed at /<service>/<id>)"
        elif own is None and allowed == ["POST"]:
            message += " (a custom method is called with POST)"
        response = error_response(_HTTP_CODES[405], message, 405)
        response.headers["Allow"] = ", ".join(allowed)
        return response
    return error_response(
        _HTTP_CODES.get(status, "bad_request"), exc.description or exc.name, status
    )


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def metrics_answer(
    hub: ServerHub, settings: ServerSettings, principal: Callable[[], Awaitable[Principal]]
) -> Response:
    """``GET /metrics``: Prometheus text for the ``metrics_token`` as a
    Bearer token, or for the owner (``principal`` says who asks)."""
    scrape = settings.metrics_token
    token = bearer(request.headers.get("Authorization"))
    if scrape is None or token is None or not hmac.compare_digest(token, scrape):
        try:
            if not (await principal()).is_owner:
                raise ServiceError("forbidden", "only the owner may read the metrics")
        except ServiceError as exc:
            return _service_error(exc)
    body = generate_latest(hub.metrics.registry)
    return Response(body, status=200, content_type=CONTENT_TYPE_LATEST)


CONNECTIONS_SHOWN: Final = 100
CONNECTIONS_SHOWN_MAX: Final = 1000


def busiest_connections(state: AppState, limit: int) -> dict[str, Any]:
    """``GET /debug/connections``: the ``limit`` busiest connections that got
    through ``hello`` (the deepest outboxes first, then the most frames sent
    and received), and how many there are in all."""
    rows = [c.statistics() for c in state.connections if c.connection_id is not None]
    rows.sort(
        key=lambda r: (
            -r["outbox_messages"],
            -(r["frames_sent"] + r["frames_received"]),
            r["connection_id"],
        )
    )
    return {"total": len(rows), "connections": rows[:limit]}


def health_answer(state: AppState) -> Response:
    """``GET /health``: 200 with the open connections, 503 while draining."""
    if state.draining:
        return _json({"status": "draining"}, 503)
    return _json({"status": "ok", "connections": len(state.connections)})


_HTTP_METHODS: Final = {
    ("GET", False): "find",
    ("POST", False): "create",
    ("GET", True): "get",
    ("PATCH", True): "patch",
    ("PUT", True): "update",
    ("DELETE", True): "remove",
}
_ROUTE_OF: Final = {
    method: f"{verb} /<service>{'/<id>' if has_id else ''}"
    for (verb, has_id), method in _HTTP_METHODS.items()
}
"""Where each standard method is called: not as a custom method."""


def create_app(hub: ServerHub, world: World, settings: ServerSettings | None = None) -> QuartTrio:
    """The quart-trio app serving ``hub``.  ``app.extensions["agor"]`` holds
    its :class:`AppState` (for :meth:`AppState.drain`)."""
    settings = settings or ServerSettings()
    app = QuartTrio("agor_actors.server")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["BODY_TIMEOUT"] = settings.http_body_timeout_s
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    state = AppState(hub=hub, world=world, settings=settings)
    hub.on_sign_out(state.signed_out)
    app.extensions["agor"] = state
    install_access_log(app, world.clock)  # first: its clock starts before other hooks

    @app.before_request
    async def _check_origin() -> Response | None:
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, state.origins):
            security_log.warning(
                "origin refused",
                extra={"transport": "http", "origin": (origin or "")[:200], "path": request.path},
            )
            return error_response("forbidden", "origin not allowed", 403)
        if state.draining and request.path != "/health":
            return error_response("unavailable", "the server is shutting down", 503)
        return None

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        return http_error_response(exc)

    async def _principal() -> Principal:
        token = bearer(request.headers.get("Authorization"))
        cookie = state.web.principal_from_request() if state.web and token is None else None
        if cookie is not None:
            confirmed = await hub.confirm(cookie)
            if confirmed is None:
                raise ServiceError("not_authenticated", "this sign-in is no longer valid")
            note_user(request.scope, confirmed.user_id)
            return confirmed
        if token is None:
            if state.web and any(n.startswith(COOKIE_PREFIX) for n in request.cookies):
                raise ServiceError(
                    "not_authenticated",
                    "the sign-in cookie is not valid here (expired, or signed with another"
                    " daemon's web-secret): sign in again (agor-actors open)",
                )
            raise ServiceError("not_authenticated", "Authorization: Bearer <token> required")
        principal = await hub.authenticate(token)
        if principal is None:
            security_log.info("token refused", extra={"transport": "http", "path": request.path})
            raise ServiceError("not_authenticated", "invalid token")
        note_user(request.scope, principal.user_id)  # for the access log
        return principal

    async def _body() -> Any:
        raw = await request.get_data(cache=False, as_text=False)
        if not raw:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ServiceError("bad_json", f"the body is not JSON: {exc}") from None

    def _base_rev() -> int | None:
        header = request.headers.get("If-Match")
        if header is None:
            return None
        if header.strip() == "*":  # any current representation: the record exists
            return None
        text = header.strip().removeprefix("W/").strip('"')
        if not _INT_RE.fullmatch(text):
            raise ServiceError("bad_request", "If-Match must be a revision number")
        return int(text)

    async def _service(service: str, id: str | None = None, method: str | None = None) -> Response:
        query: dict[str, Any] | None = None
        try:
            principal = await _principal()
            verb = request.method
            data: Any = None
            base_rev: int | None = None
            if method is None:
                method = _HTTP_METHODS.get((verb, id is not None))
                if method is None:
                    raise ServiceError("unknown_method", f"{verb} is not allowed here")
            elif method in _ROUTE_OF:  # POST /sessions/<id>/remove is no path
                raise ServiceError(
                    "not_found",
                    f"no such path: {method} is not a custom method; it is {_ROUTE_OF[method]}",
                )
            if verb == "GET" and id is None:
                query = parse_query(request.args.items(multi=True))
            elif verb in ("POST", "PATCH", "PUT"):
                data = await _body()
            if verb in ("PATCH", "PUT", "DELETE"):
                base_rev = _base_rev()
            result = await hub.call(
                principal,
                connection_id=None,
                service=service,
                method=method,
                id=id,
                data=data,
                query=query,
                base_rev=base_rev,
                idempotency_key=request.headers.get("Idempotency-Key") if verb != "GET" else None,
                if_match=base_rev is not None,
            )
        except ServiceError as exc:
            if exc.code == "conflict" and request.headers.get("If-Match") is not None:
                # a stale If-Match is a failed precondition (RFC 9110)
                return error_response(exc.code, exc.message, 412, exc.data)
            if query is not None and exc.code == "invalid_field" and _TEXT_GUESSED in exc.message:
                exc = ServiceError(exc.code, exc.message + _QUOTE_HINT, exc.data)
            return _service_error(exc)
        except HTTPException as exc:  # the body was too large, the client went away...
            return http_error_response(exc)
        except Exception:
            log.exception(
                "%s %s failed",
                request.method,
                request.path,
                extra={
                    "user_id": request.scope.get(SCOPE_USER_ID),
                    "service": service,
                    "method": method,
                    "id": id,
                },
            )
            return error_response("internal", "internal error", 500)
        headers: dict[str, str] = {}
        if isinstance(result, dict) and result.pop("_replayed", False):
            headers["Idempotent-Replayed"] = "true"  # as Stripe's API says it
        if isinstance(result, dict) and type(result.get("rev")) is int:
            headers["ETag"] = f'"{result["rev"]}"'
        status = 201 if method == "create" and request.method == "POST" and id is None else 200
        return _json(result, status, headers)

    @app.route("/health", methods=["GET"])
    async def health() -> Response:
        return health_answer(state)

    async def _owner(what: str) -> None:
        """Raise unless the owner asks (``what``: what only the owner may see)."""
        if not (await _principal()).is_owner:
            raise ServiceError("forbidden", f"only the owner may see {what}")

    @app.route("/debug/actors", methods=["GET"])
    async def debug_actors() -> Response:
        try:
            await _owner("the actors")
        except ServiceError as exc:
            return _service_error(exc)
        return _json(hub.snapshot())

    @app.route("/debug/connections", methods=["GET"])
    async def debug_connections() -> Response:
        try:
            await _owner("the connections")
            limit = _int_param("limit", request.args.get("limit", str(CONNECTIONS_SHOWN)))
            if not 1 <= limit <= CONNECTIONS_SHOWN_MAX:
                raise ServiceError("bad_request", f"limit must be 1 to {CONNECTIONS_SHOWN_MAX}")
        except ServiceError as exc:
            return _service_error(exc)
        return _json(busiest_connections(state, limit))

    @app.route("/metrics", methods=["GET"])
    async def metrics() -> Response:
        if settings.metrics_port is not None:
            return error_response("not_found", "the metrics are served on the metrics port", 404)
        return await metrics_answer(hub, settings, _principal)

    state.web = WebAuth(world, settings.data_dir, codes=hub)
    install_web_routes(app, state.web, _principal, hub)

    @app.route("/authentication", methods=["POST", "DELETE"])
    async def authentication() -> Response:
        """Sign in or refresh (POST), sign out (DELETE): no token needed."""
        try:
            data = await _body()
            method = "create" if request.method == "POST" else "remove"
            result = await hub.authentication(method, data)
        except ServiceError as exc:
            return _service_error(exc)
        except HTTPException as exc:
            return http_error_response(exc)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error_response("internal", "internal error", 500)
        if isinstance(result, dict) and isinstance(result.get("user"), dict):
            note_user(request.scope, str(result["user"].get("id")))
        return _json(result, 201 if method == "create" else 200, {"Cache-Control": "no-store"})

    @app.route("/<service>", methods=["GET", "POST"])
    async def collection(service: str) -> Response:
        _not_own(app)
        return await _service(service)

    @app.route("/<service>/<id>", methods=["GET", "PATCH", "PUT", "DELETE"])
    async def resource(service: str, id: str) -> Response:
        _not_own(app)
        return await _service(service, id)

    @app.route("/<service>/<id>/<method>", methods=["POST"])
    async def custom(service: str, id: str, method: str) -> Response:
        return await _service(service, id, method)

    return app
