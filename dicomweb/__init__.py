"""DICOMweb (PS3.18): QIDO-RS search and WADO-RS retrieve over the archive's one query engine and blob store."""

from __future__ import annotations

from fastapi import APIRouter

from dicomweb import qido, wado
from dicomweb.urls import PREFIX
from storage.ingest import Archive


def router(archive: Archive, ae_title: str) -> APIRouter:
    api = APIRouter(prefix=PREFIX)
    api.include_router(qido.router(archive, ae_title))
    api.include_router(wado.router(archive))
    return api
