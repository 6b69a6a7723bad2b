"""URLs as the browser sees them, behind a reverse proxy too (Forwarded, X-Forwarded-Proto/Host/Prefix)."""

from __future__ import annotations

from fastapi import Request

PREFIX = "/dicom-web"


def base_url(request: Request) -> str:
    """The DICOMweb root URL, e.g. https://pacs.benhvien.vn/dicom-web."""
    return public_root(request) + PREFIX


def public_root(request: Request) -> str:
    """The server's root URL as the client sees it, e.g. https://pacs.benhvien.vn (a proxy's prefix included)."""
    headers = request.headers
    proto = host = None
    forwarded = headers.get("forwarded")
    if forwarded:
        first = forwarded.split(",")[0]
        for part in first.split(";"):
            name, _, value = part.strip().partition("=")
            if name.lower() == "proto":
                proto = value.strip('"')
            elif name.lower() == "host":
                host = value.strip('"')
    proto = proto or headers.get("x-forwarded-proto", "").split(",")[0].strip() or request.url.scheme
    host = host or headers.get("x-forwarded-host", "").split(",")[0].strip() or headers.get("host")
    host = host or f"{request.url.hostname}:{request.url.port}"
    prefix = headers.get("x-forwarded-prefix", "").rstrip("/")
    return f"{proto}://{host}{prefix}"
