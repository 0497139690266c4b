"""Rotating refresh tokens: what presenting one means.  Pure.

A sign-in starts a *family*; each refresh exchanges the presented token for
the next one of the family (the presented one is marked ``rotated_at``).
Presenting a token that was already rotated means two parties hold it (a
thief, or a replay): the whole family is revoked, and both must sign in
again.  Only the token's SHA-256 is stored.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

__all__ = ["RefreshVerdict", "judge_refresh"]


class RefreshVerdict(enum.Enum):
    VALID = "valid"
    """Rotate it: mark it used, issue the next of its family."""
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REVOKED = "revoked"
    REUSED = "reused"
    """Rotated before: revoke the family."""


def judge_refresh(row: Mapping[str, Any] | None, now_ms: int) -> RefreshVerdict:
    """What the stored ``row`` of a presented refresh token (None: no such
    token) means at ``now_ms``."""
    if row is None:
        return RefreshVerdict.UNKNOWN
    if row["revoked_at"] is not None:
        return RefreshVerdict.REVOKED
    if row["rotated_at"] is not None:
        return RefreshVerdict.REUSED
    if row["expires_at"] <= now_ms:
        return RefreshVerdict.EXPIRED
    return RefreshVerdict.VALID
