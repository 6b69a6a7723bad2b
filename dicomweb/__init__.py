"""DICOMweb (PS3.18): QIDO-RS, WADO-RS and STOW-RS over the archive's one query engine, ingest path and blob store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from dicomweb import delete, qido, rendered, stow, wado, wado_uri
from dicomweb.urls import PREFIX
from storage.ingest import Archive


def router(archive: Archive, ae_title: str, spool: Path, dependencies: Sequence[Any] = ()) -> APIRouter:
    """All DICOMweb routes; `spool` is where uploads are written before ingest (the blob store adopts them).

    `dependencies` apply to every route: the application passes its authentication there.
    """
    top = APIRouter(dependencies=list(dependencies))
    top.include_router(wado_uri.router(archive))
    api = APIRouter(prefix=PREFIX)
    api.include_router(qido.router(archive, ae_title))
    api.include_router(rendered.router(archive))
    api.include_router(wado.router(archive))
    api.include_router(stow.router(archive, spool))
    api.include_router(delete.router(archive))
    top.include_router(api)
    return top
