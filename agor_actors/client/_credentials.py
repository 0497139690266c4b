"""Signing in over HTTP (``POST /authentication``) and keeping a rotating
refresh token: what :func:`~agor_actors.client.connect` needs as
``refresh`` to renew short-lived access tokens.

The request is made with the standard library's HTTP client in a worker
thread (two small requests an access token's lifetime apart; no HTTP
library to add for them).
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

import trio

from ._client import CallError

__all__ = ["Credentials", "sign_in"]

_TIMEOUT_S = 10.0


class Credentials:
    """A signed-in user's tokens.  :meth:`refresh` rotates the refresh
    token and returns the new access token (pass it as ``connect``'s
    ``refresh``); :meth:`sign_out` revokes the family."""

    def __init__(
        self,
        http_url: str,
        *,
        access_token: str,
        refresh_token: str,
        expires_at: int | None = None,
        user: dict[str, Any] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.http_url = http_url.rstrip("/")
        self.access_token = access_token
        self.refresh_token = refresh_token
        self.expires_at = expires_at
        self.user = user or {}
        self.ssl_context = ssl_context
        self._lock = trio.Lock()

    def _adopt(self, answer: dict[str, Any]) -> None:
        self.access_token = str(answer["accessToken"])
        self.refresh_token = str(answer["refreshToken"])
        expires_at = answer.get("expiresAt")
        self.expires_at = expires_at if isinstance(expires_at, int) else None
        user = answer.get("user")
        self.user = user if isinstance(user, dict) else self.user

    async def refresh(self) -> str:
        """Exchange the refresh token for a new pair; the new access token.
        Raises :class:`CallError` (``not_authenticated``: sign in again)."""
        async with self._lock:  # one rotation at a time: a second would be reuse
            answer = await _post(
                f"{self.http_url}/authentication",
                "POST",
                {"strategy": "refresh", "refreshToken": self.refresh_token},
                self.ssl_context,
            )
            self._adopt(answer)
            return self.access_token

    async def sign_out(self) -> None:
        """Revoke this sign-in's refresh tokens."""
        async with self._lock:
            await _post(
                f"{self.http_url}/authentication",
                "DELETE",
                {"refreshToken": self.refresh_token},
                self.ssl_context,
            )


async def sign_in(
    http_url: str, name: str, password: str, *, ssl_context: ssl.SSLContext | None = None
) -> Credentials:
    """Sign in with a name and password; raises :class:`CallError`
    (``not_authenticated`` for a wrong name or password)."""
    answer = await _post(
        f"{http_url.rstrip('/')}/authentication",
        "POST",
        {"strategy": "local", "name": name, "password": password},
        ssl_context,
    )
    credentials = Credentials(http_url, access_token="", refresh_token="", ssl_context=ssl_context)
    credentials._adopt(answer)
    return credentials


async def _post(
    url: str, method: str, body: dict[str, Any], context: ssl.SSLContext | None
) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )

    def run() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S, context=context) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read()

    try:
        status, raw = await trio.to_thread.run_sync(run)
    except (urllib.error.URLError, OSError) as exc:
        raise CallError("unavailable", f"cannot reach {url}: {exc}") from None
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {}
    if status >= 400 or not isinstance(answer, dict):
        code = answer.get("code", "unavailable") if isinstance(answer, dict) else "unavailable"
        message = answer.get("message", f"HTTP {status}") if isinstance(answer, dict) else ""
        raise CallError(str(code), str(message))
    return answer
