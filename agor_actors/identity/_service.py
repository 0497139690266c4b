"""The ``authentication`` service and the checks of access tokens.

* ``create`` ``{strategy: "local", name, password}``: sign in; answers
  ``{accessToken, refreshToken, expiresAt, refreshExpiresAt, user}``.
  A wrong password and an unknown name get the same ``not_authenticated``
  after the same work.
* ``create`` ``{strategy: "refresh", refreshToken}``: rotate; the same answer
  with a new pair.  A rotated token presented again revokes its family.
* ``remove`` ``{refreshToken}``: sign out: the token's family is revoked.

An access token names the password it was issued under (its ``gen``, a
digest of the password's stored hash, which every change renews): once the
password changes, the tokens issued before are refused (``signed_out``),
as the refresh tokens are revoked.  A daemon that only verifies tokens
(another service signs) does not check it.

Everything the service writes goes through the store's writer (``write``);
it reads through ``World.blocking``.  Security-relevant refusals are logged
to ``agor_actors.security`` with the user id when known, never a secret.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs

from ..domain import Principal, ServiceError
from ..store import Expect, Mutation, SqlStore, StoreConflict, WriteRequest, hash_token
from ..world import World
from ._passwords import Passwords, check_password
from ._refresh import RefreshVerdict, judge_refresh
from ._throttle import SignInThrottle
from ._tokens import AccessTokens, TokenRefused, looks_like_jwt

__all__ = ["Authentication", "Write"]

security_log = logging.getLogger("agor_actors.security")

Write = Callable[[WriteRequest], Awaitable[object]]
"""Commits a request through the store's writer; raises ``StoreError``."""

_REFUSED: Final = "invalid name or password"
_USERS_CACHED_MAX: Final = 4096
_SALT_BYTES: Final = 16


def _password_generation(credential: dict[str, Any] | None) -> str:
    """What names a user's current password in its access tokens: a
    digest of the stored hash (salted afresh at every change); "" for a
    user without one."""
    if credential is None:
        return ""
    return hash_token(str(credential["password_hash"]))[:16]


class Authentication:
    """Sign-in, refresh, sign-out and the check of access tokens."""

    def __init__(
        self,
        world: World,
        store: SqlStore,
        write: Write,
        tokens: AccessTokens,
        *,
        passwords: Passwords | None = None,
        refresh_ttl_s: int = 30 * 24 * 3600,
        throttle: SignInThrottle | None = None,
    ) -> None:
        self.world = world
        self.store = store
        self.write = write
        self.tokens = tokens
        self.passwords = passwords or Passwords()
        self.refresh_ttl_s = refresh_ttl_s
        self.throttle = throttle or SignInThrottle()
        self._users: OrderedDict[str, tuple[Principal, str]] = OrderedDict()
        """The users tokens were checked for: each with its password's
        generation."""
        self._forgets = 0

    # ------------------------------------------------------------ checking

    async def principal(self, token: str) -> Principal | None:
        """The principal an access token (a JWT) stands for, with its expiry;
        None if it is refused (logged with the reason)."""
        try:
            claims = self.tokens.verify(token, now_ms=self.world.wall.now_ms())
        except TokenRefused as exc:
            security_log.info("access token refused", extra={"reason": exc.reason})
            return None
        known = await self.known_user(claims.user_id)
        reason = "no_user"
        if known is not None:
            principal, generation = known
            if not self.tokens.keys.can_sign:  # another service signs: no generation
                return attrs.evolve(principal, expires_ms=claims.expires_ms)
            if claims.generation == generation:
                return attrs.evolve(principal, expires_ms=claims.expires_ms, generation=generation)
            reason = "signed_out"
        security_log.info(
            "access token refused", extra={"reason": reason, "user_id": claims.user_id}
        )
        return None

    def forget(self, user_id: str | None = None) -> None:
        """Forget the cached user ``user_id`` (None: every one), so that its
        next access token reads it again (a removed user is refused); a
        read begun before is made again."""
        self._forgets += 1
        if user_id is None:
            self._users.clear()
        else:
            self._users.pop(user_id, None)

    @staticmethod
    def is_access_token(token: str) -> bool:
        return looks_like_jwt(token)

    async def known_user(self, user_id: str) -> tuple[Principal, str] | None:
        """The user (None: unknown or removed) and its password's generation
        (what its access tokens name), as last read from the store."""
        cached = self._users.get(user_id)
        if cached is not None:
            self._users.move_to_end(user_id)
            return cached
        store, forgets = self.store, self._forgets

        def read() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
            return store.get("users", user_id), store.credential(user_id=user_id)

        row, credential = await self.world.blocking.run(read)
        if forgets != self._forgets:  # a user was forgotten meanwhile: read again
            return await self.known_user(user_id)
        if row is None or row.get("removed_at") is not None:
            return None
        principal = Principal(user_id=row["id"], name=row["name"], is_owner=bool(row["is_owner"]))
        known = (principal, _password_generation(credential))
        self._users[user_id] = known
        if len(self._users) > _USERS_CACHED_MAX:
            self._users.popitem(last=False)
        return known

    # ------------------------------------------------------------- the service

    async def create(self, data: Any) -> dict[str, Any]:
        """``authentication.create``: sign in or refresh (see the module)."""
        if not isinstance(data, dict):
            raise ServiceError("invalid_field", "data must be an object with a strategy")
        strategy = data.get("strategy")
        if strategy == "local":
            return await self._sign_in(data.get("name"), data.get("password"))
        if strategy == "refresh":
            return await self._refresh(data.get("refreshToken"))
        raise ServiceError("invalid_field", "strategy must be local or refresh")

    async def remove(self, data: Any) -> dict[str, Any]:
        """``authentication.remove``: revoke the family of ``refreshToken``."""
        token = data.get("refreshToken") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise ServiceError("invalid_field", "data.refreshToken is required")
        row = await self._refresh_row(token)
        if row is None:
            return {"revoked": 0}
        revoked = await self._revoke(family_id=row["family_id"])
        security_log.info(
            "signed out", extra={"user_id": row["user_id"], "family_id": row["family_id"]}
        )
        return {"revoked": revoked}

    async def _sign_in(self, name: Any, password: Any) -> dict[str, Any]:
        if not isinstance(name, str) or not isinstance(password, str) or not name:
            raise ServiceError("invalid_field", "data.name and data.password are required")
        name = name[:1024]
        self._refuse_if_throttled(name)
        store = self.store
        row = await self.world.blocking.run(lambda: store.credential(login=name))
        stored = None if row is None else str(row["password_hash"])
        ok = await self._verified(name, stored, password)  # (the same work without a row)
        if row is None or not ok:
            security_log.warning(
                "sign-in refused",
                extra={"user_id": None if row is None else row["user_id"], "strategy": "local"},
            )
            raise ServiceError("not_authenticated", _REFUSED)
        user_id = str(row["user_id"])
        now_ms = self.world.wall.now_ms()
        family = self.world.entropy.new_id(now_ms)
        refresh, mutation = self._new_refresh(user_id, family, now_ms)
        await self.write(WriteRequest(mutations=(mutation,)))
        security_log.info("signed in", extra={"user_id": user_id, "family_id": family})
        return await self._answer(user_id, refresh, now_ms)

    async def _verified(self, name: str, stored: str | None, password: str) -> bool:
        """Whether ``password`` matches ``stored`` (None: no such name, after
        the same work), counted for ``name``'s sign-in throttle."""
        passwords = self.passwords
        ok = await self.world.blocking.run(lambda: passwords.verify(stored, password[:4096]))
        if ok:
            self.throttle.succeeded(name)
        else:
            self.throttle.failed(name, self.world.wall.now_ms())
        return ok

    def _refuse_if_throttled(self, name: str) -> None:
        """``rate_limited`` while ``name`` has too many failed sign-ins."""
        wait_ms = self.throttle.retry_after_ms(name, self.world.wall.now_ms())
        if wait_ms:
            security_log.warning("sign-in throttled", extra={"retry_after_ms": wait_ms})
            raise ServiceError(
                "rate_limited",
                f"too many failed sign-ins for this name; try again in {wait_ms // 1000 + 1} s",
                {"retry_after_ms": wait_ms},
            )

    async def _refresh(self, token: Any) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise ServiceError("invalid_field", "data.refreshToken is required")
        row = await self._refresh_row(token)
        now_ms = self.world.wall.now_ms()
        verdict = judge_refresh(row, now_ms)
        if verdict is RefreshVerdict.VALID:
            assert row is not None
            user_id = str(row["user_id"])
            refresh, mutation = self._new_refresh(user_id, str(row["family_id"]), now_ms)
            key = {"id": row["id"]}
            try:
                await self.write(
                    WriteRequest(
                        expect=(
                            Expect("refresh_tokens", key, "rotated_at", None),
                            Expect("refresh_tokens", key, "revoked_at", None),
                        ),
                        mutations=(
                            Mutation("update", "refresh_tokens", key, {"rotated_at": now_ms}),
                            mutation,
                        ),
                    )
                )
            except StoreConflict:
                verdict = RefreshVerdict.REUSED  # another refresh with it won the race
            else:
                return await self._answer(user_id, refresh, now_ms)
        extra = {"reason": verdict.value, "user_id": None if row is None else row["user_id"]}
        if verdict is RefreshVerdict.REUSED:
            assert row is not None
            revoked = await self._revoke(family_id=str(row["family_id"]))
            security_log.warning(
                "refresh token reused: family revoked",
                extra={**extra, "family_id": row["family_id"], "revoked": revoked},
            )
        else:
            security_log.info("refresh token refused", extra=extra)
        raise ServiceError("not_authenticated", "the refresh token is not valid; sign in again")

    async def _refresh_row(self, token: str) -> dict[str, Any] | None:
        store = self.store
        digest = hash_token(token[:1024])
        return await self.world.blocking.run(lambda: store.refresh_token(digest))

    def _new_refresh(self, user_id: str, family: str, now_ms: int) -> tuple[str, Mutation]:
        token = self.world.entropy.token()
        row_id = self.world.entropy.new_id(now_ms)
        values = {
            "token_hash": hash_token(token),
            "family_id": family,
            "user_id": user_id,
            "created_at": now_ms,
            "expires_at": now_ms + self.refresh_ttl_s * 1000,
        }
        return token, Mutation("insert", "refresh_tokens", {"id": row_id}, values)

    async def _answer(self, user_id: str, refresh: str, now_ms: int) -> dict[str, Any]:
        known = await self.known_user(user_id)
        if known is None:
            raise ServiceError("not_authenticated", _REFUSED)
        principal, generation = known
        jti = self.world.entropy.new_id(now_ms)
        access, claims = self.tokens.issue(user_id, now_ms=now_ms, jti=jti, generation=generation)
        return {
            "accessToken": access,
            "refreshToken": refresh,
            "expiresAt": claims.expires_ms,
            "refreshExpiresAt": now_ms + self.refresh_ttl_s * 1000,
            "user": {"id": user_id, "name": principal.name, "is_owner": principal.is_owner},
        }

    async def _revoke(self, *, family_id: str | None = None, user_id: str | None = None) -> int:
        """Revoke the live refresh tokens of a family or of a user."""
        store = self.store
        ids = await self.world.blocking.run(
            lambda: store.live_refresh_tokens(family_id=family_id, user_id=user_id)
        )
        if not ids:
            return 0
        now_ms = self.world.wall.now_ms()
        await self.write(
            WriteRequest(
                mutations=tuple(
                    Mutation("update", "refresh_tokens", {"id": i}, {"revoked_at": now_ms})
                    for i in ids
                )
            )
        )
        return len(ids)

    # ------------------------------------------------------------- passwords

    async def password_mutation(
        self, user_id: str, login: str, password: Any, *, replace: bool = False
    ) -> Mutation:
        """The ``credentials`` row that gives ``user_id`` the sign-in name
        ``login`` and ``password`` (hashed here, off the event loop): for
        ``users.create`` and (``replace``) ``users.patch``.
        Raises ``invalid_field`` for a bad password, ``conflict`` for a
        name another user signs in with."""
        try:
            checked = check_password(password)
        except ValueError as exc:
            raise ServiceError("invalid_field", str(exc)) from None
        store = self.store
        taken = await self.world.blocking.run(lambda: store.credential(login=login))
        if taken is not None and taken["user_id"] != user_id:
            raise ServiceError("conflict", "another user signs in with this name")
        salt = self.world.entropy.token(_SALT_BYTES).encode()[:_SALT_BYTES]
        passwords = self.passwords
        digest = await self.world.blocking.run(lambda: passwords.hash(checked, salt))
        values = {"login": login, "password_hash": digest, "updated_at": self.world.wall.now_ms()}
        return Mutation(
            "upsert" if replace else "insert", "credentials", {"user_id": user_id}, values
        )

    async def check_current_password(
        self, user_id: str, given: Any, *, to: str = "change a password"
    ) -> bool:
        """A user changing its own password names the current one (a stolen
        access token must not be enough to take the account over): refused
        with ``invalid_field`` if missing or wrong, counted against the
        sign-in name as a failed sign-in (``rate_limited`` past the limit).
        False: the user has no password yet, so none to name."""
        store = self.store
        row = await self.world.blocking.run(lambda: store.credential(user_id=user_id))
        if row is None:
            return False
        if not isinstance(given, str) or not given:
            raise ServiceError("invalid_field", f"data.current_password is required to {to}")
        login = str(row["login"])
        self._refuse_if_throttled(login)
        if not await self._verified(login, str(row["password_hash"]), given):
            security_log.warning("password change refused", extra={"user_id": user_id})
            raise ServiceError("invalid_field", "data.current_password is not this user's password")
        return True

    async def password_changed(self, user_id: str) -> None:
        """After a password change: every refresh token of the user is
        revoked; its access tokens issued before are refused from now on
        (here; on the other daemons of a cluster after their next sweep,
        which forgets what they know of users)."""
        self.forget(user_id)
        revoked = await self._revoke(user_id=user_id)
        security_log.info("password changed", extra={"user_id": user_id, "revoked": revoked})
