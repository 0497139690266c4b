"""The browser's routes: the board page, the JavaScript client, signing in.

=====================================  ==========================================
``GET /``                              the board page (``agor_actors/web/``)
``GET /web/<file>``                    the page's script and style sheet
``GET /client/agor-client.js``         the JavaScript client (an ES module)
``POST /auth/codes``                   a one-time sign-in code for the caller
                                       (``Authorization: Bearer <token>``)
``GET /auth/open?code=<code>``         exchanges the code for a session cookie,
                                       then redirects to the page
``GET /auth/me``                       who the cookie (or token) stands for
``POST /auth/logout``                  clears the cookie, closes its sign-in
=====================================  ==========================================

Signing in, the way Jupyter does it: ``agor-actors open`` asks the daemon
(with the owner's token, or a user's) for a one-time code and prints the
link ``/auth/open?code=...``.  The code is good for ``code_ttl_s`` and once;
the daemon keeps only its SHA-256, in its store (``sign_in_codes``: any
daemon of a cluster takes a link another made; at most ``codes_max``
pending, and ``user_codes_max`` of one user's, so that a user cannot hold
up everyone's sign-in: expired ones are dropped first, then a new one is
refused with 429).  The exchange sets an ``HttpOnly; SameSite=Strict``
cookie signed with a key kept in ``<data_dir>/web-secret`` (mode 0600), so
that it outlives a restart of the daemon, and never holds the token: it names the
user, its expiry and its sign-in (``web_sessions`` in the store, checked
on each request and connection: logging out, a password change and
removing the user close it; the daemons of a cluster share the key: copy
the file).
The WebSocket handshake and the REST routes accept the cookie where they
accept the token (the ``Origin`` check applies to both); deleting the key
file signs every browser out.
"""

from __future__ import annotations

import importlib.resources
import pathlib
from collections.abc import Iterable
from typing import Any, Final, Protocol
from urllib.parse import quote

import attrs
import orjson
from itsdangerous import BadSignature, URLSafeSerializer
from quart import Response, request
from quart_trio import QuartTrio

from ..daemon._token import read_or_create_secret
from ..domain import Principal, ServiceError
from ..identity import key_check_value
from ..store import hash_token
from ..world import World

__all__ = [
    "STATIC_FILES",
    "MemoryCodes",
    "SignInCodes",
    "WebAuth",
    "WebSessions",
    "cookie_name",
    "install_web_routes",
    "web_secret_check",
]

SECRET_FILE: Final = "web-secret"
COOKIE_PREFIX: Final = "agor_session_"
_SALT: Final = "agor-web-session"

STATIC_FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "agor-client.js": "text/javascript; charset=utf-8",
}
"""The files of ``agor_actors/web`` the daemon serves, and their types."""

_PAGE_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    ),
}


def cookie_name(port: int | None) -> str:
    """The session cookie's name for the daemon listening on ``port``:
    cookies are not kept per port, so two daemons on one machine need two
    names."""
    return f"{COOKIE_PREFIX}{port or 0}"


def _read_or_create_secret(data_dir: pathlib.Path, world: World) -> str:
    """The signing key in ``<data_dir>/web-secret`` (created, mode 0600)."""
    return read_or_create_secret(data_dir / SECRET_FILE, lambda: world.entropy.token(32))


def web_secret_check(data_dir: pathlib.Path, world: World) -> str:
    """The check value of the cookie's key in ``<data_dir>/web-secret``
    (created if missing): the same on two daemons exactly when each takes
    the other's cookies, and telling nothing of the key (an HMAC under it)."""
    return key_check_value(_read_or_create_secret(data_dir, world).encode(), _SALT)


class WebSessions(Protocol):
    """Where browsers' sign-ins are kept (the hub's store): a cookie is good
    while its sign-in is open."""

    async def open_web_session(self, principal: Principal, max_age_s: int) -> Principal: ...

    async def close_web_session(self, principal: Principal) -> None: ...

    async def confirm_own(self, principal: Principal, given: Any, *, to: str) -> None: ...


class SignInCodes(Protocol):
    """Where one-time sign-in codes are kept: the hub's store (shared by the
    daemons of a cluster), or :class:`MemoryCodes`."""

    async def new_sign_in_code(
        self,
        principal: Principal,
        next_path: str,
        *,
        ttl_s: float,
        pending_max: int,
        user_pending_max: int,
    ) -> str: ...

    async def take_sign_in_code(self, code: str) -> tuple[Principal, str] | None: ...


@attrs.frozen
class _Code:
    principal: Principal
    expires_s: float
    next_path: str


class MemoryCodes:
    """Sign-in codes in this process's memory (their SHA-256 only)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._codes: dict[str, _Code] = {}

    async def new_sign_in_code(
        self,
        principal: Principal,
        next_path: str,
        *,
        ttl_s: float,
        pending_max: int,
        user_pending_max: int,
    ) -> str:
        now = self.world.clock.now_s()
        for digest in [d for d, c in self._codes.items() if c.expires_s <= now]:
            del self._codes[digest]
        if len(self._codes) >= pending_max:
            raise ServiceError("rate_limited", "too many sign-in links pending; try in a minute")
        mine = sum(1 for c in self._codes.values() if c.principal.user_id == principal.user_id)
        if mine >= user_pending_max:
            raise ServiceError(
                "rate_limited", "too many sign-in links pending for this user; try in a minute"
            )
        code = self.world.entropy.token(24)
        self._codes[hash_token(code)] = _Code(principal, now + ttl_s, next_path)
        return code

    async def take_sign_in_code(self, code: str) -> tuple[Principal, str] | None:
        record = self._codes.pop(hash_token(code), None)
        if record is None or record.expires_s <= self.world.clock.now_s():
            return None
        return record.principal, record.next_path


class WebAuth:
    """One-time codes and the session cookie."""

    def __init__(
        self,
        world: World,
        data_dir: pathlib.Path | None,
        *,
        codes: SignInCodes | None = None,
        code_ttl_s: float = 60.0,
        codes_max: int = 1024,
        user_codes_max: int = 8,
        session_max_age_s: int = 7 * 24 * 3600,
    ) -> None:
        self.world = world
        secret = _read_or_create_secret(data_dir, world) if data_dir else world.entropy.token(32)
        self._serializer = URLSafeSerializer(secret, salt=_SALT)
        self.codes: SignInCodes = codes if codes is not None else MemoryCodes(world)
        self.code_ttl_s = code_ttl_s
        self.codes_max = codes_max
        self.user_codes_max = user_codes_max
        self.session_max_age_s = session_max_age_s

    # ------------------------------------------------------------- codes

    async def new_code(self, principal: Principal, next_path: str = "/") -> str:
        """A one-time code for ``principal``; raises ``ServiceError``
        (``rate_limited``) while ``codes_max`` codes are pending, or
        ``user_codes_max`` of the principal's."""
        return await self.codes.new_sign_in_code(
            principal,
            next_path,
            ttl_s=self.code_ttl_s,
            pending_max=self.codes_max,
            user_pending_max=self.user_codes_max,
        )

    async def redeem(self, code: str) -> tuple[Principal, str] | None:
        """The code's principal and where to go next, once: None if
        unknown, used or expired."""
        if not code or len(code) > 256:
            return None
        return await self.codes.take_sign_in_code(code)

    # ------------------------------------------------------------ cookie

    def cookie_value(self, principal: Principal) -> str:
        """The cookie of ``principal`` and its browser sign-in
        (``principal.session``, which the store keeps)."""
        expires_ms = self.world.wall.now_ms() + self.session_max_age_s * 1000
        payload = {
            "u": principal.user_id,
            "n": principal.name,
            "o": principal.is_owner,
            "e": expires_ms,
            "s": principal.session,
        }
        return str(self._serializer.dumps(payload))

    def principal_of(self, value: str | None) -> Principal | None:
        """The principal a cookie value stands for, or None (missing, forged,
        expired)."""
        if not value:
            return None
        try:
            payload = self._serializer.loads(value)
        except BadSignature:
            return None
        if not isinstance(payload, dict):
            return None
        user_id, name, owner, expires_ms = (payload.get(k) for k in ("u", "n", "o", "e"))
        if not (isinstance(user_id, str) and isinstance(name, str) and isinstance(owner, bool)):
            return None
        if not isinstance(expires_ms, int) or expires_ms <= self.world.wall.now_ms():
            return None
        session = payload.get("s")
        return Principal(
            user_id=user_id,
            name=name,
            is_owner=owner,
            session=session if isinstance(session, str) else None,
        )

    def principal_from_cookies(self, cookies: Iterable[tuple[str, str]]) -> Principal | None:
        """The principal of the first ``agor_session_*`` cookie that this
        daemon signed (another daemon's, on another port, does not verify)."""
        for name, value in cookies:
            if name.startswith(COOKIE_PREFIX):
                principal = self.principal_of(value.strip().strip('"'))
                if principal is not None:
                    return principal
        return None

    def principal_from_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> Principal | None:
        """The cookie's principal from the headers of a WebSocket handshake."""
        pairs: list[tuple[str, str]] = []
        for name, value in headers:
            if name.lower() == b"cookie":
                for part in value.decode("latin-1").split(";"):
                    key, sep, val = part.strip().partition("=")
                    if sep:
                        pairs.append((key, val))
        return self.principal_from_cookies(pairs)

    def principal_from_request(self) -> Principal | None:
        """The cookie's principal of the current quart request."""
        return self.principal_from_cookies(request.cookies.items(multi=True))


def _server_port() -> int | None:
    """The port the current quart request came in on."""
    server = request.scope.get("server")
    return int(server[1]) if server and server[1] is not None else None


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, content_type="application/json")


def _error(code: str, message: str, status: int) -> Response:
    return _json({"code": code, "message": message, "data": None}, status)


def _safe_next(value: Any) -> str:
    """A local path to go to after signing in, of at most 2,048 characters
    (anything else: ``/``)."""
    if (
        isinstance(value, str)
        and len(value) <= 2048
        and value.startswith("/")
        and not value.startswith("//")
        and all(32 < ord(c) < 127 and c != "\\" for c in value)
    ):
        return value
    return "/"


_EXPIRED_PAGE: Final = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>agor: sign-in link expired</title><link rel="stylesheet" href="/web/style.css"></head>
<body class="notice"><main><h1>This sign-in link cannot be used</h1>
<p>It has expired or was already used: each link works once, for a minute.</p>
<p>Run <code>agor-actors open</code> in a terminal for a new one.</p></main></body></html>"""


def install_web_routes(
    app: QuartTrio,
    auth: WebAuth,
    principal: Any,
    sessions: WebSessions,
) -> None:
    """Add the page, the client and the ``/auth`` routes to ``app``.
    ``principal`` is the app's ``async () -> Principal`` (token or cookie;
    raises ``ServiceError``); ``sessions`` keeps the browsers' sign-ins."""
    files: dict[str, bytes] = {}
    package = importlib.resources.files("agor_actors.web")
    for name in STATIC_FILES:
        files[name] = package.joinpath(name).read_bytes()

    def _static(name: str) -> Response:
        response = Response(files[name], status=200, content_type=STATIC_FILES[name])
        for key, value in _PAGE_HEADERS.items():
            response.headers[key] = value
        return response

    @app.route("/", methods=["GET"])
    async def page() -> Response:
        return _static("index.html")

    @app.route("/web/<name>", methods=["GET"])
    async def web_file(name: str) -> Response:
        if name not in STATIC_FILES or name == "agor-client.js":
            return _error("not_found", f"no file {name!r:.60}", 404)
        return _static(name)

    @app.route("/client/agor-client.js", methods=["GET"])
    async def client_module() -> Response:
        return _static("agor-client.js")

    @app.route("/auth/codes", methods=["POST"])
    async def new_code() -> Response:
        try:
            who = await principal()
            raw = await request.get_data(cache=False, as_text=False)
            body = orjson.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise ServiceError("invalid_field", "the body must be a JSON object")
            next_path = _safe_next(body.get("next", "/"))
            # a week's sign-in from an access token or a cookie: the password too
            await sessions.confirm_own(who, body.get("current_password"), to="sign a browser in")
            code = await auth.new_code(who, next_path)
        except orjson.JSONDecodeError as exc:
            return _error("bad_json", f"the body is not JSON: {exc}", 400)
        except ServiceError as exc:
            status = 429 if exc.code == "rate_limited" else exc.http_status
            return _error(exc.code, exc.message, status)
        return _json(
            {
                "code": code,
                "path": f"/auth/open?code={quote(code)}",
                "expires_in_s": auth.code_ttl_s,
                "user_id": who.user_id,
            },
            201,
        )

    @app.route("/auth/open", methods=["GET"])
    async def open_link() -> Response:
        try:
            record = await auth.redeem(request.args.get("code", ""))
        except ServiceError as exc:
            return _error(exc.code, exc.message, exc.http_status)
        if record is None:
            response = Response(_EXPIRED_PAGE, status=400, content_type="text/html; charset=utf-8")
            response.headers["Cache-Control"] = "no-store"
            return response
        response = Response("", status=303)
        principal, next_path = record
        try:
            principal = await sessions.open_web_session(principal, auth.session_max_age_s)
        except ServiceError as exc:
            return _error(exc.code, exc.message, exc.http_status)
        response.headers["Location"] = next_path
        response.set_cookie(
            cookie_name(_server_port()),
            auth.cookie_value(principal),
            max_age=auth.session_max_age_s,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.scheme == "https",
        )
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.route("/auth/me", methods=["GET"])
    async def me() -> Response:
        try:
            who = await principal()
        except ServiceError as exc:
            return _error(exc.code, exc.message, exc.http_status)
        return _json({"user_id": who.user_id, "name": who.name, "is_owner": who.is_owner})

    @app.route("/auth/logout", methods=["POST"])
    async def logout() -> Response:
        signed_in = auth.principal_from_request()
        if signed_in is not None:  # the cookie is refused from now on, wherever it is
            try:
                await sessions.close_web_session(signed_in)
            except ServiceError as exc:
                return _error(exc.code, exc.message, exc.http_status)
        response = _json({"signed_out": True})
        response.delete_cookie(
            cookie_name(_server_port()), path="/", httponly=True, samesite="Strict"
        )
        return response
