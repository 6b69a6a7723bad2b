"""DICOMweb (PS3.18): QIDO-RS, WADO-RS and STOW-RS over the archive's one query engine, ingest path and blob store."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from dicomweb import qido, rendered, stow, wado
from dicomweb.urls import PREFIX
from storage.ingest import Archive


def router(archive: Archive, ae_title: str, spool: Path) -> APIRouter:
    """All DICOMweb routes; `spool` is where uploads are written before ingest (the blob store adopts them)."""
    api = APIRouter(prefix=PREFIX)
    api.include_router(qido.router(archive, ae_title))
    api.include_router(rendered.router(archive))
    api.include_router(wado.router(archive))
    api.include_router(stow.router(archive, spool))
    return api
