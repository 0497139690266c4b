"""Access tokens, passwords and refresh verdicts: the pure parts of
``agor_actors.identity``, with real keys and real argon2."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from argon2 import PasswordHasher, profiles
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agor_actors.domain import Principal, SignOut
from agor_actors.identity import (
    AccessTokens,
    IdentityConfig,
    IdentityConfigError,
    JwtKeys,
    Passwords,
    RefreshVerdict,
    TokenRefused,
    check_password,
    judge_refresh,
    looks_like_jwt,
)

NOW_MS = 1_767_225_600_000
OWNER_CLAIMS = {
    "sub": "owner",
    "aud": "agor",
    "iss": "agor-actors",
    "exp": 2**40,
    "iat": 0,
    "jti": "j",
}
SECRET = "k" * 48


def _tokens(**kw: object) -> AccessTokens:
    return AccessTokens(JwtKeys.hs256(SECRET), **kw)  # type: ignore[arg-type]


def _refused(tokens: AccessTokens, token: str, now_ms: int = NOW_MS) -> str:
    with pytest.raises(TokenRefused) as caught:
        tokens.verify(token, now_ms=now_ms)
    return caught.value.reason


def test_a_token_round_trips_with_every_claim() -> None:
    tokens = _tokens()
    token, claims = tokens.issue("u1", now_ms=NOW_MS, jti="j1")
    assert looks_like_jwt(token)
    assert tokens.verify(token, now_ms=NOW_MS + 1000) == claims
    assert claims.expires_ms == NOW_MS + 15 * 60 * 1000
    payload = jwt.decode(token, options={"verify_signature": False})
    assert set(payload) == {"sub", "aud", "iss", "exp", "iat", "jti"}
    assert payload["sub"] == "u1" and payload["jti"] == "j1"


def test_a_token_names_the_password_it_was_issued_under() -> None:
    tokens = _tokens()
    token, claims = tokens.issue("u1", now_ms=NOW_MS, jti="j1", generation="0123abcd0123abcd")
    assert claims.generation == "0123abcd0123abcd"
    assert tokens.verify(token, now_ms=NOW_MS) == claims
    assert jwt.decode(token, options={"verify_signature": False})["gen"] == "0123abcd0123abcd"
    # a token without one verifies with "", one with a non-string is malformed
    bare, _ = tokens.issue("u1", now_ms=NOW_MS, jti="j1")
    assert tokens.verify(bare, now_ms=NOW_MS).generation == ""
    odd = jwt.encode({**OWNER_CLAIMS, "gen": 7}, SECRET, algorithm="HS256")
    assert _refused(tokens, odd) == "malformed"


def test_a_sign_out_ends_what_it_says() -> None:
    jwt_old = Principal("u1", "ada", expires_ms=1, generation="old")
    jwt_new = Principal("u1", "ada", expires_ms=1, generation="new")
    cookie = Principal("u1", "ada", expires_ms=1, session="s")
    own = Principal("u1", "ada", token_id="t-old")  # the user's own token
    unchecked = Principal("u1", "ada", expires_ms=1)  # another service's token
    everyone = [jwt_old, jwt_new, cookie, own, unchecked]
    changed = SignOut("u1", "changed", generation="new", cookies=True)
    assert [changed.ends(p) for p in everyone] == [True, False, True, False, False]
    swept = SignOut("u1", "changed", generation="new")  # another daemon's change
    assert [swept.ends(p) for p in everyone] == [True, False, False, False, False]
    logout = SignOut("u1", "signed out", session="s")  # that browser's only
    others = [*everyone, Principal("u1", "ada", expires_ms=1, session="t")]
    assert [logout.ends(p) for p in others] == [False, False, True, False, False, False]
    removed = SignOut("u1", "removed", removed=True)
    assert all(removed.ends(p) for p in everyone)
    assert not removed.ends(Principal("u2", "bob"))
    assert not changed.ends(Principal("u2", "bob", expires_ms=1, generation="old"))
    # a renewed own token: the connections another own token opened, only
    renewed = SignOut("u1", "renewed", token_id="t-new")
    current = Principal("u1", "ada", token_id="t-new")
    assert [renewed.ends(p) for p in [*everyone, current]] == [
        *(False, False, False, True, False),
        False,
    ]
    embedded = Principal("u1", "ada")  # a program's token: no id, never ended by a renewal
    assert not renewed.ends(embedded) and not changed.ends(embedded)
    assert not renewed.ends(Principal("u2", "bob", token_id="t-old"))


def test_a_forged_signature_is_refused() -> None:
    token, _ = _tokens().issue("u1", now_ms=NOW_MS, jti="j")
    forged = jwt.encode(
        jwt.decode(token, options={"verify_signature": False}), "x" * 48, algorithm="HS256"
    )
    assert _refused(_tokens(), forged) == "bad_signature"
    # the payload changed under the original signature
    head, _, sig = token.split(".")
    body = _b64(json.dumps(OWNER_CLAIMS).encode())
    assert _refused(_tokens(), f"{head}.{body}.{sig}") == "bad_signature"


def test_an_expired_token_is_refused_on_the_callers_clock() -> None:
    tokens = _tokens(ttl_s=60)
    token, _ = tokens.issue("u1", now_ms=NOW_MS, jti="j")
    tokens.verify(token, now_ms=NOW_MS + 59_000)
    assert _refused(tokens, token, NOW_MS + 60_000) == "expired"


def test_a_token_from_the_future_is_refused() -> None:
    tokens = _tokens()
    token, _ = tokens.issue("u1", now_ms=NOW_MS + 3_600_000, jti="j")
    assert _refused(tokens, token) == "not_yet_valid"


def test_wrong_audience_and_issuer_are_refused() -> None:
    token, _ = _tokens(audience="other").issue("u1", now_ms=NOW_MS, jti="j")
    assert _refused(_tokens(), token) == "wrong_audience"
    token, _ = _tokens(issuer="elsewhere").issue("u1", now_ms=NOW_MS, jti="j")
    assert _refused(_tokens(), token) == "wrong_issuer"


def test_alg_none_and_a_missing_claim_are_refused() -> None:
    claims = OWNER_CLAIMS
    unsigned = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    assert _refused(_tokens(), unsigned) == "bad_algorithm"
    partial = {k: v for k, v in claims.items() if k != "jti"}
    assert _refused(_tokens(), jwt.encode(partial, SECRET, algorithm="HS256")) == "malformed"
    assert _refused(_tokens(), "eyJ.not.a-token") == "malformed"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_by_hand(claims: dict[str, object], key: bytes) -> str:
    """An HS256 token keyed with ``key`` (pyjwt refuses to make one with a PEM)."""
    signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(json.dumps(claims).encode())
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_key_pairs_sign_and_a_public_key_only_verifies(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    private, public = _pem(key)
    (tmp_path / "private.pem").write_bytes(private)
    (tmp_path / "public.pem").write_bytes(public)
    signer = IdentityConfig(private_key=tmp_path / "private.pem").access_tokens(None)
    assert signer.keys.algorithm == ("RS256" if kind == "rsa" else "ES256")
    verifier = IdentityConfig(public_key=tmp_path / "public.pem").access_tokens(None)
    assert not verifier.keys.can_sign
    token, claims = signer.issue("u1", now_ms=NOW_MS, jti="j")
    assert verifier.verify(token, now_ms=NOW_MS) == claims
    with pytest.raises(RuntimeError):
        verifier.issue("u1", now_ms=NOW_MS, jti="j")
    # algorithm confusion: an HS256 token keyed with the public key's PEM
    confused = _hs256_by_hand(OWNER_CLAIMS, public)
    assert _refused(verifier, confused) == "bad_algorithm"


def test_bad_key_files_say_what_is_wrong(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(IdentityConfigError, match="cannot read"):
        IdentityConfig(public_key=tmp_path / "missing.pem").access_tokens(None)
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(IdentityConfigError, match="cannot read the key"):
        IdentityConfig(public_key=tmp_path / "junk.pem").access_tokens(None)
    one, _ = _pem(ec.generate_private_key(ec.SECP256R1()))
    _, other = _pem(ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "one.pem").write_bytes(one)
    (tmp_path / "other.pem").write_bytes(other)
    with pytest.raises(IdentityConfigError, match="not the private key's"):
        IdentityConfig(
            private_key=tmp_path / "one.pem", public_key=tmp_path / "other.pem"
        ).access_tokens(None)
    with pytest.raises(IdentityConfigError, match="at least 32"):
        IdentityConfig().access_tokens("short")


def test_passwords_hash_with_the_given_salt_and_verify() -> None:
    passwords = Passwords(PasswordHasher.from_parameters(profiles.CHEAPEST))
    digest = passwords.hash("correct horse", b"0123456789abcdef")
    assert digest.startswith("$argon2id$") and "correct horse" not in digest
    assert passwords.verify(digest, "correct horse")
    assert not passwords.verify(digest, "wrong horse")
    assert not passwords.verify(None, "correct horse")
    assert not passwords.verify("garbage", "correct horse")
    with pytest.raises(ValueError, match="8 to 1024"):
        check_password("short")
    with pytest.raises(ValueError, match="string"):
        check_password(12345678)


def _row(**kw: object) -> dict[str, object]:
    return {"revoked_at": None, "rotated_at": None, "expires_at": NOW_MS + 1, **kw}


def test_refresh_verdicts() -> None:
    assert judge_refresh(None, NOW_MS) is RefreshVerdict.UNKNOWN
    assert judge_refresh(_row(), NOW_MS) is RefreshVerdict.VALID
    assert judge_refresh(_row(expires_at=NOW_MS), NOW_MS) is RefreshVerdict.EXPIRED
    assert judge_refresh(_row(rotated_at=1), NOW_MS) is RefreshVerdict.REUSED
    # revoked wins over rotated: a revoked family stays refused
    assert judge_refresh(_row(rotated_at=1, revoked_at=2), NOW_MS) is RefreshVerdict.REVOKED


def test_the_sign_in_throttle_counts_failures_per_name_in_a_window() -> None:
    from agor_actors.identity import SignInThrottle

    throttle = SignInThrottle(max_failures=3, window_ms=1000, names_max=2)
    for t in (0, 10, 20):
        assert throttle.retry_after_ms("ada", t) == 0
        throttle.failed("ada", t)
    assert throttle.retry_after_ms("ada", 30) == 970  # until the first failure is 1 s old
    assert throttle.retry_after_ms("ada", 1000) == 0  # it left the window
    throttle.failed("ada", 1000)
    assert throttle.retry_after_ms("ada", 1001) == 9
    throttle.succeeded("ada")
    assert throttle.retry_after_ms("ada", 1001) == 0
    # bounded: the least recently failed names are forgotten
    for name in ("a", "b", "c"):
        throttle.failed(name, 0)
    assert len(throttle._failures) == 2 and "a" not in throttle._failures
