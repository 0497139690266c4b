"""Passwords: argon2id (argon2-cffi), the salt drawn by the caller (from the
world's entropy).  Verifying a missing user's password costs as much as a
real one's (a dummy hash is verified), so that the time of a refusal does
not tell whether the name exists.  Slow on purpose: call through
``World.blocking.run``."""

from __future__ import annotations

from typing import Final

import attrs
from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["PASSWORD_CHARS_MAX", "PASSWORD_CHARS_MIN", "Passwords", "check_password"]

PASSWORD_CHARS_MIN: Final = 8
PASSWORD_CHARS_MAX: Final = 1024


def check_password(password: object) -> str:
    """``password`` if it is acceptable; raises :class:`ValueError` saying
    what is wrong (never what the password is)."""
    if not isinstance(password, str):
        raise ValueError("password must be a string")
    if not PASSWORD_CHARS_MIN <= len(password) <= PASSWORD_CHARS_MAX:
        raise ValueError(
            f"password must have {PASSWORD_CHARS_MIN} to {PASSWORD_CHARS_MAX} characters"
        )
    return password


@attrs.define
class Passwords:
    """Hashes and verifies with ``hasher`` (RFC 9106's low-memory profile
    unless told otherwise; tests pass ``profiles.CHEAPEST``)."""

    hasher: PasswordHasher = attrs.field(
        factory=lambda: PasswordHasher.from_parameters(profiles.RFC_9106_LOW_MEMORY)
    )
    _dummy: str | None = attrs.field(default=None, init=False)

    def hash(self, password: str, salt: bytes) -> str:
        return self.hasher.hash(password, salt=salt)

    def verify(self, password_hash: str | None, password: str) -> bool:
        """Whether ``password`` matches ``password_hash``; None (no such
        user) is False after the same work as a real check."""
        if password_hash is None:
            if self._dummy is None:
                self._dummy = self.hasher.hash("not a password", salt=b"\0" * 16)
            password_hash = self._dummy
            password = password + "\0"  # never matches
        try:
            return self.hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
