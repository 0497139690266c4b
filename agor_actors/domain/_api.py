"""What the server and the embedding API see of the daemon's core."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["Principal", "ServiceError", "SignOut", "own_token_id"]


def own_token_id(token_hash: str) -> str:
    """What names a user's own token in :attr:`Principal.token_id` and
    :attr:`SignOut.token_id`: the first 16 hex digits of its stored hash."""
    return token_hash[:16]


@attrs.frozen
class Principal:
    """Who is calling: the local owner (the daemon's token) or a user.
    ``expires_ms``: when the credential it was authenticated with expires
    (wall clock, ms; None: a local token, which does not).  ``session``: the
    browser sign-in a cookie names (None: not a cookie's).  ``generation``:
    the password an access token was issued under (see
    :meth:`SignOut.ends`; None: not an access token's, or one this daemon
    does not check).  ``token_id``: the user's own token it was
    authenticated with (the first 16 hex digits of its ``hash_token``;
    None: not an own token's, or the token of a program that embeds the
    daemon)."""

    user_id: str
    name: str
    is_owner: bool = False
    expires_ms: int | None = attrs.field(default=None, eq=False)
    session: str | None = attrs.field(default=None, eq=False, repr=False)
    generation: str | None = attrs.field(default=None, eq=False, repr=False)
    token_id: str | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class SignOut:
    """The open connections of ``user_id`` to close (``unauthorized``, with
    ``message``): every one if the user was ``removed``; otherwise those an
    access token issued under another password than ``generation`` (the
    current one's, after a change; None: none of them) opened, those a
    browser's sign-in opened if ``cookies`` (all of them) or ``session``
    names it (a browser that logged out), and those an own token other than
    ``token_id`` (the user's current one, after a renewal; None: none of
    them) opened."""

    user_id: str
    message: str
    removed: bool = False
    generation: str | None = None
    cookies: bool = False
    session: str | None = attrs.field(default=None, repr=False)
    token_id: str | None = None

    def ends(self, principal: Principal) -> bool:
        """Whether a connection of ``principal`` is to be closed."""
        if principal.user_id != self.user_id:
            return False
        if self.removed:
            return True
        if principal.session is not None:
            return self.cookies or principal.session == self.session
        if principal.token_id is not None:
            return self.token_id is not None and principal.token_id != self.token_id
        if principal.generation is None or self.generation is None:
            return False
        return principal.generation != self.generation


class ServiceError(Exception):
    """A call or join that failed for a reason the client should see.

    ``code`` is one of the protocol's stable error codes (``not_found``,
    ``conflict``, ``forbidden``, ``invalid_field``, ``bad_request``,
    ``unavailable``, ...); ``data`` carries details (for ``conflict``: the
    current value).  ``http_status`` is what the REST routes answer with."""

    HTTP_STATUS = {
        "not_found": 404,
        "conflict": 409,
        "unauthorized": 401,
        "forbidden": 403,
        "invalid_data": 422,
        "not_authenticated": 401,
        "invalid_field": 400,
        "bad_request": 400,
        "unknown_method": 405,
        "unknown_service": 404,
        "rate_limited": 429,
        "too_many_pending": 429,
        "unavailable": 503,
        "internal": 500,
    }

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data

    @property
    def http_status(self) -> int:
        return self.HTTP_STATUS.get(self.code, 400)
