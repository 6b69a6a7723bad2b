"""Rendered images and thumbnails (PS3.18 10.4.1.1.3, 10.4.1.1.4): JPEG or PNG, with window, viewport, quality."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from dicomweb.imaging import ImagingError, RenderOptions, render
from dicomweb.lookup import stored_objects
from dicomweb.wado import parse_accept
from storage.blobstore import BlobStoreError
from storage.ingest import Archive
from storage.query import Level, StoredObject

THUMBNAIL = (128, 128)
_TYPES = ("image/jpeg", "image/png")


def _options(request: Request, default_viewport: tuple[int, int] | None) -> RenderOptions:
    params = request.query_params
    wanted = params.get("accept") or request.headers.get("accept")
    media_type = "image/jpeg"
    for media in parse_accept(wanted):
        if media.media_type in _TYPES:
            media_type = media.media_type
            break
        if media.media_type in ("*/*", "image/*"):
            break
    else:
        if wanted:
            raise HTTPException(406, "rendered images are image/jpeg or image/png")
    try:
        quality = int(params.get("quality", "90"))
        window = None
        if params.get("window"):
            center, width, *function = params["window"].split(",")
            window = (float(center), float(width), function[0] if function else "linear")
            if window[1] <= 0:
                raise ValueError("window width must be positive")
        viewport = default_viewport
        if params.get("viewport"):
            vw, vh, *_ = params["viewport"].split(",")
            viewport = (int(vw), int(vh))
            if min(viewport) <= 0:
                raise ValueError("viewport must be positive")
    except ValueError as exc:
        raise HTTPException(400, f"bad rendering parameter: {exc}") from exc
    if not 1 <= quality <= 100:
        raise HTTPException(400, "quality is 1 to 100")
    return RenderOptions(media_type=media_type, quality=quality, window=window, viewport=viewport)


def router(archive: Archive) -> APIRouter:
    api = APIRouter(tags=["WADO-RS rendered"])

    def pick(level: Level, filters: dict[str, str]) -> StoredObject:
        """The instance to show: itself, or the middle instance of a series (first series of a study)."""
        objects = stored_objects(archive, level, filters)
        first_series = [o for o in objects if o.series_instance_uid == objects[0].series_instance_uid]
        return first_series[len(first_series) // 2]

    async def respond(request: Request, obj: StoredObject, frame: int, viewport: tuple[int, int] | None) -> Response:
        options = _options(request, viewport)

        def work() -> bytes:
            with archive.blobs.local_file(obj.blob_key) as path:
                return render(path, frame, options)

        try:
            image = await run_in_threadpool(work)
        except IndexError as exc:
            raise HTTPException(404, str(exc)) from exc
        except ImagingError as exc:
            raise HTTPException(406, str(exc)) from exc
        except BlobStoreError as exc:
            raise HTTPException(503, f"storage unavailable: {exc}") from exc
        return Response(image, media_type=options.media_type, headers={"Cache-Control": "private, max-age=3600"})

    def instance_filters(study: str, series: str, instance: str) -> dict[str, str]:
        return {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}

    @api.get("/studies/{study}/series/{series}/instances/{instance}/rendered", summary="Rendered instance")
    async def rendered(request: Request, study: str, series: str, instance: str) -> Response:
        return await respond(request, pick("IMAGE", instance_filters(study, series, instance)), 1, None)

    @api.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered", summary="Rendered frame")
    async def rendered_frame(request: Request, study: str, series: str, instance: str, frame: int) -> Response:
        return await respond(request, pick("IMAGE", instance_filters(study, series, instance)), frame, None)

    @api.get("/studies/{study}/series/{series}/instances/{instance}/thumbnail", summary="Instance thumbnail")
    async def thumbnail(request: Request, study: str, series: str, instance: str) -> Response:
        return await respond(request, pick("IMAGE", instance_filters(study, series, instance)), 1, THUMBNAIL)

    @api.get("/studies/{study}/series/{series}/thumbnail", summary="Series thumbnail")
    async def series_thumbnail(request: Request, study: str, series: str) -> Response:
        filters = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
        return await respond(request, pick("SERIES", filters), 1, THUMBNAIL)

    @api.get("/studies/{study}/thumbnail", summary="Study thumbnail")
    async def study_thumbnail(request: Request, study: str) -> Response:
        return await respond(request, pick("STUDY", {"StudyInstanceUID": study}), 1, THUMBNAIL)

    return api
