"""Access tokens: short-lived JWTs (pyjwt), signed with HS256 and a key made
on first start, or RS256/ES256 with a configured key pair, or only verified
(a public key and no private one: another service signs).

Claims: ``sub`` (the user id), ``aud``, ``iss``, ``iat``, ``exp`` (seconds
since the epoch) and ``jti`` (a fresh id); ``gen`` (optional) names the
password the token was issued under, so that a token issued before the
password changed can be refused (:class:`~.Authentication`).  Verification pins the one
configured algorithm (``alg: none`` and algorithm confusion are refused by
pyjwt), requires every claim, checks ``aud`` and ``iss``, and checks ``exp``
and ``iat`` against the caller's ``now_ms`` (the world's wall clock, not
pyjwt's own reading of the time).  Pure: no clock, no randomness.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Final

import attrs
import jwt
from cryptography.hazmat.primitives import serialization

__all__ = [
    "ALGORITHMS",
    "AccessClaims",
    "AccessTokens",
    "JwtKeys",
    "TokenRefused",
    "key_check_value",
    "looks_like_jwt",
]

ALGORITHMS: Final = ("HS256", "RS256", "ES256")
_REQUIRED: Final = ["sub", "aud", "iss", "exp", "iat", "jti"]
CLOCK_SKEW_S: Final = 60
"""How far in the future an ``iat`` may be (another signer's clock)."""


class TokenRefused(Exception):
    """An access token that does not stand for anyone.  ``reason`` is one of
    ``malformed``, ``bad_signature``, ``bad_algorithm``, ``wrong_audience``,
    ``wrong_issuer``, ``expired``, ``not_yet_valid``, ``signed_out`` (issued
    under a password since changed) (for the security log;
    the client is told ``not_authenticated`` whatever it is)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class AccessClaims:
    user_id: str
    jti: str
    issued_ms: int
    expires_ms: int
    generation: str = ""
    """The ``gen`` claim ("" if the token has none)."""


@attrs.frozen
class JwtKeys:
    """The algorithm and its keys; ``signing_key`` None: verify only."""

    algorithm: str
    verify_key: Any = attrs.field(repr=False)
    signing_key: Any = attrs.field(default=None, repr=False)

    @classmethod
    def hs256(cls, secret: str) -> JwtKeys:
        if len(secret) < 32:
            raise ValueError("the HS256 key must have at least 32 characters")
        return cls("HS256", secret, secret)

    @classmethod
    def from_pem(
        cls, algorithm: str, *, private_pem: bytes | None, public_pem: bytes | None
    ) -> JwtKeys:
        """RS256 or ES256 keys from PEM: a private key signs (its public half
        verifies unless ``public_pem`` is given); a public key alone only
        verifies.  Raises :class:`ValueError` for a key that does not fit."""
        if algorithm not in ("RS256", "ES256"):
            raise ValueError(f"a key pair needs RS256 or ES256, not {algorithm}")
        signing: Any = None
        verifying: Any = None
        try:
            if private_pem is not None:
                signing = serialization.load_pem_private_key(private_pem, password=None)
                verifying = signing.public_key()
            if public_pem is not None:
                verifying = serialization.load_pem_public_key(public_pem)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot read the key: {exc}") from None
        if verifying is None:
            raise ValueError("give a private key, a public key or both")
        keys = cls(algorithm, verifying, signing)
        keys._check()
        return keys

    @property
    def can_sign(self) -> bool:
        return self.signing_key is not None

    def verify_material(self) -> bytes:
        """The verifying key as bytes: HS256's secret, or the public key
        (DER)."""
        if isinstance(self.verify_key, str):
            return self.verify_key.encode()
        return bytes(
            self.verify_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def _check(self) -> None:
        """The keys fit the algorithm (and each other): sign and verify once."""
        if self.signing_key is None:
            return
        probe = jwt.encode({"probe": 1}, self.signing_key, algorithm=self.algorithm)
        try:
            jwt.decode(probe, self.verify_key, algorithms=[self.algorithm])
        except jwt.InvalidTokenError:
            raise ValueError("the public key is not the private key's") from None


def key_check_value(key: bytes, *context: str) -> str:
    """A value that is the same for the same ``key`` and ``context``, and
    that tells nothing of the key: an HMAC under it of a fixed text and the
    context (the "key check value" of key ceremonies)."""
    named = "\0".join(("agor-actors key check", *context))
    return hmac.new(key, named.encode(), hashlib.sha256).hexdigest()[:32]


def looks_like_jwt(token: str) -> bool:
    """A compact JWS (three base64url parts, a JSON header): the local
    tokens (one base64url part) never do."""
    return token.count(".") == 2 and token.startswith("eyJ")


@attrs.frozen
class AccessTokens:
    """Issues and verifies the access tokens of one deployment."""

    keys: JwtKeys
    issuer: str = "agor-actors"
    audience: str = "agor"
    ttl_s: int = 15 * 60

    def check_value(self) -> str:
        """A value that is the same on two daemons exactly when each accepts
        the other's tokens (the verifying key, the algorithm, the issuer and
        the audience), and that tells nothing of the key."""
        keys = self.keys
        return key_check_value(keys.verify_material(), keys.algorithm, self.issuer, self.audience)

    def issue(
        self, user_id: str, *, now_ms: int, jti: str, generation: str = ""
    ) -> tuple[str, AccessClaims]:
        """A signed token for ``user_id`` and its claims (``gen``:
        ``generation``, if any).  Raises :class:`RuntimeError` in
        verify-only mode."""
        if not self.keys.can_sign:
            raise RuntimeError("verify-only: no private key to sign with")
        issued_s = now_ms // 1000
        claims = {
            "sub": user_id,
            "aud": self.audience,
            "iss": self.issuer,
            "iat": issued_s,
            "exp": issued_s + self.ttl_s,
            "jti": jti,
        }
        if generation:
            claims["gen"] = generation
        token = jwt.encode(claims, self.keys.signing_key, algorithm=self.keys.algorithm)
        expires_ms = (issued_s + self.ttl_s) * 1000
        return token, AccessClaims(user_id, jti, issued_s * 1000, expires_ms, generation)

    def verify(self, token: str, *, now_ms: int) -> AccessClaims:
        """The claims of a valid token; raises :class:`TokenRefused`."""
        try:
            claims = jwt.decode(
                token,
                self.keys.verify_key,
                algorithms=[self.keys.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": _REQUIRED,
                    "verify_exp": False,  # checked below, on the caller's clock
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise TokenRefused("wrong_audience") from None
        except jwt.InvalidIssuerError:
            raise TokenRefused("wrong_issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused("bad_signature") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRefused("bad_algorithm") from None
        except jwt.InvalidTokenError:
            raise TokenRefused("malformed") from None
        sub, jti, iat, exp = claims["sub"], claims["jti"], claims["iat"], claims["exp"]
        if not (isinstance(sub, str) and sub and isinstance(jti, str)):
            raise TokenRefused("malformed")
        if type(iat) is not int or type(exp) is not int:
            raise TokenRefused("malformed")
        generation = claims.get("gen", "")
        if not isinstance(generation, str):
            raise TokenRefused("malformed")
        if exp * 1000 <= now_ms:
            raise TokenRefused("expired")
        if iat * 1000 > now_ms + CLOCK_SKEW_S * 1000:
            raise TokenRefused("not_yet_valid")
        return AccessClaims(sub, jti, iat * 1000, exp * 1000, generation)
