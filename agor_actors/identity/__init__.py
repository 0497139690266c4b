"""Who is calling: sign-in for people (names and argon2 password hashes),
short-lived JWT access tokens, rotating refresh tokens with reuse detection.
The hub asks it to check access tokens and serves its ``authentication``
service; the local tokens (the owner's, ``users.create``'s) stay the hub's."""

from ._config import IdentityConfig as IdentityConfig
from ._config import IdentityConfigError as IdentityConfigError
from ._passwords import PASSWORD_CHARS_MAX as PASSWORD_CHARS_MAX
from ._passwords import PASSWORD_CHARS_MIN as PASSWORD_CHARS_MIN
from ._passwords import Passwords as Passwords
from ._passwords import check_password as check_password
from ._refresh import RefreshVerdict as RefreshVerdict
from ._refresh import judge_refresh as judge_refresh
from ._service import Authentication as Authentication
from ._throttle import SignInThrottle as SignInThrottle
from ._tokens import AccessClaims as AccessClaims
from ._tokens import AccessTokens as AccessTokens
from ._tokens import JwtKeys as JwtKeys
from ._tokens import TokenRefused as TokenRefused
from ._tokens import key_check_value as key_check_value
from ._tokens import looks_like_jwt as looks_like_jwt
