"""Token mode: every DICOMweb route needs a valid JWT (header or ?token=), HS256 secret or an OIDC issuer's JWKS."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.conftest import StartServer
from tests.services import free_port

SECRET = "bi-mat-cua-benh-vien-dai-hon-32-byte"


def hs256(secret: str, **claims: object) -> str:
    return jwt.encode({"sub": "bs.lan", "exp": int(time.time()) + 300, **claims}, secret, algorithm="HS256")


def test_token_mode_requires_a_valid_token_in_header_or_query(start_server: StartServer) -> None:
    server = start_server("fs-sqlite", VNPACS_AUTH="token", VNPACS_JWT_SECRET=SECRET)
    studies = f"{server.base_url}/dicom-web/studies"
    missing = httpx.get(studies)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert (
        httpx.get(
            studies, headers={"Authorization": f"Bearer {hs256('a-different-secret-of-32-bytes-or-more')}"}
        ).status_code
        == 401
    )
    expired = hs256(SECRET, exp=int(time.time()) - 3600)
    assert "expired" in httpx.get(studies, headers={"Authorization": f"Bearer {expired}"}).json()["detail"]
    good = hs256(SECRET)
    assert httpx.get(studies, headers={"Authorization": f"Bearer {good}"}).status_code == 200
    assert httpx.get(studies, params={"token": good}).status_code == 200  # <img src=…?token=…>
    assert httpx.get(f"{server.base_url}/wado", params={"requestType": "WADO"}).status_code == 401
    assert httpx.post(studies, content=b"x", headers={"Content-Type": "multipart/related"}).status_code == 401
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # liveness stays open


class Jwks:
    """A real HTTP server publishing a JWKS, as an OIDC issuer does; `sign` issues RS256 tokens with its key."""

    def __init__(self, kid: str = "benh-vien-1") -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
        body = json.dumps({"keys": [jwk]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def sign(self, claims: dict[str, object]) -> str:
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def oidc_issuer() -> Iterator[tuple[str, rsa.RSAPrivateKey]]:
    issuer = Jwks()
    try:
        yield issuer.url, issuer.key
    finally:
        issuer.close()


def test_tokens_signed_by_an_oidc_issuer_are_checked_against_its_jwks(
    start_server: StartServer, oidc_issuer: tuple[str, rsa.RSAPrivateKey]
) -> None:
    url, key = oidc_issuer
    server = start_server("fs-sqlite", VNPACS_AUTH="token", VNPACS_JWKS_URL=url, VNPACS_JWT_AUDIENCE="vnpacs")
    claims = {"sub": "bs.hoa", "aud": "vnpacs", "exp": int(time.time()) + 300}
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "benh-vien-1"})
    studies = f"{server.base_url}/dicom-web/studies"
    assert httpx.get(studies, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    other_audience = jwt.encode({**claims, "aud": "other"}, key, algorithm="RS256", headers={"kid": "benh-vien-1"})
    assert httpx.get(studies, headers={"Authorization": f"Bearer {other_audience}"}).status_code == 401
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": "benh-vien-1"})
    assert httpx.get(studies, headers={"Authorization": f"Bearer {forged}"}).status_code == 401
