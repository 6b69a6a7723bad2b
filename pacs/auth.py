"""The authentication seam: one FastAPI dependency every data route depends on.

`VNPACS_AUTH=none` (embedded default, HTTP bound to 127.0.0.1): open. `VNPACS_AUTH=token`: a JWT is required, as
`Authorization: Bearer …` or as `?token=…` (image tags send no header), checked against `VNPACS_JWT_SECRET`
(HS256) or the signing keys of an OIDC issuer (`VNPACS_JWKS_URL`, RS/ES/PS algorithms). Roles and audit build on
the `User` this returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from fastapi import HTTPException, Request

from pacs.settings import Settings

ASYMMETRIC = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


@dataclass(frozen=True)
class User:
    subject: str
    claims: dict[str, Any] = field(default_factory=dict)


ANONYMOUS = User("anonymous")


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, reason, headers={"WWW-Authenticate": 'Bearer realm="vnpacs"'})


def authenticator(settings: Settings) -> Callable[[Request], User]:
    """The dependency for `settings`: built once, so JWKS keys are fetched once and cached by PyJWT."""
    if settings.auth == "none":

        def open_access(request: Request) -> User:
            request.state.user = ANONYMOUS
            return ANONYMOUS

        return open_access
    if not settings.jwt_secret and not settings.jwks_url:
        raise ValueError("VNPACS_AUTH=token needs VNPACS_JWT_SECRET or VNPACS_JWKS_URL")
    if settings.jwt_secret and len(settings.jwt_secret.encode()) < 32:
        raise ValueError("VNPACS_JWT_SECRET must be at least 32 bytes (RFC 7518 3.2)")
    jwks = jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=3600) if settings.jwks_url else None
    options: Any = {"require": ["exp"], "verify_aud": bool(settings.jwt_audience)}

    def verify(request: Request) -> User:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else request.query_params.get("token")
        if not token:
            raise _unauthorized("authentication required: Bearer token or ?token=")
        try:
            if jwks is not None and jwt.get_unverified_header(token).get("alg") in ASYMMETRIC:
                key: Any = jwks.get_signing_key_from_jwt(token).key
                algorithms = ASYMMETRIC
            elif settings.jwt_secret:
                key, algorithms = settings.jwt_secret, ["HS256", "HS384", "HS512"]
            else:
                raise jwt.InvalidTokenError("token algorithm not accepted")
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=settings.jwt_audience or None,
                issuer=settings.jwt_issuer or None,
                options=options,
                leeway=30,
            )
        except jwt.ExpiredSignatureError as exc:
            raise _unauthorized("token expired") from exc
        except (jwt.InvalidTokenError, jwt.PyJWKClientError) as exc:
            raise _unauthorized(f"invalid token: {exc}") from exc
        user = User(str(claims.get("sub", "")), claims)
        request.state.user = user  # routers of other packages read who is asking from here
        return user

    return verify
