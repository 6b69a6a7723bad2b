"""DELETE of studies, series and instances (corrections): index rows and blobs go together."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from dicomweb.lookup import stored_objects
from storage.ingest import Archive, StorageUnavailable
from storage.query import Level, QueryError


def router(archive: Archive) -> APIRouter:
    api = APIRouter(tags=["Delete"])

    def remove(level: Level, filters: dict[str, str]) -> int:
        return archive.delete(stored_objects(archive, level, filters))

    async def run(level: Level, filters: dict[str, str]) -> JSONResponse:
        try:
            removed = await run_in_threadpool(remove, level, filters)
        except QueryError as exc:
            raise HTTPException(400, str(exc)) from exc
        except (SQLAlchemyError, StorageUnavailable) as exc:
            raise HTTPException(503, "database unavailable") from exc
        return JSONResponse({"deleted_instances": removed})

    @api.delete("/studies/{study}", summary="Delete a study")
    async def delete_study(study: str) -> JSONResponse:
        return await run("STUDY", {"StudyInstanceUID": study})

    @api.delete("/studies/{study}/series/{series}", summary="Delete a series")
    async def delete_series(study: str, series: str) -> JSONResponse:
        return await run("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series})

    @api.delete("/studies/{study}/series/{series}/instances/{instance}", summary="Delete an instance")
    async def delete_instance(study: str, series: str, instance: str) -> JSONResponse:
        return await run("IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance})

    return api
