"""How a deployment signs and checks access tokens: the algorithm and its
keys, the issuer, the audience and the lifetimes."""

from __future__ import annotations

import pathlib

import attrs
from argon2 import Parameters, profiles
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from ._tokens import AccessTokens, JwtKeys

__all__ = ["IdentityConfig", "IdentityConfigError"]


class IdentityConfigError(ValueError):
    """The keys cannot be used: a file that cannot be read, a key of the
    wrong kind, a public key that is not the private key's."""


@attrs.frozen(kw_only=True)
class IdentityConfig:
    """``private_key``/``public_key``: PEM files of an RSA (RS256) or P-256
    (ES256) key; neither: HS256 with the daemon's own key (made on first
    start, ``<data_dir>/jwt-secret``); a public key alone: verify only
    (tokens are issued elsewhere, ``authentication`` refuses to sign in)."""

    issuer: str = "agor-actors"
    audience: str = "agor"
    access_ttl_s: int = 15 * 60
    refresh_ttl_s: int = 30 * 24 * 3600
    private_key: pathlib.Path | None = None
    public_key: pathlib.Path | None = None
    password_params: Parameters = profiles.RFC_9106_LOW_MEMORY
    """argon2id's cost (tests use ``argon2.profiles.CHEAPEST``)."""

    @property
    def uses_key_pair(self) -> bool:
        return self.private_key is not None or self.public_key is not None

    def access_tokens(self, hs256_secret: str | None) -> AccessTokens:
        """The token issuer and verifier this config describes (the HS256
        secret is needed only without a key pair).  Raises
        :class:`IdentityConfigError` saying what is wrong with the keys."""
        try:
            keys = self._keys(hs256_secret)
        except OSError as exc:
            raise IdentityConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
        except ValueError as exc:
            raise IdentityConfigError(str(exc)) from None
        return AccessTokens(
            keys, issuer=self.issuer, audience=self.audience, ttl_s=self.access_ttl_s
        )

    def _keys(self, hs256_secret: str | None) -> JwtKeys:
        if self.uses_key_pair:
            private_pem = self.private_key.read_bytes() if self.private_key else None
            public_pem = self.public_key.read_bytes() if self.public_key else None
            keys = JwtKeys.from_pem(
                _algorithm_of(private_pem, public_pem),
                private_pem=private_pem,
                public_pem=public_pem,
            )
        else:
            if hs256_secret is None:
                raise ValueError("HS256 needs the daemon's secret")
            keys = JwtKeys.hs256(hs256_secret)
        return keys


def _algorithm_of(private_pem: bytes | None, public_pem: bytes | None) -> str:
    """RS256 for an RSA key, ES256 for a P-256 one."""
    try:
        if private_pem is not None:
            key: object = load_pem_private_key(private_pem, password=None).public_key()
        else:
            assert public_pem is not None
            key = load_pem_public_key(public_pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot read the key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError("an RSA key needs at least 2048 bits")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ValueError("the key must be RSA (RS256) or EC P-256 (ES256)")
